"""``KimiK2ForCausalLM``: embeddings -> decoder layers -> final norm -> LM head, over a ``ForwardBatch``.

Lifecycle: a worker builds the model once (on its device, in its dtype, with the logical expert
ids it owns), fills it with ``load_state_dict(weights, strict=True)`` and then calls it once per
step: ``model(batch, kv_cache) -> logits``. Parameters are uninitialized until loaded. The model
holds no per-request state; all of that is in the ``ForwardBatch`` and the paged ``kv_cache``,
which each call updates in place with the new tokens' latent rows.

State dict = checkpoint names (reference kimi-k2.md §2) except the routed experts, which are
stacked over this rank's experts: ``model.layers.{L}.mlp.experts.gate_up_proj`` [E_local, 2I, H]
and ``...experts.down_proj`` [E_local, H, I] (with ``expert_format="int4"``: the packed words and
scales instead, ``LocalExperts``). Buffers derived from the config (rope cos/sin, the
logical -> local expert table) are non-persistent; ``e_score_correction_bias`` stays fp32.

Attention form: per sequence, one new token -> weight-absorbed form, several -> expanded form
(``attention_plan``). ``attention_form`` ("auto" | "absorbed" | "expanded"), as a constructor
argument, attribute or per-call argument, forces one form for tests.

Legend: T = new tokens, N = rows that get logits, H = hidden_size, V = vocab_size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from k2serve.workers.config import ExpertIds, ModelConfig
from k2serve.workers.dispatcher import ExpertDispatcher, LocalDispatcher
from k2serve.workers.model.attention_plan import AttentionForm, plan_attention
from k2serve.workers.model.decoder_layer import DecoderLayer
from k2serve.workers.model.experts import ExpertWeightFormat
from k2serve.workers.model.forward_batch import ForwardBatch
from k2serve.workers.model.linear import embedding, linear
from k2serve.workers.model.moe import MoE
from k2serve.workers.model.rmsnorm import RMSNorm
from k2serve.workers.model.rotary import RotaryEmbedding


class KimiK2Model(nn.Module):
    """The decoder stack; returns the final-normalized hidden states [T, H]."""

    def __init__(
        self,
        config: ModelConfig,
        expert_ids: Mapping[int, Sequence[int]],
        dispatcher: ExpertDispatcher,
        *,
        max_positions: int,
        device: torch.device | str | None,
        dtype: torch.dtype,
        expert_format: ExpertWeightFormat = "dense",
    ) -> None:
        super().__init__()
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(
                config, i, expert_ids.get(i, ()), dispatcher, device=device, dtype=dtype, expert_format=expert_format
            )
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device=device, dtype=dtype)
        self.rotary_emb = RotaryEmbedding(config, max_positions, device=device)

    def forward(
        self,
        batch: ForwardBatch,
        kv_cache: Sequence[torch.Tensor],
        form: AttentionForm,
        on_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        if len(kv_cache) != len(self.layers):
            raise ValueError(f"kv_cache has {len(kv_cache)} layers, the model {len(self.layers)}")
        if batch.max_seq_len > self.rotary_emb.max_positions:
            raise ValueError(
                f"a sequence of {batch.max_seq_len} tokens exceeds max_positions {self.rotary_emb.max_positions}"
            )
        block_size = kv_cache[0].shape[1]
        plan = plan_attention(batch, block_size, form, self.rotary_emb(batch.positions))
        hidden_states = self.embed_tokens(batch.input_ids)  # [T, H]
        for i, (layer, layer_cache) in enumerate(zip(self.layers, kv_cache, strict=True)):
            hidden_states = layer(hidden_states, plan, layer_cache)
            if on_layer is not None:
                on_layer(i)  # layer i's rows are in the cache (queued, on a device)
        return self.norm(hidden_states)


class KimiK2ForCausalLM(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        *,
        expert_ids: ExpertIds | None = None,
        dispatcher: ExpertDispatcher | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        max_positions: int | None = None,
        attention_form: AttentionForm = "auto",
        expert_format: ExpertWeightFormat = "dense",
    ) -> None:
        """``expert_ids``: logical routed experts held here, in local order (default: all), the same for
        every MoE layer or per MoE layer id.
        ``max_positions``: rope table length (default ``config.max_position_embeddings``).
        ``dtype``: default ``config.torch_dtype``.
        ``expert_format``: "dense" (dequantized stacks) or "int4" (packed words and scales, the
        W4A16 kernels; the state dict then holds ``load_weights(..., keep_packed=True)``'s names).
        """
        super().__init__()
        if config.tie_word_embeddings:
            raise ValueError("tie_word_embeddings: Kimi K2 / DeepSeek-V3 checkpoints have an untied lm_head")
        self.config = config
        dtype = dtype if dtype is not None else getattr(torch, config.torch_dtype)
        per_layer = config.experts_per_layer(expert_ids)
        self.attention_form: AttentionForm = attention_form
        self.model = KimiK2Model(
            config,
            per_layer,
            dispatcher if dispatcher is not None else LocalDispatcher(),
            max_positions=max_positions if max_positions is not None else config.max_position_embeddings,
            device=device,
            dtype=dtype,
            expert_format=expert_format,
        )
        self.lm_head = linear(config.hidden_size, config.vocab_size, device=device, dtype=dtype)

    def moe_layers(self) -> list[MoE]:
        """The MoE blocks, in layer order."""
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]

    @torch.no_grad()
    def idle_step(self) -> None:
        """An EP group's empty step: join every MoE layer's dispatch collective with no tokens, in the
        order a forward would, so the peers that do have tokens never wait on this rank."""
        for moe in self.moe_layers():
            moe.idle()

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @torch.no_grad()
    def forward(
        self,
        batch: ForwardBatch,
        kv_cache: Sequence[torch.Tensor],
        attention_form: AttentionForm | None = None,
        on_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Logits [N, V] fp32 for the rows ``batch.logits_indices`` (all T rows when None).

        Writes the latent rows of the batch's new tokens into ``kv_cache`` (one tensor per layer);
        ``on_layer(i)`` runs right after layer i wrote its rows (a KV transfer may then send them).
        """
        hidden_states = self.model(batch, kv_cache, attention_form or self.attention_form, on_layer)  # [T, H]
        if batch.logits_indices is not None:
            hidden_states = hidden_states[batch.logits_indices]  # [N, H]
        return self.lm_head(hidden_states).float()
