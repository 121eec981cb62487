"""``fused_moe_w4a16``: the Triton W4A16 grouped GEMMs equal the torch reference; the reference's
INT4 dequantization equals the checkpoint rule (``workers.int4``) bit for bit.

Weights go through the real quantizer and packer, so the words carry every nibble value and
negative int32 words. Runs under the Triton interpreter on CPU (conftest.py) or on the GPU.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from kernel_fixtures import TOLERANCE, kernel_device, relative_error

from k2serve.kernels.moe_w4a16 import (
    MoeGemmConfig,
    _dequantize_tile,
    _moe_w4a16_gemm_kernel,
    dequantize_int4_reference,
    fused_moe_w4a16,
    fused_moe_w4a16_reference,
)
from k2serve.workers.int4 import dequantize_int4, pack_int4, quantize_int4

DEVICE = kernel_device(_moe_w4a16_gemm_kernel)
GROUP = 32
SMALL_TILES = MoeGemmConfig(block_m=16, block_n=16, block_k=32)  # several N tiles and K steps
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _dequantize_probe_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations: only constexprs have one
    w_ptr, s_ptr, out_ptr, dtype: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr
):
    # w [N, K/8] int32, s [N, K/G] -> out [K, N]: the tile the GEMM kernel feeds to tl.dot
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    words = tl.load(w_ptr + offs_n[None, :] * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)[:, None])
    scales = tl.load(s_ptr + offs_n[None, :] * (BLOCK_K // GROUP) + tl.arange(0, BLOCK_K // GROUP)[:, None])
    tile = _dequantize_tile(words, scales, dtype, BLOCK_K, BLOCK_N, GROUP)
    tl.store(out_ptr + offs_k[:, None] * BLOCK_N + offs_n[None, :], tile)


def _experts(num_experts: int, hidden: int, inter: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """(w13_packed, w13_scale, w2_packed, w2_scale) of random experts, quantized like the checkpoint."""
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5
    out = []
    for w in (w13, w2):
        q, scale = quantize_int4(w, GROUP, scale_dtype=torch.bfloat16)
        out += [pack_int4(q).to(DEVICE), scale.to(dtype).to(DEVICE)]
    return tuple(out)


def _routing(
    num_tokens: int, top_k: int, num_experts: int, seed: int, skip: float = 0.25
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, num_experts, (num_tokens, top_k), generator=gen)
    ids[torch.rand(num_tokens, top_k, generator=gen) < skip] = -1
    weights = torch.rand(num_tokens, top_k, generator=gen) * 2
    return ids.to(DEVICE), weights.to(DEVICE)


# bf16 on the GPU only: the Triton interpreter casts fp32 to bf16 by truncation, not rounding.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_the_kernel_dequantizes_bit_for_bit_like_the_reference(dtype: torch.dtype) -> None:
    """The tile the GEMM multiplies equals ``dequantize_int4_reference`` exactly: every nibble value,
    scales over many binades, each activation dtype."""
    block_n, block_k = 16, 128
    gen = torch.Generator().manual_seed(12)
    packed = torch.randint(-(2**31), 2**31 - 1, (block_n, block_k // 8), generator=gen, dtype=torch.int32)
    binades = torch.randint(-20, 4, (block_n, block_k // GROUP), generator=gen).float().exp2()
    scale = (torch.randn(block_n, block_k // GROUP, generator=gen) * binades).to(dtype)
    out = torch.full((block_k, block_n), float("nan"), dtype=dtype, device=DEVICE)
    _dequantize_probe_kernel[(1,)](packed.to(DEVICE), scale.to(DEVICE), out, TL_DTYPES[dtype], block_k, block_n, GROUP)
    expected = dequantize_int4_reference(packed, scale, GROUP, dtype).t()  # [K, N]
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(out.cpu().view(bits), expected.contiguous().view(bits))


def _check(
    num_tokens: int,
    top_k: int,
    num_experts: int,
    hidden: int,
    inter: int,
    dtype: torch.dtype,
    seed: int,
    config: MoeGemmConfig | None = None,
    ids: torch.Tensor | None = None,
) -> None:
    weights = _experts(num_experts, hidden, inter, dtype, seed)
    routed_ids, routed_weights = _routing(num_tokens, top_k, num_experts, seed)
    ids = routed_ids if ids is None else ids.to(DEVICE)
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)
    ours = fused_moe_w4a16(x, ids, routed_weights, *weights, impl="triton", config=config)
    ref = fused_moe_w4a16_reference(x, ids, routed_weights, *weights)
    assert ours.shape == ref.shape == x.shape and ours.dtype == dtype
    assert relative_error(ours, ref) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_shape_matches_reference(poison_allocations: None, dtype: torch.dtype) -> None:
    _check(num_tokens=6, top_k=2, num_experts=4, hidden=64, inter=32, dtype=dtype, seed=0)


def test_one_token_one_expert(poison_allocations: None) -> None:
    _check(1, 1, 1, 64, 32, torch.float32, seed=1, ids=torch.zeros(1, 1, dtype=torch.int64))


def test_empty_experts_and_non_local_assignments(poison_allocations: None) -> None:
    ids = torch.tensor([[0, -1], [3, 0], [-1, -1], [3, 3]])  # experts 1, 2, 4 get nothing; token 2 none
    _check(4, 2, 5, 64, 32, torch.float32, seed=2, ids=ids)


def test_many_tokens_per_expert_with_small_tiles(poison_allocations: None) -> None:
    # ~40 assignments per expert -> several M blocks each; N and K loops of several steps
    _check(64, 2, 3, 96, 64, torch.float32, seed=3, config=SMALL_TILES)


def test_token_chunks_give_the_same_result(poison_allocations: None) -> None:
    weights = _experts(3, 64, 32, torch.float32, seed=4)
    ids, route = _routing(10, 2, 3, seed=4)
    x = torch.randn(10, 64).to(DEVICE)
    whole = fused_moe_w4a16(x, ids, route, *weights, impl="triton")
    chunked = fused_moe_w4a16(x, ids, route, *weights, impl="triton", chunk_tokens=3)
    assert relative_error(chunked, whole) <= 1e-6


def test_no_tokens_and_no_local_experts() -> None:
    weights = _experts(2, 64, 32, torch.float32, seed=5)
    empty = torch.empty(0, 64, device=DEVICE)
    ids = torch.empty(0, 2, dtype=torch.int64, device=DEVICE)
    out = fused_moe_w4a16(empty, ids, torch.empty(0, 2, device=DEVICE), *weights, impl="triton")
    assert out.shape == (0, 64)
    x = torch.randn(3, 64, device=DEVICE)
    none_here = torch.full((3, 2), -1, device=DEVICE)
    out = fused_moe_w4a16(x, none_here, torch.ones(3, 2, device=DEVICE), *weights, impl="triton")
    assert torch.equal(out, torch.zeros_like(x))


def test_reference_dequantization_is_the_checkpoint_rule() -> None:
    w13_packed, w13_scale, _, _ = _experts(2, 64, 32, torch.bfloat16, seed=6)
    for dtype in (torch.float32, torch.bfloat16):
        ours = dequantize_int4_reference(w13_packed.cpu(), w13_scale.cpu(), GROUP, dtype)
        rule = dequantize_int4(w13_packed.cpu(), w13_scale.cpu(), (64, 64), dtype)
        assert torch.equal(ours, rule)


def test_reference_equals_a_dense_per_token_loop() -> None:
    w13_packed, w13_scale, w2_packed, w2_scale = (t.cpu() for t in _experts(3, 64, 32, torch.float32, seed=7))
    ids, route = (t.cpu() for t in _routing(5, 2, 3, seed=7))
    x = torch.randn(5, 64)
    w13 = dequantize_int4(w13_packed, w13_scale, (64, 64), torch.float32)
    w2 = dequantize_int4(w2_packed, w2_scale, (64, 32), torch.float32)
    expected = torch.zeros(5, 64)
    for t in range(5):
        for k in range(2):
            e = int(ids[t, k])
            if e >= 0:
                gate, up = (w13[e] @ x[t]).split(32)
                expected[t] += route[t, k] * (w2[e] @ (torch.nn.functional.silu(gate) * up))
    ref = fused_moe_w4a16_reference(x, ids, route, w13_packed, w13_scale, w2_packed, w2_scale)
    assert relative_error(ref, expected) <= 1e-5


def test_auto_runs_the_reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tuple(t.cpu() for t in _experts(2, 64, 32, torch.float32, seed=8))
    ids, route = (t.cpu() for t in _routing(3, 2, 2, seed=8))
    called = []
    monkeypatch.setattr("k2serve.kernels.moe_w4a16._moe_chunk", lambda *a, **k: called.append(1))
    fused_moe_w4a16(torch.randn(3, 64), ids, route, *weights)
    assert not called


def test_bad_shapes_are_rejected() -> None:
    w13_packed, w13_scale, w2_packed, w2_scale = _experts(2, 64, 32, torch.float32, seed=9)
    x, ids, route = torch.randn(3, 64, device=DEVICE), *_routing(3, 2, 2, seed=9)
    with pytest.raises(ValueError, match="topk_weights"):
        fused_moe_w4a16(x, ids, route.half(), w13_packed, w13_scale, w2_packed, w2_scale)
    with pytest.raises(ValueError, match="w2_packed"):
        fused_moe_w4a16(x, ids, route, w13_packed, w13_scale, w2_packed[:1], w2_scale)
    with pytest.raises(ValueError, match="packed words"):
        fused_moe_w4a16(x, ids, route, w13_packed[..., :4], w13_scale, w2_packed, w2_scale)


@pytest.mark.gpu
@pytest.mark.parametrize(("num_tokens", "num_experts"), [(4, 8), (512, 6)])
def test_bf16_on_gpu_at_k2_like_shapes(num_tokens: int, num_experts: int) -> None:
    _check(num_tokens, 8, num_experts, 1024, 256, torch.bfloat16, seed=10)
