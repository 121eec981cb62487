"""What every REST route does with the raw request: read the JSON body, derive routing, watch the client.

Lifecycle: per request, a route calls ``await read_json_object(request)`` (400 for a body that is
not a UTF-8 JSON object: bad syntax, an array, ``null``, a wrong content type, lone surrogates or
NUL characters anywhere in it, ``NaN``/``Infinity`` or a number too large for a float such as ``1e309``,
nesting deeper than 64), ``routing_for(request, user)`` (the tenant's cache salt set by
``HttpGuard``; the session key from ``x-session-id`` or else the ``user`` field), and, for a
non-streaming answer, ``await until_done_or_gone(request, coroutine)``, which cancels the work (and
so aborts the request on the workers, and gives back its admission slot) when the client
disconnects first, then raises ``ClientGone``.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request

from k2serve.router.api_error import ApiError, ErrorKind, invalid
from k2serve.router.generation_request import Routing
from k2serve.router.http_guard import ClientGone

T = TypeVar("T")
SESSION_HEADER = "x-session-id"
DISCONNECT_POLL_S = 0.25


async def read_json_object(request: Request) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type not in ("application/json", "") and not content_type.endswith("+json"):
        raise invalid("body", f"expected Content-Type application/json, got {content_type!r}")
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid("body", "the body is not valid UTF-8") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except ApiError:
        raise
    except (ValueError, RecursionError):
        raise invalid("body", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise invalid("body", f"the body must be a JSON object, got {type(body).__name__}")
    _check_strings(body, "")
    return body


def routing_for(request: Request, user: Any = None) -> Routing:
    tenant = getattr(request.state, "tenant", "") or ""
    session = request.headers.get(SESSION_HEADER) or (user if isinstance(user, str) and user else None)
    return Routing(session_key=session, cache_salt=tenant or None)


async def until_done_or_gone(
    request: Request, work: Awaitable[T], discard: Callable[[T], Awaitable[object]] | None = None
) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise ``ClientGone`` (a
    ``CancelledError``, which ``HttpGuard`` turns into a quiet end of the request). ``discard`` takes
    a result that came in the same instant as the disconnect (a started stream nobody will read)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                if discard is not None and not task.cancelled() and task.exception() is None:
                    await discard(task.result())
                raise ClientGone("the client disconnected")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _reject_constant(name: str) -> Any:
    raise ApiError(ErrorKind.INVALID, f"body: {name} is not valid JSON (use a finite number)", param="body")


def _finite_float(text: str) -> float:
    """A JSON number too large for a float (``1e309``) parses to inf in Python: reject it here."""
    value = float(text)
    if not math.isfinite(value):
        raise ApiError(ErrorKind.INVALID, "body: a number is out of range (must be a finite float)", param="body")
    return value


def _check_strings(value: Any, path: str, depth: int = 0) -> None:
    """No lone surrogates or NUL characters anywhere (they break the tokenizer and the template)."""
    if depth > 64:
        raise invalid(path or "body", "nested too deeply")
    if isinstance(value, str):
        _check_text(value, path or "body")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, path or "body")
            _check_strings(item, f"{path}.{key}" if path else key, depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_strings(item, f"{path}.{i}", depth + 1)


def _check_text(text: str, path: str) -> None:
    if "\x00" in text:
        raise invalid(path, "must not contain NUL characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(path, "contains an unpaired surrogate (not valid Unicode)") from None
