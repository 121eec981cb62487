"""How a Worker RPC ends with a gRPC status: ``StatusError`` carries the code and message, and
``status_codes`` turns the typed failures raised inside an RPC into that RPC's status.

Lifecycle: ``async with status_codes(context):`` around an RPC's body (``context.abort`` raises and
ends the RPC); pure otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from k2serve.workers.engine import EngineFailedError


class StatusError(Exception):
    """An RPC that ends with this gRPC status and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@contextlib.asynccontextmanager
async def status_codes(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Typed failures inside an RPC -> its gRPC status."""
    try:
        yield
    except StatusError as exc:
        await context.abort(exc.code, str(exc))
    except ValueError as exc:  # SamplingParamsError, RequestValidationError: the message names the field
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except EngineFailedError as exc:
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
