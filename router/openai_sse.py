"""``sse_response``: OpenAI server-sent events around an already started generation.

Lifecycle: the route awaits ``frontend.start`` first (so 4xx/429/503 are real HTTP statuses, sent
before any stream byte), then returns ``sse_response(chunks, close)``. The response writes each
chunk as ``data: <one-line JSON>`` and a blank line, and always ends with ``data: [DONE]``; an
``ApiError`` raised by ``chunks`` after the first byte becomes ``data: {"error": {...}}`` before
the ``[DONE]``, anything else a generic internal error (the exception is logged, never sent).
``close`` (idempotent) runs in a ``finally`` of the body and of the response, shielded from
cancellation: a client that goes away mid-stream, or before the body began, cancels the response
task, and closing the generation is what aborts the request on the workers and gives back its
admission slots.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from k2serve.router.api_error import ApiError, ErrorKind

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}  # no proxy buffering


def sse_data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def sse_events(
    chunks: AsyncGenerator[dict[str, Any], None], close: Callable[[], Awaitable[None]]
) -> AsyncIterator[str]:
    try:
        try:
            async for chunk in chunks:
                yield sse_data(chunk)
        except ApiError as exc:
            yield sse_data(exc.openai_body())
        except Exception:
            logger.exception("streaming response failed")
            yield sse_data(ApiError(ErrorKind.INTERNAL, "internal error (logged on the server)").openai_body())
        yield DONE
    finally:
        with anyio.CancelScope(shield=True):
            await chunks.aclose()
            await close()


class SseResponse(StreamingResponse):
    """Closes the generation even when the body is never iterated (the client left before it began)."""

    def __init__(self, chunks: AsyncGenerator[dict[str, Any], None], close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(sse_events(chunks, close), media_type="text/event-stream", headers=SSE_HEADERS)
        self._close = close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._close()


def sse_response(chunks: AsyncGenerator[dict[str, Any], None], close: Callable[[], Awaitable[None]]) -> SseResponse:
    return SseResponse(chunks, close)
