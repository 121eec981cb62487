"""``GrpcChatClient``: the router's ``k2serve.v1.Serving/Chat`` stream over one ``grpc.aio`` channel.

Lifecycle: one per sweep (``async with GrpcChatClient(...)``); ``send(request, origin)`` per
request converts the OpenAI-shaped ``BenchRequest`` to a ``ChatRequest`` (tools as JSON-schema
text, the session id as ``session_id``), streams the answer and returns a ``RequestRecord``; a
gRPC status other than OK, a choice that finishes with ``error`` or the per-request deadline (the
call's ``timeout``, also bounded by ``asyncio.timeout``) become a failed record, never an
exception. The API key travels as ``authorization: Bearer`` metadata. The clock rule is the
REST one (``stream_recorder``): a message with ``role``, reasoning, content or tool calls is a
token chunk; the finish message and the usage message are not.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

import grpc

from k2serve.loadtest.bench_request import BenchRequest, Message, RequestRecord, Tool
from k2serve.loadtest.stream_recorder import StreamRecorder
from k2serve.proto import serving_pb2, serving_pb2_grpc


def chat_messages(messages: Sequence[Message]) -> list[serving_pb2.ChatMessage]:
    out = []
    for m in messages:
        calls = [
            serving_pb2.ToolCall(
                id=c.get("id", ""),
                name=c.get("function", {}).get("name", ""),
                arguments_json=_json_text(c.get("function", {}).get("arguments", "")),
            )
            for c in m.get("tool_calls") or []
        ]
        out.append(
            serving_pb2.ChatMessage(
                role=m["role"],
                content=m.get("content") or "",
                reasoning_content=m.get("reasoning_content") or "",
                tool_calls=calls,
                tool_call_id=m.get("tool_call_id") or "",
                name=m.get("name") or "",
            )
        )
    return out


def tool_functions(tools: Sequence[Tool]) -> list[serving_pb2.ToolFunction]:
    return [
        serving_pb2.ToolFunction(
            name=t["function"]["name"],
            description=t["function"].get("description", ""),
            parameters_json=json.dumps(t["function"].get("parameters", {})),
        )
        for t in tools
    ]


def chat_request(
    request: BenchRequest, model: str, *, temperature: float | None = None, ignore_eos: bool = False
) -> serving_pb2.ChatRequest:
    sampling = serving_pb2.SamplingParams(max_tokens=request.max_tokens, ignore_eos=ignore_eos)
    if temperature is not None:
        sampling.temperature = temperature
    return serving_pb2.ChatRequest(
        model=model,
        messages=chat_messages(request.messages),
        tools=tool_functions(request.tools),
        sampling=sampling,
        session_id=request.session_id or "",
    )


def apply_response(recorder: StreamRecorder, response: serving_pb2.ChatResponse, now: float) -> str | None:
    """Feed one ``ChatResponse``; -> the error text of a choice that failed, else None."""
    if response.role or response.content or response.reasoning_content or response.tool_calls:
        recorder.token_chunk(now, content=response.content, reasoning=response.reasoning_content)
        for call in response.tool_calls:
            recorder.tool_call_piece(call.index, call.id, call.name, call.arguments)
    if response.finish_reason:
        if response.finish_reason == "error":
            return response.error or "the choice finished with an error"
        recorder.finish(response.finish_reason)
    if response.HasField("usage"):
        usage = response.usage
        recorder.usage(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)
    return None


class GrpcChatClient:
    def __init__(
        self,
        target: str,
        model: str,
        *,
        api_key: str | None = None,
        request_timeout_s: float = 600.0,
        temperature: float | None = None,
        ignore_eos: bool = False,
    ) -> None:
        self.model = model
        self.request_timeout_s = request_timeout_s
        self.temperature = temperature
        self.ignore_eos = ignore_eos
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = serving_pb2_grpc.ServingStub(self._channel)

    async def __aenter__(self) -> GrpcChatClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._channel.close(grace=None)

    async def send(self, request: BenchRequest, origin: float) -> RequestRecord:
        recorder = StreamRecorder(request, origin)
        message = chat_request(request, self.model, temperature=self.temperature, ignore_eos=self.ignore_eos)
        call: Any = None
        try:
            async with asyncio.timeout(self.request_timeout_s + 1.0):  # the deadline fires first
                recorder.start = time.perf_counter()
                call = self._stub.Chat(message, timeout=self.request_timeout_s, metadata=self._metadata)
                async for response in call:
                    error = apply_response(recorder, response, time.perf_counter())
                    if error is not None:
                        call.cancel()
                        return recorder.failed(error)
            return recorder.record()
        except grpc.aio.AioRpcError as exc:
            return recorder.failed(f"gRPC {exc.code().name}: {exc.details()}")
        except TimeoutError:
            if call is not None:
                call.cancel()
            return recorder.failed(f"timed out after {self.request_timeout_s:g} s")


async def discover_grpc_model(target: str, api_key: str | None, timeout_s: float = 30.0) -> str:
    """The first model of ``Serving/ListModels``; ValueError when the server cannot say."""
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = serving_pb2_grpc.ServingStub(channel)
            answer = await stub.ListModels(serving_pb2.ListModelsRequest(), timeout=timeout_s, metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        raise ValueError(f"cannot list the models of {target} ({exc.code().name}); pass --model") from exc
    if not answer.models:
        raise ValueError(f"{target} lists no model; pass --model")
    return str(answer.models[0].id)


def _json_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments)
