"""``HealthProbe``: the controller's ``grpc.health.v1`` Check against worker addresses.

Lifecycle: one probe per controller; ``check(address, timeout_s)`` reuses one channel per address
(opened on first use) and returns None when the worker answers SERVING, else the reason;
``forget(address)`` closes the channel of a worker that is gone; ``close()`` closes them all.
Every call is bounded by its timeout.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class HealthProbe:
    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def check(self, address: str, timeout_s: float, service: str = "") -> str | None:
        """None when SERVING; otherwise why not (status name or RPC error)."""
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address)
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            return f"health Check {address}: {exc.code().name} {exc.details() or ''}".rstrip()
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            return f"health Check {address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
        return None

    async def forget(self, address: str) -> None:
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        for address in list(self._channels):
            await self.forget(address)
