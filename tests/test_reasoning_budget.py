"""The reasoning budget: after ``max_reasoning_tokens`` output tokens without ``</think>`` the engine
forces ``</think>`` and the model continues its answer from there — greedy and sampled, and not at
all when the model ended its reasoning itself."""

from __future__ import annotations

import pytest

from k2serve.tiny_model import make_tiny_model
from k2serve.workers.engine import Engine, EngineConfig
from k2serve.workers.greedy import greedy_generate
from k2serve.workers.model.kv_cache import allocate_kv_cache
from k2serve.workers.model.model import KimiK2ForCausalLM
from k2serve.workers.model_loader import load_model
from k2serve.workers.sampling_params import SamplingParams, SamplingParamsError

PROMPT = [11, 300, 42, 7, 99]
THINK_END = 700  # any id works for the engine; the router passes the tokenizer's </think>


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> KimiK2ForCausalLM:
    return load_model(make_tiny_model(tmp_path_factory.mktemp("budget") / "tiny", seed=2), max_positions=128)


def _run(model: KimiK2ForCausalLM, params: SamplingParams) -> list[int]:
    engine = Engine(
        model, allocate_kv_cache(model.config, 64, 4, model.dtype, model.device), EngineConfig(block_size=4)
    )
    engine.add_request("r", PROMPT, params)
    tokens: list[int] = []
    for _ in range(200):
        if not engine.has_unfinished_requests():
            return tokens
        for out in engine.step():
            tokens.extend(out.new_token_ids)
    raise AssertionError("unfinished")


@pytest.mark.parametrize("budget", [0, 3])
def test_the_engine_closes_the_reasoning_and_the_model_answers_from_there(
    model: KimiK2ForCausalLM, budget: int
) -> None:
    params = SamplingParams(
        temperature=0.0,
        max_tokens=10,
        ignore_eos=True,
        max_reasoning_tokens=budget,
        reasoning_end_token_ids=(THINK_END,),
    )
    out = _run(model, params)
    oracle = greedy_generate(model, PROMPT, max_tokens=10)
    assert THINK_END not in oracle[:budget]  # the budget really cut the reasoning short
    assert out[:budget] == oracle[:budget] and out[budget] == THINK_END
    continuation = greedy_generate(model, PROMPT + out[: budget + 1], max_tokens=10 - budget - 1)
    assert out[budget + 1 :] == continuation  # and the answer follows from the forced </think>


def test_a_model_that_ends_its_reasoning_itself_is_left_alone(model: KimiK2ForCausalLM) -> None:
    oracle = greedy_generate(model, PROMPT, max_tokens=10)
    own_end = oracle[1]  # pretend the model's second token is </think>
    params = SamplingParams(
        temperature=0.0, max_tokens=10, ignore_eos=True, max_reasoning_tokens=4, reasoning_end_token_ids=(own_end,)
    )
    assert _run(model, params) == oracle


def test_sampled_requests_obey_the_budget_too(model: KimiK2ForCausalLM) -> None:
    params = SamplingParams(
        temperature=1.0,
        seed=5,
        max_tokens=8,
        ignore_eos=True,
        max_reasoning_tokens=2,
        reasoning_end_token_ids=(THINK_END,),
    )
    out = _run(model, params)
    assert THINK_END in out[:3]


def test_a_budget_needs_the_end_id() -> None:
    with pytest.raises(SamplingParamsError, match="reasoning_end_token_ids"):
        SamplingParams(max_reasoning_tokens=5)
    with pytest.raises(SamplingParamsError, match="max_reasoning_tokens"):
        SamplingParams(max_reasoning_tokens=-1, reasoning_end_token_ids=(3,))
