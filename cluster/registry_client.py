"""``RegistryClient``: follow the controller's live worker set over ``Registry.Watch``.

Lifecycle: ``RegistryClient(address)``; ``await list()`` for one snapshot, or ``async for snapshot in
watch()`` to get the current set at once and then every new version. ``watch`` reconnects when the
stream breaks or goes silent for three heartbeats (a dead controller, a network cut), with
exponential backoff, and gives up with ``RegistryUnavailableError`` after ``max_reconnects``
consecutive failed attempts; any message received resets the count. After a reconnect the first
set is yielded whatever its version (a restarted controller counts again from 1). Leaving the
``async for`` closes the stream and the channel.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from k2serve.cluster.registry import DEFAULT_HEARTBEAT_S
from k2serve.cluster.worker_record import WorkerRecord, WorkerSnapshot, WorkerState
from k2serve.proto import cluster_pb2, cluster_pb2_grpc
from k2serve.proto.cluster_token import authorized

logger = logging.getLogger(__name__)


class RegistryUnavailableError(ConnectionError):
    """The registry could not be reached (or kept silent) for ``max_reconnects`` attempts in a row."""


def snapshot_from_proto(message: cluster_pb2.WorkerSet) -> WorkerSnapshot:
    workers = tuple(
        WorkerRecord(
            worker_id=w.worker_id,
            pool=w.pool,
            role=w.role,
            group=w.group,
            rank=w.rank,
            ep_size=w.ep_size,
            address=w.address,
            state=_state(w.state),
            metrics_address=w.metrics_address,
        )
        for w in message.workers
    )
    return WorkerSnapshot(message.version, workers, message.controller_metrics_address)


def _state(text: str) -> WorkerState:
    if text not in ("starting", "ready", "draining", "failed", "stopping"):
        raise ValueError(f"registry: unknown worker state {text!r}")
    return text  # type: ignore[return-value]


class _StreamEndedError(ConnectionError):
    pass


class RegistryClient:
    def __init__(
        self,
        address: str,
        *,
        connect_timeout_s: float = 5.0,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        max_reconnects: int = 5,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 5.0,
        cluster_token: str | None = None,
    ) -> None:
        self.address = address
        self._cluster_token = cluster_token
        self._connect_timeout_s = connect_timeout_s
        self._silence_s = 3 * heartbeat_s
        self._max_reconnects = max_reconnects
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s

    async def list(self, timeout_s: float = 5.0) -> WorkerSnapshot:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = authorized(cluster_pb2_grpc.RegistryStub(channel), self._cluster_token)
            message = await stub.List(cluster_pb2.ListRequest(), timeout=timeout_s, wait_for_ready=True)
        return snapshot_from_proto(message)

    async def watch(self) -> AsyncIterator[WorkerSnapshot]:
        failures = 0
        while True:
            try:
                async for snapshot in self._stream():
                    failures = 0
                    yield snapshot
                raise _StreamEndedError("the registry ended the stream")
            except (grpc.aio.AioRpcError, TimeoutError, _StreamEndedError) as exc:
                failures += 1
                if failures > self._max_reconnects:
                    raise RegistryUnavailableError(
                        f"registry {self.address}: unreachable after {self._max_reconnects} reconnects: {_why(exc)}"
                    ) from exc
                delay = min(self._backoff_max_s, self._backoff_initial_s * 2 ** (failures - 1))
                logger.warning("registry %s: %s; reconnecting in %.1fs", self.address, _why(exc), delay)
                await asyncio.sleep(delay)

    async def _stream(self) -> AsyncIterator[WorkerSnapshot]:
        """One connection: every new version (the first one whatever it is); heartbeats are dropped."""
        async with grpc.aio.insecure_channel(self.address) as channel:
            async with asyncio.timeout(self._connect_timeout_s):
                await channel.channel_ready()
            call = authorized(cluster_pb2_grpc.RegistryStub(channel), self._cluster_token).Watch(
                cluster_pb2.WatchRequest()
            )
            try:
                last: int | None = None
                while True:
                    async with asyncio.timeout(self._silence_s):
                        message = await call.read()
                    if message is grpc.aio.EOF:
                        return
                    assert isinstance(message, cluster_pb2.WorkerSet)
                    if message.version != last:
                        last = message.version
                        yield snapshot_from_proto(message)
            finally:
                call.cancel()


def _why(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, TimeoutError):
        return "no message within the connect timeout or three heartbeats"
    return str(exc) or type(exc).__name__
