"""``HttpCounter``: the outermost ASGI layer of the REST app; counts every answer by route, method and status.

Lifecycle: wraps the guarded app once (``HttpCounter(app, counter, routes)``); per HTTP request it
notes the status of ``http.response.start`` as it passes and, when the app returns (or raises: 500),
increments ``counter`` with the route template — one of ``routes``, else ``other``, so a client
probing random paths cannot grow the label set — the method, and the status. A request whose
client left before any answer counts as status ``499`` (nginx's "client closed request"). Pure
ASGI: streaming responses pass through untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from prometheus_client import Counter

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]
METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})


class HttpCounter:
    def __init__(self, app: App, counter: Counter, routes: Iterable[str]) -> None:
        self.app, self.counter, self.routes = app, counter, frozenset(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 499

        async def noting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        except Exception:
            status = 500
            raise
        finally:
            path = scope.get("path", "")
            method = scope.get("method", "")
            self.counter.labels(
                path if path in self.routes else "other", method if method in METHODS else "other", str(status)
            ).inc()
