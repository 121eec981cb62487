"""``HttpGuard``: the ASGI middleware in front of every REST route: API key, body size, tenant.

Lifecycle: wraps the FastAPI app once (``HttpGuard(app, keys, ...)``); per HTTP request it
1. lets ``OPTIONS`` and the public paths (``/health``, ``/metrics`` by default) through;
2. checks the key (``ApiKeys``): missing or wrong -> 401 in the surface's error shape (Anthropic's
   for ``/v1/messages*``, OpenAI's elsewhere) before the body is read;
3. puts the tenant into ``scope["state"]["tenant"]`` (the routes derive the cache salt from it);
4. caps the body: a ``Content-Length`` over ``max_body_bytes`` -> 413 at once, and a streamed body
   that grows past it -> 413 as soon as it does (the app never sees more than the limit).
It is pure ASGI (no ``BaseHTTPMiddleware``), so streaming responses pass through untouched.
"""

from __future__ import annotations

import json
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


def is_anthropic_path(path: str) -> bool:
    return path.startswith("/v1/messages")


async def send_error(send: Send, path: str, error: ApiError) -> None:
    anthropic = is_anthropic_path(path)
    body = error.anthropic_body() if anthropic else error.openai_body()
    status = error.kind.anthropic_status if anthropic else error.kind.http_status
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in error.headers().items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class _BodyTooLarge(Exception):
    pass


class HttpGuard:
    def __init__(
        self,
        app: ASGIApp,
        keys: ApiKeys,
        *,
        public_paths: tuple[str, ...] = DEFAULT_PUBLIC_PATHS,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.app, self.keys = app, keys
        self.public_paths, self.max_body_bytes = public_paths, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        public = scope.get("method") == "OPTIONS" or path in self.public_paths
        tenant = self.keys.tenant_of_headers(headers)
        if tenant is None and not public:
            await send_error(send, path, ApiError(ErrorKind.UNAUTHENTICATED, "missing or invalid API key"))
            return
        scope.setdefault("state", {})["tenant"] = tenant or ""
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            await send_error(send, path, self._too_large())
            return
        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not response_started:
                await send_error(send, path, self._too_large())

    def _too_large(self) -> ApiError:
        return ApiError(ErrorKind.TOO_LARGE, f"the request body is larger than {self.max_body_bytes} bytes")
