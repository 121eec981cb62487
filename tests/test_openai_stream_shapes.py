"""The OpenAI chat shapes from synthetic events (no server): how pieces become chunk deltas, the
non-streaming message, ``parallel_tool_calls: false``, empty deltas, and the SSE error framing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from k2serve.router.api_error import ApiError, ErrorKind
from k2serve.router.generation_event import (
    ChatDelta,
    ChoiceFinished,
    ChoiceStarted,
    RequestFinished,
    RequestUsage,
    TokenLogprob,
    TopLogprob,
)
from k2serve.router.generation_request import GenerationRequest
from k2serve.router.kimi_output import ContentDelta, ReasoningDelta, ToolCallArguments, ToolCallStart
from k2serve.router.openai_chat_answer import ChoiceText
from k2serve.router.openai_chat_request import ChatShape
from k2serve.router.openai_chat_stream import ChatChunks
from k2serve.router.openai_sse import sse_events

REQUEST = GenerationRequest(request_id="chatcmpl-1", prompt_token_ids=(1, 2, 3))
TURN = ChatDelta(
    0,
    (
        ReasoningDelta("I should "),
        ReasoningDelta("call."),
        ToolCallStart(0, "functions.f:0", "f"),
        ToolCallArguments(0, '{"a"'),
        ToolCallArguments(0, ": 1}"),
        ToolCallStart(1, "functions.g:1", "g"),
        ToolCallArguments(1, "{}"),
    ),
    (7, 8, 9),
)


def _deltas(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c["choices"][0]["delta"] for c in chunks]


def test_pieces_become_one_delta_per_run() -> None:
    chunks = ChatChunks(REQUEST, ChatShape(return_token_ids=True), "m")
    role = chunks.on(ChoiceStarted(0))
    assert _deltas(role) == [{"role": "assistant", "content": ""}] and role[0]["prompt_token_ids"] == [1, 2, 3]
    out = chunks.on(TURN)
    assert _deltas(out) == [
        {"reasoning_content": "I should call.", "reasoning": "I should call."},
        {
            "tool_calls": [
                {"index": 0, "id": "functions.f:0", "type": "function", "function": {"name": "f", "arguments": ""}}
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]},
        {
            "tool_calls": [
                {"index": 1, "id": "functions.g:1", "type": "function", "function": {"name": "g", "arguments": ""}}
            ]
        },
        {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]},
    ]
    assert [c["choices"][0].get("token_ids") for c in out] == [None, None, None, None, [7, 8, 9]]
    assert {(c["id"], c["object"], c["model"]) for c in out} == {("chatcmpl-1", "chat.completion.chunk", "m")}
    finish = chunks.on(ChoiceFinished(0, "tool_calls", completion_tokens=3))
    assert finish[0]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "tool_calls",
        "stop_reason": None,
    }
    assert chunks.on(RequestFinished(RequestUsage(3, 3, 0, 2))) == []  # no include_usage


def test_parallel_tool_calls_false_keeps_only_the_first_call() -> None:
    shape = ChatShape(parallel_tool_calls=False)
    streamed = ChatChunks(REQUEST, shape, "m").on(TURN)
    indices = [d["tool_calls"][0]["index"] for d in _deltas(streamed) if "tool_calls" in d]
    assert indices == [0, 0]
    text = ChoiceText(0, shape)
    text.add(TURN)
    message = text.message()
    assert message["content"] is None and message["reasoning_content"] == message["reasoning"] == "I should call."
    assert message["tool_calls"] == [
        {"id": "functions.f:0", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]


def test_empty_deltas_make_chunks_only_when_ids_or_logprobs_are_asked_for() -> None:
    empty = ChatDelta(0, (), (5,), (TokenLogprob(5, "x", b"x", -0.5, (TopLogprob(5, "x", b"x", -0.5),)),))
    assert ChatChunks(REQUEST, ChatShape(), "m").on(empty) == []
    [chunk] = ChatChunks(REQUEST, ChatShape(logprobs=True), "m").on(empty)
    assert chunk["choices"][0]["delta"] == {}
    assert chunk["choices"][0]["logprobs"] == {
        "content": [
            {
                "token": "x",
                "logprob": -0.5,
                "bytes": [120],
                "top_logprobs": [{"token": "x", "logprob": -0.5, "bytes": [120]}],
            }
        ]
    }


def test_usage_chunks() -> None:
    chunks = ChatChunks(REQUEST, ChatShape(stream=True, include_usage=True, continuous_usage=True), "m")
    content = chunks.on(ChatDelta(0, (ContentDelta("hi"),), (4, 5)))
    assert content[0]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    [last] = chunks.on(RequestFinished(RequestUsage(3, 2, 1, 0)))
    assert last["choices"] == [] and last["usage"]["prompt_tokens_details"] == {"cached_tokens": 1}


def test_a_failed_choice_is_an_error() -> None:
    with pytest.raises(ApiError) as failed:
        ChatChunks(REQUEST, ChatShape(), "m").on(ChoiceFinished(0, "error", error="worker gone"))
    assert failed.value.kind is ErrorKind.UNAVAILABLE and "worker gone" in failed.value.message


def test_sse_error_after_the_start_is_an_event_then_done() -> None:
    closed: list[bool] = []

    async def chunks() -> AsyncGenerator[dict[str, Any], None]:
        yield {"n": 1}
        raise ApiError(ErrorKind.UNAVAILABLE, "gone")

    async def close() -> None:
        closed.append(True)

    async def collect() -> list[str]:
        return [line async for line in sse_events(chunks(), close)]

    events = asyncio.run(collect())
    assert events[0] == 'data: {"n":1}\n\n' and events[-1] == "data: [DONE]\n\n"
    assert json.loads(events[1][len("data: ") :])["error"]["message"] == "gone"
    assert closed == [True]
