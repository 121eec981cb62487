"""Paged MLA decode attention in the weight-absorbed form, split over the context (split-K).

Lifecycle: called once per attention layer per decode step with one query token per sequence.
The caller has already absorbed ``W_UK`` into the query (``q_latent = q_nope · W_UK``) and rotated
``q_pe``; it applies ``W_UV`` and ``o_proj`` to the returned latent. Nothing is kept between calls.

Math (reference kimi-k2.md §3.2, per sequence b, head h, key t < seq_lens[b]):
``score = (q_latent·c_t + q_pe·k_pe_t) · softmax_scale``, ``p = softmax_t(score)`` in fp32,
``out = Σ_t p_t · c_t``, where cache row t = ``[c_t (R) | k_pe_t (Rp)]`` lives at block
``block_tables[b, t // BS]``, offset ``t % BS``. Entries of a block table past the sequence's
blocks are never read (they may hold anything, -1 included).

Kernels: ``_mla_decode_split_kernel`` — one program per (head group, sequence, split): its
BLOCK_H heads share every key tile it loads (MQA-style: one latent row serves all heads), an
online softmax in fp32 with exp2, partial output normalized by its own sum plus its log-sum-exp
(-inf for an empty split). ``_mla_decode_reduce_kernel`` — one program per (head, sequence):
rescales and sums the splits. A sequence of length 0 yields zeros.

Legend: B = sequences, NH = heads, R = kv_lora_rank, Rp = qk_rope_head_dim, D = R + Rp,
NB = cache blocks, BS = block_size, MB = max blocks per sequence, S = num_kv_splits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from k2serve.kernels.dispatch import Impl, use_triton

LOG2E = 1.4426950408889634
TARGET_PROGRAMS = 264  # ~2 waves on a 132-SM H100
MIN_KEYS_PER_SPLIT = 256
DEFAULT_BLOCK_N, DEFAULT_NUM_WARPS, DEFAULT_NUM_STAGES = 64, 8, 3  # keys a step, warps, pipeline stages
MAX_BLOCK_H = 64  # all 64 heads of a K2 rank in one program: each key tile is read once, not once per head group


@triton.jit
def _mla_decode_split_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations: only constexprs have one
    q_lat_ptr,
    q_pe_ptr,
    cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    part_out_ptr,  # [B, NH, S, R] fp32
    part_lse_ptr,  # [B, NH, S] fp32, log2 units
    num_heads,
    kv_lora_rank,
    rope_dim,
    block_size,
    num_splits,
    scale_log2,  # softmax_scale * log2(e)
    stride_qlb,
    stride_qlh,
    stride_qpb,
    stride_qph,
    stride_cb,
    stride_cs,
    stride_bt,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_h = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    heads = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < num_heads
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < kv_lora_rank
    offs_p = tl.arange(0, BLOCK_P)
    p_ok = offs_p < rope_dim
    q_lat = tl.load(
        q_lat_ptr + seq * stride_qlb + heads[:, None] * stride_qlh + offs_r[None, :],
        mask=h_ok[:, None] & r_ok[None, :],
        other=0.0,
    )  # [BLOCK_H, BLOCK_R]
    q_pe = tl.load(
        q_pe_ptr + seq * stride_qpb + heads[:, None] * stride_qph + offs_p[None, :],
        mask=h_ok[:, None] & p_ok[None, :],
        other=0.0,
    )  # [BLOCK_H, BLOCK_P]

    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    denom = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        k_ok = keys < end
        block = tl.load(block_tables_ptr + seq * stride_bt + keys // block_size, mask=k_ok, other=0).to(tl.int64)
        rows = block * stride_cb + (keys % block_size).to(tl.int64) * stride_cs  # [BLOCK_N] element offsets
        latent = tl.load(cache_ptr + rows[:, None] + offs_r[None, :], mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        k_pe = tl.load(
            cache_ptr + rows[:, None] + kv_lora_rank + offs_p[None, :], mask=k_ok[:, None] & p_ok[None, :], other=0.0
        )
        scores = tl.dot(q_lat, tl.trans(latent), input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_N] fp32
        scores = tl.dot(q_pe, tl.trans(k_pe), scores, input_precision=DOT_PRECISION)
        scores = tl.where(k_ok[None, :], scores * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        denom = denom * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(latent.dtype), latent, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m = m_new

    has_keys = denom > 0.0
    out = acc / tl.where(has_keys, denom, 1.0)[:, None]
    lse = tl.where(has_keys, m + tl.log2(tl.where(has_keys, denom, 1.0)), float("-inf"))
    part = (seq * num_heads + heads) * num_splits + split  # [BLOCK_H] row of [B, NH, S]
    tl.store(part_out_ptr + part[:, None] * kv_lora_rank + offs_r[None, :], out, mask=h_ok[:, None] & r_ok[None, :])
    tl.store(part_lse_ptr + part, lse, mask=h_ok)


@triton.jit
def _mla_decode_reduce_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations: only constexprs have one
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    num_heads,
    kv_lora_rank,
    num_splits,
    stride_ob,
    stride_oh,
    BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    head = tl.program_id(0).to(tl.int64)
    seq = tl.program_id(1).to(tl.int64)
    splits = tl.arange(0, BLOCK_S)
    s_ok = splits < num_splits
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < kv_lora_rank
    base = (seq * num_heads + head) * num_splits
    lse = tl.load(part_lse_ptr + base + splits, mask=s_ok, other=float("-inf"))  # [BLOCK_S]
    m = tl.max(lse, 0)
    m = tl.where(m > float("-inf"), m, 0.0)  # all splits empty (length 0): every weight is exp2(-inf) = 0
    weight = tl.exp2(lse - m)  # empty splits (lse = -inf) weigh 0
    total = tl.sum(weight, 0)
    parts = tl.load(
        part_out_ptr + (base + splits)[:, None] * kv_lora_rank + offs_r[None, :],
        mask=s_ok[:, None] & r_ok[None, :],
        other=0.0,
    )  # [BLOCK_S, BLOCK_R]
    out = tl.sum(parts * weight[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + offs_r, out.to(out_ptr.dtype.element_ty), mask=r_ok)


def default_block_h(num_heads: int) -> int:
    """Heads per program: all of them up to 64 (``tl.dot`` needs at least 16 rows)."""
    return min(MAX_BLOCK_H, max(16, triton.next_power_of_2(num_heads)))


def default_num_kv_splits(num_seqs: int, num_heads: int, max_context: int, block_h: int | None = None) -> int:
    """Splits so that the grid fills the GPU about twice, each split at least 256 keys (host values only)."""
    block_h = block_h or default_block_h(num_heads)
    programs = max(num_seqs * triton.cdiv(num_heads, block_h), 1)
    wanted = triton.cdiv(TARGET_PROGRAMS, programs)
    return max(1, min(wanted, triton.cdiv(max_context, MIN_KEYS_PER_SPLIT), 64))


def mla_decode(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    *,
    num_kv_splits: int | None = None,
    max_seq_len: int | None = None,
    impl: Impl = "auto",
    block_h: int | None = None,
    block_n: int = DEFAULT_BLOCK_N,
    num_warps: int = DEFAULT_NUM_WARPS,
    num_stages: int = DEFAULT_NUM_STAGES,
) -> torch.Tensor:
    """Absorbed MLA decode: q_latent [B, NH, R], q_pe [B, NH, Rp], kv_cache [NB, BS, R+Rp] (same dtype),
    block_tables [B, MB] int32/int64, seq_lens [B] int32/int64 -> latent output [B, NH, R] (q's dtype).

    ``max_seq_len``: an optional host-side bound on ``seq_lens`` (the caller's promise); it picks
    the default split count and trims the reference's gather. Without it the table width is used.
    The tile defaults (all heads up to 64 per program, 64 keys a step, 8 warps, 3 stages) won the
    H100 sweep of docs/BENCHMARKS.md (Kernels) on every cell of 32+ sequences or 32k+ keys by 2-3.7x
    over 16 heads, 32 keys, 4 warps, 2 stages, with no register spills.
    """
    _check_mla(q_latent, q_pe, kv_cache, block_tables, seq_lens)
    if not use_triton(impl, _mla_decode_split_kernel, q_latent.device):
        return mla_decode_reference(
            q_latent, q_pe, kv_cache, block_tables, seq_lens, softmax_scale, max_seq_len=max_seq_len
        )
    num_seqs, num_heads, rank = q_latent.shape
    rope = q_pe.shape[2]
    block_size = kv_cache.shape[1]
    context = max_seq_len if max_seq_len is not None else block_tables.shape[1] * block_size
    block_h = block_h or default_block_h(num_heads)
    splits = num_kv_splits or default_num_kv_splits(num_seqs, num_heads, context, block_h)
    if not 1 <= splits <= 1024:
        raise ValueError(f"num_kv_splits must be in [1, 1024], got {splits}")
    out = q_latent.new_empty(num_seqs, num_heads, rank)
    if num_seqs == 0:
        return out
    part_out = torch.empty(num_seqs, num_heads, splits, rank, dtype=torch.float32, device=q_latent.device)
    part_lse = torch.empty(num_seqs, num_heads, splits, dtype=torch.float32, device=q_latent.device)
    block_r, block_p = triton.next_power_of_2(rank), triton.next_power_of_2(rope)
    precision = "ieee" if q_latent.dtype == torch.float32 else "tf32"
    _mla_decode_split_kernel[(triton.cdiv(num_heads, block_h), num_seqs, splits)](
        q_latent,
        q_pe,
        kv_cache,
        block_tables,
        seq_lens,
        part_out,
        part_lse,
        num_heads,
        rank,
        rope,
        block_size,
        splits,
        softmax_scale * LOG2E,
        q_latent.stride(0),
        q_latent.stride(1),
        q_pe.stride(0),
        q_pe.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        block_tables.stride(0),
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        BLOCK_R=block_r,
        BLOCK_P=block_p,
        DOT_PRECISION=precision,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    _mla_decode_reduce_kernel[(num_heads, num_seqs)](
        part_out,
        part_lse,
        out,
        num_heads,
        rank,
        splits,
        out.stride(0),
        out.stride(1),
        BLOCK_S=triton.next_power_of_2(splits),
        BLOCK_R=block_r,
    )
    return out


def mla_decode_reference(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    *,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """The same attention with torch: gather every sequence's keys up to its table width (or up to
    ``max_seq_len``), mask, fp32 scores, softmax and weighted sum, cast to q's dtype once. Unused
    table entries are redirected to block 0 and their rows zeroed before use, so they are never
    mixed in."""
    _check_mla(q_latent, q_pe, kv_cache, block_tables, seq_lens)
    rank = q_latent.shape[2]
    block_size = kv_cache.shape[1]
    if max_seq_len is not None:
        block_tables = block_tables[:, : -(-max_seq_len // block_size)]
    positions = torch.arange(block_tables.shape[1] * block_size, device=kv_cache.device)  # [L]
    valid = positions[None, :] < seq_lens[:, None].long()  # [B, L]
    blocks = torch.where(valid, block_tables.long()[:, positions // block_size], 0)  # [B, L]
    keys = kv_cache[blocks, positions % block_size].float()  # [B, L, D]
    keys = torch.where(valid[..., None], keys, 0.0)
    scores = torch.einsum("bhr,blr->bhl", q_latent.float(), keys[..., :rank])
    scores = scores + torch.einsum("bhp,blp->bhl", q_pe.float(), keys[..., rank:])  # [B, NH, L]
    scores = (scores * softmax_scale).masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)  # a 0-length sequence gives zeros
    return torch.einsum("bhl,blr->bhr", probs, keys[..., :rank]).to(q_latent.dtype)


def _check_mla(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
) -> None:
    if q_latent.dim() != 3 or q_pe.dim() != 3 or q_latent.shape[:2] != q_pe.shape[:2]:
        raise ValueError(
            f"q_latent [B, NH, R] and q_pe [B, NH, Rp] disagree: {tuple(q_latent.shape)}, {tuple(q_pe.shape)}"
        )
    num_seqs, _, rank = q_latent.shape
    if kv_cache.dim() != 3 or kv_cache.shape[2] != rank + q_pe.shape[2]:
        raise ValueError(f"kv_cache must be [NB, BS, {rank}+{q_pe.shape[2]}], got {tuple(kv_cache.shape)}")
    if not q_latent.dtype == q_pe.dtype == kv_cache.dtype or not kv_cache.is_floating_point():
        raise ValueError(
            f"q_latent, q_pe and kv_cache need one float dtype, got {q_latent.dtype}, {q_pe.dtype}, {kv_cache.dtype}"
        )
    if (
        block_tables.dim() != 2
        or block_tables.shape[0] != num_seqs
        or block_tables.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError(
            f"block_tables must be int [{num_seqs}, MB], got {block_tables.dtype} {tuple(block_tables.shape)}"
        )
    if seq_lens.shape != (num_seqs,) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"seq_lens must be int [{num_seqs}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    tensors = (q_latent, q_pe, kv_cache, block_tables, seq_lens)
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted({str(t.device) for t in tensors})}")
    if q_latent.stride(2) != 1 or q_pe.stride(2) != 1 or kv_cache.stride(2) != 1 or block_tables.stride(1) != 1:
        raise ValueError("the last dimension of q_latent, q_pe, kv_cache and block_tables must be contiguous")
    if not seq_lens.is_contiguous():
        raise ValueError("seq_lens must be contiguous")
