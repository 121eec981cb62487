"""The sampler: greedy is argmax, filters and penalties follow their formulas, a seeded request draws
the same tokens whatever its batch, draws follow the softmax, logprobs come from the raw logits."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from k2serve.workers.logits_processors import apply_min_p, apply_penalties, apply_top_k, apply_top_p
from k2serve.workers.sampler import Sampler, SamplingState
from k2serve.workers.sampling_params import SamplingParams

VOCAB = 64


def _state(prompt: Sequence[int] = (0,), stops: Sequence[int] = (), **params: Any) -> SamplingState:
    return SamplingState.create(SamplingParams(**params), prompt, stop_ids_for_min_tokens=stops)


def _logits(num_rows: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(num_rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3  # [N, V]


def _generate(sampler: Sampler, states: Sequence[SamplingState], steps: int) -> list[list[int]]:
    """Run ``steps`` steps over fixed per-step logits, appending like the engine does."""
    out: list[list[int]] = [[] for _ in states]
    for step in range(steps):
        logits = _logits(len(states), seed=step)
        logits[:] = logits[0]  # every row sees the same distribution; only its state differs
        for row, token in enumerate(sampler.sample(logits, states).token_ids):
            states[row].output_token_ids.append(token)
            out[row].append(token)
    return out


def _probs(*values: float) -> torch.Tensor:
    return torch.tensor([values])  # [1, V]


# ---- greedy ---------------------------------------------------------------------------------------------


def test_greedy_rows_equal_argmax_exactly_in_a_mixed_batch() -> None:
    logits = _logits(8)
    original = logits.clone()
    states = [_state(temperature=0.0) if i % 2 == 0 else _state(seed=i, top_k=5, min_p=0.1) for i in range(8)]
    states[1] = _state(seed=1, frequency_penalty=1.0, min_tokens=2, stops=(0,))  # mask + penalty rows too
    states[1].output_token_ids.append(3)
    tokens = Sampler().sample(logits, states).token_ids
    assert torch.equal(logits, original)  # the engine's logits are never modified
    expected = logits.argmax(dim=-1).tolist()
    assert [tokens[i] for i in range(0, 8, 2)] == [expected[i] for i in range(0, 8, 2)]


def test_greedy_ties_take_the_lowest_id() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0]])
    assert Sampler().sample(logits, [_state(temperature=0.0)]).token_ids == [1]


def test_greedy_draws_nothing_from_the_generator() -> None:
    state = _state(temperature=0.0, seed=3)
    Sampler().sample(_logits(1), [state])
    assert state._generator is None


def test_temperature_near_zero_approaches_greedy() -> None:
    logits = _logits(32)
    states = [_state(temperature=1e-4, seed=i) for i in range(32)]
    assert Sampler().sample(logits, states).token_ids == logits.argmax(dim=-1).tolist()


def test_top_k_one_equals_greedy() -> None:
    logits = _logits(32)
    states = [_state(top_k=1, seed=i) for i in range(32)]
    assert Sampler().sample(logits, states).token_ids == logits.argmax(dim=-1).tolist()


# ---- filters ---------------------------------------------------------------------------------------------


def test_top_k_keeps_the_k_largest_and_disabled_rows_unchanged() -> None:
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [1.0, 4.0, 3.0, 2.0], [1.0, 4.0, 3.0, 2.0]])
    out = apply_top_k(logits, torch.tensor([2, -1, 0]))
    inf = float("-inf")
    assert out[0].tolist() == [inf, 4.0, 3.0, inf]
    assert torch.equal(out[1:], logits[1:])


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = _probs(0.15, 0.5, 0.05, 0.3)  # sorted: 0.5, 0.3, 0.15, 0.05
    kept = {p: (apply_top_p(probs, torch.tensor([p]))[0] > 0).nonzero().flatten().tolist() for p in (0.4, 0.75, 0.9)}
    assert kept == {0.4: [1], 0.75: [1, 3], 0.9: [0, 1, 3]}
    assert torch.equal(apply_top_p(probs, torch.tensor([1.0])), probs)


def test_top_p_draws_only_from_the_nucleus() -> None:
    logits = _probs(0.15, 0.5, 0.05, 0.3).log()
    state = _state(top_p=0.75, seed=0)
    drawn = {Sampler().sample(logits, [state]).token_ids[0] for _ in range(300)}
    assert drawn == {1, 3}


def test_min_p_drops_tokens_below_min_p_times_the_top_probability() -> None:
    probs = _probs(0.15, 0.5, 0.05, 0.3)
    out = apply_min_p(probs, torch.tensor([0.2]))  # threshold 0.1
    assert out[0].tolist() == pytest.approx([0.15, 0.5, 0.0, 0.3])
    logits = probs.log()
    state = _state(min_p=0.5, seed=0)  # threshold 0.25: only ids 1 and 3 survive
    assert {Sampler().sample(logits, [state]).token_ids[0] for _ in range(300)} == {1, 3}


# ---- penalties and min_tokens -------------------------------------------------------------------------------


def test_penalties_follow_the_hf_and_openai_formulas() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -0.5]])
    counts = torch.tensor([[2.0, 1.0, 0.0, 0.0, 0.0]])  # output: id 0 twice, id 1 once
    prompt = torch.tensor([[False, False, True, False, False]])  # prompt: id 2
    out = apply_penalties(logits, counts, prompt, torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([0.25]))
    expected = [
        2.0 / 2 - 0.25 * 2 - 0.5,  # positive, generated twice
        -1.0 * 2 - 0.25 * 1 - 0.5,  # negative, generated once
        0.5 / 2,  # in the prompt only: repetition penalty alone
        3.0,  # never seen
        -0.5,  # never seen
    ]
    assert out[0].tolist() == pytest.approx(expected)


def test_penalties_steer_a_greedy_request_away_from_its_output() -> None:
    logits = torch.tensor([[3.0, 2.5, 0.0, 0.0]])
    state = _state(prompt=(2,), temperature=0.0, presence_penalty=1.0)
    state.output_token_ids.append(0)
    assert Sampler().sample(logits, [state]).token_ids == [1]
    repeat = _state(prompt=(0,), temperature=0.0, repetition_penalty=1.5)  # 3 / 1.5 < 2.5
    assert Sampler().sample(logits, [repeat]).token_ids == [1]


def test_neutral_penalties_leave_greedy_bit_exact() -> None:
    logits = _logits(4)
    states = [_state(temperature=0.0, presence_penalty=0.0, repetition_penalty=1.0) for _ in range(4)]
    assert Sampler().sample(logits, states).token_ids == logits.argmax(dim=-1).tolist()


def test_min_tokens_masks_stop_ids_until_reached() -> None:
    logits = torch.tensor([[0.0, 1.0, 0.0, 9.0, 8.0]])  # the stop ids 3 and 4 are the favourites
    state = _state(temperature=0.0, min_tokens=2, stops=(3, 4))
    tokens = []
    for _ in range(3):
        token = Sampler().sample(logits, [state]).token_ids[0]
        state.output_token_ids.append(token)
        tokens.append(token)
    assert tokens == [1, 1, 3]


def test_min_tokens_mask_holds_for_random_draws() -> None:
    logits = torch.zeros(1, 4)
    state = _state(seed=0, min_tokens=1000, stops=(0, 2))
    assert {Sampler().sample(logits, [state]).token_ids[0] for _ in range(200)} == {1, 3}


# ---- seeds and the draw ----------------------------------------------------------------------------------------


def test_same_seed_same_tokens_alone_and_at_another_row_with_other_batch_mates() -> None:
    sampler = Sampler()
    alone = _generate(sampler, [_state(seed=42, top_p=0.9)], steps=20)[0]
    batch = [_state(temperature=0.0), _state(seed=7, top_k=3), _state(seed=42, top_p=0.9), _state(min_p=0.1)]
    assert _generate(sampler, batch, steps=20)[2] == alone


def test_different_seeds_draw_different_tokens() -> None:
    sequences = _generate(Sampler(), [_state(seed=s) for s in range(4)], steps=30)
    assert len({tuple(seq) for seq in sequences}) == 4


def test_unseeded_requests_differ() -> None:
    a, b = _state(), _state()
    assert a.seed != b.seed
    sequences = _generate(Sampler(), [a, b], steps=30)
    assert sequences[0] != sequences[1]


def test_seeded_draws_follow_the_softmax() -> None:
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0, 0.5]])
    expected = torch.softmax(logits[0] / 0.8, dim=-1).tolist()
    state = _state(seed=1234, temperature=0.8)
    sampler = Sampler()
    num_draws = 4000
    counts = Counter(sampler.sample(logits, [state]).token_ids[0] for _ in range(num_draws))
    chi_square = sum((counts[i] - num_draws * p) ** 2 / (num_draws * p) for i, p in enumerate(expected))
    assert chi_square < 18.47  # chi-square, 4 degrees of freedom, p = 0.001


# ---- logprobs --------------------------------------------------------------------------------------------


def test_logprobs_come_from_the_raw_distribution_sorted_with_rank() -> None:
    logits = _logits(3)
    raw = torch.log_softmax(logits, dim=-1)
    states = [
        _state(seed=0, temperature=0.5, presence_penalty=1.0, logprobs=5),
        _state(temperature=0.0),
        _state(seed=1, logprobs=0),
    ]
    states[0].output_token_ids.extend([1, 2, 3])
    out = Sampler().sample(logits, states)
    assert out.logprobs is not None and out.logprobs[1] is None
    for row in (0, 2):
        record = out.logprobs[row]
        assert record is not None and record.token_id == out.token_ids[row]
        assert record.logprob == pytest.approx(raw[row, record.token_id].item(), abs=1e-6)
        assert record.rank == int((raw[row] >= raw[row, record.token_id]).sum())
    top = out.logprobs[0]
    assert top is not None and len(top.top_token_ids) == 5
    assert list(top.top_logprobs) == sorted(top.top_logprobs, reverse=True)
    assert list(top.top_token_ids) == raw[0].topk(5).indices.tolist()
    assert out.logprobs[2] is not None and out.logprobs[2].top_token_ids == ()


def test_greedy_token_has_rank_one() -> None:
    out = Sampler().sample(_logits(1), [_state(temperature=0.0, logprobs=1)])
    assert out.logprobs is not None and out.logprobs[0] is not None
    assert out.logprobs[0].rank == 1 and out.logprobs[0].top_token_ids == (out.token_ids[0],)


def test_no_logprobs_requested_gives_none() -> None:
    assert Sampler().sample(_logits(2), [_state(), _state()]).logprobs is None


# ---- the state and the call ------------------------------------------------------------------------------------


def test_output_ids_tensor_follows_the_appended_list() -> None:
    state = _state()
    for token in range(100):
        state.output_token_ids.append(token % 7)
        assert state.output_ids_tensor().tolist() == state.output_token_ids
    state.output_token_ids = [5]
    assert state.output_ids_tensor().tolist() == [5]


def test_logits_rows_must_match_the_states() -> None:
    with pytest.raises(ValueError, match="logits"):
        Sampler().sample(_logits(2), [_state()])
    assert Sampler().sample(torch.zeros(0, VOCAB), []).token_ids == []


def test_float_probability_space_is_never_nan() -> None:
    logits = torch.full((1, VOCAB), -math.inf)
    logits[0, 5] = 0.0  # a model that masks all but one id
    assert Sampler().sample(logits, [_state(seed=0, top_p=0.5, min_p=0.1, top_k=3)]).token_ids == [5]
