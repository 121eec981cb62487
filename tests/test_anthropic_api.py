"""The Anthropic Messages API (``/v1/messages``, ``/v1/messages/count_tokens``) on a real router over
the tiny model: greedy answers equal the single-process oracle parsed by the Kimi parsers, the
official SDK reads plain, streamed and tool-use messages, the raw SSE stream follows Anthropic's
event grammar, every bad field is a 400 ``invalid_request_error`` naming it, and the block
conversion and event shaping behave as specified (the tiny model never opens ``<think>`` by itself,
so thinking blocks are checked on synthetic pieces)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest
import torch
from router_fixtures import LiveRouter, live_router

from k2serve.router.anthropic_blocks import ContentBlocks, thinking_signature, tool_input
from k2serve.router.anthropic_events import MessageEvents
from k2serve.router.anthropic_messages import convert_conversation
from k2serve.router.anthropic_request import parse_messages_request
from k2serve.router.api_error import ApiError
from k2serve.router.generation_event import ChatDelta, ChoiceFinished, RequestFinished, RequestUsage
from k2serve.router.kimi_output import (
    ContentDelta,
    ParsedOutput,
    ReasoningDelta,
    ToolCallArguments,
    ToolCallStart,
    parse_output,
)
from k2serve.router.kimi_vocab import (
    THINK_BEGIN,
    THINK_END,
    TOOL_CALL_ARGUMENT_BEGIN,
    TOOL_CALL_BEGIN,
    TOOL_CALLS_SECTION_BEGIN,
)
from k2serve.router.sampling_check import RequestLimits
from k2serve.tiny_model import make_tiny_model
from k2serve.workers.greedy import greedy_generate
from k2serve.workers.model.model import KimiK2ForCausalLM
from k2serve.workers.model_loader import load_model

MAX_TOKENS = 8
QUESTION = "What is the weather in Paris?"
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
OPENAI_WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": WEATHER_TOOL["input_schema"],
        "description": "The weather in a city",
    },
}
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveRouter]:
    model_dir = make_tiny_model(tmp_path_factory.mktemp("an") / "tiny", seed=11)
    with live_router(model_dir) as router:
        yield router


@pytest.fixture(scope="module")
def model(live: LiveRouter) -> KimiK2ForCausalLM:
    return load_model(live.model_dir, dtype=torch.float32, max_positions=256, progress=False)


@pytest.fixture(scope="module")
def client(live: LiveRouter) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=live.http_url, api_key="unused", max_retries=0)


def _oracle(
    live: LiveRouter,
    model: KimiK2ForCausalLM,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    forced: tuple[str, ...] = (),
    max_tokens: int = MAX_TOKENS,
) -> tuple[ParsedOutput, int]:
    """The greedy answer to an OpenAI-shaped conversation, parsed; and its number of generated ids."""
    tokenizer = live.frontend.tokenizer
    prefix = [tokenizer.special_tokens[name] for name in forced]
    prompt = live.frontend.render_chat(messages, tools) + prefix
    out = greedy_generate(model, prompt, max_tokens=max_tokens, stop_token_ids=tokenizer.stop_token_ids)
    reason = "stop" if out[-1] in tokenizer.stop_token_ids else "length"
    return parse_output(tokenizer, prefix + out, finish_reason=reason), len(out)


def _post(live: LiveRouter, body: dict[str, Any], path: str = "/v1/messages") -> httpx.Response:
    return httpx.post(live.http_url + path, json=body, timeout=60)


def _sse_events(live: LiveRouter, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    with httpx.stream("POST", live.http_url + "/v1/messages", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    events = []
    for frame in text.split("\n\n"):
        if frame.strip():
            name, data = frame.split("\n")
            assert name.startswith("event: ") and data.startswith("data: "), frame
            events.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return events


def _check_grammar(events: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Anthropic's event order; returns the content the events build."""
    assert all(name == data["type"] for name, data in events)
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]
    assert events[0][1]["message"]["content"] == [] and "[DONE]" not in json.dumps(events)
    content: list[dict[str, Any]] = []
    open_index: int | None = None
    for name, data in events[2:-2]:
        if name == "content_block_start":
            assert open_index is None and data["index"] == len(content)
            open_index = data["index"]
            content.append({**data["content_block"], "deltas": []})
        elif name == "content_block_delta":
            assert data["index"] == open_index
            content[-1]["deltas"].append(data["delta"])
        else:
            assert name == "content_block_stop" and data["index"] == open_index and content[-1]["deltas"]
            open_index = None
    assert open_index is None
    return [_built(block) for block in content]


def _built(block: dict[str, Any]) -> dict[str, Any]:
    deltas = block.pop("deltas")
    kinds = [d["type"] for d in deltas]
    if block["type"] == "thinking":
        assert kinds[-1] == "signature_delta" and set(kinds[:-1]) == {"thinking_delta"}
        return {**block, "thinking": "".join(d["thinking"] for d in deltas[:-1]), "signature": deltas[-1]["signature"]}
    if block["type"] == "text":
        assert set(kinds) == {"text_delta"}
        return {**block, "text": "".join(d["text"] for d in deltas)}
    assert set(kinds) == {"input_json_delta"}
    return {**block, "input": json.loads("".join(d["partial_json"] for d in deltas))}


def _expected_content(parsed: ParsedOutput) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = []
    if parsed.reasoning:
        content.append(
            {"type": "thinking", "thinking": parsed.reasoning, "signature": thinking_signature(parsed.reasoning)}
        )
    if parsed.content:
        content.append({"type": "text", "text": parsed.content})
    for call in parsed.tool_calls:
        content.append({"type": "tool_use", "id": call.id, "name": call.name, "input": tool_input(call.arguments)})
    return content


def _stop_reason(parsed: ParsedOutput) -> str:
    if parsed.finish_reason == "length":
        return "max_tokens"
    return "tool_use" if parsed.tool_calls else "end_turn"


def _sdk(request: dict[str, Any]) -> dict[str, Any]:
    """The SDK no longer types the sampling fields: they travel in ``extra_body``."""
    sampling = {k: request[k] for k in ("temperature", "top_p", "top_k") if k in request}
    return {**{k: v for k, v in request.items() if k not in sampling}, "extra_body": sampling}


def _plain(message: Any) -> dict[str, Any]:
    return message.model_dump(mode="json", exclude_none=True, exclude={"id", "usage"})


# -- answers against the oracle --------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_request(live: LiveRouter) -> dict[str, Any]:
    return {
        "model": live.model_name,
        "max_tokens": MAX_TOKENS,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": QUESTION}],
        **GREEDY,
    }


@pytest.fixture(scope="module")
def plain_oracle(live: LiveRouter, model: KimiK2ForCausalLM) -> tuple[ParsedOutput, int]:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    return _oracle(live, model, messages)


def test_create_answers_what_the_greedy_oracle_says(
    live: LiveRouter, client: anthropic.Anthropic, plain_request: dict[str, Any], plain_oracle: tuple[ParsedOutput, int]
) -> None:
    parsed, generated = plain_oracle
    assert parsed.content  # the tiny model answers in text
    message = client.messages.create(**_sdk(plain_request))
    body = message.model_dump(mode="json", exclude_none=True)
    assert message.id.startswith("msg_") and body["type"] == "message" and body["role"] == "assistant"
    assert body["model"] == live.model_name
    assert body["content"] == _expected_content(parsed)
    assert message.stop_reason == _stop_reason(parsed) and message.stop_sequence is None
    prompt = live.frontend.render_chat(convert_conversation(plain_request).messages, None)
    usage = message.usage
    assert usage.input_tokens + (usage.cache_read_input_tokens or 0) == len(prompt)
    assert usage.output_tokens == generated and usage.cache_creation_input_tokens == 0


def test_the_raw_stream_follows_anthropics_event_grammar(
    live: LiveRouter, plain_request: dict[str, Any], plain_oracle: tuple[ParsedOutput, int]
) -> None:
    parsed, generated = plain_oracle
    events = _sse_events(live, plain_request)
    assert _check_grammar(events) == _expected_content(parsed)
    start, delta = events[0][1]["message"], events[-2][1]
    prompt_tokens = len(live.frontend.render_chat(convert_conversation(plain_request).messages, None))
    assert start["usage"]["input_tokens"] == prompt_tokens and start["stop_reason"] is None
    assert delta["delta"] == {"stop_reason": _stop_reason(parsed), "stop_sequence": None}
    usage = delta["usage"]
    assert usage["output_tokens"] == generated
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] == prompt_tokens


def test_a_forced_tool_call_is_a_tool_use_block_streamed_or_not(
    live: LiveRouter, client: anthropic.Anthropic, model: KimiK2ForCausalLM
) -> None:
    request = {
        "model": live.model_name,
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": QUESTION}],
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "tool", "name": "get_weather"},
        **GREEDY,
    }
    forced = (THINK_BEGIN, THINK_END, TOOL_CALLS_SECTION_BEGIN, TOOL_CALL_BEGIN)
    messages = [{"role": "user", "content": QUESTION}]
    tokenizer = live.frontend.tokenizer
    prompt = live.frontend.render_chat(messages, [OPENAI_WEATHER_TOOL])
    name_ids = tokenizer.encode("functions.get_weather:0", allow_special=False)
    prefix = [tokenizer.special_tokens[n] for n in forced] + name_ids
    prefix.append(tokenizer.special_tokens[TOOL_CALL_ARGUMENT_BEGIN])
    out = greedy_generate(model, prompt + prefix, max_tokens=MAX_TOKENS, stop_token_ids=tokenizer.stop_token_ids)
    reason = "stop" if out[-1] in tokenizer.stop_token_ids else "length"
    parsed = parse_output(tokenizer, prefix + out, finish_reason=reason)

    message = client.messages.create(**_sdk(request))
    assert [block.type for block in message.content] == ["tool_use"]
    call = message.content[0]
    assert call.type == "tool_use" and call.id == "functions.get_weather:0" and call.name == "get_weather"
    assert _plain(message)["content"] == _expected_content(parsed)
    assert message.stop_reason == ("max_tokens" if reason == "length" else "tool_use")
    with client.messages.stream(**_sdk(request)) as stream:
        final = stream.get_final_message()
    assert _plain(final) == _plain(message)
    assert final.usage.output_tokens == message.usage.output_tokens == len(out)


def test_the_sdk_stream_accumulates_to_the_created_message(
    client: anthropic.Anthropic, plain_request: dict[str, Any]
) -> None:
    with client.messages.stream(**_sdk(plain_request)) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    created = client.messages.create(**_sdk(plain_request))
    assert _plain(final) == _plain(created) and [{"type": "text", "text": "".join(texts)}] == _plain(created)["content"]
    total = final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0)
    assert total == created.usage.input_tokens + (created.usage.cache_read_input_tokens or 0)


def test_a_stop_sequence_ends_the_answer_and_is_reported(
    live: LiveRouter, plain_request: dict[str, Any], plain_oracle: tuple[ParsedOutput, int]
) -> None:
    content = plain_oracle[0].content
    start = next(i for i in range(1, len(content)) if content[i].isalnum())
    stop = content[start : start + 2]
    body = _post(live, {**plain_request, "stop_sequences": [stop], "metadata": {"user_id": "user-7"}}).json()
    assert body["stop_reason"] == "stop_sequence" and body["stop_sequence"] == stop
    assert body["content"] == [{"type": "text", "text": content[: content.index(stop)]}]


def test_thinking_disabled_answers_without_reasoning(live: LiveRouter, model: KimiK2ForCausalLM) -> None:
    request = {
        "model": live.model_name,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": "Hello"}],
        "thinking": {"type": "disabled"},
        **GREEDY,
    }
    parsed, _ = _oracle(
        live, model, [{"role": "user", "content": "Hello"}], forced=(THINK_BEGIN, THINK_END), max_tokens=4
    )
    body = _post(live, request).json()
    assert body["content"] == _expected_content(parsed) and parsed.reasoning == ""


def test_a_client_that_leaves_mid_stream_frees_its_slot_and_the_workers(live: LiveRouter) -> None:
    body = {
        "model": live.model_name,
        "max_tokens": 180,
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": True,
    }
    with httpx.stream("POST", live.http_url + "/v1/messages", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line == "event: content_block_delta":
                break
    deadline = time.monotonic() + 20
    while live.frontend.admission.running or any(load.running for load in live.loads()):
        assert time.monotonic() < deadline, "the abandoned request still runs"
        time.sleep(0.05)


# -- count_tokens ----------------------------------------------------------------------------------


def test_count_tokens_is_the_rendered_prompt_of_the_converted_conversation(live: LiveRouter) -> None:
    body = {
        "model": live.model_name,
        "system": [{"type": "text", "text": "You are terse."}, {"type": "text", "text": "Answer in French."}],
        "tools": [WEATHER_TOOL],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "Use the tool.", "signature": "whatever"},
                    {"type": "redacted_thinking", "data": "opaque"},
                    {"type": "text", "text": "Checking."},
                    {
                        "type": "tool_use",
                        "id": "functions.get_weather:0",
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Thanks."},
                    {"type": "tool_result", "tool_use_id": "functions.get_weather:0", "content": "Sunny"},
                ],
            },
        ],
    }
    openai = [
        {
            "role": "system",
            "content": [{"type": "text", "text": "You are terse."}, {"type": "text", "text": "Answer in French."}],
        },
        {"role": "user", "content": QUESTION},
        {
            "role": "assistant",
            "content": "Checking.",
            "reasoning_content": "Use the tool.",
            "tool_calls": [
                {
                    "id": "functions.get_weather:0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "Sunny"},
        {"role": "user", "content": "Thanks."},
    ]
    response = _post(live, body, "/v1/messages/count_tokens")
    assert response.status_code == 200
    assert response.json() == {"input_tokens": len(live.frontend.render_chat(openai, [OPENAI_WEATHER_TOOL]))}


# -- errors ----------------------------------------------------------------------------------------


def test_sdk_errors_have_anthropics_types(live: LiveRouter, client: anthropic.Anthropic) -> None:
    request: dict[str, Any] = {"max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", **request)
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as small:
        client.messages.create(
            **{**request, "max_tokens": 2000, "thinking": {"type": "enabled", "budget_tokens": 512}},
            model=live.model_name,
        )
    assert "thinking.budget_tokens" in small.value.message


BAD_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "8"}, "max_tokens"),
    ({"model": None}, "model"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "u"}}]}]},
        "messages.0.content.0.type",
    ),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content.0.text"),
    (
        {"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}}]}]},
        "messages.0.content.0.type",
    ),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]}, "messages.0.content.0.tool_use_id"),
    ({"system": 5}, "system"),
    ({"system": [{"type": "image"}]}, "system.0.type"),
    ({"temperature": 1.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -5}, "top_k"),
    ({"stop_sequences": "END"}, "stop_sequences"),
    ({"stop_sequences": [""]}, "stop_sequences"),
    ({"stream": "yes"}, "stream"),
    ({"metadata": {"user_id": 5}}, "metadata.user_id"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1023}, "max_tokens": 4000}, "thinking.budget_tokens"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}, "max_tokens": 1024}, "thinking.budget_tokens"),
    ({"thinking": {"type": "enabled"}}, "thinking.budget_tokens"),
    ({"thinking": {"type": "sometimes"}}, "thinking.type"),
    ({"tools": [{"name": "f"}]}, "tools.0.input_schema"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "tool"}}, "tool_choice.name"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "tool", "name": "other"}}, "tool_choice.name"),
    ({"tool_choice": {"type": "any"}}, "tool_choice"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "maybe"}}, "tool_choice.type"),
    ({"max_tokens": 250}, "max_tokens"),  # the prompt plus 250 exceeds the tiny model's 256 positions
]


@pytest.mark.parametrize(("change", "field"), BAD_FIELDS, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD_FIELDS)])
def test_every_bad_field_is_a_400_naming_it(live: LiveRouter, change: dict[str, Any], field: str) -> None:
    body = {"model": live.model_name, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}], **change}
    response = _post(live, {k: v for k, v in body.items() if v is not None})
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert field in error["error"]["message"], error


def test_count_tokens_validates_like_messages(live: LiveRouter) -> None:
    response = _post(live, {"model": live.model_name, "messages": []}, "/v1/messages/count_tokens")
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    response = _post(
        live, {"model": "nope", "messages": [{"role": "user", "content": "Hi"}]}, "/v1/messages/count_tokens"
    )
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


# -- conversion and shaping, without a server ------------------------------------------------------


def test_the_thinking_budget_becomes_the_engines_reasoning_budget() -> None:
    body = {
        "model": "m",
        "max_tokens": 4096,
        "messages": [{"role": "user", "content": "Hi"}],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    }
    parsed = parse_messages_request(body, RequestLimits())
    assert parsed.sampling.max_reasoning_tokens == 1024 and parsed.sampling.max_tokens == 4096 and parsed.thinking
    for thinking in ({"type": "adaptive"}, None):
        relaxed = parse_messages_request({**body, "thinking": thinking}, RequestLimits())
        assert relaxed.sampling.max_reasoning_tokens is None and relaxed.thinking
    assert not parse_messages_request({**body, "thinking": {"type": "disabled"}}, RequestLimits()).thinking


def test_tool_choice_maps_onto_openais() -> None:
    base = {"messages": [{"role": "user", "content": "Hi"}], "tools": [WEATHER_TOOL]}
    choices = {
        "auto": "auto",
        "any": "required",
        "none": "none",
        "tool": {"type": "function", "function": {"name": "get_weather"}},
    }
    for kind, expected in choices.items():
        choice = {"type": kind, "name": "get_weather"} if kind == "tool" else {"type": kind}
        conversation = convert_conversation({**base, "tool_choice": choice})
        assert conversation.tool_choice == expected and conversation.tools == [OPENAI_WEATHER_TOOL]
    single = convert_conversation({**base, "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}})
    assert single.disable_parallel_tool_use
    bare = convert_conversation({"messages": base["messages"], "tools": [], "tool_choice": {"type": "auto"}})
    assert bare.tools is None and bare.tool_choice is None


def test_tool_results_come_before_the_users_text_and_billing_headers_are_dropped() -> None:
    conversation = convert_conversation(
        {
            "system": [{"type": "text", "text": "x-anthropic-billing-header: cc=1;"}, {"type": "text", "text": "Sys"}],
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Here:"},
                        {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "A"}]},
                        {"type": "tool_result", "tool_use_id": "t2"},
                        {"type": "text", "text": "go on"},
                    ],
                }
            ],
        }
    )
    assert conversation.messages == [
        {"role": "system", "content": "Sys"},
        {"role": "tool", "tool_call_id": "t1", "content": "A"},
        {"role": "tool", "tool_call_id": "t2", "content": ""},
        {"role": "user", "content": [{"type": "text", "text": "Here:"}, {"type": "text", "text": "go on"}]},
    ]


def _finished(reason: str, stop: str | None = None, error: str = "") -> ChoiceFinished:
    return ChoiceFinished(0, reason, stop, error, completion_tokens=9)


FINISHED = RequestFinished(RequestUsage(prompt_tokens=20, completion_tokens=9, cached_tokens=8, reasoning_tokens=3))


def test_blocks_open_on_every_change_of_kind_and_thinking_ends_with_its_signature() -> None:
    events = MessageEvents("msg_1", "m", 20, single_tool_call=True)
    pieces = (
        ReasoningDelta("Need "),
        ReasoningDelta("the tool."),
        ContentDelta("Let me "),
        ContentDelta("check."),
        ToolCallStart(0, "functions.get_weather:0", "get_weather"),
        ToolCallArguments(0, '{"city": '),
        ToolCallArguments(0, '"Paris"}'),
        ToolCallStart(1, "functions.get_time:1", "get_time"),  # dropped: disable_parallel_tool_use
        ToolCallArguments(1, "{}"),
    )
    stream = [*events.start(), *events.push(ChatDelta(0, pieces, (1, 2, 3)))]
    stream += events.push(_finished("tool_calls")) + events.push(FINISHED)
    framed = [(data["type"], data) for data in stream]
    content = _check_grammar(framed)
    signature = thinking_signature("Need the tool.")
    assert content == [
        {"type": "thinking", "thinking": "Need the tool.", "signature": signature},
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "functions.get_weather:0", "name": "get_weather", "input": {"city": "Paris"}},
    ]
    assert events.message()["content"] == content
    assert framed[-2][1]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert framed[-2][1]["usage"] == {
        "input_tokens": 12,
        "output_tokens": 9,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 8,
    }


def test_malformed_tool_arguments_give_an_empty_input() -> None:
    blocks = ContentBlocks()
    events = blocks.push([ToolCallStart(0, "functions.f:0", "f"), ToolCallArguments(0, '{"cut": ')]) + blocks.close()
    assert events[-2]["delta"] == {"type": "input_json_delta", "partial_json": "{}"}
    assert blocks.content == [{"type": "tool_use", "id": "functions.f:0", "name": "f", "input": {}}]
    assert tool_input("[1, 2]") == {} and tool_input('{"a": 1}') == {"a": 1}


@pytest.mark.parametrize(
    ("finished", "stop_reason", "stop_sequence"),
    [
        (_finished("stop"), "end_turn", None),
        (_finished("stop", "END"), "stop_sequence", "END"),
        (_finished("length"), "max_tokens", None),
        (_finished("tool_calls"), "tool_use", None),
    ],
)
def test_finish_reasons_map_onto_stop_reasons(
    finished: ChoiceFinished, stop_reason: str, stop_sequence: str | None
) -> None:
    events = MessageEvents("msg_1", "m", 20)
    events.push(ChatDelta(0, (ContentDelta("hi"),), (1,)))
    events.push(finished)
    events.push(FINISHED)
    body = events.message()
    assert (body["stop_reason"], body["stop_sequence"]) == (stop_reason, stop_sequence)


@pytest.mark.parametrize(
    ("finished", "status", "kind"),
    [
        (_finished("error", error="peer rank is dead or stuck"), 529, "overloaded_error"),
        (_finished("error", error="worker: UNAVAILABLE: gone"), 529, "overloaded_error"),
        (_finished("abort"), 529, "overloaded_error"),
    ],
)
def test_a_failure_after_the_start_is_an_error_event_and_nothing_more(
    finished: ChoiceFinished, status: int, kind: str
) -> None:
    events = MessageEvents("msg_1", "m", 20)
    assert events.push(ChatDelta(0, (ContentDelta("half"),), (1,)))
    error_events = events.push(finished)
    assert isinstance(events.failure, ApiError) and events.failure.kind.anthropic_status == status
    assert error_events == [{"type": "error", "error": {"type": kind, "message": events.failure.message}}]
    assert events.push(FINISHED) == [] and events.done
