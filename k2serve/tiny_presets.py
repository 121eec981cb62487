"""Architectures of the generated test models (``k2serve make-tiny-model --preset ...``).

Both presets keep the real Kimi K2 Thinking features that implementations get wrong: YaRN with the
real rope parameters and ``qk_rope_head_dim`` 64 (so the 19/20 frequency ramp is exercised), a
dense first layer, sigmoid ``noaux_tc`` routing with a non-zero bias, a shared expert,
``routed_scaling_factor`` 2.827, ``rms_norm_eps`` 1e-6, and INT4 group-32 routed experts.
"""

from __future__ import annotations

from dataclasses import dataclass

from k2serve.workers.config import ModelConfig, RopeScaling
from k2serve.workers.quantization_config import kimi_k2_quantization

NUM_RESERVED_SPECIAL_TOKENS = 256  # Kimi's tokenizer: ids [num_base, num_base + 256) are special


@dataclass(frozen=True)
class TinyPreset:
    name: str
    num_base_tokens: int  # BPE ranks in tiktoken.model; vocab_size = this + 256
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int


PRESETS = {
    # Tests: loads in milliseconds; 8 experts, top-2, two MoE layers after one dense layer.
    "tiny": TinyPreset("tiny", 512, 64, 128, 32, 3, 4, 32, 32, 16, 16, 8, 2, 1, 1),
    # Benchmarks: large enough that a CPU forward pass is dominated by GEMMs, not Python.
    "small": TinyPreset("small", 2048, 1024, 2816, 256, 6, 16, 384, 256, 64, 64, 64, 6, 1, 1),
}


def preset_config(name: str) -> ModelConfig:
    """The ``ModelConfig`` of a preset, with Kimi K2 Thinking's special-token layout."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[name]
    base = p.num_base_tokens
    config = ModelConfig(
        vocab_size=base + NUM_RESERVED_SPECIAL_TOKENS,
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        moe_intermediate_size=p.moe_intermediate_size,
        num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_attention_heads,
        q_lora_rank=p.q_lora_rank,
        kv_lora_rank=p.kv_lora_rank,
        qk_nope_head_dim=p.qk_nope_head_dim,
        qk_rope_head_dim=64,
        v_head_dim=p.v_head_dim,
        n_routed_experts=p.n_routed_experts,
        n_shared_experts=1,
        num_experts_per_tok=p.num_experts_per_tok,
        first_k_dense_replace=1,
        moe_layer_freq=1,
        n_group=p.n_group,
        topk_group=p.topk_group,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.827,
        hidden_act="silu",
        max_position_embeddings=262144,
        rope_theta=50000.0,
        rope_scaling=RopeScaling(
            factor=64.0,
            original_max_position_embeddings=4096,
            beta_fast=1.0,
            beta_slow=1.0,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
        rms_norm_eps=1e-6,
        # Same offsets as the real tokenizer: [BOS] = base, <|im_end|> = base + 2, [PAD] = base + 255.
        bos_token_id=base,
        eos_token_id=(base + 2,),
        pad_token_id=base + 255,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        model_type="kimi_k2",
        quantization=kimi_k2_quantization(32),
    )
    config.validate()
    return config
