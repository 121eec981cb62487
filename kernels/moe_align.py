"""Sort (token, expert) assignments by local expert and pad each expert's run to the GEMM's M block.

Lifecycle: called once per MoE layer per step, before the grouped GEMMs (``moe_w4a16``). Input is
``topk_local_ids`` [T, K]: the local expert of each assignment, -1 (or anything outside
``[0, num_experts)``) where the expert is not held here. Assignment ``a = t * K + k`` is the flat
index into it. Output (``MoeAlignment``), all int32 on the input's device, no host sync:

- ``expert_counts`` [E]: assignments per local expert;
- ``expert_offsets`` [E+1]: start of each expert's segment after padding each count up to a
  multiple of ``block_m`` (``expert_offsets[E]`` = padded total; an empty expert has length 0);
- ``sorted_ids`` [P]: the assignment at each padded row, ``num_assignments`` (= T*K, the sentinel)
  on padding rows and on rows past the padded total; within an expert, assignments keep their
  flat order (a stable sort, so both implementations agree exactly);
- ``block_expert_ids`` [P / block_m]: the expert of each M block, -1 past the padded total;
- ``num_padded`` [1]: ``expert_offsets[E]`` again, where the GEMM reads it.

P (``max_padded_rows``) is a host-side bound that needs no sync: every non-empty expert adds at
most ``block_m - 1`` padding rows and there are at most min(E, T*K) of them.

Triton (three launches): per-chunk histograms of the ids; one program that scans them into
per-chunk prefixes, counts and padded offsets, labels the M blocks and fills ``sorted_ids`` with
the sentinel; per-chunk scatter of each assignment to offset + prefix + rank within its chunk.
The torch reference computes the same with ``bincount`` and a stable ``argsort``.

Legend: T = tokens, K = top_k, A = T*K assignments, E = local experts, P = padded rows, C = chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from k2serve.kernels.dispatch import Impl, use_triton

CHUNK = 128  # assignments per program in the histogram and scatter kernels
BLOCK_LABEL = 64  # M blocks labelled per loop iteration
BLOCK_FILL = 1024  # sentinel entries written per loop iteration


@dataclass(frozen=True)
class MoeAlignment:
    sorted_ids: torch.Tensor  # [P] int32 assignment per padded row, sentinel = num_assignments
    block_expert_ids: torch.Tensor  # [P / block_m] int32 expert of each M block, -1 past the end
    num_padded: torch.Tensor  # [1] int32 padded total = expert_offsets[E]
    expert_counts: torch.Tensor  # [E] int32
    expert_offsets: torch.Tensor  # [E+1] int32
    block_m: int
    num_assignments: int  # A = T*K, also the sentinel value

    @property
    def max_blocks(self) -> int:
        """M blocks a GEMM grid covers (blocks past ``num_padded`` exit at once)."""
        return self.block_expert_ids.shape[0]


def max_padded_rows(num_assignments: int, num_experts: int, block_m: int) -> int:
    """Host bound P on the padded total, a multiple of ``block_m``."""
    bound = num_assignments + min(num_experts, num_assignments) * (block_m - 1)
    return triton.cdiv(bound, block_m) * block_m


@triton.jit
def _moe_histogram_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations: only constexprs have one
    ids_ptr, chunk_counts_ptr, num_assignments, num_experts, CHUNK: tl.constexpr, BINS: tl.constexpr
):
    # chunk_counts [C, BINS]: row c = per-expert counts of assignments [c*CHUNK, (c+1)*CHUNK)
    chunk = tl.program_id(0)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + offs, mask=offs < num_assignments, other=-1).to(tl.int32)
    ids = tl.where((ids >= 0) & (ids < num_experts), ids, num_experts)  # bin E collects the skipped ones
    tl.store(chunk_counts_ptr + chunk * BINS + tl.arange(0, BINS), tl.histogram(ids, BINS))


@triton.jit
def _moe_offsets_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations: only constexprs have one
    chunk_counts_ptr,
    chunk_prefix_ptr,
    counts_ptr,
    offsets_ptr,
    block_expert_ptr,
    sorted_ids_ptr,
    num_chunks,
    num_experts,
    num_assignments,
    max_padded,
    BLOCK_M: tl.constexpr,
    BINS: tl.constexpr,
    BLOCK_LABEL: tl.constexpr,
    BLOCK_FILL: tl.constexpr,
):
    # One program. Exclusive prefix over chunks per expert, then the padded layout.
    experts = tl.arange(0, BINS)
    is_expert = experts < num_experts
    running = tl.zeros([BINS], dtype=tl.int32)
    for c in range(num_chunks):
        row = tl.load(chunk_counts_ptr + c * BINS + experts)
        tl.store(chunk_prefix_ptr + c * BINS + experts, running)
        running += row
    counts = tl.where(is_expert, running, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)  # [BINS] inclusive; bins >= E add nothing
    total = tl.sum(padded, 0)
    tl.store(counts_ptr + experts, counts, mask=is_expert)
    tl.store(offsets_ptr + experts, ends - padded, mask=is_expert)
    tl.store(offsets_ptr + num_experts, total)

    # The expert of M block j is the number of experts whose segment ends at or before row j*BLOCK_M.
    max_blocks = max_padded // BLOCK_M
    for j0 in range(0, max_blocks, BLOCK_LABEL):
        blocks = j0 + tl.arange(0, BLOCK_LABEL)
        first_row = blocks * BLOCK_M
        done = (ends[None, :] <= first_row[:, None]) & is_expert[None, :]  # [BLOCK_LABEL, BINS]
        label = tl.sum(done.to(tl.int32), 1)
        tl.store(block_expert_ptr + blocks, tl.where(first_row < total, label, -1), mask=blocks < max_blocks)

    # Every row starts as padding; the scatter kernel (launched next) overwrites the real ones.
    for p0 in range(0, max_padded, BLOCK_FILL):
        rows = p0 + tl.arange(0, BLOCK_FILL)
        tl.store(sorted_ids_ptr + rows, tl.full([BLOCK_FILL], 0, tl.int32) + num_assignments, mask=rows < max_padded)


@triton.jit
def _moe_scatter_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations: only constexprs have one
    ids_ptr,
    chunk_prefix_ptr,
    offsets_ptr,
    sorted_ids_ptr,
    num_assignments,
    num_experts,
    CHUNK: tl.constexpr,
    BINS: tl.constexpr,
):
    chunk = tl.program_id(0)
    lane = tl.arange(0, CHUNK)
    offs = chunk * CHUNK + lane
    ids = tl.load(ids_ptr + offs, mask=offs < num_assignments, other=-1).to(tl.int32)
    valid = (ids >= 0) & (ids < num_experts)
    ids = tl.where(valid, ids, num_experts)
    # rank of each assignment among the earlier ones of its chunk with the same expert (stable)
    same_before = (ids[:, None] == ids[None, :]) & (lane[None, :] < lane[:, None])  # [CHUNK, CHUNK]
    rank = tl.sum(same_before.to(tl.int32), 1)
    before = tl.load(chunk_prefix_ptr + chunk * BINS + ids)  # earlier chunks' assignments to that expert
    start = tl.load(offsets_ptr + ids, mask=valid, other=0)
    tl.store(sorted_ids_ptr + start + before + rank, offs, mask=valid)


def moe_align(topk_local_ids: torch.Tensor, num_experts: int, block_m: int, *, impl: Impl = "auto") -> MoeAlignment:
    """Sort and pad the assignments of ``topk_local_ids`` [T, K] (int32/int64) by expert."""
    _check(topk_local_ids, num_experts, block_m)
    if not use_triton(impl, _moe_scatter_kernel, topk_local_ids.device):
        return moe_align_reference(topk_local_ids, num_experts, block_m)
    ids = topk_local_ids.reshape(-1)  # [A] (a view: the check asked for contiguity)
    num_assignments = ids.numel()
    max_padded = max_padded_rows(num_assignments, num_experts, block_m)
    bins = triton.next_power_of_2(num_experts + 1)
    num_chunks = max(triton.cdiv(num_assignments, CHUNK), 1)
    device = ids.device
    chunk_counts = torch.empty(num_chunks, bins, dtype=torch.int32, device=device)  # [C, BINS]
    chunk_prefix = torch.empty(num_chunks, bins, dtype=torch.int32, device=device)  # [C, BINS]
    counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=device)
    sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=device)
    block_expert_ids = torch.empty(max_padded // block_m, dtype=torch.int32, device=device)
    _moe_histogram_kernel[(num_chunks,)](ids, chunk_counts, num_assignments, num_experts, CHUNK=CHUNK, BINS=bins)
    _moe_offsets_kernel[(1,)](
        chunk_counts,
        chunk_prefix,
        counts,
        offsets,
        block_expert_ids,
        sorted_ids,
        num_chunks,
        num_experts,
        num_assignments,
        max_padded,
        BLOCK_M=block_m,
        BINS=bins,
        BLOCK_LABEL=BLOCK_LABEL,
        BLOCK_FILL=BLOCK_FILL,
    )
    _moe_scatter_kernel[(num_chunks,)](
        ids, chunk_prefix, offsets, sorted_ids, num_assignments, num_experts, CHUNK=CHUNK, BINS=bins
    )
    return MoeAlignment(sorted_ids, block_expert_ids, offsets[num_experts:], counts, offsets, block_m, num_assignments)


def moe_align_reference(topk_local_ids: torch.Tensor, num_experts: int, block_m: int) -> MoeAlignment:
    """The same layout with torch ops (bincount, stable argsort, searchsorted); no Python loop."""
    _check(topk_local_ids, num_experts, block_m)
    device = topk_local_ids.device
    flat = topk_local_ids.reshape(-1).long()  # [A]
    num_assignments = flat.numel()
    max_padded = max_padded_rows(num_assignments, num_experts, block_m)
    key = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)  # [A], E = skipped
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]  # [E]
    padded = (counts + block_m - 1) // block_m * block_m
    offsets = torch.cat((counts.new_zeros(1), torch.cumsum(padded, 0)))  # [E+1]
    order = torch.argsort(key, stable=True)  # [A] skipped assignments last
    expert = key[order].clamp(max=num_experts - 1)  # [A]
    unpadded_start = torch.cumsum(counts, 0) - counts  # [E]
    rows = offsets[expert] + torch.arange(num_assignments, device=device) - unpadded_start[expert]  # [A]
    rows = torch.where(key[order] < num_experts, rows, max_padded)  # skipped ones land in a spare row
    sorted_ids = torch.full((max_padded + 1,), num_assignments, dtype=torch.int64, device=device)
    sorted_ids[rows] = order
    first_rows = torch.arange(0, max_padded, block_m, device=device)  # [P / block_m]
    labels = torch.searchsorted(offsets[1:].contiguous(), first_rows, right=True)
    labels = torch.where(first_rows < offsets[-1], labels, -1)
    return MoeAlignment(
        sorted_ids=sorted_ids[:max_padded].int(),
        block_expert_ids=labels.int(),
        num_padded=offsets[-1:].int(),
        expert_counts=counts.int(),
        expert_offsets=offsets.int(),
        block_m=block_m,
        num_assignments=num_assignments,
    )


def _check(topk_local_ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    if topk_local_ids.dim() != 2 or topk_local_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"topk_local_ids must be [T, K] int32/int64, got {tuple(topk_local_ids.shape)} {topk_local_ids.dtype}"
        )
    if not topk_local_ids.is_contiguous():
        raise ValueError("topk_local_ids must be contiguous")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two, got {block_m}")
    if topk_local_ids.numel() + num_experts * block_m >= 2**31:
        raise ValueError("too many assignments for int32 row indices; split the batch")
