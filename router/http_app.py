"""The router's HTTP front door, minimal edition: stream tokens from the cluster.

Lifecycle: ``build_app(dispatcher, tokenizer, model_name)`` returns a FastAPI app; the serving
process runs it under uvicorn on the configured interface and keeps ``dispatcher`` fed from the
registry. Routes:
- ``POST /v1/completions``: ``prompt`` (text, encoded verbatim, or token ids), ``max_tokens``,
  ``temperature``, ``top_p``, ``seed``, ``stream``; streaming answers are SSE ``data:`` lines in the
  OpenAI completion-chunk shape ending with ``data: [DONE]``, otherwise one completion object;
- ``GET /v1/models``, ``GET /health`` (503 while no worker is live).
Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 for bad fields,
503 when no worker is live or a worker is unavailable. The full OpenAI/Anthropic API replaces this
in the router issue.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError

from k2serve.proto import worker_pb2
from k2serve.router.tokenizer import KimiTokenizer
from k2serve.router.worker_client import Dispatcher, NoWorkerError


class CompletionRequest(BaseModel):
    model: str | None = None
    prompt: str | list[int]
    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0)
    stream: bool = False
    ignore_eos: bool = False


def error_body(status: int, message: str, *, param: str | None = None, kind: str | None = None) -> JSONResponse:
    kind = kind or ("invalid_request_error" if status < 500 else "service_unavailable")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


def build_app(dispatcher: Dispatcher, tokenizer: KimiTokenizer, model_name: str) -> FastAPI:
    app = FastAPI(title="k2serve router")

    @app.get("/health")
    async def health() -> JSONResponse:
        if not dispatcher.endpoints:
            return error_body(503, "no live worker")
        return JSONResponse({"status": "ok", "workers": len(dispatcher.endpoints)})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "k2serve"}]}

    @app.post("/v1/completions", response_model=None)
    async def completions(raw: Request) -> JSONResponse | StreamingResponse:
        try:
            body = CompletionRequest.model_validate(await raw.json())
        except ValidationError as exc:
            problem = exc.errors()[0]
            param = ".".join(str(p) for p in problem["loc"])
            return error_body(400, f"{param}: {problem['msg']}", param=param)
        except ValueError:
            return error_body(400, "the body is not valid JSON")
        prompt = tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)
        if not prompt:
            return error_body(400, "prompt: must not be empty", param="prompt")
        if any(not 0 <= t < tokenizer.vocab_size for t in prompt):
            return error_body(400, f"prompt: token ids must be in [0, {tokenizer.vocab_size})", param="prompt")
        sampling = worker_pb2.SamplingParams(
            temperature=body.temperature,
            top_p=body.top_p,
            max_tokens=body.max_tokens,
            ignore_eos=body.ignore_eos,
            stop_token_ids=list(tokenizer.stop_token_ids),
        )
        if body.seed is not None:
            sampling.seed = body.seed
        request_id = f"cmpl-{uuid.uuid4().hex}"
        events = dispatcher.generate(request_id, prompt, sampling)
        try:
            first = await anext(events)
        except NoWorkerError as exc:
            return error_body(503, str(exc))
        except grpc.aio.AioRpcError as exc:
            status = 400 if exc.code() == grpc.StatusCode.INVALID_ARGUMENT else 503
            return error_body(status, str(exc.details()))
        except StopAsyncIteration:
            return error_body(503, "the worker ended the request without a token")
        chunks = _chunks(request_id, model_name, tokenizer, first, events, len(prompt))
        if body.stream:
            return StreamingResponse(_sse(chunks), media_type="text/event-stream")
        text, finish, usage = "", None, None
        async for chunk in chunks:
            text += chunk["choices"][0]["text"]
            finish = chunk["choices"][0]["finish_reason"] or finish
            usage = chunk.get("usage") or usage
        return JSONResponse(
            {
                "id": request_id,
                "object": "text_completion",
                "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
                "usage": usage,
            }
        )

    return app


async def _chunks(
    request_id: str, model: str, tokenizer: KimiTokenizer, first: Any, rest: AsyncIterator[Any], prompt_tokens: int
) -> AsyncIterator[dict[str, Any]]:
    detok = tokenizer.incremental_detokenizer()
    created = int(time.time())
    completion_tokens = 0

    async def all_events() -> AsyncIterator[Any]:
        yield first
        async for event in rest:
            yield event

    async for event in all_events():
        completion_tokens += len(event.token_ids)
        text = detok.push(list(event.token_ids))
        if event.finish_reason:
            text += detok.flush()
        chunk: dict[str, Any] = {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": event.finish_reason or None, "logprobs": None}],
        }
        if event.finish_reason:
            chunk["usage"] = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
            if event.error:
                chunk["error"] = {"message": event.error, "type": "server_error"}
        yield chunk


async def _sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\n\n".encode()
    yield b"data: [DONE]\n\n"
