"""INT4 pack-quantized rule: the §2.4 test vectors, round trips, and agreement with compressed-tensors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from k2serve.workers.int4 import (
    Int4FormatError,
    dequantize_int4,
    pack_int4,
    quantize_int4,
    unpack_int4,
)

GROUP_SIZE = 32


@pytest.fixture(scope="module")
def ct() -> SimpleNamespace:
    """The compressed-tensors pieces we compare against (imported lazily: the import is slow)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized import pack_to_int32, unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    # Kimi K2 Thinking's config_groups.group_0.weights
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=GROUP_SIZE)
    return SimpleNamespace(
        compressor=PackedQuantizationCompressor,
        scheme=QuantizationScheme(targets=["Linear"], weights=args),
        args=args,
        pack=pack_to_int32,
        unpack=unpack_from_int32,
        quantize=quantize,
        dequantize=dequantize,
        calculate_qparams=calculate_qparams,
    )


def _ct_scale(ct: SimpleNamespace, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' min-max observer over groups of 32, in the weight's dtype."""
    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // GROUP_SIZE, GROUP_SIZE)
    return ct.calculate_qparams(groups.amin(-1), groups.amax(-1), ct.args)


def _random_q(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 8, (rows, cols), generator=gen, dtype=torch.int8)


# ---- reference/kimi-k2.md §2.4 test vectors ----------------------------------------------------


@pytest.mark.parametrize(
    ("values", "word"),
    [
        ([0, 1, 2, 3, 4, 5, 6, 7], -19088744),  # 0xFEDCBA98
        ([-8, -7, -6, -5, -4, -3, -2, -1], 1985229328),  # 0x76543210
        ([0] * 8, -2004318072),  # 0x88888888: a zero weight does not pack to 0
        ([7] * 8, -1),
        ([-8] * 8, 0),
    ],
)
def test_pack_matches_reference_vectors(values: list[int], word: int) -> None:
    q = torch.tensor([values], dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.int32
    assert packed.tolist() == [[word]]
    assert unpack_int4(packed, 8).tolist() == [values]


def test_first_column_is_the_lowest_nibble() -> None:
    q = torch.full((1, 8), -8, dtype=torch.int8)
    q[0, 0] = 7  # u = 15 in bits 0-3
    assert pack_int4(q).item() == 0xF


# ---- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("cols", [1, 5, 8, 9, 31, 32, 33, 100, 256])
def test_pack_unpack_round_trip(cols: int) -> None:
    q = _random_q(13, cols, seed=cols)
    packed = pack_int4(q)
    assert packed.shape == (13, (cols + 7) // 8)
    assert torch.equal(unpack_int4(packed, cols), q)


def test_padding_nibbles_are_zero() -> None:
    q = torch.full((2, 5), 7, dtype=torch.int8)  # u = 15 in the 5 real columns, 0 in the 3 padded ones
    assert pack_int4(q).tolist() == [[0x000FFFFF]] * 2


def test_pack_unpack_batched_experts() -> None:
    q = _random_q(4 * 6, 40, seed=1).reshape(4, 6, 40)  # [E, R, C]
    packed = pack_int4(q)
    assert packed.shape == (4, 6, 5)
    assert torch.equal(packed[2], pack_int4(q[2]))
    assert torch.equal(unpack_int4(packed, 40), q)


def test_quantize_error_is_at_most_half_a_step() -> None:
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    q, scale = quantize_int4(w, GROUP_SIZE, scale_dtype=torch.float32)
    assert q.dtype == torch.int8 and scale.shape == (16, 4)
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    w_hat = dequantize_int4(pack_int4(q), scale, w.shape, torch.float32)
    step = scale.repeat_interleave(GROUP_SIZE, dim=1)
    assert bool(((w - w_hat).abs() <= step / 2 + 1e-6).all())


def test_quantize_guards_all_zero_groups() -> None:
    w = torch.zeros(2, 64)
    w[1, 32:] = torch.linspace(-1, 1, 32)
    q, scale = quantize_int4(w, GROUP_SIZE, scale_dtype=torch.bfloat16)
    assert bool((scale > 0).all())
    assert bool((q[0] == 0).all()) and bool((q[1, :32] == 0).all())
    assert bool((dequantize_int4(pack_int4(q), scale, w.shape, torch.float32)[0] == 0).all())


def test_dequantize_returns_target_dtype_and_shape() -> None:
    w = torch.randn(8, 64, dtype=torch.bfloat16)
    q, scale = quantize_int4(w)
    assert scale.dtype == torch.bfloat16
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = dequantize_int4(pack_int4(q), scale, torch.tensor([8, 64]), dtype)
        assert out.dtype == dtype and out.shape == (8, 64)


def test_bad_inputs_raise_int4_format_error() -> None:
    with pytest.raises(Int4FormatError):
        pack_int4(torch.tensor([[8]], dtype=torch.int8))
    with pytest.raises(Int4FormatError):
        pack_int4(torch.zeros(2, 8, dtype=torch.int32))
    with pytest.raises(Int4FormatError):
        unpack_int4(torch.zeros(2, 2, dtype=torch.int64), 16)
    with pytest.raises(Int4FormatError):
        unpack_int4(torch.zeros(2, 2, dtype=torch.int32), 17)
    with pytest.raises(Int4FormatError):
        quantize_int4(torch.randn(2, 40), 32)


# ---- agreement with compressed-tensors ----------------------------------------------------------


@pytest.mark.parametrize("cols", [8, 20, 64, 96, 100])
def test_packing_is_bit_identical_to_compressed_tensors(ct: SimpleNamespace, cols: int) -> None:
    q = _random_q(7, cols, seed=cols)
    ours = pack_int4(q)
    assert torch.equal(ours, ct.pack(q, 4))
    assert torch.equal(ct.unpack(ours, 4, torch.Size([7, cols])), q)  # ours read by theirs
    assert torch.equal(unpack_int4(ct.pack(q, 4), cols), q)  # theirs read by ours


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_their_compressed_weight_decompresses_identically_with_ours(ct: SimpleNamespace, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(48, 128, generator=gen) * 0.05).to(torch.bfloat16)
    scale, zero_point = _ct_scale(ct, weight)
    compressed = ct.compressor.compress(
        {"weight": weight, "weight_scale": scale, "weight_zero_point": zero_point}, ct.scheme
    )
    assert set(compressed) == {"weight_packed", "weight_scale", "weight_shape"}
    theirs = ct.compressor.decompress(compressed, ct.scheme)["weight"]
    ours = dequantize_int4(
        compressed["weight_packed"], compressed["weight_scale"], compressed["weight_shape"], torch.bfloat16
    )
    assert theirs.dtype == torch.bfloat16
    assert torch.equal(ours, theirs)
    # fp32 output keeps the exact product q * scale, which rounds to their BF16 result
    ours_fp32 = dequantize_int4(
        compressed["weight_packed"], compressed["weight_scale"], compressed["weight_shape"], torch.float32
    )
    assert torch.equal(ours_fp32.to(torch.bfloat16), theirs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_our_compressed_weight_decompresses_identically_with_theirs(ct: SimpleNamespace, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(48, 160, generator=gen) * 0.05
    q, scale = quantize_int4(weight, GROUP_SIZE, scale_dtype=torch.bfloat16)
    state = {"weight_packed": pack_int4(q), "weight_scale": scale, "weight_shape": torch.tensor(weight.shape)}
    theirs = ct.compressor.decompress(state, ct.scheme)["weight"]
    ours = dequantize_int4(state["weight_packed"], scale, state["weight_shape"], torch.bfloat16)
    assert torch.equal(ours, theirs)


def test_quantize_matches_compressed_tensors_observer_and_rounding(ct: SimpleNamespace) -> None:
    weight = torch.randn(32, 256, generator=torch.Generator().manual_seed(3))
    weight[0, :32] = 0.0  # an all-zero group takes the epsilon guard
    q, scale = quantize_int4(weight, GROUP_SIZE, scale_dtype=torch.float32)
    their_scale, zero_point = _ct_scale(ct, weight)
    assert torch.equal(scale, their_scale)
    their_q = ct.quantize(weight, their_scale, zero_point, ct.args, dtype=torch.int8)
    assert torch.equal(q, their_q)
