"""The Registry: the live worker set, published by the controller and streamed to routers over gRPC.

Lifecycle: the controller owns a ``WorkerBoard`` and calls ``publish(records)`` after every change
of its live state; the board bumps its version only when the set really changed and wakes the
watchers. ``RegistryServer.start(board, host, port)`` serves ``k2serve.cluster.v1.Registry`` (and
``grpc.health.v1``) on ``host`` only, in the caller's event loop; ``stop(grace_s)`` ends every
open Watch stream. Watch sends the current set first, then the whole set on every change, and
repeats the current set every ``heartbeat_s`` so that a client can tell a quiet stream from a dead
one. Protobuf stops here: the board holds ``WorkerRecord`` values.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from k2serve.cluster.worker_record import WorkerRecord, WorkerSnapshot
from k2serve.proto import cluster_pb2, cluster_pb2_grpc
from k2serve.proto.cluster_token import token_interceptor

logger = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_S = 5.0
REGISTRY_SERVICE = cluster_pb2.DESCRIPTOR.services_by_name["Registry"].full_name


class WorkerBoard:
    """The current ``WorkerSnapshot`` and a wake-up for whoever waits for the next one."""

    def __init__(self, controller_metrics_address: str = "") -> None:
        self.controller_metrics_address = controller_metrics_address  # copied into every new snapshot
        self._snapshot = WorkerSnapshot(version=0, workers=())
        self._changed = asyncio.Condition()

    @property
    def snapshot(self) -> WorkerSnapshot:
        return self._snapshot

    async def publish(self, workers: Iterable[WorkerRecord]) -> WorkerSnapshot:
        """Make ``workers`` the live set; a new version only if it differs from the current one."""
        ordered = tuple(sorted(workers, key=lambda w: (w.pool, w.group, w.rank)))
        metrics = self.controller_metrics_address
        current = self._snapshot
        if ordered != current.workers or metrics != current.controller_metrics_address or current.version == 0:
            self._snapshot = WorkerSnapshot(current.version + 1, ordered, metrics)
            async with self._changed:
                self._changed.notify_all()
        return self._snapshot

    async def wait_newer(self, version: int, timeout_s: float) -> WorkerSnapshot:
        """The first snapshot with a version above ``version``, or the current one after ``timeout_s``."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._changed.wait_for(lambda: self._snapshot.version > version)
        return self._snapshot


def snapshot_to_proto(snapshot: WorkerSnapshot) -> cluster_pb2.WorkerSet:
    return cluster_pb2.WorkerSet(
        version=snapshot.version,
        controller_metrics_address=snapshot.controller_metrics_address,
        workers=[
            cluster_pb2.WorkerInfo(
                worker_id=w.worker_id,
                pool=w.pool,
                role=w.role,
                group=w.group,
                rank=w.rank,
                ep_size=w.ep_size,
                address=w.address,
                state=w.state,
                metrics_address=w.metrics_address,
            )
            for w in snapshot.workers
        ],
    )


class RegistryServicer(cluster_pb2_grpc.RegistryServicer):
    def __init__(self, board: WorkerBoard, heartbeat_s: float) -> None:
        self._board = board
        self._heartbeat_s = heartbeat_s

    async def List(self, request: cluster_pb2.ListRequest, context: grpc.aio.ServicerContext) -> cluster_pb2.WorkerSet:
        return snapshot_to_proto(self._board.snapshot)

    async def Watch(
        self, request: cluster_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cluster_pb2.WorkerSet]:
        current = self._board.snapshot
        if current.version > request.after_version:
            yield snapshot_to_proto(current)
        seen = max(current.version, request.after_version)
        while not context.done():
            current = await self._board.wait_newer(seen, self._heartbeat_s)
            seen = max(seen, current.version)
            yield snapshot_to_proto(current)  # a change, or the heartbeat (same version)


class RegistryServer:
    """The gRPC server of one ``WorkerBoard``."""

    def __init__(self, server: grpc.aio.Server, address: str, health_servicer: health.aio.HealthServicer) -> None:
        self._server = server
        self.address = address
        self._health = health_servicer

    @classmethod
    async def start(
        cls,
        board: WorkerBoard,
        host: str,
        port: int = 0,
        *,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        cluster_token: str | None = None,
    ) -> RegistryServer:
        server = grpc.aio.server(interceptors=token_interceptor(cluster_token))
        cluster_pb2_grpc.add_RegistryServicer_to_server(RegistryServicer(board, heartbeat_s), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        bound = server.add_insecure_port(f"{_bracket(host)}:{port}")
        if bound == 0:
            raise OSError(f"registry: cannot bind {host}:{port}")
        await server.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set(REGISTRY_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        address = f"{_bracket(host)}:{bound}"
        logger.info("registry serving on %s", address)
        return cls(server, address, health_servicer)

    async def stop(self, grace_s: float = 1.0) -> None:
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace_s)


def _bracket(host: str) -> str:
    """IPv6 literals need brackets in host:port."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
