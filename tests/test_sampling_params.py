"""SamplingParams: OpenAI/vLLM defaults, every bad value names its field, n > 1 children."""

from __future__ import annotations

from typing import Any

import pytest

from k2serve.workers.sampling_params import SamplingParams, SamplingParamsError


def test_defaults_are_kimi_k2_thinking_recommendations() -> None:
    params = SamplingParams()
    assert params.temperature == 1.0 and params.top_p == 1.0 and params.n == 1
    assert params.top_k == -1 and params.min_p == 0.0 and params.max_tokens is None
    assert not params.is_greedy and not params.has_penalties
    params.validate(vocab_size=163840)


def test_temperature_zero_is_greedy() -> None:
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=0).temperature == 0.0  # ints are normalised to float


def test_stop_token_ids_list_becomes_a_tuple() -> None:
    from_json: dict[str, Any] = {"stop_token_ids": [5, 7]}
    assert SamplingParams(**from_json).stop_token_ids == (5, 7)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": "1.0"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"n": 0}, "n"),
        ({"n": 129}, "n"),
        ({"seed": 1.5}, "seed"),
        ({"stop_token_ids": (1, -3)}, "stop_token_ids"),
        ({"stop_token_ids": "12"}, "stop_token_ids"),
        ({"ignore_eos": 1}, "ignore_eos"),
    ],
)
def test_every_bad_value_names_its_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field
    assert f"'{field}'" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_stop_id_outside_the_vocabulary_is_refused_at_validate() -> None:
    params = SamplingParams(stop_token_ids=(3, 100))
    params.validate()  # no vocabulary known yet: fine
    with pytest.raises(SamplingParamsError) as info:
        params.validate(vocab_size=100)
    assert info.value.field == "stop_token_ids"


def test_boundary_values_are_accepted() -> None:
    SamplingParams(
        temperature=0.0,
        top_p=1.0,
        top_k=0,
        min_p=1.0,
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        max_tokens=1,
        min_tokens=1,
        logprobs=20,
        n=128,
        seed=-5,
    ).validate(vocab_size=10)


def test_children_get_n_one_and_consecutive_seeds() -> None:
    params = SamplingParams(n=3, seed=10, temperature=0.7)
    children = [params.for_child(i) for i in range(3)]
    assert [c.seed for c in children] == [10, 11, 12]
    assert all(c.n == 1 and c.temperature == 0.7 for c in children)


def test_children_of_an_unseeded_request_stay_unseeded() -> None:
    assert SamplingParams(n=2).for_child(1).seed is None


def test_child_index_must_be_within_n() -> None:
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(n=2).for_child(2)
    assert info.value.field == "index"
