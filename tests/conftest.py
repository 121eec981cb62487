"""Session-wide test setup: the Triton interpreter on machines without CUDA, the ``gpu`` marker, and
the ``poison_allocations`` fixture of the kernel tests.

Triton decides between compiling and interpreting a kernel when ``@triton.jit`` runs, i.e. when a
``k2serve.kernels`` module is first imported, not when the kernel is launched. pytest imports this
file before it collects any test module, so setting ``TRITON_INTERPRET=1`` here (only when there
is no CUDA device and nobody chose otherwise) reaches every kernel whichever test file imports it
first. It changes nothing else: the model's ``impl="auto"`` still runs the torch references on
CPU tensors. With a CUDA device the kernels compile and the same kernel tests run on the GPU.

``poison_allocations`` makes every ``torch.empty``-style allocation of a test start as NaN (floats)
or a junk integer, so a kernel that leaves part of an output or scratch buffer unwritten, or reads
a row it should skip, fails loudly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from k2serve.tiny_presets import preset_config
from k2serve.workers.config import ModelConfig

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

POISON_INT = -77


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _poison(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_floating_point():
        tensor.fill_(float("nan"))
    elif tensor.dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
        tensor.fill_(POISON_INT)
    return tensor


@pytest.fixture
def poison_allocations(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every ``torch.empty`` / ``empty_like`` / ``Tensor.new_empty`` in the test starts poisoned."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def poisoned_empty(*args: Any, **kwargs: Any) -> torch.Tensor:
        return _poison(empty(*args, **kwargs))

    def poisoned_empty_like(*args: Any, **kwargs: Any) -> torch.Tensor:
        return _poison(empty_like(*args, **kwargs))

    def poisoned_new_empty(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _poison(new_empty(self, *args, **kwargs))

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    monkeypatch.setattr(torch, "empty_like", poisoned_empty_like)
    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned_new_empty)
    yield


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """Tiny-model tests on one intra-op thread: their ops are far too small to gain from more, and on
    a shared 2-core machine spinning OpenMP workers make them several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny() -> ModelConfig:
    return preset_config("tiny")
