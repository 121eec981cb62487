"""One pre-norm decoder layer: ``h = x + Attn(norm_in(x))``, ``out = h + MLP(norm_post(h))``.

Lifecycle: built by the model for layer ``layer_idx``; the MLP is dense for the first
``first_k_dense_replace`` layers and MoE after (``ModelConfig.is_moe_layer``). Weights come from
``load_state_dict`` under ``model.layers.{layer_idx}.*``.

Legend: T = new tokens in the batch, H = hidden_size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from k2serve.workers.config import ModelConfig
from k2serve.workers.dispatcher import ExpertDispatcher
from k2serve.workers.model.attention import MLAAttention
from k2serve.workers.model.attention_plan import AttentionPlan
from k2serve.workers.model.experts import ExpertWeightFormat
from k2serve.workers.model.mlp import MLP
from k2serve.workers.model.moe import MoE
from k2serve.workers.model.rmsnorm import RMSNorm


class DecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_idx: int,
        expert_ids: Sequence[int],
        dispatcher: ExpertDispatcher,
        *,
        device: torch.device | str | None,
        dtype: torch.dtype,
        expert_format: ExpertWeightFormat = "dense",
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, device=device, dtype=dtype)
        self.self_attn = MLAAttention(config, device=device, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, device=device, dtype=dtype)
        self.mlp: MoE | MLP
        if config.is_moe_layer(layer_idx):
            self.mlp = MoE(
                config,
                expert_ids,
                dispatcher,
                device=device,
                dtype=dtype,
                expert_format=expert_format,
                layer_id=layer_idx,
            )
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, device=device, dtype=dtype)

    def forward(self, hidden_states: torch.Tensor, plan: AttentionPlan, kv_cache: torch.Tensor) -> torch.Tensor:
        # hidden_states: [T, H] -> [T, H]; kv_cache: this layer's [num_blocks, block_size, D]
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), plan, kv_cache)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
