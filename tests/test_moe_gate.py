"""The noaux_tc sigmoid gate, the stacked local experts and the local expert dispatcher."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from model_fixtures import random_state_dict

from k2serve.tiny_presets import preset_config
from k2serve.workers.config import ModelConfig
from k2serve.workers.dispatcher import LocalDispatcher
from k2serve.workers.model.experts import LocalExperts
from k2serve.workers.model.moe import MoE, MoEGate

SCALE = 2.827


@pytest.fixture(scope="module")
def tiny() -> ModelConfig:
    config = preset_config("tiny")
    assert (config.n_routed_experts, config.num_experts_per_tok, config.routed_scaling_factor) == (8, 2, SCALE)
    return config


def _gate(config: ModelConfig, logits: list[float], bias: list[float]) -> tuple[MoEGate, torch.Tensor]:
    """A gate whose router logits for the returned input [1, H] are exactly ``logits``."""
    gate = MoEGate(config, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[:, 0] = torch.tensor(logits)
        gate.e_score_correction_bias.copy_(torch.tensor(bias))
    x = torch.zeros(1, config.hidden_size)
    x[0, 0] = 1.0
    return gate, x


def test_selection_uses_biased_scores_but_weights_use_unbiased_scores(tiny: ModelConfig) -> None:
    logits = [2.0, 1.5, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0]
    gate, x = _gate(tiny, logits, [0, 0, 0, 0, 0, 0, 0, 1.0])  # lifts expert 7 (s = 0.018) above expert 1
    ids, weights = gate(x)
    assert sorted(ids[0].tolist()) == [0, 7]
    s = torch.sigmoid(torch.tensor(logits))
    expected = {0: s[0] / (s[0] + s[7]) * SCALE, 7: s[7] / (s[0] + s[7]) * SCALE}
    for expert, weight in zip(ids[0].tolist(), weights[0].tolist(), strict=True):
        assert weight == pytest.approx(expected[expert].item(), rel=1e-6)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64


def test_weights_are_normalized_then_always_scaled_by_routed_scaling_factor(tiny: ModelConfig) -> None:
    state = random_state_dict(tiny, 0)
    gate = MoEGate(tiny, device="cpu", dtype=torch.float32)
    gate.load_state_dict(
        {
            "weight": state["model.layers.1.mlp.gate.weight"],
            "e_score_correction_bias": state["model.layers.1.mlp.gate.e_score_correction_bias"],
        }
    )
    x = torch.randn(50, tiny.hidden_size, generator=torch.Generator().manual_seed(0))
    ids, weights = gate(x)
    torch.testing.assert_close(weights.sum(-1), torch.full((50,), SCALE))
    # The fixture's bias really changes the choice for some tokens (so the HF comparison covers it).
    scores = torch.sigmoid(x @ gate.weight.T)
    unbiased = scores.topk(tiny.num_experts_per_tok, dim=-1).indices.sort(-1).values
    assert (unbiased != ids.sort(-1).values).any(dim=-1).sum() >= 5
    torch.testing.assert_close(weights, scores.gather(1, ids) / scores.gather(1, ids).sum(-1, keepdim=True) * SCALE)


def test_without_norm_topk_prob_weights_are_scores_times_routed_scaling_factor(tiny: ModelConfig) -> None:
    logits = [2.0, 1.5, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0]
    gate, x = _gate(dataclasses.replace(tiny, norm_topk_prob=False), logits, [0.0] * 8)
    ids, weights = gate(x)
    assert ids[0].tolist() == [0, 1]
    torch.testing.assert_close(weights[0], torch.sigmoid(torch.tensor(logits[:2])) * SCALE)


def test_group_limited_selection_picks_only_experts_of_the_best_groups(tiny: ModelConfig) -> None:
    grouped = dataclasses.replace(tiny, n_group=2, topk_group=1)  # experts 0-3 | 4-7
    # Group 0 holds the single best expert but group 1 has the larger sum of its top two.
    logits = [3.0, -2.0, -2.0, -2.0, 1.0, 1.0, -1.0, -3.0]
    gate, x = _gate(grouped, logits, [0.0] * 8)
    assert sorted(gate(x)[0][0].tolist()) == [4, 5]
    plain, _ = _gate(tiny, logits, [0.0] * 8)
    assert sorted(plain(x)[0][0].tolist()) == [0, 4]


def test_masked_groups_get_minus_inf_so_negative_biased_scores_stay_in_the_chosen_group(tiny: ModelConfig) -> None:
    """With a negative bias every s + bias is < 0; a 0.0 fill of the dropped group would win the top-k."""
    grouped = dataclasses.replace(tiny, n_group=2, topk_group=1)
    logits = [-3.0, -3.0, -3.0, -3.0, 1.0, 0.5, -1.0, -3.0]
    gate, x = _gate(grouped, logits, [-1.0] * 8)
    ids, weights = gate(x)
    assert sorted(ids[0].tolist()) == [4, 5]
    assert weights.sum().item() == pytest.approx(SCALE)


def _experts(config: ModelConfig, expert_ids: list[int], state: dict[str, torch.Tensor]) -> LocalExperts:
    experts = LocalExperts(config, expert_ids, device="cpu", dtype=torch.float32)
    experts.load_state_dict(
        {
            "gate_up_proj": state["model.layers.1.mlp.experts.gate_up_proj"][expert_ids],
            "down_proj": state["model.layers.1.mlp.experts.down_proj"][expert_ids],
        }
    )
    return experts


def _routing(config: ModelConfig, num_tokens: int, allowed: list[int], seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, config.hidden_size, generator=gen)
    choice = torch.rand(num_tokens, len(allowed), generator=gen).topk(config.num_experts_per_tok, dim=-1).indices
    ids = torch.tensor(allowed)[choice]  # [T, K] distinct logical ids per token
    weights = torch.rand(num_tokens, config.num_experts_per_tok, generator=gen)
    return x, ids, weights


def test_grouped_expert_compute_matches_a_per_token_loop(tiny: ModelConfig) -> None:
    state = random_state_dict(tiny, 0)
    experts = _experts(tiny, list(range(8)), state)
    x, ids, weights = _routing(tiny, 40, list(range(8)), seed=1)
    got = experts(x, ids, weights)
    inter = tiny.moe_intermediate_size
    expected = torch.zeros_like(x)
    for t in range(len(x)):
        for k in range(tiny.num_experts_per_tok):
            e = ids[t, k].item()
            gate_up = experts.gate_up_proj[e] @ x[t]
            h = torch.nn.functional.silu(gate_up[:inter]) * gate_up[inter:]
            expected[t] += weights[t, k] * (experts.down_proj[e] @ h)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_local_dispatcher_with_a_subset_equals_the_full_set_when_selected_experts_are_local(tiny: ModelConfig) -> None:
    state = random_state_dict(tiny, 0)
    subset = [6, 1, 3]  # any order: it is the local index order
    x, ids, weights = _routing(tiny, 30, subset, seed=2)
    dispatcher = LocalDispatcher()
    full = dispatcher.dispatch(x, ids, weights, _experts(tiny, list(range(8)), state))
    torch.testing.assert_close(dispatcher.dispatch(x, ids, weights, _experts(tiny, subset, state)), full)


def test_local_dispatcher_skips_experts_it_does_not_hold_so_disjoint_ranks_sum_to_the_full_output(
    tiny: ModelConfig,
) -> None:
    state = random_state_dict(tiny, 0)
    x, ids, weights = _routing(tiny, 30, list(range(8)), seed=3)
    dispatcher = LocalDispatcher()
    full = dispatcher.dispatch(x, ids, weights, _experts(tiny, list(range(8)), state))
    owners = list(range(8))
    random.Random(0).shuffle(owners)
    parts = [
        dispatcher.dispatch(x, ids, weights, _experts(tiny, owners[:3], state)),
        dispatcher.dispatch(x, ids, weights, _experts(tiny, owners[3:], state)),
    ]
    torch.testing.assert_close(parts[0] + parts[1], full, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(parts[0], full)
    none_local = _experts(tiny, [], state)
    assert torch.equal(dispatcher.dispatch(x, ids, weights, none_local), torch.zeros_like(x))


def test_moe_block_adds_the_unweighted_shared_expert_to_the_dispatched_output(tiny: ModelConfig) -> None:
    state = random_state_dict(tiny, 0)
    prefix = "model.layers.1.mlp."
    moe = MoE(tiny, list(range(8)), LocalDispatcher(), device="cpu", dtype=torch.float32)
    moe.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    x = torch.randn(12, tiny.hidden_size, generator=torch.Generator().manual_seed(4))
    ids, weights = moe.gate(x)
    expected = moe.experts(x, moe.experts.to_local(ids), weights) + moe.shared_experts(x)
    torch.testing.assert_close(moe(x), expected)
    assert moe(x[:0]).shape == (0, tiny.hidden_size)  # an idle rank still runs the layer
