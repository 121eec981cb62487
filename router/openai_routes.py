"""The OpenAI-compatible REST surface: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``,
``/tokenize`` and ``/detokenize`` (api-and-ops-conventions.md §1).

Lifecycle: ``openai_routes(frontend)`` once per app (``build_app`` mounts it). Per request a route
reads the body (``read_json_object``), parses it into ``GenerationRequest``s (400s name the
field), then
- streaming: awaits ``frontend.start`` *before* answering, so a rejection (4xx, 429, 503) is a
  real HTTP status with no stream byte sent, and returns ``sse_response`` over the chunks, which
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
from k2serve.router.openai_sse import sse_response
from k2serve.router.openai_tokenizer_routes import detokenize, model_list, tokenize


def openai_routes(frontend: Frontend) -> APIRouter:
    router = APIRouter()
    created = int(time.time())
    model = frontend.model.name

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_json_object(request)
        generation, shape = parse_chat(frontend, body, routing_for(request, body.get("user")))
        if shape.stream:
            stream = await frontend.start(generation)
            return sse_response(chat_chunks(stream, shape, model), stream.aclose)

        async def answer() -> dict[str, Any]:
            return await chat_answer(await frontend.start(generation), shape, model)

        return JSONResponse(await until_done_or_gone(request, answer()))

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_json_object(request)
        job = parse_completion(frontend, body, routing_for(request, body.get("user")))
        if job.shape.stream:
            streams = await start_all(frontend, job)
            return sse_response(completion_chunks(job, streams, model), lambda: close_all(streams))

        async def answer() -> dict[str, Any]:
            return await completion_answer(job, await start_all(frontend, job), model)

        return JSONResponse(await until_done_or_gone(request, answer()))

    @router.get("/v1/models")
    async def models() -> dict[str, Any]:
        return model_list(frontend, created)

    @router.post("/tokenize")
    async def tokenize_route(request: Request) -> dict[str, Any]:
        return tokenize(frontend, await read_json_object(request))

    @router.post("/detokenize")
    async def detokenize_route(request: Request) -> dict[str, Any]:
        return detokenize(frontend, await read_json_object(request))

    return router
