"""``HttpGuard``: the ASGI middleware in front of every REST route: API key, body size, tenant.

Lifecycle: wraps the FastAPI app once (``HttpGuard(app, keys, ...)``); per HTTP request it
0. answers 431 (and closes) to more than ``max_headers`` headers or more than ``max_header_bytes``
   of them: the server (h11) only bounds a header block that arrives in pieces, so this makes the
   limit the same whichever way the bytes came;
1. lets ``OPTIONS`` and the public paths (``/health``, ``/metrics`` by default; exact match) through;
2. checks the key (``ApiKeys``): missing or wrong -> 401 in the surface's error shape (Anthropic's
   for ``/v1/messages*``, OpenAI's elsewhere) before the body is read;
3. puts the tenant into ``scope["state"]["tenant"]`` (the routes derive the cache salt from it);
4. caps the body: a ``Content-Length`` over ``max_body_bytes`` -> 413 at once (not a number ->
   400), without reading any of it; otherwise the guard reads the body itself (chunked or not), answers
   413 as soon as it grows past the limit, and hands the app the whole body as one message, so the
   app never sees more than the limit and no app-level exception handler can turn the 413 into a
   500. A client that disconnects while sending its body never reaches the app. The 413 asks the
   server to close the connection (the rest of the body is not read).
A route that finds its client gone raises ``ClientGone``: the guard ends the request quietly.
After the body, ``receive`` is the server's own again (``http.disconnect`` reaches the app), and
``send`` is untouched: it is pure ASGI (no ``BaseHTTPMiddleware``), so streaming responses pass
through as they are.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from k2serve.router.api_error import ApiError, ErrorKind
from k2serve.router.api_keys import ApiKeys

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_PUBLIC_PATHS = ("/health", "/metrics")
DEFAULT_MAX_BODY_BYTES = 8 * 2**20
DEFAULT_MAX_HEADER_BYTES = 32 * 2**10  # names + values of all headers
DEFAULT_MAX_HEADERS = 128
_DIGITS = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() also accepts "²" (int() then fails)


def is_anthropic_path(path: str) -> bool:
    return path.startswith("/v1/messages")


async def send_error(
    send: Send,
    path: str,
    error: ApiError,
    *,
    close: bool = False,
    extra_headers: tuple[tuple[bytes, bytes], ...] = (),
    status: int | None = None,
) -> None:
    """``error`` in the surface's shape; ``status`` overrides the kind's (431 has no ``ErrorKind``)."""
    anthropic = is_anthropic_path(path)
    body = error.anthropic_body() if anthropic else error.openai_body()
    if status is None:
        status = error.kind.anthropic_status if anthropic else error.kind.http_status
    elif not anthropic:
        body["error"]["code"] = status
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in error.headers().items()]
    headers += extra_headers
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class ClientGone(asyncio.CancelledError):
    """Raised by a route whose client disconnected before the answer (``until_done_or_gone``).

    A ``CancelledError`` so that everything on the way unwinds as for a cancellation; ``HttpGuard``
    ends the request quietly on it (nobody to answer; not an "Exception in ASGI application")."""


class HttpGuard:
    def __init__(
        self,
        app: ASGIApp,
        keys: ApiKeys,
        *,
        public_paths: tuple[str, ...] = DEFAULT_PUBLIC_PATHS,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_headers: int = DEFAULT_MAX_HEADERS,
    ) -> None:
        self.app, self.keys = app, keys
        self.public_paths, self.max_body_bytes = public_paths, max_body_bytes
        self.max_header_bytes, self.max_headers = max_header_bytes, max_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        raw_headers = scope.get("headers", [])
        size = sum(len(name) + len(value) for name, value in raw_headers)
        if len(raw_headers) > self.max_headers or size > self.max_header_bytes:
            error = ApiError(
                ErrorKind.INVALID,
                f"request header fields too large (at most {self.max_headers} headers, {self.max_header_bytes} bytes)",
            )
            await send_error(send, path, error, close=True, status=431)
            return
        headers: dict[str, str] = {}
        for name, value in raw_headers:
            headers[name.decode("latin-1").lower()] = value.decode("latin-1")
        public = scope.get("method") == "OPTIONS" or path in self.public_paths
        tenant = self.keys.tenant_of_headers(headers)
        if tenant is None and not public:
            error = ApiError(ErrorKind.UNAUTHENTICATED, "missing or invalid API key")
            await send_error(send, path, error, extra_headers=((b"www-authenticate", b"Bearer"),))
            return
        scope.setdefault("state", {})["tenant"] = tenant or ""
        length = (headers.get("content-length") or "").strip()
        if length and not _DIGITS.fullmatch(length):
            await send_error(send, path, ApiError(ErrorKind.INVALID, "invalid Content-Length header"), close=True)
            return
        if length and (len(length) > 18 or int(length) > self.max_body_bytes):  # (no 4,300-digit int())
            await send_error(send, path, self._too_large(), close=True)
            return
        body = await self._read_body(receive)
        if body is None:  # the client left while sending its body: nobody to answer
            return
        if len(body) > self.max_body_bytes:
            await send_error(send, path, self._too_large(), close=True)
            return
        replayed = False

        async def replay_receive() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            await self.app(scope, replay_receive, send)
        except ClientGone:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # this task is being cancelled too: say so
                raise

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or the first part of it over the limit; None when the client disconnected."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            if message["type"] != "http.request":
                continue
            chunk = message.get("body", b"")
            if chunk:
                chunks.append(chunk)
                size += len(chunk)
                if size > self.max_body_bytes:
                    break
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _too_large(self) -> ApiError:
        return ApiError(ErrorKind.TOO_LARGE, f"the request body is larger than {self.max_body_bytes} bytes")
