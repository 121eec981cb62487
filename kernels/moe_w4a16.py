"""Routed experts of one MoE layer as W4A16 grouped GEMMs over packed INT4 weights.

Lifecycle: ``fused_moe_w4a16`` is called once per MoE layer per step with this rank's tokens,
their local expert ids and combine weights, and the layer's packed expert stacks (as
``load_weights(..., keep_packed=True)`` returns them). It aligns the assignments by expert
(``moe_align``), runs ``gate_up`` with SiLU·mul fused, runs ``down`` with the combine weight
multiplied in, and sums each token's rows. Nothing is kept between calls.

Weight format (reference kimi-k2.md §2.4): ``packed`` int32 [E, N, Kd/8], 8 nibbles per word
LSB-first (column 8j+i in bits 4i..4i+3), offset binary (q = nibble - 8); ``scale`` [E, N, Kd/G];
``W[e, n, c] = q * scale[e, n, c // G]``. ``w13`` holds gate rows 0..I-1 then up rows I..2I-1.

Kernel: one program computes a [BLOCK_M, BLOCK_N] tile of one M block (all rows belong to one
expert, ``moe_align``). Per BLOCK_K step it loads the packed words [BLOCK_K/8, BLOCK_N] and scales
[BLOCK_K/G, BLOCK_N] once, unpacks and scales them in registers to the activation dtype (the same
fp32-product-then-one-cast rounding as ``dequantize_int4``, so the weights equal the dequantized
reference bit for bit) and accumulates ``tl.dot`` in fp32. Activations are gathered by assignment
(``a // a_row_div``: the token for ``gate_up``, the assignment itself for ``down``) and results are
written by assignment, so padding rows are never read or written. The combine kernel sums each
token's K rows in fp32 in a fixed order (deterministic, no atomics).

Legend: T = tokens, K = top_k, A = T*K assignments, H = hidden_size, I = moe_intermediate_size,
E = local experts, G = group_size, N/Kd = output/input features of one GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from k2serve.kernels.dispatch import Impl, use_triton
from k2serve.kernels.moe_align import moe_align

INT4_OFFSET = 8
DEFAULT_CHUNK_TOKENS = 8192  # bounds the [A, I] and [A, H] scratch buffers of one launch group


@dataclass(frozen=True)
class MoeGemmConfig:
    block_m: int
    block_n: int
    block_k: int  # a multiple of the group size
    num_warps: int = 4
    num_stages: int = 3


def default_config(num_assignments: int, num_experts: int) -> MoeGemmConfig:
    """Decode (few rows per expert) takes small M tiles and long K steps, prefill big M tiles.
    Picked by the H100 sweep of docs/BENCHMARKS.md (Kernels): above 16 rows per expert a 64-row
    tile beat 32 rows by up to 1.8x, and above 1024 rows a 128-row tile beat 64 by 1.3x."""
    per_expert = num_assignments / max(min(num_experts, num_assignments), 1)
    if per_expert <= 16:
        return MoeGemmConfig(block_m=16, block_n=64, block_k=128)
    if per_expert <= 1024:
        return MoeGemmConfig(block_m=64, block_n=64, block_k=64)
    return MoeGemmConfig(block_m=128, block_n=64, block_k=64)


@triton.jit
def _dequantize_tile(  # type: ignore[no-untyped-def]  # Triton reads annotations: only constexprs have one
    words, scales, dtype: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr
):
    # words [BLOCK_K/8, BLOCK_N] int32, scales [BLOCK_K/G, BLOCK_N] -> weights [BLOCK_K, BLOCK_N] in dtype
    shifts = tl.arange(0, 8) * 4
    nibbles = (words[:, None, :] >> shifts[None, :, None]) & 0xF  # [BLOCK_K/8, 8, BLOCK_N], row 8j+i
    q = tl.reshape(nibbles, (BLOCK_K, BLOCK_N)).to(tl.float32) - 8.0
    s = tl.broadcast_to(scales.to(tl.float32)[:, None, :], (BLOCK_K // GROUP, GROUP, BLOCK_N))
    return (q * tl.reshape(s, (BLOCK_K, BLOCK_N))).to(dtype)


@triton.jit
def _moe_w4a16_gemm_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations: only constexprs have one
    a_ptr,  # [rows, Kd] activations
    w_ptr,  # [E, N_total, Kd/8] int32
    s_ptr,  # [E, N_total, Kd/G]
    c_ptr,  # [A, N] output rows by assignment
    sorted_ids_ptr,
    block_expert_ptr,
    num_padded_ptr,
    route_w_ptr,  # [A] fp32 combine weights (read when MUL_ROUTE_WEIGHT)
    N,
    Kd,
    num_assignments,
    a_row_div,
    up_row_offset,  # first row of the up half of w (GATED)
    stride_am,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_cm,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GATED: tl.constexpr,
    MUL_ROUTE_WEIGHT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    ids = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M] assignments
    row_ok = ids < num_assignments
    a_rows = (ids // a_row_div).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_kw = tl.arange(0, BLOCK_K // 8)
    offs_kg = tl.arange(0, BLOCK_K // GROUP)

    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_kw[:, None]
    s_ptrs = s_ptr + expert * stride_se + offs_n[None, :].to(tl.int64) * stride_sn + offs_kg[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, Kd, BLOCK_K):
        left = Kd - k0  # a multiple of GROUP (checked by the wrapper)
        a = tl.load(a_ptrs, mask=row_ok[:, None] & (offs_k[None, :] < left), other=0.0)
        w_mask = (offs_kw[:, None] < left // 8) & n_ok[None, :]
        s_mask = (offs_kg[:, None] < left // GROUP) & n_ok[None, :]
        w = _dequantize_tile(
            tl.load(w_ptrs, mask=w_mask, other=0),
            tl.load(s_ptrs, mask=s_mask, other=0.0),
            a.dtype,
            BLOCK_K,
            BLOCK_N,
            GROUP,
        )
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        if GATED:
            w_up = _dequantize_tile(
                tl.load(w_ptrs + up_row_offset * stride_wn, mask=w_mask, other=0),
                tl.load(s_ptrs + up_row_offset * stride_sn, mask=s_mask, other=0.0),
                a.dtype,
                BLOCK_K,
                BLOCK_N,
                GROUP,
            )
            acc_up = tl.dot(a, w_up, acc_up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // 8
        s_ptrs += BLOCK_K // GROUP

    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up  # SiLU(gate) * up in fp32
    if MUL_ROUTE_WEIGHT:
        acc = acc * tl.load(route_w_ptr + ids, mask=row_ok, other=0.0)[:, None]
    c_ptrs = c_ptr + ids[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _moe_combine_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations: only constexprs have one
    rows_ptr, ids_ptr, out_ptr, H, num_experts, stride_rm, stride_om, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr
):
    # out[t] = sum over k of rows[t*K + k] for the local assignments, in k order, in fp32
    token = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        expert = tl.load(ids_ptr + token * TOP_K + k) + tl.zeros([BLOCK_H], dtype=tl.int32)  # [BLOCK_H] broadcast
        local = h_ok & (expert >= 0) & (expert < num_experts)
        row = tl.load(rows_ptr + (token * TOP_K + k) * stride_rm + offs_h, mask=local, other=0.0)
        acc += row.to(tl.float32)
    tl.store(out_ptr + token * stride_om + offs_h, acc.to(out_ptr.dtype.element_ty), mask=h_ok)


def fused_moe_w4a16(
    hidden_states: torch.Tensor,
    topk_local_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13_packed: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_packed: torch.Tensor,
    w2_scale: torch.Tensor,
    *,
    impl: Impl = "auto",
    config: MoeGemmConfig | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """``out[t] = Σ_k topk_weights[t,k] · Expert_{topk_local_ids[t,k]}(hidden_states[t])`` over ids >= 0.

    hidden_states [T, H] float; topk_local_ids [T, K] int32/int64 (-1 = not held here);
    topk_weights [T, K] fp32; w13_packed int32 [E, 2I, H/8], w13_scale [E, 2I, H/G];
    w2_packed int32 [E, H, I/8], w2_scale [E, H, I/G]. Returns [T, H] in the dtype of hidden_states.
    """
    group = _check_moe(hidden_states, topk_local_ids, topk_weights, w13_packed, w13_scale, w2_packed, w2_scale)
    if not use_triton(impl, _moe_w4a16_gemm_kernel, hidden_states.device):
        return fused_moe_w4a16_reference(
            hidden_states, topk_local_ids, topk_weights, w13_packed, w13_scale, w2_packed, w2_scale
        )
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if w13_packed.shape[0] == 0:  # a rank holding no expert of this layer
        return torch.zeros_like(hidden_states)
    out = torch.empty_like(hidden_states)  # [T, H]
    for start in range(0, hidden_states.shape[0], chunk_tokens):
        end = start + chunk_tokens
        _moe_chunk(
            hidden_states[start:end],
            topk_local_ids[start:end],
            topk_weights[start:end],
            (w13_packed, w13_scale, w2_packed, w2_scale),
            group,
            config,
            out[start:end],
        )
    return out


def _moe_chunk(
    hidden_states: torch.Tensor,
    topk_local_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    group: int,
    config: MoeGemmConfig | None,
    out: torch.Tensor,
) -> None:
    w13_packed, w13_scale, w2_packed, w2_scale = weights
    num_experts, hidden = w2_packed.shape[0], w2_packed.shape[1]
    inter = w13_packed.shape[1] // 2
    num_tokens, top_k = topk_local_ids.shape
    num_assignments = num_tokens * top_k
    cfg = config or default_config(num_assignments, num_experts)
    align = moe_align(topk_local_ids, num_experts, cfg.block_m, impl="triton")
    gated = hidden_states.new_empty(num_assignments, inter)  # [A, I] rows of skipped assignments stay unset
    expert_rows = hidden_states.new_empty(num_assignments, hidden)  # [A, H] weighted expert outputs
    route_weights = topk_weights.reshape(-1)  # [A]
    precision = "ieee" if hidden_states.dtype == torch.float32 else "tf32"
    for a, packed, scale, c, n, kd, a_row_div, is_gate_up in (
        (hidden_states, w13_packed, w13_scale, gated, inter, hidden, top_k, True),
        (gated, w2_packed, w2_scale, expert_rows, hidden, inter, 1, False),
    ):
        grid = (align.max_blocks, triton.cdiv(n, cfg.block_n))
        _moe_w4a16_gemm_kernel[grid](
            a,
            packed,
            scale,
            c,
            align.sorted_ids,
            align.block_expert_ids,
            align.num_padded,
            route_weights,
            n,
            kd,
            num_assignments,
            a_row_div,
            inter,
            a.stride(0),
            packed.stride(0),
            packed.stride(1),
            scale.stride(0),
            scale.stride(1),
            c.stride(0),
            GROUP=group,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_K=max(cfg.block_k, group),
            GATED=is_gate_up,
            MUL_ROUTE_WEIGHT=not is_gate_up,
            DOT_PRECISION=precision,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    block_h = min(1024, triton.next_power_of_2(hidden))
    _moe_combine_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
        expert_rows,
        topk_local_ids,
        out,
        hidden,
        num_experts,
        expert_rows.stride(0),
        out.stride(0),
        TOP_K=top_k,
        BLOCK_H=block_h,
    )


def fused_moe_w4a16_reference(
    hidden_states: torch.Tensor,
    topk_local_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13_packed: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_packed: torch.Tensor,
    w2_scale: torch.Tensor,
) -> torch.Tensor:
    """The same sum in torch: per touched expert, dequantize its weights to the activation dtype and
    run ``down(silu(gate(x)) * up(x))`` on all of its tokens at once; weighted outputs accumulate in
    fp32 and are cast once (the rounding of ``LocalExperts`` with dequantized weights, so both give
    identical results). One host sync for the per-expert counts."""
    group = _check_moe(hidden_states, topk_local_ids, topk_weights, w13_packed, w13_scale, w2_packed, w2_scale)
    num_experts, inter = w13_packed.shape[0], w13_packed.shape[1] // 2
    top_k = topk_local_ids.shape[1]
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)  # [T, H]
    flat = topk_local_ids.reshape(-1).long()  # [A]
    key = torch.where((flat >= 0) & (flat < num_experts), flat, -1)
    order = torch.argsort(key, stable=True)  # skipped first, then by expert
    counts = torch.bincount(key + 1, minlength=num_experts + 1).tolist()  # host sync
    token_of = order // top_k
    weight_of = topk_weights.reshape(-1)[order].float()
    start = counts[0]
    for expert, count in enumerate(counts[1:]):
        if count == 0:
            continue
        rows = token_of[start : start + count]  # [A_e]
        w13 = dequantize_int4_reference(w13_packed[expert], w13_scale[expert], group, hidden_states.dtype)
        w2 = dequantize_int4_reference(w2_packed[expert], w2_scale[expert], group, hidden_states.dtype)
        gate, up = F.linear(hidden_states[rows], w13).split(inter, dim=-1)
        expert_out = F.linear(F.silu(gate) * up, w2)  # [A_e, H]
        out.index_add_(0, rows, expert_out.float() * weight_of[start : start + count, None])
        start += count
    return out.to(hidden_states.dtype)


def dequantize_int4_reference(
    packed: torch.Tensor, scale: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """packed int32 [..., R, C/8], scale [..., R, C/G] -> [..., R, C] = (nibble - 8) * scale, fp32 then one cast."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)  # [8] LSB-first
    nibbles = (packed[..., None] >> shifts) & 0xF  # [..., R, C/8, 8]
    q = nibbles.reshape(*packed.shape[:-1], -1).float() - INT4_OFFSET  # [..., R, C]
    return (q * scale.float().repeat_interleave(group_size, dim=-1)).to(dtype)


def _check_moe(
    hidden_states: torch.Tensor,
    topk_local_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13_packed: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_packed: torch.Tensor,
    w2_scale: torch.Tensor,
) -> int:
    """Shapes, dtypes, devices and strides of ``fused_moe_w4a16``'s arguments; returns the group size."""
    if hidden_states.dim() != 2 or not hidden_states.is_floating_point():
        raise ValueError(f"hidden_states must be [T, H] float, got {tuple(hidden_states.shape)} {hidden_states.dtype}")
    num_tokens, hidden = hidden_states.shape
    if topk_local_ids.dim() != 2 or topk_local_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_local_ids must be [{num_tokens}, K], got {tuple(topk_local_ids.shape)}")
    if topk_local_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_local_ids must be int32/int64, got {topk_local_ids.dtype}")
    if topk_weights.shape != topk_local_ids.shape or topk_weights.dtype != torch.float32:
        raise ValueError(
            f"topk_weights must be fp32 {tuple(topk_local_ids.shape)}, got {topk_weights.dtype} {tuple(topk_weights.shape)}"
        )
    if w13_packed.dim() != 3 or w13_packed.dtype != torch.int32 or w13_packed.shape[1] % 2:
        raise ValueError(f"w13_packed must be int32 [E, 2I, H/8], got {w13_packed.dtype} {tuple(w13_packed.shape)}")
    num_experts, inter = w13_packed.shape[0], w13_packed.shape[1] // 2
    if w2_packed.dtype != torch.int32 or w2_packed.dim() != 3 or w2_packed.shape[:2] != (num_experts, hidden):
        raise ValueError(f"w2_packed must be int32 [{num_experts}, {hidden}, I/8], got {tuple(w2_packed.shape)}")
    if w13_packed.shape[2] * 8 != hidden or w2_packed.shape[2] * 8 != inter:
        raise ValueError(
            f"packed words {w13_packed.shape[2]} / {w2_packed.shape[2]} do not match H={hidden} / I={inter} (8 per word)"
        )
    if w13_scale.dim() != 3 or w13_scale.shape[:2] != w13_packed.shape[:2] or w13_scale.shape[2] == 0:
        raise ValueError(f"w13_scale must be [{num_experts}, {2 * inter}, H/G], got {tuple(w13_scale.shape)}")
    group = hidden // w13_scale.shape[2]
    if w2_scale.shape != (num_experts, hidden, inter // group if group else 0):
        raise ValueError(f"w2_scale must be [{num_experts}, {hidden}, {inter}/{group}], got {tuple(w2_scale.shape)}")
    if group < 8 or group % 8 or hidden % group or inter % group or group & (group - 1):
        raise ValueError(f"group size {group} must be a power of two >= 8 dividing H={hidden} and I={inter}")
    if not (w13_scale.is_floating_point() and w2_scale.is_floating_point()):
        raise ValueError("scales must be floating point")
    tensors = (hidden_states, topk_local_ids, topk_weights, w13_packed, w13_scale, w2_packed, w2_scale)
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted({str(t.device) for t in tensors})}")
    if hidden_states.stride(1) != 1 or not all(t.is_contiguous() for t in tensors[1:]):
        raise ValueError("hidden_states rows must be contiguous and every other tensor contiguous")
    return group
