"""The public gRPC API (``k2serve.v1.Serving``) against a real router over a real worker of the tiny
model: token ids match the greedy reference, chat streams typed deltas, errors are status codes,
keys are checked, and a deadline, a cancel or an Abort frees the request's KV blocks on the worker
within a second."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from router_fixtures import MAX_MODEL_LEN, LiveRouter, live_router

from k2serve.proto import serving_pb2 as pb
from k2serve.proto import serving_pb2_grpc
from k2serve.router.admission import AdmissionLimits
from k2serve.router.generation_event import ChatDelta, ChoiceFinished, RequestFinished, RequestUsage, TextDelta
from k2serve.router.generation_request import GenerationRequest
from k2serve.router.grpc_responses import chat_responses
from k2serve.router.kimi_output import ContentDelta, ReasoningDelta, ToolCallArguments, ToolCallStart
from k2serve.tiny_model import make_tiny_model
from k2serve.workers.greedy import greedy_generate
from k2serve.workers.model_loader import load_model

LONG_PROMPT = [7, 8, 9]  # the tiny model (seed 11) runs 250 greedy tokens from it without an end of turn (~1 s on CPU)
LONG_MAX_TOKENS = 250
FREED_WITHIN_S = 3.0  # a cancelled call frees its worker at the next step; headroom for a loaded 2-core box
WEATHER = pb.ToolFunction(
    name="get_weather",
    description="The weather in a city",
    parameters_json='{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}',
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("gr") / "tiny", seed=11)


@pytest.fixture(scope="module")
def live(model_dir: Path) -> Iterator[LiveRouter]:
    with live_router(model_dir) as router:
        yield router


@pytest.fixture(scope="module")
def stub(live: LiveRouter) -> Iterator[serving_pb2_grpc.ServingStub]:
    with grpc.insecure_channel(live.grpc_target) as channel:
        yield serving_pb2_grpc.ServingStub(channel)


def greedy(max_tokens: int, **fields: Any) -> pb.SamplingParams:
    return pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **fields)


def wait_until_freed(live: LiveRouter) -> None:
    """Every worker runs nothing and has all its blocks free (cached blocks count as free), in time."""
    deadline = time.monotonic() + FREED_WITHIN_S
    while True:
        loads = live.loads()
        if all(x.running == 0 and x.waiting == 0 and x.free_blocks == x.num_blocks for x in loads):
            assert live.frontend.admission.running == 0
            return
        assert time.monotonic() < deadline, f"the request still holds the worker after {FREED_WITHIN_S} s: {loads}"
        time.sleep(0.02)


def status_of(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        for _ in call:
            pass
    return info.value


# -- Generate ----------------------------------------------------------------------------------------


def test_generate_token_ids_match_the_greedy_reference(
    live: LiveRouter, stub: serving_pb2_grpc.ServingStub, model_dir: Path
) -> None:
    ids = [1, 2, 3, 4, 5]
    call = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=greedy(8), request_id="client-7"))
    messages = list(call)
    model = load_model(model_dir, dtype=torch.float32, max_positions=MAX_MODEL_LEN, progress=False)
    assert [t for m in messages for t in m.token_ids] == greedy_generate(model, ids, max_tokens=8)
    server_id = messages[0].id
    assert server_id.startswith("gen-") and all(m.id == server_id for m in messages)
    assert dict(call.initial_metadata()) == {"x-request-id": "client-7", "x-k2serve-id": server_id}
    assert [m.finish_reason for m in messages if m.finish_reason] == ["length"]
    assert [m.HasField("usage") for m in messages].count(True) == 1 and messages[-1].HasField("usage")
    assert (messages[-1].usage.prompt_tokens, messages[-1].usage.completion_tokens) == (5, 8)
    assert call.code() == grpc.StatusCode.OK


def test_generate_text_prompt_is_the_tokenized_text(
    stub: serving_pb2_grpc.ServingStub, model_dir: Path, live: LiveRouter
) -> None:
    tokenized = stub.Tokenize(pb.TokenizeRequest(text="hello world"))
    assert tokenized.count == len(tokenized.token_ids) > 0 and tokenized.max_model_len == MAX_MODEL_LEN
    text_out = list(stub.Generate(pb.GenerateRequest(text="hello world", sampling=greedy(6))))
    ids_out = list(
        stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=tokenized.token_ids), sampling=greedy(6)))
    )
    assert [t for m in text_out for t in m.token_ids] == [t for m in ids_out for t in m.token_ids]
    assert "".join(m.text for m in text_out) == "".join(m.text for m in ids_out)
    assert text_out[-1].usage.prompt_tokens == tokenized.count


def test_generate_passes_the_client_deadline_to_the_request(
    live: LiveRouter, stub: serving_pb2_grpc.ServingStub
) -> None:
    seen: list[float | None] = []
    start = live.frontend.start

    async def recording_start(request: GenerationRequest) -> Any:
        seen.append(request.deadline_s)
        return await start(request)

    live.frontend.start = recording_start  # type: ignore[method-assign]
    try:
        list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]), sampling=greedy(2)), timeout=30))
        list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]), sampling=greedy(2))))
    finally:
        del live.frontend.start
    assert seen[0] is not None and 20 < seen[0] <= 31  # the wire rounds the timeout up
    assert seen[1] is None


# -- Chat --------------------------------------------------------------------------------------------


def test_chat_streams_the_role_first_and_the_usage_last(stub: serving_pb2_grpc.ServingStub) -> None:
    request = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="hi")], sampling=greedy(6))
    messages = list(stub.Chat(request))
    assert messages[0].role == "assistant" and messages[0].id.startswith("chat-")
    assert [m.finish_reason for m in messages if m.finish_reason] == ["length"]
    assert messages[-1].HasField("usage") and not any(m.HasField("usage") for m in messages[:-1])
    rendered = pb.TokenizeRequest(chat=request)
    assert messages[-1].usage.prompt_tokens == stub.Tokenize(rendered).count
    assert messages[-1].usage.completion_tokens == 6


def test_chat_named_tool_choice_calls_that_function(stub: serving_pb2_grpc.ServingStub) -> None:
    request = pb.ChatRequest(
        messages=[pb.ChatMessage(role="user", content="Weather in Paris?")],
        tools=[WEATHER],
        tool_choice=pb.ToolChoice(function_name="get_weather"),
        sampling=greedy(8),
    )
    messages = list(stub.Chat(request))
    assert messages[0].role == "assistant"
    calls = [c for m in messages for c in m.tool_calls]
    assert (calls[0].index, calls[0].id, calls[0].name) == (0, "functions.get_weather:0", "get_weather")
    assert all(c.index == 0 and not c.id for c in calls[1:])  # later deltas carry only arguments
    assert messages[-1].HasField("usage")


def test_chat_pieces_combine_into_the_fewest_ordered_messages() -> None:
    pieces = (
        ReasoningDelta("think "),
        ReasoningDelta("more"),
        ContentDelta("answer"),
        ToolCallStart(0, "functions.f:0", "f"),
        ToolCallArguments(0, '{"a"'),
        ToolCallArguments(0, ": 1}"),
        ContentDelta("after"),
        ReasoningDelta("again"),
    )
    out = chat_responses("chat-1", ChatDelta(2, pieces, (1, 2, 3)))
    assert [(m.reasoning_content, m.content, len(m.tool_calls)) for m in out] == [
        ("think more", "answer", 1),
        ("", "after", 0),
        ("again", "", 0),
    ]
    call = out[0].tool_calls[0]
    assert (call.index, call.id, call.name, call.arguments) == (0, "functions.f:0", "f", '{"a": 1}')
    assert all(m.id == "chat-1" and m.index == 2 for m in out)
    usage = chat_responses("chat-1", RequestFinished(RequestUsage(3, 4, 1, 2)))
    assert [(m.usage.prompt_tokens, m.usage.completion_tokens, m.usage.cached_tokens) for m in usage] == [(3, 4, 1)]


# -- other RPCs --------------------------------------------------------------------------------------


def test_list_models_and_tokenize(live: LiveRouter, stub: serving_pb2_grpc.ServingStub) -> None:
    (model,) = stub.ListModels(pb.ListModelsRequest()).models
    assert (model.id, model.max_model_len, model.root) == (live.model_name, MAX_MODEL_LEN, str(live.model_dir))
    assert list(stub.Tokenize(pb.TokenizeRequest(text="abc")).token_ids) == live.frontend.encode("abc")


# -- status codes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_fields", "code", "named"),
    [
        ({"text": "hi", "sampling": pb.SamplingParams(top_p=0.0)}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
        ({"text": "hi", "model": "no-such-model"}, grpc.StatusCode.NOT_FOUND, "no-such-model"),
        ({"text": ""}, grpc.StatusCode.INVALID_ARGUMENT, "text"),
        ({"token_ids": pb.TokenIds(ids=[])}, grpc.StatusCode.INVALID_ARGUMENT, "token_ids"),
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        ({"token_ids": pb.TokenIds(ids=[1] * MAX_MODEL_LEN)}, grpc.StatusCode.INVALID_ARGUMENT, "context length"),
        ({"text": "hi", "request_id": "é"}, grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
        ({"text": "hi", "sampling": pb.SamplingParams(n=2, temperature=0)}, grpc.StatusCode.INVALID_ARGUMENT, "n"),
    ],
)
def test_generate_errors_are_the_status_of_the_call(
    stub: serving_pb2_grpc.ServingStub, request_fields: dict[str, Any], code: grpc.StatusCode, named: str
) -> None:
    error = status_of(stub.Generate(pb.GenerateRequest(**request_fields)))
    assert error.code() == code and named in (error.details() or "")


def test_chat_errors_name_the_field(stub: serving_pb2_grpc.ServingStub) -> None:
    user = pb.ChatMessage(role="user", content="hi")
    bad_schema = pb.ToolFunction(name="f", parameters_json="{not json")
    cases = [
        (pb.ChatRequest(messages=[user], tools=[bad_schema]), "tools[0].parameters_json"),
        (pb.ChatRequest(messages=[]), "messages"),
        (pb.ChatRequest(messages=[pb.ChatMessage(role="robot", content="x")]), "messages[0].role"),
        (pb.ChatRequest(messages=[user], tools=[WEATHER], tool_choice=pb.ToolChoice(function_name="g")), "tool_choice"),
        (pb.ChatRequest(messages=[user], tool_choice=pb.ToolChoice(mode="sometimes")), "tool_choice"),
    ]
    for request, named in cases:
        error = status_of(stub.Chat(request))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and named in (error.details() or ""), named


def test_an_error_after_the_first_message_ends_the_stream_unavailable(
    live: LiveRouter, stub: serving_pb2_grpc.ServingStub
) -> None:
    """The failed choice's last message says why, then the call's status is UNAVAILABLE."""
    start = live.frontend.start

    class FailingStream:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        async def _events(self) -> Any:
            async for event in self.inner:
                yield event
                if isinstance(event, TextDelta):
                    yield ChoiceFinished(0, "error", error="worker lost")
                    yield RequestFinished(RequestUsage(2, 1, 0, 0))

        def __aiter__(self) -> Any:
            return self._events()

        async def aclose(self) -> None:
            await self.inner.aclose()

    async def failing_start(request: GenerationRequest) -> Any:
        return FailingStream(await start(request))

    live.frontend.start = failing_start  # type: ignore[method-assign]
    try:
        call = stub.Generate(
            pb.GenerateRequest(token_ids=pb.TokenIds(ids=LONG_PROMPT), sampling=greedy(LONG_MAX_TOKENS))
        )
        received = []
        with pytest.raises(grpc.RpcError):
            for message in call:
                received.append(message)
    finally:
        del live.frontend.start
    assert len(received[0].token_ids) == 1
    assert (received[-1].finish_reason, received[-1].error) == ("error", "worker lost")
    assert call.code() == grpc.StatusCode.UNAVAILABLE and "worker lost" in (call.details() or "")
    wait_until_freed(live)


# -- deadline, cancel, abort -------------------------------------------------------------------------


def test_a_passed_deadline_frees_the_request_on_the_worker(
    live: LiveRouter, stub: serving_pb2_grpc.ServingStub
) -> None:
    call = stub.Generate(
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=LONG_PROMPT), sampling=greedy(LONG_MAX_TOKENS)), timeout=0.3
    )
    assert status_of(call).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until_freed(live)


def test_a_cancelled_call_frees_the_request_on_the_worker(live: LiveRouter, stub: serving_pb2_grpc.ServingStub) -> None:
    call = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=LONG_PROMPT), sampling=greedy(LONG_MAX_TOKENS)))
    next(call), next(call)
    assert live.loads()[0].running == 1
    call.cancel()
    wait_until_freed(live)
    assert call.code() == grpc.StatusCode.CANCELLED


def test_abort_ends_the_stream_cancelled(live: LiveRouter, stub: serving_pb2_grpc.ServingStub) -> None:
    """``Abort(id)`` ends that call with status CANCELLED after the messages already sent."""
    call = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=LONG_PROMPT), sampling=greedy(LONG_MAX_TOKENS)))
    first = next(call)
    outcome: dict[str, Any] = {}

    def drain() -> None:
        outcome["error"] = status_of(call)

    reader = threading.Thread(target=drain)
    reader.start()
    assert stub.Abort(pb.AbortRequest(id=first.id)).found
    reader.join(timeout=5)
    assert not reader.is_alive()
    assert outcome["error"].code() == grpc.StatusCode.CANCELLED and "Abort" in outcome["error"].details()
    wait_until_freed(live)
    assert not stub.Abort(pb.AbortRequest(id=first.id)).found


# -- keys, health, reflection, admission -------------------------------------------------------------

SECRET, OTHER = (("x-api-key", "k-secret"),), (("authorization", "Bearer k-other"),)


@pytest.fixture(scope="module")
def keyed(model_dir: Path) -> Iterator[LiveRouter]:
    """A router with two keys (two tenants) and room for one running request, none waiting."""
    admission = AdmissionLimits(max_running=1, max_waiting=0)
    with live_router(model_dir, api_keys=("k-secret", "k-other"), admission=admission) as router:
        yield router


@pytest.fixture
def keyed_channel(keyed: LiveRouter) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(keyed.grpc_target) as channel:
        yield channel
    wait_until_freed(keyed)  # the next test finds the one slot free


def test_a_key_is_required_except_for_health_and_reflection(keyed_channel: grpc.Channel) -> None:
    serving = serving_pb2_grpc.ServingStub(keyed_channel)
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]), sampling=greedy(2))
    for metadata in [(), (("authorization", "Bearer wrong"),), (("x-api-key", "k-secre"),)]:
        assert status_of(serving.Generate(request, metadata=metadata)).code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            serving.ListModels(pb.ListModelsRequest(), metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for metadata in [SECRET, OTHER]:
        call = serving.Generate(request, metadata=metadata)
        assert len([t for m in call for t in m.token_ids]) == 2 and call.code() == grpc.StatusCode.OK
    health = health_pb2_grpc.HealthStub(keyed_channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(keyed_channel)
    (answer,) = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    assert "k2serve.v1.Serving" in {s.name for s in answer.list_services_response.service}


def test_a_full_queue_is_resource_exhausted_with_retry_after(keyed_channel: grpc.Channel) -> None:
    serving = serving_pb2_grpc.ServingStub(keyed_channel)
    running = serving.Generate(
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=LONG_PROMPT), sampling=greedy(LONG_MAX_TOKENS)), metadata=SECRET
    )
    try:
        next(running)
        refused = serving.Generate(pb.GenerateRequest(text="hi", request_id="r-9"), metadata=SECRET)
        assert status_of(refused).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(refused.trailing_metadata()) == {"retry-after": "1", "x-request-id": "r-9"}
    finally:
        running.cancel()


def test_only_the_tenant_of_a_call_may_abort_it(keyed_channel: grpc.Channel) -> None:
    serving = serving_pb2_grpc.ServingStub(keyed_channel)
    call = serving.Generate(
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=LONG_PROMPT), sampling=greedy(LONG_MAX_TOKENS)), metadata=SECRET
    )
    try:
        first = next(call)
        assert not serving.Abort(pb.AbortRequest(id=first.id), metadata=OTHER).found
        assert next(call).id == first.id  # still running
        assert serving.Abort(pb.AbortRequest(id=first.id), metadata=SECRET).found
        assert status_of(call).code() == grpc.StatusCode.CANCELLED
    finally:
        call.cancel()
