"""Our forward pass against an independent implementation: transformers' ``DeepseekV3ForCausalLM``.

Both models load the same random fp32 state dict (tiny preset: YaRN rope with K2's parameters,
interleaved pairs, a dense layer then MoE layers with a non-zero gate bias and a shared expert,
routed_scaling_factor 2.827). Our batch is flattened (prompts of different lengths in one
ForwardBatch); HF runs each prompt on its own.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from model_fixtures import (
    batched_greedy,
    build_hf_model,
    build_model,
    hf_config,
    random_state_dict,
)

from k2serve.workers.config import ModelConfig
from k2serve.workers.model.forward_batch import make_forward_batch
from k2serve.workers.model.kv_cache import allocate_kv_cache
from k2serve.workers.model.model import KimiK2ForCausalLM

pytest.importorskip("transformers")

PROMPT_LENGTHS = (7, 1, 19, 33)


def _prompts(config: ModelConfig, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def _ours_flattened(model: KimiK2ForCausalLM, prompts: list[list[int]]) -> torch.Tensor:
    batch = make_forward_batch(prompts, block_size=4)
    cache = allocate_kv_cache(model.config, 64, 4, torch.float32, "cpu")
    return model(batch, cache)  # [sum(lengths), V]


def _hf_per_prompt(hf_model: torch.nn.Module, prompts: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([hf_model(torch.tensor([p])).logits[0] for p in prompts]).float()


def _assert_logits_match_hf(config: ModelConfig, seed: int = 0) -> torch.Tensor:
    state = random_state_dict(config, seed)
    prompts = _prompts(config)
    ours = _ours_flattened(build_model(config, state), prompts)
    ref = _hf_per_prompt(build_hf_model(config, state), prompts)
    assert ours.shape == ref.shape == (sum(PROMPT_LENGTHS), config.vocab_size)
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() <= 1e-4
    return ours


def test_state_dict_names_are_the_checkpoint_names_and_load_into_hf(tiny: ModelConfig) -> None:
    from transformers import DeepseekV3ForCausalLM

    model = KimiK2ForCausalLM(tiny, dtype=torch.float32, max_positions=64)  # device=None: the default device
    assert not any(p.is_meta for p in model.parameters())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    loaded = {k: tuple(v.shape) for k, v in random_state_dict(tiny, 0).items()}  # the loader's output
    assert ours == loaded
    hf = {k: tuple(v.shape) for k, v in DeepseekV3ForCausalLM(hf_config(tiny)).state_dict().items()}
    assert ours == hf
    assert not any("rotary" in k or "logical_to_local" in k for k in ours)  # derived buffers are non-persistent


def test_expert_subset_stacks_only_the_local_experts_in_the_given_order(tiny: ModelConfig) -> None:
    expert_ids = [5, 2, 7]
    state = random_state_dict(tiny, 0, expert_ids=expert_ids)
    full = random_state_dict(tiny, 0)
    model = build_model(tiny, state, expert_ids=expert_ids)
    assert model.state_dict().keys() == full.keys()
    experts = model.model.layers[1].mlp.experts
    assert experts.gate_up_proj.shape == (3, 2 * tiny.moe_intermediate_size, tiny.hidden_size)
    assert torch.equal(experts.gate_up_proj[0], full["model.layers.1.mlp.experts.gate_up_proj"][5])
    assert experts.to_local(torch.tensor([2, 5, 7, 0])).tolist() == [1, 0, 2, -1]


def test_gate_bias_and_rope_tables_stay_fp32_in_a_bf16_model(tiny: ModelConfig) -> None:
    state = random_state_dict(tiny, 0)
    model = build_model(tiny, state).to(torch.bfloat16)
    assert model.dtype == torch.bfloat16
    gate = model.model.layers[1].mlp.gate
    assert gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(gate.e_score_correction_bias, state["model.layers.1.mlp.gate.e_score_correction_bias"])
    assert model.model.rotary_emb.cos_cache.dtype == torch.float32
    bf16 = KimiK2ForCausalLM(tiny, dtype=torch.bfloat16, max_positions=64)
    bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in state.items()}, strict=True)
    assert bf16.model.layers[2].mlp.gate.e_score_correction_bias.dtype == torch.float32


def test_prefill_logits_of_a_flattened_batch_match_hf_per_prompt(tiny: ModelConfig) -> None:
    _assert_logits_match_hf(tiny)


def test_greedy_decode_with_paged_cache_and_absorbed_form_matches_hf_generate(tiny: ModelConfig) -> None:
    state = random_state_dict(tiny, 0)
    prompts = _prompts(tiny)
    ours = batched_greedy(build_model(tiny, state), prompts, 32, block_size=4)
    hf_model = build_hf_model(tiny, state)
    for prompt, tokens in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
        assert out[0, len(prompt) :].tolist() == tokens
    assert len({tuple(t) for t in ours}) > 1


def test_group_limited_routing_matches_hf(tiny: ModelConfig) -> None:
    """n_group=2, topk_group=1: only the 4 experts of the best group are eligible.

    transformers 5.23's router masks the experts of dropped groups with -inf like DeepSeek-V3's
    reference (older transformers and the remote modeling_deepseek.py fill 0.0). The fixture's
    biases are >= 0, so every biased score s + bias is > 0 and a 0.0 fill would choose the same
    experts too: the comparison holds for either HF behaviour.
    """
    grouped = dataclasses.replace(tiny, n_group=2, topk_group=1)
    grouped.validate()
    logits_grouped = _assert_logits_match_hf(grouped)
    plain = _ours_flattened(build_model(tiny, random_state_dict(tiny, 0)), _prompts(tiny))
    assert not torch.allclose(logits_grouped, plain, atol=1e-3)  # the group limit changed some choices


def test_attention_without_q_lora_matches_hf(tiny: ModelConfig) -> None:
    _assert_logits_match_hf(dataclasses.replace(tiny, q_lora_rank=None))
