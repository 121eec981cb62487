"""ModelConfig reads Kimi K2 Thinking's config.json and names the field of every bad value."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from k2serve.workers.config import ConfigError, ModelConfig

K2_CONFIG = Path(__file__).parent / "data" / "kimi_k2_thinking_config.json"


def _raw() -> dict[str, Any]:
    return json.loads(K2_CONFIG.read_text())


def test_real_config_parses_with_kimi_values() -> None:
    config = ModelConfig.from_dict(_raw())
    assert config.num_hidden_layers == 61 and config.n_routed_experts == 384
    assert config.kv_cache_dim == 576 and config.qk_head_dim == 192
    assert config.moe_layer_ids == tuple(range(1, 61))
    assert config.eos_token_id == (163586,)
    assert config.rope_scaling is not None and config.rope_scaling.factor == 64.0
    assert config.softmax_scale == pytest.approx(0.1446796, abs=5e-7)


def test_quantization_ignore_list_selects_only_routed_experts() -> None:
    config = ModelConfig.from_dict(_raw())
    assert config.is_quantized("model.layers.1.mlp.experts.0.gate_proj")
    assert config.is_quantized("model.layers.60.mlp.experts.383.down_proj")
    for name in (
        "lm_head",
        "model.layers.1.self_attn.kv_b_proj",
        "model.layers.1.mlp.shared_experts.up_proj",
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.down_proj",
    ):
        assert not config.is_quantized(name), name


def test_config_round_trips_through_to_dict() -> None:
    config = ModelConfig.from_dict(_raw())
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_from_model_dir_reads_the_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(K2_CONFIG.read_text())
    assert ModelConfig.from_model_dir(tmp_path).hidden_size == 7168


def _mutated(path: str, value: Any) -> dict[str, Any]:
    raw = copy.deepcopy(_raw())
    node = raw
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return raw


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("hidden_size", 7000, "hidden_size"),
        ("moe_intermediate_size", 2050, "moe_intermediate_size"),
        ("quantization_config.quant_method", "fp8", "quantization_config.quant_method"),
        ("quantization_config.format", "naive-quantized", "quantization_config.format"),
        (
            "quantization_config.config_groups.group_0.weights.num_bits",
            8,
            "quantization_config.config_groups.group_0.weights.num_bits",
        ),
        (
            "quantization_config.config_groups.group_0.weights.symmetric",
            False,
            "quantization_config.config_groups.group_0.weights.symmetric",
        ),
        ("topk_method", "greedy", "topk_method"),
        ("scoring_func", "softmax", "scoring_func"),
        ("hidden_act", "gelu", "hidden_act"),
        ("n_group", 5, "n_group"),
        ("topk_group", 2, "topk_group"),
        ("num_experts_per_tok", 400, "num_experts_per_tok"),
        ("qk_rope_head_dim", 63, "qk_rope_head_dim"),
        ("rope_scaling.type", "linear", "rope_scaling.type"),
        ("rope_scaling.factor", _DELETE, "rope_scaling.factor"),
        ("vocab_size", _DELETE, "vocab_size"),
        ("num_hidden_layers", "61", "num_hidden_layers"),
        ("rms_norm_eps", 0.0, "rms_norm_eps"),
        ("eos_token_id", 999999, "eos_token_id"),
        ("model_type", "llama", "model_type"),
        ("architectures", ["LlamaForCausalLM"], "architectures"),
        ("first_k_dense_replace", 99, "first_k_dense_replace"),
    ],
)
def test_bad_value_raises_config_error_naming_the_field(path: str, value: Any, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict(_mutated(path, value))
    assert info.value.field == field
    assert field in str(info.value)


def test_missing_config_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config\.json"):
        ModelConfig.from_model_dir(tmp_path)
