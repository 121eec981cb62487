"""Which implementation a kernel wrapper runs: the Triton kernel or its torch reference.

Rule (DESIGN.md §4): ``impl="auto"`` runs Triton on CUDA tensors and the torch reference on any
other device. ``"triton"`` / ``"torch"`` force one; tests force ``"triton"`` on CPU tensors, which
works only when the kernels were decorated under the Triton interpreter (``TRITON_INTERPRET=1``
set before the ``k2serve.kernels`` modules were imported: Triton reads it when ``@triton.jit``
runs, not when a kernel is launched). There is no module-level switch; every call decides from
its own arguments.
"""

from __future__ import annotations

from typing import Literal

import torch

Impl = Literal["auto", "triton", "torch"]
IMPLS: tuple[Impl, ...] = ("auto", "triton", "torch")


def use_triton(impl: Impl, kernel: object, device: torch.device) -> bool:
    """True when the Triton ``kernel`` should run on tensors living on ``device``.

    Raises ``ValueError`` for an unknown ``impl`` and ``RuntimeError`` when Triton is forced on a
    non-CUDA device while ``kernel`` was compiled for the GPU (no interpreter).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl {impl!r}; expected one of {IMPLS}")
    if impl == "torch" or (impl == "auto" and device.type != "cuda"):
        return False
    if device.type != "cuda" and not is_interpreted(kernel):
        raise RuntimeError(
            f"impl='triton' on {device.type} tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before k2serve.kernels is imported"
        )
    return True


def is_interpreted(kernel: object) -> bool:
    """Whether ``kernel`` was decorated under ``TRITON_INTERPRET=1`` (runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"
