"""The OpenAI-compatible REST surface: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``,
``/tokenize`` and ``/detokenize`` (api-and-ops-conventions.md §1).

Lifecycle: ``openai_routes(frontend)`` once per app (``build_app`` mounts it). Per request a route
reads the body (``read_json_object``), parses it into ``GenerationRequest``s (400s name the
field), then
- streaming: awaits ``frontend.start`` *before* answering (under ``until_done_or_gone``: a client
  that leaves while queued or before its first token frees its slot at once), so a rejection (4xx,
  429, 503) is a real HTTP status with no stream byte sent, and returns ``sse_response`` over the chunks, which
  closes the generation in its ``finally`` (a client that leaves aborts the workers' request);
- non-streaming: starts and reads the generation to the end under ``until_done_or_gone``.
Errors are ``ApiError``s; ``build_app``'s handler writes them in OpenAI's shape.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from k2serve.router.frontend import Frontend
from k2serve.router.http_request import read_json_object, routing_for, until_done_or_gone
from k2serve.router.openai_chat_answer import chat_answer
from k2serve.router.openai_chat_request import parse_chat
from k2serve.router.openai_chat_stream import chat_chunks
from k2serve.router.openai_completion_request import parse_completion
from k2serve.router.openai_completions import close_all, completion_answer, completion_chunks, start_all
from k2serve.router.openai_schemas import (
    CHAT_COMPLETION,
    CHAT_REQUEST,
    COMPLETION,
    COMPLETION_REQUEST,
    DETOKENIZE_ANSWER,
    DETOKENIZE_REQUEST,
    MODEL_LIST,
    SSE_EVENT,
    TOKENIZE_ANSWER,
    TOKENIZE_REQUEST,
    json_body,
    responses,
)
from k2serve.router.openai_sse import sse_response
from k2serve.router.openai_tokenizer_routes import detokenize, model_list, tokenize


def openai_routes(frontend: Frontend) -> APIRouter:
    router = APIRouter()
    created = int(time.time())
    model = frontend.model.name
    served = (model, frontend.tokenizer.vocab_size)  # what the OpenAPI document describes

    @router.post(
        "/v1/chat/completions",
        openapi_extra=json_body(CHAT_REQUEST, *served),
        responses=responses(CHAT_COMPLETION, stream_event=SSE_EVENT),
    )
    async def chat_completions(request: Request) -> Response:
        body = await read_json_object(request)
        generation, shape = parse_chat(frontend, body, routing_for(request, body.get("user")))
        if shape.stream:
            # a client that leaves while queued for admission or waiting for the first token frees its slot
            stream = await until_done_or_gone(request, frontend.start(generation), lambda s: s.aclose())
            return sse_response(chat_chunks(stream, shape, model), stream.aclose)

        async def answer() -> dict[str, Any]:
            return await chat_answer(await frontend.start(generation), shape, model)

        return JSONResponse(await until_done_or_gone(request, answer()))

    @router.post(
        "/v1/completions",
        openapi_extra=json_body(COMPLETION_REQUEST, *served),
        responses=responses(COMPLETION, stream_event=SSE_EVENT),
    )
    async def completions(request: Request) -> Response:
        body = await read_json_object(request)
        job = parse_completion(frontend, body, routing_for(request, body.get("user")))
        if job.shape.stream:
            streams = await until_done_or_gone(request, start_all(frontend, job), close_all)
            return sse_response(completion_chunks(job, streams, model), lambda: close_all(streams))

        async def answer() -> dict[str, Any]:
            return await completion_answer(job, await start_all(frontend, job), model)

        return JSONResponse(await until_done_or_gone(request, answer()))

    @router.get("/v1/models", responses=responses(MODEL_LIST))
    async def models() -> dict[str, Any]:
        return model_list(frontend, created)

    @router.post("/tokenize", openapi_extra=json_body(TOKENIZE_REQUEST, *served), responses=responses(TOKENIZE_ANSWER))
    async def tokenize_route(request: Request) -> dict[str, Any]:
        return tokenize(frontend, await read_json_object(request))

    @router.post(
        "/detokenize", openapi_extra=json_body(DETOKENIZE_REQUEST, *served), responses=responses(DETOKENIZE_ANSWER)
    )
    async def detokenize_route(request: Request) -> dict[str, Any]:
        return detokenize(frontend, await read_json_object(request))

    return router
