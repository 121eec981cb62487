"""``auth_interceptor``: the API-key check in front of every gRPC method of the router.

Lifecycle: built once per gRPC server (``grpc.aio.server(interceptors=[auth_interceptor(keys)])``)
from the router's ``ApiKeys``; per call it looks at the method and the metadata only:
- keys off (none configured): every call passes;
- ``/grpc.health.v1.Health/*`` and ``/grpc.reflection.*``: always pass (probes and ``grpcurl``
  need no key);
- otherwise ``authorization: Bearer <key>`` or ``x-api-key: <key>`` must name a configured key,
  else the call gets a handler of the same shape that ends it with UNAUTHENTICATED before the
  servicer runs. The servicer derives the tenant (the cache salt) from the same metadata.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc

from k2serve.proto.cluster_token import PUBLIC_METHOD_PREFIXES, denied_handler
from k2serve.router.api_keys import ApiKeys

UNAUTHENTICATED_MESSAGE = "a valid API key is required (`authorization: Bearer <key>` or `x-api-key: <key>` metadata)"


def metadata_dict(metadata: Sequence[tuple[str, Any]] | None) -> dict[str, str]:
    """Text metadata with lower-case keys (binary ``-bin`` values are left out)."""
    return {key.lower(): value for key, value in metadata or () if isinstance(value, str)}


def auth_interceptor(keys: ApiKeys) -> grpc.aio.ServerInterceptor:
    return _AuthInterceptor(keys)


class _AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: ApiKeys) -> None:
        self._keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method: str = getattr(handler_call_details, "method", "") or ""
        if not self._keys.enabled or method.startswith(PUBLIC_METHOD_PREFIXES):
            return await continuation(handler_call_details)
        headers: Mapping[str, str] = metadata_dict(getattr(handler_call_details, "invocation_metadata", None))
        handler = await continuation(handler_call_details)
        if handler is None or self._keys.tenant_of_headers(headers) is not None:
            return handler  # None: an unknown method (UNIMPLEMENTED) reveals nothing
        return denied_handler(handler, UNAUTHENTICATED_MESSAGE)
