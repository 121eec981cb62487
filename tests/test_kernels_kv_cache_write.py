"""``kv_cache_write``: the Triton kernel writes exactly the rows the reference writes, bit for bit,
skips slot -1, and leaves every other cache row untouched. Runs under the Triton interpreter on
CPU (conftest.py) or on the GPU."""

from __future__ import annotations

import pytest
import torch
from kernel_fixtures import kernel_device

from k2serve.kernels.kv_cache_write import _kv_cache_write_kernel, kv_cache_write, kv_cache_write_reference

DEVICE = kernel_device(_kv_cache_write_kernel)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [96, 576])
def test_triton_write_equals_reference_bit_for_bit(dtype: torch.dtype, width: int) -> None:
    gen = torch.Generator().manual_seed(width)
    cache = torch.randn(6, 4, width, generator=gen).to(dtype).to(DEVICE)
    rows = torch.randn(7, width, generator=gen).to(dtype).to(DEVICE)
    slots = torch.tensor([3, 22, -1, 0, 9, -1, 23], dtype=torch.int64, device=DEVICE)
    ours, ref = cache.clone(), cache.clone()
    kv_cache_write(ours, slots, rows, impl="triton")
    kv_cache_write_reference(ref, slots, rows)
    assert torch.equal(_bits(ours), _bits(ref))
    flat = ours.view(-1, width)
    assert torch.equal(_bits(flat[[3, 22, 0, 9, 23]]), _bits(rows[[0, 1, 3, 4, 6]]))
    untouched = [s for s in range(24) if s not in (3, 22, 0, 9, 23)]
    assert torch.equal(_bits(flat[untouched]), _bits(cache.view(-1, width)[untouched]))


def test_rows_are_cast_to_the_cache_dtype() -> None:
    cache = torch.zeros(2, 4, 96, dtype=torch.bfloat16, device=DEVICE)
    rows = torch.randn(3, 96, device=DEVICE)
    slots = torch.tensor([1, 5, 7], device=DEVICE)
    ours, ref = cache.clone(), cache.clone()
    kv_cache_write(ours, slots, rows, impl="triton")
    kv_cache_write_reference(ref, slots, rows)
    assert torch.equal(_bits(ours), _bits(ref))


def test_no_rows_is_a_no_op() -> None:
    cache = torch.randn(2, 4, 96, device=DEVICE)
    before = cache.clone()
    kv_cache_write(
        cache, torch.empty(0, dtype=torch.int64, device=DEVICE), torch.empty(0, 96, device=DEVICE), impl="triton"
    )
    assert torch.equal(cache, before)


def test_bad_shapes_are_rejected() -> None:
    cache = torch.zeros(2, 4, 96)
    with pytest.raises(ValueError, match="rows"):
        kv_cache_write(cache, torch.zeros(3, dtype=torch.int64), torch.zeros(3, 95))
    with pytest.raises(ValueError, match="slot_mapping"):
        kv_cache_write(cache, torch.zeros(2, dtype=torch.int64), torch.zeros(3, 96))
