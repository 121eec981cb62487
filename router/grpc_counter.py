"""``GrpcCounter``: a ``grpc.aio`` server interceptor that counts every call by method and final status.

Lifecycle: installed once on the router's gRPC server; for each call it wraps the method handler
(unary or server-streaming) and, when the handler ends, increments ``counter`` with the short
method name (``Generate``, ``Chat``, ``Check``, ...; the set is the services' own, so it is bounded)
and the status code name: the code the handler set with ``context.abort``/``set_code``, ``OK``
when it set none, ``CANCELLED`` when the client left, ``UNKNOWN`` for an unexpected exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import Counter


class GrpcCounter(grpc.aio.ServerInterceptor):
    def __init__(self, counter: Counter) -> None:
        self.counter = counter

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = str(handler_call_details.method).rsplit("/", 1)[-1] or "other"
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # no client-streaming methods here

    def _unary(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            error: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                self.counter.labels(method, _outcome(context, error)).inc()

        return call

    def _stream(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            error: BaseException | None = None
            try:
                produced = behavior(request, context)
                if hasattr(produced, "__aiter__"):
                    async for message in produced:
                        yield message
                else:  # a handler that writes with context.write and returns
                    await produced
            except BaseException as exc:
                error = exc
                raise
            finally:
                self.counter.labels(method, _outcome(context, error)).inc()

        return call


def _outcome(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    """The final status name of a call that ended with ``error`` (None: returned normally)."""
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    return "OK" if error is None else "UNKNOWN"
