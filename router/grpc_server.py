"""PLACEHOLDER (being written): the gRPC Serving service."""

from __future__ import annotations

import grpc

from k2serve.router.api_keys import ApiKeys
from k2serve.router.frontend import Frontend


def add_serving(server: grpc.aio.Server, frontend: Frontend) -> None:
    return None


def auth_interceptor(keys: ApiKeys) -> grpc.aio.ServerInterceptor:
    class _Pass(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
            return await continuation(handler_call_details)

    return _Pass()
