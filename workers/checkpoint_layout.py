"""The tensors a ``ModelConfig`` implies in a checkpoint: names, shapes and storage dtypes.

One function, ``expected_tensors(config, expert_ids)``, lists every tensor a Kimi K2 / DeepSeek-V3
checkpoint of that config holds under its checkpoint name (reference/kimi-k2.md §2), in file order:
embeddings, then layer by layer (attention, MLP; routed experts in id order), final norm, LM head.
The loader validates a folder against it and the random-checkpoint writer generates from it, so the
two cannot drift apart.

Which Linear modules are stored pack-quantized is decided by ``config.is_quantized(module)`` (the
``quantization_config`` ignore list), never hard-coded: a quantized module ``m`` holds
``m.weight_packed`` int32 [out, ceil(in/8)], ``m.weight_scale`` [out, ceil(in/group_size)] and
``m.weight_shape`` int64 [2] = [out, in]; any other module holds ``m.weight`` [out, in].
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import torch

from k2serve.workers.config import ModelConfig
from k2serve.workers.int4 import num_groups, packed_cols

TensorKind = Literal["embedding", "norm", "linear", "router", "score_bias", "packed", "scale", "shape"]
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
QUANTIZED_KINDS = ("packed", "scale", "shape")

_TORCH_DTYPES = MappingProxyType({"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32})


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor. ``module`` is the owning module name (``name`` minus the parameter);
    ``logical_shape`` is the [out, in] weight a Linear stands for (packed or not)."""

    name: str
    shape: tuple[int, ...]
    kind: TensorKind
    dtype: torch.dtype  # what the real checkpoint stores (the writer writes this)
    module: str
    logical_shape: tuple[int, ...]
    layer: int | None = None
    expert: int | None = None

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * self.dtype.itemsize


def expert_module(layer: int, expert: int, projection: str) -> str:
    """``model.layers.{layer}.mlp.experts.{expert}.{projection}`` (projection in EXPERT_PROJECTIONS)."""
    return f"model.layers.{layer}.mlp.experts.{expert}.{projection}"


def expert_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """[out, in] of each routed-expert projection: gate/up [I, H], down [H, I]."""
    hidden, inter = config.hidden_size, config.moe_intermediate_size
    return {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}


def dense_dtype(config: ModelConfig) -> torch.dtype:
    """Storage dtype of unquantized tensors (config.json ``torch_dtype``; BF16 for Kimi K2)."""
    return _TORCH_DTYPES[config.torch_dtype]


def expected_tensors(config: ModelConfig, expert_ids: Iterable[int] | None = None) -> list[TensorSpec]:
    """Every checkpoint tensor of ``config``, routed experts restricted to ``expert_ids`` (default all).

    Expert ids are listed once each, in ascending order. MTP layers (``num_nextn_predict_layers``)
    are not part of the serving model and are not listed.
    """
    experts = range(config.n_routed_experts) if expert_ids is None else sorted(set(expert_ids))
    return list(_LayoutBuilder(config, tuple(experts)).build())


class _LayoutBuilder:
    """Walks the architecture in checkpoint order and yields ``TensorSpec``s."""

    def __init__(self, config: ModelConfig, experts: tuple[int, ...]) -> None:
        self.config = config
        self.experts = experts
        self.dense_dtype = dense_dtype(config)

    def build(self) -> Iterable[TensorSpec]:
        c = self.config
        yield self._plain("model.embed_tokens.weight", (c.vocab_size, c.hidden_size), "embedding")
        for layer in range(c.num_hidden_layers):
            yield from self._layer(layer)
        yield self._plain("model.norm.weight", (c.hidden_size,), "norm")
        if not c.tie_word_embeddings:
            yield from self._linear("lm_head", c.vocab_size, c.hidden_size)

    def _layer(self, layer: int) -> Iterable[TensorSpec]:
        c = self.config
        p = f"model.layers.{layer}"
        yield self._plain(f"{p}.input_layernorm.weight", (c.hidden_size,), "norm", layer)
        q_out = c.num_attention_heads * c.qk_head_dim
        if c.q_lora_rank is None:
            yield from self._linear(f"{p}.self_attn.q_proj", q_out, c.hidden_size, layer)
        else:
            yield from self._linear(f"{p}.self_attn.q_a_proj", c.q_lora_rank, c.hidden_size, layer)
            yield self._plain(f"{p}.self_attn.q_a_layernorm.weight", (c.q_lora_rank,), "norm", layer)
            yield from self._linear(f"{p}.self_attn.q_b_proj", q_out, c.q_lora_rank, layer)
        yield from self._linear(f"{p}.self_attn.kv_a_proj_with_mqa", c.kv_cache_dim, c.hidden_size, layer)
        yield self._plain(f"{p}.self_attn.kv_a_layernorm.weight", (c.kv_lora_rank,), "norm", layer)
        kv_b_out = c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim)
        yield from self._linear(f"{p}.self_attn.kv_b_proj", kv_b_out, c.kv_lora_rank, layer)
        yield from self._linear(f"{p}.self_attn.o_proj", c.hidden_size, c.num_attention_heads * c.v_head_dim, layer)
        yield self._plain(f"{p}.post_attention_layernorm.weight", (c.hidden_size,), "norm", layer)
        if c.is_moe_layer(layer):
            yield from self._moe(layer)
        else:
            yield from self._mlp(f"{p}.mlp", c.intermediate_size, layer)

    def _moe(self, layer: int) -> Iterable[TensorSpec]:
        c = self.config
        p = f"model.layers.{layer}.mlp"
        yield self._plain(f"{p}.gate.weight", (c.n_routed_experts, c.hidden_size), "router", layer)
        yield self._plain(f"{p}.gate.e_score_correction_bias", (c.n_routed_experts,), "score_bias", layer)
        if c.n_shared_experts:
            yield from self._mlp(f"{p}.shared_experts", c.moe_intermediate_size * c.n_shared_experts, layer)
        shapes = expert_weight_shapes(c)
        for expert in self.experts:
            for proj in EXPERT_PROJECTIONS:
                out_features, in_features = shapes[proj]
                yield from self._linear(expert_module(layer, expert, proj), out_features, in_features, layer, expert)

    def _mlp(self, prefix: str, intermediate: int, layer: int) -> Iterable[TensorSpec]:
        hidden = self.config.hidden_size
        yield from self._linear(f"{prefix}.gate_proj", intermediate, hidden, layer)
        yield from self._linear(f"{prefix}.up_proj", intermediate, hidden, layer)
        yield from self._linear(f"{prefix}.down_proj", hidden, intermediate, layer)

    def _plain(self, name: str, shape: tuple[int, ...], kind: TensorKind, layer: int | None = None) -> TensorSpec:
        dtype = torch.float32 if kind == "score_bias" else self.dense_dtype
        return TensorSpec(name, shape, kind, dtype, name.rsplit(".", 1)[0], shape, layer)

    def _linear(
        self, module: str, out_features: int, in_features: int, layer: int | None = None, expert: int | None = None
    ) -> Iterable[TensorSpec]:
        logical = (out_features, in_features)
        quant = self.config.quantization
        if quant is None or not self.config.is_quantized(module):
            yield TensorSpec(f"{module}.weight", logical, "linear", self.dense_dtype, module, logical, layer, expert)
            return
        packed = (out_features, packed_cols(in_features))
        scale = (out_features, num_groups(in_features, quant.group_size))
        yield TensorSpec(f"{module}.weight_packed", packed, "packed", torch.int32, module, logical, layer, expert)
        yield TensorSpec(f"{module}.weight_scale", scale, "scale", self.dense_dtype, module, logical, layer, expert)
        yield TensorSpec(f"{module}.weight_shape", (2,), "shape", torch.int64, module, logical, layer, expert)
