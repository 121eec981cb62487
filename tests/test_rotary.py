"""Rotary embedding: YaRN frequencies and mscale of the real Kimi K2 config, interleaved-pair rotation."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from k2serve.workers.config import ModelConfig, yarn_mscale
from k2serve.workers.model.rotary import (
    RotaryEmbedding,
    apply_interleaved_rotary,
    rope_attention_factor,
    rope_inv_freq,
    yarn_correction_dim,
    yarn_correction_range,
)

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def k2() -> ModelConfig:
    """Kimi K2 Thinking's config.json (reference kimi-k2.md §1): just the config, no weights."""
    config = ModelConfig.from_dict(json.loads((DATA / "kimi_k2_thinking_config.json").read_text()))
    assert (config.num_hidden_layers, config.n_routed_experts, config.qk_rope_head_dim) == (61, 384, 64)
    assert config.rope_theta == 50000.0 and config.rope_scaling is not None
    assert (config.rope_scaling.factor, config.rope_scaling.beta_fast, config.rope_scaling.beta_slow) == (
        64.0,
        1.0,
        1.0,
    )
    return config


def test_yarn_correction_range_of_kimi_k2_is_19_to_20(k2: ModelConfig) -> None:
    assert yarn_correction_dim(1.0, 64, 50000.0, 4096) == pytest.approx(19.1646, abs=1e-4)
    assert yarn_correction_range(64, k2.rope_theta, k2.rope_scaling) == (19, 20)


def test_yarn_keeps_pairs_up_to_19_and_divides_pairs_from_20_by_the_factor(k2: ModelConfig) -> None:
    inv_freq = rope_inv_freq(64, k2.rope_theta, k2.rope_scaling)
    original = 1.0 / (50000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    assert inv_freq.shape == (32,) and inv_freq.dtype == torch.float32
    torch.testing.assert_close(inv_freq[:20].double(), original[:20], rtol=1e-6, atol=0)
    torch.testing.assert_close(inv_freq[20:].double(), original[20:] / 64.0, rtol=1e-6, atol=0)


def test_inv_freq_and_cos_sin_factor_match_transformers_yarn(k2: ModelConfig) -> None:
    pytest.importorskip("transformers")
    from model_fixtures import hf_config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config(k2))
    assert torch.equal(rope_inv_freq(64, k2.rope_theta, k2.rope_scaling), hf_inv_freq)
    assert rope_attention_factor(k2.rope_scaling) == hf_factor == 1.0


def test_softmax_scale_is_qk_head_dim_to_the_minus_half_times_mscale_squared(k2: ModelConfig) -> None:
    assert yarn_mscale(64.0, 1.0) == pytest.approx(1 + 0.1 * math.log(64))
    assert k2.qk_head_dim == 192
    assert k2.softmax_scale == pytest.approx(0.1446796, abs=1e-7)
    factor_32 = dataclasses.replace(k2, rope_scaling=dataclasses.replace(k2.rope_scaling, factor=32.0))
    assert factor_32.softmax_scale == pytest.approx(0.1308608, abs=1e-7)
    assert dataclasses.replace(k2, rope_scaling=None).softmax_scale == pytest.approx(192**-0.5)


def _complex_reference(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's apply_rotary_emb: pairs (x[2i], x[2i+1]) as complex numbers times e^{i·angle_i}."""
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())  # [..., d/2]
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles.double()), angles.double())).flatten(-2)


def test_rotation_is_interleaved_pairs_not_rotate_half(k2: ModelConfig) -> None:
    rope = RotaryEmbedding(k2, max_positions=k2.max_position_embeddings, device="cpu")  # the full 256K context
    gen = torch.Generator().manual_seed(0)
    positions = torch.tensor([0, 1, 7, 4095, 4096, 100_000, 262_143])
    q_pe = torch.randn(len(positions), 4, 64, generator=gen)  # [T, NH, Rp]
    cos, sin = rope(positions)  # [T, 32]
    # Same fp32 angles as the table (position·θ in fp32 is what every implementation computes).
    angles = positions[:, None].float() * rope_inv_freq(64, k2.rope_theta, k2.rope_scaling)  # [T, 32]
    got = apply_interleaved_rotary(q_pe, cos[:, None, :], sin[:, None, :])
    torch.testing.assert_close(got.double(), _complex_reference(q_pe, angles[:, None, :]), rtol=0, atol=1e-5)

    half = q_pe.shape[-1] // 2  # NeoX rotate-half on the raw layout: wrong for DeepSeek weights
    cos2, sin2 = torch.cat((cos, cos), -1)[:, None, :], torch.cat((sin, sin), -1)[:, None, :]
    neox = q_pe * cos2 + torch.cat((-q_pe[..., half:], q_pe[..., :half]), -1) * sin2
    assert not torch.allclose(neox, got, atol=1e-2)


def test_rotated_scores_depend_only_on_the_relative_position(k2: ModelConfig) -> None:
    rope = RotaryEmbedding(k2, max_positions=4096, device="cpu")
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(64, generator=gen), torch.randn(64, generator=gen)

    def score(pq: int, pk: int) -> float:
        cos, sin = rope(torch.tensor([pq, pk]))
        return float(apply_interleaved_rotary(q, cos[0], sin[0]) @ apply_interleaved_rotary(k, cos[1], sin[1]))

    assert score(10, 3) == pytest.approx(score(1010, 1003), abs=1e-4)
    assert score(10, 3) != pytest.approx(score(10, 4), abs=1e-3)


def test_rotation_keeps_the_input_dtype_and_computes_in_fp32(k2: ModelConfig) -> None:
    rope = RotaryEmbedding(k2, max_positions=64, device="cpu")
    x = torch.randn(3, 2, 64)
    cos, sin = rope(torch.tensor([5, 6, 7]))
    got = apply_interleaved_rotary(x.to(torch.bfloat16), cos[:, None], sin[:, None])
    assert got.dtype == torch.bfloat16
    ref = apply_interleaved_rotary(x.to(torch.bfloat16).float(), cos[:, None], sin[:, None]).to(torch.bfloat16)
    assert torch.equal(got, ref)
