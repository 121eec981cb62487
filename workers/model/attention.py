"""Multi-head latent attention (MLA) of one layer, in both forms, over the paged latent KV cache.

Lifecycle: one ``MLAAttention`` per decoder layer, built by the model and filled by
``load_state_dict`` (checkpoint names ``self_attn.*``). Each step it projects the new tokens,
rotates their rope parts, writes ``[c | k_pe]`` of every new token into the layer's cache at its
slot, and then, group by group (``AttentionPlan``), attends over the keys read back from the cache:
cached context and the new tokens alike, causally.

The two forms (reference kimi-k2.md §3.2):
- expanded (prefill): ``kv_b_proj`` turns each key's latent into per-head ``k_nope`` and ``v``;
  scores are ``q_nope·k_nope + q_pe·k_pe``.
- weight-absorbed (decode): ``kv_b_proj.weight`` viewed [NH, Dn+Dv, R] splits into ``W_UK`` and
  ``W_UV``; ``q_abs = q_nope·W_UK`` scores directly against the cached latents, the probabilities
  average the latents, and ``W_UV`` maps the result to each head's value space. No per-key
  expansion: the cost per key is R + Rp = 576 values for K2 instead of NH·(Dn+Dv).
Both use ``config.softmax_scale`` (YaRN mscale² included) and a softmax in fp32, then ``o_proj``.
The decode group (one new token per sequence, absorbed) reads the paged cache directly through
``kernels.mla_decode`` (split-K Triton on CUDA, its fp32 torch reference elsewhere); the cache
write goes through ``kernels.kv_cache_write``. ``kernel_impl`` forces one implementation (tests).

Legend: T = new tokens, H = hidden_size, NH = num_heads, Dn = qk_nope_head_dim, Rp =
qk_rope_head_dim, Dv = v_head_dim, R = kv_lora_rank, D = R + Rp, S/Q/L = sequences, new tokens
per sequence and keys per sequence of one group.
"""

from __future__ import annotations

import torch
from torch import nn

from k2serve.kernels.dispatch import Impl
from k2serve.kernels.mla_decode import mla_decode
from k2serve.workers.config import ModelConfig
from k2serve.workers.model.attention_plan import AttentionGroup, AttentionPlan
from k2serve.workers.model.kv_cache import gather_kv_cache, write_kv_cache
from k2serve.workers.model.linear import linear
from k2serve.workers.model.rmsnorm import RMSNorm
from k2serve.workers.model.rotary import apply_interleaved_rotary


class MLAAttention(nn.Module):
    def __init__(self, config: ModelConfig, *, device: torch.device | str | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.softmax_scale = config.softmax_scale
        self.kernel_impl: Impl = "auto"  # kernels (cache write, absorbed decode): Triton on CUDA, torch elsewhere
        hidden, heads, eps = config.hidden_size, config.num_attention_heads, config.rms_norm_eps
        self.q_lora_rank = config.q_lora_rank
        if config.q_lora_rank is None:
            self.q_proj = linear(hidden, heads * config.qk_head_dim, device=device, dtype=dtype)
        else:
            self.q_a_proj = linear(hidden, config.q_lora_rank, device=device, dtype=dtype)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, eps, device=device, dtype=dtype)
            self.q_b_proj = linear(config.q_lora_rank, heads * config.qk_head_dim, device=device, dtype=dtype)
        self.kv_a_proj_with_mqa = linear(hidden, config.kv_cache_dim, device=device, dtype=dtype)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, eps, device=device, dtype=dtype)
        self.kv_b_proj = linear(
            config.kv_lora_rank, heads * (config.qk_nope_head_dim + config.v_head_dim), device=device, dtype=dtype
        )
        self.o_proj = linear(heads * config.v_head_dim, hidden, device=device, dtype=dtype)

    def forward(self, hidden_states: torch.Tensor, plan: AttentionPlan, kv_cache: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, H] (already normalized) -> [T, H]; writes the new tokens' rows of ``kv_cache``."""
        num_tokens = hidden_states.shape[0]
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q = q.view(num_tokens, self.num_heads, self.qk_nope_head_dim + self.qk_rope_head_dim)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)  # [T, NH, Dn], [T, NH, Rp]
        c_kv, k_pe = self.kv_a_proj_with_mqa(hidden_states).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(c_kv)  # [T, R]; k_pe [T, Rp] is not normalized
        q_pe = apply_interleaved_rotary(q_pe, plan.cos[:, None, :], plan.sin[:, None, :])
        k_pe = apply_interleaved_rotary(k_pe, plan.cos, plan.sin)
        write_kv_cache(kv_cache, plan.slot_mapping, latent, k_pe, impl=self.kernel_impl)

        out = hidden_states.new_empty(num_tokens, self.num_heads, self.v_head_dim)  # [T, NH, Dv]
        for group in plan.groups:
            s, q_len = group.num_seqs, group.query_len
            group_q_nope = q_nope[group.query_rows].view(s, q_len, self.num_heads, self.qk_nope_head_dim)
            group_q_pe = q_pe[group.query_rows].view(s, q_len, self.num_heads, self.qk_rope_head_dim)
            if group.absorbed and q_len == 1:
                heads = self._absorbed_decode(group_q_nope[:, 0], group_q_pe[:, 0], kv_cache, group)[:, None]
            else:
                keys = gather_kv_cache(kv_cache, group.key_slots).to(hidden_states.dtype)  # [S, L, D]
                attend = self._absorbed if group.absorbed else self._expanded
                heads = attend(group_q_nope, group_q_pe, keys, group.mask)  # [S, Q, NH, Dv]
            out[group.query_rows] = heads.reshape(s * q_len, self.num_heads, self.v_head_dim)
        return self.o_proj(out.flatten(1))

    def _absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_UK`` [NH, Dn, R] and ``W_UV`` [NH, Dv, R], views of ``kv_b_proj.weight``."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]

    def _absorbed_decode(
        self,
        q_nope: torch.Tensor,  # [S, NH, Dn] one new token per sequence
        q_pe: torch.Tensor,  # [S, NH, Rp]
        kv_cache: torch.Tensor,  # [NB, BS, D]
        group: AttentionGroup,
    ) -> torch.Tensor:
        """The absorbed form straight over the paged cache (``kernels.mla_decode``) -> [S, NH, Dv]."""
        w_uk, w_uv = self._absorbed_weights()
        q_latent = torch.einsum("shd,hdc->shc", q_nope, w_uk)  # [S, NH, R]
        latent = mla_decode(
            q_latent.to(kv_cache.dtype).contiguous(),
            q_pe.to(kv_cache.dtype).contiguous(),
            kv_cache,
            group.block_tables,
            group.seq_lens,
            self.softmax_scale,
            max_seq_len=group.key_slots.shape[1],
            impl=self.kernel_impl,
        )  # [S, NH, R]
        return torch.einsum("shc,hvc->shv", latent.to(q_nope.dtype), w_uv)

    def _expanded(
        self,
        q_nope: torch.Tensor,  # [S, Q, NH, Dn]
        q_pe: torch.Tensor,  # [S, Q, NH, Rp]
        keys: torch.Tensor,  # [S, L, D] cache rows: latent then rotated k_pe
        mask: torch.Tensor,  # [S, Q, L]
    ) -> torch.Tensor:
        s, num_keys = keys.shape[:2]
        key_latent, key_pe = keys.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)  # [S, L, R], [S, L, Rp]
        kv = self.kv_b_proj(key_latent).view(s, num_keys, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)  # [S, L, NH, Dn], [S, L, NH, Dv]
        # One dot product over [nope | rope] per head (one rounding in bf16), k_pe shared by all heads.
        k = torch.cat((k_nope, key_pe[:, :, None, :].expand(-1, -1, self.num_heads, -1)), dim=-1)  # [S, L, NH, Dn+Rp]
        q = torch.cat((q_nope, q_pe), dim=-1)  # [S, Q, NH, Dn+Rp]
        probs = self._softmax(torch.einsum("sqhd,slhd->shql", q, k), mask)  # [S, NH, Q, L]
        return torch.einsum("shql,slhv->sqhv", probs, v)

    def _absorbed(
        self,
        q_nope: torch.Tensor,  # [S, Q, NH, Dn]
        q_pe: torch.Tensor,  # [S, Q, NH, Rp]
        keys: torch.Tensor,  # [S, L, D] cache rows: latent then rotated k_pe
        mask: torch.Tensor,  # [S, Q, L]
    ) -> torch.Tensor:
        w_uk, w_uv = self._absorbed_weights()  # [NH, Dn, R], [NH, Dv, R]
        q_abs = torch.einsum("sqhd,hdc->sqhc", q_nope, w_uk)  # [S, Q, NH, R]
        # [q_abs | q_pe] against the cache rows [latent | k_pe]: the 576-wide dot product of K2.
        q = torch.cat((q_abs, q_pe), dim=-1)  # [S, Q, NH, D]
        probs = self._softmax(torch.einsum("sqhd,sld->shql", q, keys), mask)  # [S, NH, Q, L]
        out_latent = torch.einsum("shql,slc->sqhc", probs, keys[..., : self.kv_lora_rank])  # [S, Q, NH, R]
        return torch.einsum("sqhc,hvc->sqhv", out_latent, w_uv)

    def _softmax(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """scores [S, NH, Q, L] in the model dtype -> probabilities, computed in fp32, cast back."""
        logits = scores.float() * self.softmax_scale
        logits = logits.masked_fill(~mask[:, None, :, :], float("-inf"))
        return torch.softmax(logits, dim=-1).to(scores.dtype)
