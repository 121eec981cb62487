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

from collections.abc import Mapping

import grpc

from k2serve.proto.cluster_token import MetadataGuard
from k2serve.router.api_keys import ApiKeys

UNAUTHENTICATED_MESSAGE = "a valid API key is required (`authorization: Bearer <key>` or `x-api-key: <key>` metadata)"


def auth_interceptor(keys: ApiKeys) -> grpc.aio.ServerInterceptor:
    def accepts(headers: Mapping[str, str]) -> bool:
        return not keys.enabled or keys.tenant_of_headers(headers) is not None

    return MetadataGuard(accepts, UNAUTHENTICATED_MESSAGE)
