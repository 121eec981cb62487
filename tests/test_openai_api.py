"""The OpenAI surface on a real router over real workers of the tiny model (loopback), driven by the
official ``openai`` SDK and by raw HTTP: chat and completions, streaming and not, match the
single-process greedy oracle token for token; the SSE framing is exact; tool calls, n, seeds, stop
strings, logprobs, the model card and the tokenizer routes have OpenAI's shapes; bad input is a 400
naming the field; a client that leaves mid-stream frees its admission slot and its worker request."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from router_fixtures import LiveRouter, live_router

from k2serve.router.kimi_vocab import THINK_BEGIN, THINK_END
from k2serve.tiny_model import make_tiny_model
from k2serve.workers.greedy import greedy_generate
from k2serve.workers.model.model import KimiK2ForCausalLM
from k2serve.workers.model_loader import load_model

MAX_TOKENS = 8
GREEDY: dict[str, Any] = {"temperature": 0, "extra_body": {"return_token_ids": True, "ignore_eos": True}}
HELLO = [{"role": "user", "content": "Say hello."}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
NAMED_CHOICE = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("oa") / "tiny", seed=11)


@pytest.fixture(scope="module")
def live(model_dir: Path) -> Iterator[LiveRouter]:
    with live_router(model_dir) as router:
        yield router


@pytest.fixture(scope="module")
def oracle(model_dir: Path) -> KimiK2ForCausalLM:
    return load_model(model_dir, dtype=torch.float32, max_positions=256, progress=False)


@pytest.fixture(scope="module")
def client(live: LiveRouter) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.http_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _extra(obj: Any, key: str) -> Any:
    return (obj.model_extra or {})[key]


def _post(live: LiveRouter, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(live.http_url + path, json=body, timeout=60)


def _sse_lines(live: LiveRouter, path: str, body: dict[str, Any]) -> list[str]:
    with httpx.stream("POST", live.http_url + path, json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(response.iter_lines())


# -- chat ----------------------------------------------------------------------------------------


def test_chat_greedy_matches_the_oracle(live: LiveRouter, client: openai.OpenAI, oracle: KimiK2ForCausalLM) -> None:
    answer = client.chat.completions.create(model=live.model_name, messages=HELLO, max_tokens=MAX_TOKENS, **GREEDY)
    prompt_ids = _extra(answer, "prompt_token_ids")
    choice = answer.choices[0]
    assert _extra(choice, "token_ids") == greedy_generate(oracle, prompt_ids, max_tokens=MAX_TOKENS)
    assert answer.id.startswith("chatcmpl-") and answer.object == "chat.completion"
    assert choice.finish_reason == "length" and _extra(choice, "stop_reason") is None
    assert choice.message.role == "assistant" and choice.message.tool_calls is None
    assert "reasoning_content" in (choice.message.model_extra or {}) and "reasoning" in (
        choice.message.model_extra or {}
    )
    usage = answer.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt_ids), MAX_TOKENS)
    assert usage.total_tokens == len(prompt_ids) + MAX_TOKENS
    assert usage.completion_tokens_details is not None and usage.prompt_tokens_details is not None
    # the chat form of /tokenize renders the same prompt
    tokens = _post(live, "/tokenize", {"messages": HELLO, "add_generation_prompt": True}).json()
    assert tokens["tokens"] == prompt_ids and tokens["count"] == len(prompt_ids)


@pytest.mark.parametrize(
    "switch",
    [{"chat_template_kwargs": {"thinking": False}}, {"thinking": {"type": "disabled"}}],
    ids=["kwargs", "moonshot"],
)
def test_thinking_off_prefills_an_empty_reasoning_block(
    live: LiveRouter, client: openai.OpenAI, oracle: KimiK2ForCausalLM, switch: dict[str, Any]
) -> None:
    extra = {**GREEDY["extra_body"], **switch}
    answer = client.chat.completions.create(
        model=live.model_name, messages=HELLO, max_tokens=MAX_TOKENS, temperature=0, extra_body=extra
    )
    special = live.frontend.tokenizer.special_tokens
    model_input = [*_extra(answer, "prompt_token_ids"), special[THINK_BEGIN], special[THINK_END]]
    assert _extra(answer.choices[0], "token_ids") == greedy_generate(oracle, model_input, max_tokens=MAX_TOKENS)
    assert _extra(answer.choices[0].message, "reasoning_content") is None
    assert answer.usage is not None and answer.usage.completion_tokens == MAX_TOKENS


def test_chat_stream_accumulates_to_the_non_streaming_answer(live: LiveRouter, client: openai.OpenAI) -> None:
    args: dict[str, Any] = {"model": live.model_name, "messages": HELLO, "max_completion_tokens": MAX_TOKENS, **GREEDY}
    answer = client.chat.completions.create(**args)
    content, reasoning, ids, finish = "", "", [], None
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    assert len({(c.id, c.created) for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            ids += (choice.model_extra or {}).get("token_ids") or []
            finish = choice.finish_reason or finish
    message = answer.choices[0].message
    assert content == (message.content or "") and reasoning == (_extra(message, "reasoning_content") or "")
    assert ids == _extra(answer.choices[0], "token_ids") and finish == answer.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS


def test_chat_sse_framing_is_exact(live: LiveRouter) -> None:
    body = {"messages": HELLO, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    lines = _sse_lines(live, "/v1/chat/completions", body)
    assert lines[-2:] == ["data: [DONE]", ""]
    assert all(line.startswith("data: ") for line in lines[0::2]) and all(line == "" for line in lines[1::2])
    chunks = [json.loads(line[len("data: ") :]) for line in lines[0:-2:2]]
    assert {(c["id"], c["created"], c["model"], c["object"]) for c in chunks} == {
        (chunks[0]["id"], chunks[0]["created"], live.model_name, "chat.completion.chunk")
    }
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finishes = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] is not None]
    assert len(finishes) == 1 and finishes[0]["choices"][0]["delta"] == {}
    assert "stop_reason" in finishes[0]["choices"][0]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4
    assert "cached_tokens" in usage["usage"]["prompt_tokens_details"]
    assert "reasoning_tokens" in usage["usage"]["completion_tokens_details"]
    assert all(c["choices"] for c in chunks[:-1])  # no empty chunk before the usage chunk


def test_named_tool_choice_forces_the_call(live: LiveRouter, client: openai.OpenAI) -> None:
    args: dict[str, Any] = {
        "model": live.model_name,
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": NAMED_CHOICE,
        "max_tokens": 6,
        "temperature": 0,
    }
    answer = client.chat.completions.create(**args)
    calls = answer.choices[0].message.tool_calls
    assert calls is not None and calls[0].id == "functions.get_weather:0" and calls[0].function.name == "get_weather"
    assert answer.choices[0].finish_reason in ("stop", "length")
    deltas = [
        call
        for chunk in client.chat.completions.create(stream=True, **args)
        for choice in chunk.choices
        for call in choice.delta.tool_calls or ()
    ]
    first = deltas[0]
    assert (first.index, first.id, first.type) == (0, "functions.get_weather:0", "function")
    assert first.function is not None and first.function.name == "get_weather"
    assert all(d.id is None and d.function is not None and d.function.name is None for d in deltas[1:])
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function is not None)
    assert arguments == calls[0].function.arguments


def test_n_choices_with_a_seed_are_reproducible(live: LiveRouter, client: openai.OpenAI) -> None:
    args: dict[str, Any] = {"model": live.model_name, "messages": HELLO, "max_tokens": 6, "n": 2, "seed": 7}
    first = client.chat.completions.create(temperature=1.0, extra_body={"return_token_ids": True}, **args)
    again = client.chat.completions.create(temperature=1.0, extra_body={"return_token_ids": True}, **args)
    assert [c.index for c in first.choices] == [0, 1]
    assert [_extra(c, "token_ids") for c in first.choices] == [_extra(c, "token_ids") for c in again.choices]
    assert first.usage is not None and first.usage.completion_tokens == sum(
        len(_extra(c, "token_ids")) for c in first.choices
    )


def test_stop_string_ends_the_answer_before_it(live: LiveRouter, client: openai.OpenAI) -> None:
    args: dict[str, Any] = {"model": live.model_name, "messages": HELLO, "max_tokens": 16, **GREEDY}
    text = client.chat.completions.create(**args).choices[0].message.content or ""
    cut = next(
        k for k in range(2, len(text) - 1) if text.find(text[k : k + 2]) == k and "\ufffd" not in text[k : k + 2]
    )
    stop = text[cut : cut + 2]
    choice = client.chat.completions.create(stop=[stop], **args).choices[0]
    assert choice.message.content == text[:cut]
    assert choice.finish_reason == "stop" and _extra(choice, "stop_reason") == stop


def test_chat_logprobs_have_openai_shape(live: LiveRouter, client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=live.model_name, messages=HELLO, max_tokens=4, logprobs=True, top_logprobs=2, **GREEDY
    )
    logprobs = answer.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None and len(logprobs.content) == 4
    for entry in logprobs.content:
        assert entry.logprob <= 0 and isinstance(entry.token, str) and isinstance(entry.bytes, list)
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)


# -- completions ---------------------------------------------------------------------------------


def test_completions_greedy_match_the_oracle_and_stream_alike(
    live: LiveRouter, client: openai.OpenAI, oracle: KimiK2ForCausalLM
) -> None:
    prompts = [[11, 200, 37, 90, 5], [300, 12]]
    answer = client.completions.create(model=live.model_name, prompt=prompts, max_tokens=MAX_TOKENS, **GREEDY)
    assert [c.index for c in answer.choices] == [0, 1] and answer.object == "text_completion"
    for prompt, choice in zip(prompts, answer.choices, strict=True):
        assert _extra(choice, "token_ids") == greedy_generate(oracle, prompt, max_tokens=MAX_TOKENS)
        assert _extra(choice, "prompt_token_ids") == prompt and choice.finish_reason == "length"
    assert answer.usage is not None and answer.usage.prompt_tokens == 7
    assert answer.usage.completion_tokens == 2 * MAX_TOKENS
    texts = ["", ""]
    stream = client.completions.create(
        model=live.model_name, prompt=prompts, max_tokens=MAX_TOKENS, stream=True, **GREEDY
    )
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in answer.choices]


def test_completions_echo_logprobs_and_usage_chunk(live: LiveRouter, client: openai.OpenAI) -> None:
    echoed = client.completions.create(model=live.model_name, prompt="hello world", max_tokens=3, echo=True, **GREEDY)
    assert echoed.choices[0].text.startswith("hello world")
    scored = client.completions.create(model=live.model_name, prompt="hello world", max_tokens=3, logprobs=2, **GREEDY)
    logprobs = scored.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None and len(logprobs.tokens) == 3
    assert logprobs.token_logprobs is not None and logprobs.top_logprobs is not None and logprobs.text_offset
    assert all(len(top) <= 2 for top in logprobs.top_logprobs) and logprobs.text_offset[0] == 0
    body = {
        "prompt": "hello",
        "max_tokens": 3,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    lines = _sse_lines(live, "/v1/completions", body)
    assert lines[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(line[len("data: ") :]) for line in lines[0:-2:2]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert all(c["object"] == "text_completion" for c in chunks)


# -- models, tokenizer routes, errors ------------------------------------------------------------


def test_models_and_tokenizer_routes(live: LiveRouter, client: openai.OpenAI) -> None:
    card = client.models.list().data[0]
    assert (card.id, card.object, card.owned_by) == (live.model_name, "model", "k2serve")
    assert _extra(card, "max_model_len") == 256 and _extra(card, "root") == str(live.model_dir)
    tokens = _post(live, "/tokenize", {"prompt": "hello world", "return_token_strs": True}).json()
    assert tokens["count"] == len(tokens["tokens"]) == len(tokens["token_strs"]) and tokens["max_model_len"] == 256
    assert _post(live, "/detokenize", {"tokens": tokens["tokens"]}).json() == {"prompt": "hello world"}
    bad = _post(live, "/detokenize", {"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/v1/chat/completions", {"max_tokens": "abc"}, "max_tokens"),
        ("/v1/chat/completions", {"max_tokens": True}, "max_tokens"),
        ("/v1/chat/completions", {"max_completion_tokens": 2**63}, "max_completion_tokens"),
        ("/v1/chat/completions", {"temperature": "hot"}, "temperature"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
        ("/v1/chat/completions", {"cache_salt": ""}, "cache_salt"),
        ("/v1/chat/completions", {"n": 2, "temperature": 0}, "n"),
        ("/v1/chat/completions", {"stop": 5}, "stop"),
        ("/v1/chat/completions", {"tools": 5}, "tools"),
        ("/v1/chat/completions", {"stop_token_ids": [1, "x"]}, "stop_token_ids"),
        ("/v1/chat/completions", {"messages": "hi"}, "messages"),
        ("/v1/completions", {"prompt": []}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "suffix": "!"}, "suffix"),
        ("/v1/completions", {"prompt": [1, 10**9]}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "logprobs": True}, "logprobs"),
    ],
)
def test_bad_fields_are_400_naming_the_field(live: LiveRouter, path: str, fields: dict[str, Any], param: str) -> None:
    body = {"messages": HELLO, "max_tokens": 2, **fields}
    response = _post(live, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_sdk_errors_and_tolerated_fields(live: LiveRouter, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=live.model_name, messages=HELLO, max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=HELLO, max_tokens=2)
    with pytest.raises(
        openai.BadRequestError, match=re.escape("Stream options can only be defined when `stream=True`.")
    ):
        client.chat.completions.create(
            model=live.model_name, messages=HELLO, max_tokens=2, stream_options={"include_usage": True}
        )
    huge = httpx.post(
        live.http_url + "/v1/chat/completions",
        content=b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e309}',
        headers={"content-type": "application/json"},
    )
    assert huge.status_code == 400  # the JSON reader refuses infinities before any field is read
    unknown = {"messages": HELLO, "max_tokens": 2, "some_new_field": {"x": 1}, "cache_salt": "mine", "request_id": "r1"}
    response = _post(live, "/v1/chat/completions", unknown)
    assert response.status_code == 200 and response.json()["id"] != "r1"


def test_client_leaving_mid_stream_aborts_the_request(live: LiveRouter) -> None:
    body = {"messages": HELLO, "max_tokens": 200, "ignore_eos": True, "temperature": 0}
    began = time.monotonic()
    full = _post(live, "/v1/chat/completions", body).json()
    full_s = time.monotonic() - began
    assert full["usage"]["completion_tokens"] == 200
    with httpx.stream(
        "POST", live.http_url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60
    ) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # the role chunk: the request is running; leave now
    left = time.monotonic()
    while time.monotonic() - left < full_s:
        if live.frontend.admission.running == 0 and all(load.running == 0 for load in live.loads()):
            break
        time.sleep(0.02)
    freed_s = time.monotonic() - left
    assert live.frontend.admission.running == 0
    assert all(load.running == 0 and load.waiting == 0 for load in live.loads())
    assert freed_s < full_s / 2, (freed_s, full_s)  # aborted, not run to the end
