"""The Anthropic surface: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

Lifecycle: ``anthropic_routes(frontend)`` once per app (``http_app`` mounts it; failures leave as
``ApiError`` and the app renders Anthropic's error body and status under ``/v1/messages``). Per
request: read the JSON body -> ``parse_messages_request`` (every field checked, blocks converted
to OpenAI's shape) -> ``check_model`` (404) -> ``chat_generation`` (template, tokens, context) ->
``frontend.start`` (admission: 429 is answered as 529 ``overloaded_error``; the first token) ->
- non-streaming: collect the events under ``until_done_or_gone`` (a client that leaves cancels
  the work) into ``MessageEvents.message()``; a failure after the start is an error response;
- streaming: ``frontend.start`` is awaited (under ``until_done_or_gone``) before the
  ``StreamingResponse`` is returned, so every
  failure before the first token still has a real status; the body is ``MessageEvents``' SSE
  events, and the generator closes the stream in ``finally`` (disconnect -> workers abort). The
  response closes it too once it is done (``_ClosingStreamingResponse``): a client that leaves
  before the body's first chunk means the generator never starts, so its ``finally`` never runs,
  and the request would otherwise keep its admission slot and run to ``max_tokens``.
``count_tokens`` validates the same conversation and answers the rendered prompt's length.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import MappingProxyType
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from k2serve.router.anthropic_events import MessageEvents, sse
from k2serve.router.anthropic_request import MessagesRequest, parse_count_request, parse_messages_request
from k2serve.router.anthropic_schemas import (
    COUNT_ANSWER,
    COUNT_REQUEST,
    ERROR,
    MESSAGE_ANSWER,
    MESSAGES_REQUEST,
    STREAM_EVENT,
)
from k2serve.router.chat_request import chat_generation, resolve_tool_choice
from k2serve.router.frontend import Frontend, GenerationStream
from k2serve.router.generation_request import GenerationRequest
from k2serve.router.http_request import read_json_object, routing_for, until_done_or_gone
from k2serve.router.openai_schemas import json_body, responses

SSE_HEADERS = MappingProxyType({"cache-control": "no-cache", "x-accel-buffering": "no"})


def anthropic_routes(frontend: Frontend) -> APIRouter:
    router = APIRouter()
    served = (frontend.model.name, frontend.tokenizer.vocab_size)  # what the OpenAPI document describes

    @router.post(
        "/v1/messages",
        response_model=None,
        openapi_extra=json_body(MESSAGES_REQUEST, *served),
        responses=responses(MESSAGE_ANSWER, ERROR, stream_event=STREAM_EVENT),
    )
    async def messages(request: Request) -> Response:
        parsed = parse_messages_request(await read_json_object(request), frontend.limits)
        frontend.check_model(parsed.model)
        generation = _generation(frontend, parsed, request)
        message_id = "msg_" + generation.request_id.rpartition("-")[2]
        events = MessageEvents(
            message_id,
            parsed.model,
            len(generation.prompt_token_ids),
            single_tool_call=parsed.conversation.disable_parallel_tool_use,
        )
        headers = {"request-id": message_id}
        if parsed.stream:
            stream = await until_done_or_gone(request, frontend.start(generation), lambda s: s.aclose())
            return _ClosingStreamingResponse(
                stream, _sse_body(stream, events), media_type="text/event-stream", headers={**SSE_HEADERS, **headers}
            )
        body = await until_done_or_gone(request, _collect(frontend, generation, events))
        return JSONResponse(body, headers=headers)

    @router.post(
        "/v1/messages/count_tokens",
        openapi_extra=json_body(COUNT_REQUEST, *served),
        responses=responses(COUNT_ANSWER, ERROR),
    )
    async def count_tokens(request: Request) -> dict[str, int]:
        model, conversation = parse_count_request(await read_json_object(request))
        frontend.check_model(model)
        mode, _ = resolve_tool_choice(conversation.tools, conversation.tool_choice)
        prompt = frontend.render_chat(conversation.messages, conversation.tools if mode != "none" else None)
        return {"input_tokens": len(prompt)}

    return router


def _generation(frontend: Frontend, parsed: MessagesRequest, request: Request) -> GenerationRequest:
    conversation = parsed.conversation
    return chat_generation(
        frontend,
        request_id=frontend.new_request_id("msg"),
        messages=conversation.messages,
        tools=conversation.tools,
        tool_choice=conversation.tool_choice,
        sampling=parsed.sampling,
        thinking=parsed.thinking,
        stop=parsed.stop,
        routing=routing_for(request, parsed.user_id),
    )


async def _collect(frontend: Frontend, generation: GenerationRequest, events: MessageEvents) -> dict[str, object]:
    stream = await frontend.start(generation)
    try:
        async for event in stream:
            events.push(event)
            if events.failure is not None:
                raise events.failure
    finally:
        await stream.aclose()
    return events.message()


async def _sse_body(stream: GenerationStream, events: MessageEvents) -> AsyncIterator[str]:
    try:
        for data in events.start():
            yield sse(data)
        async for event in stream:
            for data in events.push(event):
                yield sse(data)
            if events.done:
                break
    finally:
        await stream.aclose()


class _ClosingStreamingResponse(StreamingResponse):
    """A ``StreamingResponse`` that closes the generation stream however the response ends."""

    def __init__(self, stream: GenerationStream, content: AsyncIterator[str], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._stream.aclose()
