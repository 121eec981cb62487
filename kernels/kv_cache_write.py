"""Write the new tokens' latent rows into their slots of one layer's paged MLA cache.

Lifecycle: called once per attention layer per step, before attention reads the cache. Row t of
``rows`` [T, D] (``[c_kv normalized | k_pe rotated]``, D = kv_lora_rank + qk_rope_head_dim) goes to
slot ``slot_mapping[t]``, i.e. block ``slot // BS``, offset ``slot % BS`` of ``kv_cache``
[NB, BS, D]; a negative slot means "do not write" (a padded row). Rows are converted to the cache
dtype first (the torch ``to``, so both implementations round alike). Pure data movement: the two
implementations agree bit for bit.

Legend: T = new tokens, D = cache row width, NB = blocks, BS = block_size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from k2serve.kernels.dispatch import Impl, use_triton


@triton.jit
def _kv_cache_write_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations: only constexprs have one
    rows_ptr, slots_ptr, cache_ptr, width, block_size, stride_rt, stride_cb, stride_cs, BLOCK_D: tl.constexpr
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot >= 0:
        offs = tl.arange(0, BLOCK_D)
        mask = offs < width
        row = tl.load(rows_ptr + token * stride_rt + offs, mask=mask)
        dst = cache_ptr + (slot // block_size) * stride_cb + (slot % block_size) * stride_cs + offs
        tl.store(dst, row, mask=mask)


def kv_cache_write(
    kv_cache: torch.Tensor, slot_mapping: torch.Tensor, rows: torch.Tensor, *, impl: Impl = "auto"
) -> None:
    """Store ``rows`` [T, D] at ``slot_mapping`` [T] (int64, -1 = skip) of ``kv_cache`` [NB, BS, D], in place."""
    _check(kv_cache, slot_mapping, rows)
    rows = rows.to(kv_cache.dtype)
    if not use_triton(impl, _kv_cache_write_kernel, kv_cache.device):
        kv_cache_write_reference(kv_cache, slot_mapping, rows)
        return
    if rows.shape[0] == 0:
        return
    width = kv_cache.shape[2]
    _kv_cache_write_kernel[(rows.shape[0],)](
        rows,
        slot_mapping,
        kv_cache,
        width,
        kv_cache.shape[1],
        rows.stride(0),
        kv_cache.stride(0),
        kv_cache.stride(1),
        BLOCK_D=triton.next_power_of_2(width),
    )


def kv_cache_write_reference(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, rows: torch.Tensor) -> None:
    """The same write with torch indexing (an index_put over the rows whose slot is >= 0)."""
    _check(kv_cache, slot_mapping, rows)
    keep = slot_mapping >= 0  # [T]
    slots = slot_mapping[keep]
    block_size = kv_cache.shape[1]
    kv_cache[slots // block_size, slots % block_size] = rows[keep].to(kv_cache.dtype)


def _check(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, rows: torch.Tensor) -> None:
    if kv_cache.dim() != 3 or not kv_cache.is_floating_point():
        raise ValueError(f"kv_cache must be a float [NB, BS, D] tensor, got {kv_cache.dtype} {tuple(kv_cache.shape)}")
    if rows.dim() != 2 or rows.shape[1] != kv_cache.shape[2]:
        raise ValueError(f"rows must be [T, {kv_cache.shape[2]}], got {tuple(rows.shape)}")
    if slot_mapping.shape != (rows.shape[0],) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"slot_mapping must be int [{rows.shape[0]}], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}"
        )
    if len({kv_cache.device, slot_mapping.device, rows.device}) != 1:
        raise ValueError("kv_cache, slot_mapping and rows must be on one device")
    if kv_cache.stride(2) != 1 or rows.stride(1) != 1 or not slot_mapping.is_contiguous():
        raise ValueError("the last dimension of kv_cache and rows, and slot_mapping, must be contiguous")
