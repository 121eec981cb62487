"""The cluster token: the shared secret that every call between k2serve's own processes carries (router ->
worker, worker -> worker for the KV handoff, router -> registry), and that the Worker and Registry
servers check. User API keys stay at the router; this token keeps anyone else who can reach the
cluster's private interface from calling a rank or the registry directly (free inference past the
API keys, another tenant's KV cache through ``PullKv``, an ``Abort`` of someone else's request).

Lifecycle: an entry point resolves the token once (``K2SERVE_CLUSTER_TOKEN``, or a fresh one for a
cluster it starts itself) and hands it down explicitly: servers add ``token_interceptor(token)``,
clients wrap their stubs with ``authorized(stub, token)``. ``None`` means no check and no metadata
(a component started on its own, as the unit tests do). The token travels as the metadata value
``x-k2serve-cluster-token``, compared in constant time; the gRPC health service and reflection stay
open (probes and ``grpcurl`` need no secret, and they reveal nothing a caller could use).

Rotation without refusing anyone: the value may list several tokens, comma-separated ("NEW,OLD").
A process sends the first and accepts any of them. Restart the head with "NEW,OLD" (its ranks and
registry then accept the routers that still send OLD), roll the routers to "NEW" (or "NEW,OLD"),
and drop OLD at the head's next restart.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc

ENV_VAR = "K2SERVE_CLUSTER_TOKEN"  # read by the entry points only
METADATA_KEY = "x-k2serve-cluster-token"
PUBLIC_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
UNAUTHENTICATED_MESSAGE = f"an internal k2serve service: calls need the cluster token (`{METADATA_KEY}` metadata)"
MIN_LENGTH = 16
SEPARATOR = ","  # between the tokens of a rotation: the first is sent, each is accepted
MAX_TOKENS = 4


def new_token() -> str:
    """A fresh 256-bit token (URL-safe text: valid gRPC metadata)."""
    return secrets.token_urlsafe(32)


def checked_token(value: str | None, name: str = ENV_VAR) -> str | None:
    """``value`` if it can serve as the cluster token (``None`` or "" -> None); ValueError naming ``name``
    otherwise: 1 to ``MAX_TOKENS`` tokens separated by ``SEPARATOR``, each at least ``MIN_LENGTH``
    characters of printable ASCII without spaces or commas (what gRPC metadata carries as is)."""
    if not value:
        return None
    tokens = value.split(SEPARATOR)
    if len(tokens) > MAX_TOKENS:
        raise ValueError(f"{name}: at most {MAX_TOKENS} comma-separated cluster tokens, got {len(tokens)}")
    for i, token in enumerate(tokens):
        if len(token) < MIN_LENGTH or not all("!" <= ch <= "~" for ch in token):
            which = "the cluster token" if len(tokens) == 1 else f"cluster token {i + 1} of {len(tokens)}"
            raise ValueError(
                f"{name}: {which} must be at least {MIN_LENGTH} printable ASCII characters without spaces or commas"
            )
    return value


def sent_token(token: str) -> str:
    """The token a process sends: the first of a rotation list."""
    return token.split(SEPARATOR, 1)[0]


class _Authorized:
    """A stub whose every call carries the token (the calls themselves are the stub's own: same call
    objects, same cancellation behaviour)."""

    def __init__(self, stub: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        self._stub, self._metadata = stub, metadata

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._stub, name)
        metadata = self._metadata

        def call(*args: Any, **kwargs: Any) -> Any:
            kwargs["metadata"] = (*metadata, *(kwargs.get("metadata") or ()))
            return method(*args, **kwargs)

        return call


def authorized(stub: Any, token: str | None) -> Any:
    """``stub`` with the token on every call; ``stub`` itself when there is no token."""
    return stub if token is None else _Authorized(stub, ((METADATA_KEY, sent_token(token)),))


def token_interceptor(token: str | None) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors of a server that checks ``token``, any token of a rotation list (none when
    ``token`` is None)."""
    if token is None:
        return []
    accepted = [each.encode() for each in token.split(SEPARATOR)]

    def carries_token(headers: Mapping[str, str]) -> bool:
        given = headers.get(METADATA_KEY, "").encode()
        # a list, not a generator: every one is compared, so the time does not tell which one matched
        return any([hmac.compare_digest(given, each) for each in accepted])

    return [MetadataGuard(carries_token, UNAUTHENTICATED_MESSAGE)]


def metadata_dict(metadata: Sequence[tuple[str, Any]] | None) -> dict[str, str]:
    """Text metadata with lower-case keys (binary ``-bin`` values are left out)."""
    return {key.lower(): value for key, value in metadata or () if isinstance(value, str)}


class MetadataGuard(grpc.aio.ServerInterceptor):
    """Ends every call whose metadata ``accepts`` refuses with UNAUTHENTICATED and ``message``, before any
    servicer code runs; health and reflection always pass (shared by this token and the router's API
    keys)."""

    def __init__(self, accepts: Callable[[Mapping[str, str]], bool], message: str) -> None:
        self._accepts, self._message = accepts, message

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method: str = getattr(handler_call_details, "method", "") or ""
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(PUBLIC_METHOD_PREFIXES):
            return handler  # None: an unknown method (UNIMPLEMENTED) reveals nothing
        if self._accepts(metadata_dict(getattr(handler_call_details, "invocation_metadata", None))):
            return handler
        return denied_handler(handler, self._message)


def denied_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s shape that ends the call with UNAUTHENTICATED and ``message`` before any
    servicer code runs."""

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return factory(
        deny, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )
