"""The independent reference: Hugging Face transformers' ``DeepseekV3ForCausalLM`` on our weights.

Used by the tests (logits and greedy tokens must match) and by ``k2serve bench engine`` (the peer
whose batched ``generate`` we compare with). transformers is a test/benchmark dependency only and
is imported lazily. Our state-dict names are transformers 5.x's, so one dict loads into both.
"""

from __future__ import annotations

from typing import Any

import torch

from k2serve.workers.config import ModelConfig


def hf_config(config: ModelConfig, **overrides: Any) -> Any:
    """The transformers ``DeepseekV3Config`` of ``config``: yarn ``rope_scaling`` + ``rope_theta`` folded
    into ``rope_parameters``, interleaved rope, no MTP layer, eager attention and experts, no EOS
    (so ``generate`` always produces the requested number of tokens)."""
    from transformers import DeepseekV3Config

    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        s = config.rope_scaling
        rope = {
            "rope_type": "yarn",
            "rope_theta": config.rope_theta,
            "factor": s.factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
            "beta_fast": s.beta_fast,
            "beta_slow": s.beta_slow,
            "mscale": s.mscale,
            "mscale_all_dim": s.mscale_all_dim,
        }
    kwargs: dict[str, Any] = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "moe_intermediate_size": config.moe_intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_attention_heads,
        "n_shared_experts": config.n_shared_experts,
        "n_routed_experts": config.n_routed_experts,
        "routed_scaling_factor": config.routed_scaling_factor,
        "kv_lora_rank": config.kv_lora_rank,
        "q_lora_rank": config.q_lora_rank,
        "qk_rope_head_dim": config.qk_rope_head_dim,
        "qk_nope_head_dim": config.qk_nope_head_dim,
        "v_head_dim": config.v_head_dim,
        "n_group": config.n_group,
        "topk_group": config.topk_group,
        "num_experts_per_tok": config.num_experts_per_tok,
        "first_k_dense_replace": config.first_k_dense_replace,
        "norm_topk_prob": config.norm_topk_prob,
        "hidden_act": config.hidden_act,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": rope,
        "rope_interleave": True,
        "num_mtp_layers": 0,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": None,
        "pad_token_id": config.pad_token_id,
        "attn_implementation": "eager",
        "experts_implementation": "eager",
    }
    kwargs.update(overrides)
    return DeepseekV3Config(**kwargs)


def build_hf_model(config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> Any:
    from transformers import DeepseekV3ForCausalLM

    if config.moe_layer_freq != 1:
        raise ValueError("moe_layer_freq: transformers makes every layer >= first_k_dense_replace MoE; need 1")
    model = DeepseekV3ForCausalLM(hf_config(config))
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
