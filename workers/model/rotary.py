"""Rotary position embedding of MLA's rope part: YaRN frequencies, interleaved pairs, a cos/sin cache.

Lifecycle: ``RotaryEmbedding`` is built once per model; it precomputes cos/sin for positions
``[0, max_positions)`` in fp32 as non-persistent buffers (not in the state dict, never loaded) and
keeps them fp32 when the model is cast to bf16. Once per step the model looks up the rows of the
batch's positions; every attention layer then rotates ``q_pe`` (every head) and ``k_pe`` (one
vector shared by all heads) with ``apply_interleaved_rotary``.

Layout: DeepSeek rotates **interleaved pairs** ``(x[2i], x[2i+1])`` by angle ``p·θ_i`` (GPT-J style,
DeepSeek-V3 ``apply_rotary_emb``, vLLM ``is_neox_style=False``), not the two contiguous halves.
The output keeps the interleaved layout, so the rotated ``k_pe`` in the KV cache is in the same
layout as the checkpoint's ``kv_a_proj_with_mqa`` rows. (Hugging Face de-interleaves q and k the
same way before its ``rotate_half``; dot products are identical, only the order of the 64 values
differs.)

YaRN (reference kimi-k2.md §3.2 item 8): ``inv_freq = freq_inter·ramp + freq_extra·(1-ramp)`` with
``freq_extra[i] = base^(-2i/d)``, ``freq_inter = freq_extra / factor`` and a linear ramp between the
correction dims ``low = floor(corr(beta_fast))`` and ``high = ceil(corr(beta_slow))``; cos/sin are
multiplied by ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` (1.0 for Kimi K2). The
attention-logit part of YaRN lives in ``ModelConfig.softmax_scale``, not here.

Legend: P = cached positions, T = tokens, R = qk_rope_head_dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from k2serve.workers.config import ModelConfig, RopeScaling, yarn_mscale


def yarn_correction_dim(num_rotations: float, dim: int, base: float, original_max_positions: int) -> float:
    """The rotary dim index whose wavelength fits ``num_rotations`` times into the original context."""
    return dim * math.log(original_max_positions / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_correction_range(dim: int, base: float, scaling: RopeScaling) -> tuple[int, int]:
    """``(low, high)``: pair indices below ``low`` keep their frequency, above ``high`` are divided by factor."""
    orig = scaling.original_max_position_embeddings
    low = math.floor(yarn_correction_dim(scaling.beta_fast, dim, base, orig))
    high = math.ceil(yarn_correction_dim(scaling.beta_slow, dim, base, orig))
    return max(low, 0), min(high, dim - 1)


def rope_inv_freq(dim: int, base: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequency of each of the ``dim // 2`` rotated pairs, fp32 [dim // 2]."""
    freq_extra = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if scaling is None:
        return freq_extra
    freq_inter = 1.0 / (scaling.factor * base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low, high = yarn_correction_range(dim, base, scaling)
    span = (high - low) if high != low else 0.001  # avoid 0/0 when the range collapses
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / span).clamp(0.0, 1.0)
    return freq_inter * ramp + freq_extra * (1.0 - ramp)


def rope_attention_factor(scaling: RopeScaling | None) -> float:
    """Multiplier of cos/sin: ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)``; 1 without YaRN."""
    if scaling is None:
        return 1.0
    return yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(scaling.factor, scaling.mscale_all_dim)


def apply_interleaved_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[..., 2i], x[..., 2i+1])`` by the angle whose cos/sin are ``cos[..., i]``/``sin[..., i]``.

    ``x`` [..., d] in any dtype; ``cos``/``sin`` [..., d/2] fp32, broadcastable. Computed in fp32, returned
    in ``x.dtype`` with the interleaved layout kept.
    """
    x32 = x.float()
    even, odd = x32[..., 0::2], x32[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)  # [..., d/2, 2]
    return rotated.flatten(-2).to(x.dtype)


class RotaryEmbedding(nn.Module):
    cos_cache: torch.Tensor  # [P, R/2] fp32, non-persistent
    sin_cache: torch.Tensor  # [P, R/2] fp32, non-persistent

    def __init__(self, config: ModelConfig, max_positions: int, *, device: torch.device | str | None) -> None:
        super().__init__()
        self.rotary_dim = config.qk_rope_head_dim
        inv_freq = rope_inv_freq(self.rotary_dim, config.rope_theta, config.rope_scaling)  # [R/2]
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [P, R/2]
        factor = rope_attention_factor(config.rope_scaling)
        self.register_buffer("cos_cache", (angles.cos() * factor).to(device), persistent=False)  # [P, R/2] fp32
        self.register_buffer("sin_cache", (angles.sin() * factor).to(device), persistent=False)  # [P, R/2] fp32

    @property
    def max_positions(self) -> int:
        return self.cos_cache.shape[0]

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [T, R/2] fp32 at ``positions`` [T]; every position must be < ``max_positions``."""
        return self.cos_cache[positions], self.sin_cache[positions]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> RotaryEmbedding:
        # Module.to(dtype) casts every floating buffer; bf16 angles would lose the position at long
        # context. Let fn pick the device, then move the untouched fp32 tables there.
        cos, sin = self.cos_cache, self.sin_cache
        super()._apply(fn, recurse)
        self.cos_cache = cos.to(self.cos_cache.device)
        self.sin_cache = sin.to(self.sin_cache.device)
        return self
