"""Model configuration read from a checkpoint's ``config.json``.

Lifecycle: ``ModelConfig.from_model_dir(path)`` (or ``from_dict``) parses the Kimi K2 / DeepSeek-V3
field names once, validates them and returns a frozen object that every other part of a worker
reads. Nothing is ever written back into it; values discovered at run time live elsewhere.

Errors are ``ConfigError`` and always name the offending field, e.g.
``ConfigError: config.json field 'hidden_size': 7000 is not divisible by quantization group_size 32``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from k2serve.workers.config_error import ConfigError
from k2serve.workers.quantization_config import QuantizationConfig

logger = logging.getLogger(__name__)

# The routed experts a rank holds: the same logical ids for every MoE layer, or a list per MoE layer id (EPLB).
ExpertIds = Sequence[int] | Mapping[int, Sequence[int]]

SUPPORTED_ARCHITECTURES = ("DeepseekV3ForCausalLM",)
SUPPORTED_MODEL_TYPES = ("kimi_k2", "deepseek_v3")

# Keys that exist in real Kimi K2 / DeepSeek-V3 configs but matter only for training or for
# other stacks. They are accepted silently; any other unknown key is logged once.
_IGNORED_KEYS = frozenset(
    {
        "auto_map",
        "transformers_version",
        "seq_aux",
        "aux_loss_alpha",
        "ep_size",
        "initializer_range",
        "pretraining_tp",
        "use_cache",
        "rope_interleave",
        "num_mtp_layers",
        "output_router_logits",
        "dtype",
    }
)


# Sizes every config.json must give (positive integers).
_REQUIRED_SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "num_experts_per_tok",
)


@dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (``rope_scaling`` with ``type``/``rope_type`` = ``yarn``)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    @staticmethod
    def from_dict(raw: Mapping[str, Any]) -> RopeScaling:
        kind = raw.get("type", raw.get("rope_type"))
        if kind != "yarn":
            raise ConfigError("rope_scaling.type", f"unsupported rope scaling {kind!r}; only 'yarn'")
        for key in ("factor", "original_max_position_embeddings"):
            if key not in raw:
                raise ConfigError(f"rope_scaling.{key}", "missing")
        scaling = RopeScaling(
            factor=float(raw["factor"]),
            original_max_position_embeddings=int(raw["original_max_position_embeddings"]),
            beta_fast=float(raw.get("beta_fast", 32.0)),
            beta_slow=float(raw.get("beta_slow", 1.0)),
            mscale=float(raw.get("mscale", 1.0)),
            mscale_all_dim=float(raw.get("mscale_all_dim", 0.0)),
        )
        if scaling.factor < 1.0:
            raise ConfigError("rope_scaling.factor", f"must be >= 1, got {scaling.factor}")
        if scaling.original_max_position_embeddings <= 0:
            raise ConfigError("rope_scaling.original_max_position_embeddings", "must be > 0")
        return scaling


def yarn_mscale(factor: float, mscale: float) -> float:
    """``0.1 * mscale * ln(factor) + 1`` for factor > 1, else 1 (``yarn_get_mscale``)."""
    if factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Kimi K2 / DeepSeek-V3 checkpoint, with the field names of config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    num_key_value_heads: int | None = None
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    attention_bias: bool = False
    attention_dropout: float = 0.0
    torch_dtype: str = "bfloat16"
    model_type: str = "kimi_k2"
    architectures: tuple[str, ...] = SUPPORTED_ARCHITECTURES
    quantization: QuantizationConfig | None = None

    # ---- derived sizes ------------------------------------------------------------------------

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width of the expanded (prefill) form: nope + rope (192 for K2)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer: normalized latent + rotated k_pe (576 for K2)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim**-0.5 * mscale**2`` with YaRN's mscale (0.1446796 for Kimi K2 Thinking)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling is not None:
            m = yarn_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if self.is_moe_layer(i))

    def experts_per_layer(self, expert_ids: ExpertIds | None) -> dict[int, tuple[int, ...]]:
        """{MoE layer id: logical expert ids in slot order}; None = every expert in every layer."""
        if expert_ids is None:
            return dict.fromkeys(self.moe_layer_ids, tuple(range(self.n_routed_experts)))
        if isinstance(expert_ids, Mapping):
            per_layer = {int(layer): tuple(int(e) for e in ids) for layer, ids in expert_ids.items()}
            missing = sorted(set(self.moe_layer_ids) - set(per_layer))
            if missing:
                raise ValueError(f"expert_ids: no experts given for MoE layers {missing}")
        else:
            per_layer = dict.fromkeys(self.moe_layer_ids, tuple(int(e) for e in expert_ids))
        bad = sorted({e for ids in per_layer.values() for e in ids if not 0 <= e < self.n_routed_experts})
        if bad:
            raise ValueError(f"expert_ids {bad} are outside [0, {self.n_routed_experts})")
        return per_layer

    def is_quantized(self, module_name: str) -> bool:
        """True when ``module_name`` (a Linear module) is stored pack-quantized in the checkpoint."""
        return self.quantization is not None and not self.quantization.is_ignored(module_name)

    # ---- parsing --------------------------------------------------------------------------------

    @staticmethod
    def from_model_dir(model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError("config.json", f"not found in {model_dir}")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError("config.json", f"invalid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError("config.json", "top level must be an object")
        return ModelConfig.from_dict(raw)

    @staticmethod
    def from_dict(raw: Mapping[str, Any]) -> ModelConfig:
        known = {f for f in ModelConfig.__dataclass_fields__ if f != "quantization"}
        unknown = set(raw) - known - _IGNORED_KEYS - {"quantization_config"}
        if unknown:
            logger.info("config.json: ignoring unknown keys %s", sorted(unknown))
        kwargs: dict[str, Any] = {}
        for name in known:
            if name in raw:
                kwargs[name] = raw[name]
        for required in (*_REQUIRED_SIZES, "n_routed_experts"):
            if raw.get(required) is None:
                raise ConfigError(required, "missing")
        kwargs.setdefault("q_lora_rank", None)
        kwargs.setdefault("n_shared_experts", 0)
        if kwargs.get("n_shared_experts") is None:
            kwargs["n_shared_experts"] = 0
        for name in ("n_group", "topk_group"):
            if kwargs.get(name) is None:
                kwargs[name] = 1
        rope_raw = raw.get("rope_scaling")
        kwargs["rope_scaling"] = RopeScaling.from_dict(rope_raw) if rope_raw else None
        eos = raw.get("eos_token_id")
        kwargs["eos_token_id"] = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        kwargs["architectures"] = tuple(raw.get("architectures") or SUPPORTED_ARCHITECTURES)
        quant_raw = raw.get("quantization_config")
        kwargs["quantization"] = QuantizationConfig.from_dict(quant_raw) if quant_raw else None
        _check_types(kwargs)
        config = ModelConfig(**kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first inconsistent field."""
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError("model_type", f"unsupported {self.model_type!r}; expected one of {SUPPORTED_MODEL_TYPES}")
        for arch in self.architectures:
            if arch not in SUPPORTED_ARCHITECTURES:
                raise ConfigError("architectures", f"unsupported {arch!r}; expected {SUPPORTED_ARCHITECTURES}")
        positive = (*_REQUIRED_SIZES, "moe_layer_freq", "n_group", "topk_group", "max_position_embeddings")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError("q_lora_rank", f"must be > 0 or null, got {self.q_lora_rank}")
        if self.n_routed_experts < 0 or self.n_shared_experts < 0:
            raise ConfigError("n_routed_experts", "expert counts must be >= 0")
        if self.qk_rope_head_dim % 2:
            raise ConfigError("qk_rope_head_dim", f"must be even (rotary pairs), got {self.qk_rope_head_dim}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ConfigError(
                "first_k_dense_replace", f"must be in [0, num_hidden_layers], got {self.first_k_dense_replace}"
            )
        if self.hidden_act != "silu":
            raise ConfigError("hidden_act", f"unsupported {self.hidden_act!r}; only 'silu'")
        if self.topk_method != "noaux_tc":
            raise ConfigError("topk_method", f"unsupported {self.topk_method!r}; only 'noaux_tc'")
        if self.scoring_func != "sigmoid":
            raise ConfigError("scoring_func", f"unsupported {self.scoring_func!r}; only 'sigmoid'")
        if self.n_routed_experts:
            if self.n_routed_experts % self.n_group:
                raise ConfigError(
                    "n_group", f"n_routed_experts {self.n_routed_experts} is not divisible by n_group {self.n_group}"
                )
            if self.topk_group > self.n_group:
                raise ConfigError("topk_group", f"{self.topk_group} exceeds n_group {self.n_group}")
            per_group = self.n_routed_experts // self.n_group
            if self.n_group > 1 and per_group < 2:
                raise ConfigError("n_group", "group-limited routing needs at least 2 experts per group")
            if self.num_experts_per_tok > self.topk_group * per_group:
                raise ConfigError(
                    "num_experts_per_tok",
                    f"{self.num_experts_per_tok} exceeds the {self.topk_group * per_group} experts of the selected groups",
                )
        if self.rms_norm_eps <= 0:
            raise ConfigError("rms_norm_eps", f"must be > 0, got {self.rms_norm_eps}")
        if self.rope_theta <= 0:
            raise ConfigError("rope_theta", f"must be > 0, got {self.rope_theta}")
        if self.attention_bias:
            raise ConfigError("attention_bias", "biased attention projections are not supported")
        if self.torch_dtype not in ("bfloat16", "float16", "float32"):
            raise ConfigError("torch_dtype", f"unsupported {self.torch_dtype!r}")
        for tok in ("bos_token_id", "pad_token_id"):
            value = getattr(self, tok)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ConfigError(tok, f"{value} is outside the vocabulary of {self.vocab_size}")
        for value in self.eos_token_id:
            if not 0 <= value < self.vocab_size:
                raise ConfigError("eos_token_id", f"{value} is outside the vocabulary of {self.vocab_size}")
        if self.quantization is not None:
            gs = self.quantization.group_size
            if self.hidden_size % gs:
                raise ConfigError("hidden_size", f"{self.hidden_size} is not divisible by quantization group_size {gs}")
            if self.moe_intermediate_size % gs:
                raise ConfigError(
                    "moe_intermediate_size",
                    f"{self.moe_intermediate_size} is not divisible by quantization group_size {gs}",
                )

    def to_dict(self) -> dict[str, Any]:
        """config.json content with Kimi K2's key names (inverse of ``from_dict``)."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name == "quantization":
                if value is not None:
                    out["quantization_config"] = value.to_dict()
            elif name == "rope_scaling":
                out[name] = None if value is None else {"type": "yarn", **_dataclass_dict(value)}
            elif name == "eos_token_id":
                out[name] = value[0] if len(value) == 1 else list(value)
            elif name == "architectures":
                out[name] = list(value)
            else:
                out[name] = value
        return out


def _dataclass_dict(obj: RopeScaling) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__dataclass_fields__}


_INT_FIELDS = frozenset(
    {
        *_REQUIRED_SIZES,
        "n_routed_experts",
        "n_shared_experts",
        "first_k_dense_replace",
        "moe_layer_freq",
        "n_group",
        "topk_group",
        "max_position_embeddings",
        "num_nextn_predict_layers",
    }
)
_FLOAT_FIELDS = frozenset({"routed_scaling_factor", "rope_theta", "rms_norm_eps", "attention_dropout"})
_BOOL_FIELDS = frozenset({"norm_topk_prob", "tie_word_embeddings", "attention_bias"})


def _check_types(kwargs: dict[str, Any]) -> None:
    for name, value in kwargs.items():
        if name in _INT_FIELDS and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(name, f"must be an integer, got {value!r}")
        if name in _FLOAT_FIELDS:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(name, f"must be a number, got {value!r}")
            kwargs[name] = float(value)
        if name in _BOOL_FIELDS and not isinstance(value, bool):
            raise ConfigError(name, f"must be true or false, got {value!r}")
    q_lora = kwargs.get("q_lora_rank")
    if q_lora is not None and (isinstance(q_lora, bool) or not isinstance(q_lora, int)):
        raise ConfigError("q_lora_rank", f"must be an integer or null, got {q_lora!r}")


__all__ = ["ConfigError", "ModelConfig", "QuantizationConfig", "RopeScaling", "yarn_mscale"]
