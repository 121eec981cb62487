"""``WorkerServer``: one rank's gRPC ``Worker`` service (proto/worker.proto) over its ``EngineLoop``.

Lifecycle: ``await WorkerServer.start(rank, options)`` starts the rank's engine loop, the KV
transfer side of its role and a ``grpc.aio`` server on ``options.host`` (never every interface by
default) with the ``Worker`` service, ``grpc.health.v1.Health`` (SERVING once up) and reflection;
``drain(grace_s)`` turns health NOT_SERVING, refuses new requests with UNAVAILABLE and waits for
in-flight ones; ``stop()`` drains, stops the server, the loop and the transfer endpoints. An engine
that fails for good (its group broke, or ``max_step_failures`` steps in a row failed: "engine dead")
turns health NOT_SERVING too and reports ``engine_failed`` (and why) in ``GetLoad``; the controller
restarts it.
Test-only fault hooks (``options.faults``, ``K2SERVE_FAULTS``) go to the engine loop and the KV
senders through the rank's ``FaultInjector``.

Roles (``options.role``):
- ``mixed`` (colocated): ``Generate``;
- ``prefill``: ``Prefill``, ``StartKvSend`` (p2p), ``PullKv`` (gRPC stream), ``RenewKv`` and
  ``ReleaseKv`` are ``PrefillHandoff``'s (prefill_handoff.py): it prefills with ``hold_kv``, grants a
  lease on the pinned blocks and returns a ``KvHandle``, moves the rows, and unpins them on release,
  ``Abort`` of the request or lease expiry (checked here every ``min(1 s, ttl / 4)``);
- ``decode``: ``Decode`` is ``DecodeHandoff``'s (decode_handoff.py): it waits, bounded and first come
  first served, for the prompt's KV blocks, renews the lease meanwhile, pulls the KV named by the
  handle, always releases the lease once a pull was tried, then streams the tokens after the first.
  ``Abort`` of a waiting request ends its wait. ``AcceptKv`` takes a push (kv_push_receiver.py);
- push: a ``Prefill`` naming a decode rank (``push_to``, p2p) sends the KV there layer by layer as
  its last forward writes each layer (kv_push.py); the lease is granted under the push's lease id,
  the handle says ``pushed_to``, and the sender ends like a pull's.
Every rank answers ``Abort`` and ``GetLoad``, and keeps its Prometheus series in ``metrics``
(``WorkerMetrics``; served over HTTP on ``options.host`` when ``options.metrics_port`` is set).

Status codes: INVALID_ARGUMENT (bad field, named); FAILED_PRECONDITION (wrong role);
RESOURCE_EXHAUSTED (``Decode`` only: a request that needs more KV blocks than the rank's whole pool,
at once, naming both numbers; or "no KV blocks within N s" after waiting ``handoff_wait_s`` or the
call's deadline; either way the lease is left to the caller, who may decode elsewhere with the same
handle or ``Abort`` it on the prefill rank); NOT_FOUND (unknown, released or expired lease:
``StartKvSend``, ``PullKv``, ``RenewKv``); UNAVAILABLE (draining, engine or group failed; on
``Decode``, a message with "prefill rank" or "KV transfer": the KV could not be had, because the pull
failed or the lease was lost, and the router prefills again); CANCELLED (``Decode`` aborted while it
waited).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from k2serve.proto import worker_pb2, worker_pb2_grpc
from k2serve.proto.cluster_token import token_interceptor
from k2serve.workers.decode_handoff import DecodeHandoff
from k2serve.workers.engine import Engine
from k2serve.workers.engine_loop import EngineLoop
from k2serve.workers.fault_plan import FaultInjector
from k2serve.workers.group_rank import GroupRank
from k2serve.workers.kv_lease import KvLeaseTable
from k2serve.workers.kv_transport_p2p import P2pKvClient
from k2serve.workers.metrics_endpoint import MetricsEndpoint
from k2serve.workers.prefill_handoff import PrefillHandoff, cache_layout
from k2serve.workers.rpc_status import StatusError, status_codes
from k2serve.workers.sampling_params import SamplingParams
from k2serve.workers.wire_format import delta_to_proto, sampling_from_proto
from k2serve.workers.worker_metrics import WorkerMetrics
from k2serve.workers.worker_options import Role, WorkerOptions

logger = logging.getLogger(__name__)

SERVICE_NAME = "k2serve.worker.v1.Worker"
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 256 * 2**20),
    ("grpc.max_receive_message_length", 256 * 2**20),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
]


class WorkerServer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, rank: GroupRank, options: WorkerOptions) -> None:
        self.rank = rank
        self.options = options
        self.engine: Engine = rank.engine
        self.faults = FaultInjector(options.faults, options.role)
        self.loop = EngineLoop(
            rank.engine, max_step_failures=options.max_step_failures, on_failed=self._engine_failed, faults=self.faults
        )
        self.leases = KvLeaseTable(options.lease_ttl_s)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.address = ""
        self.draining = False
        self._p2p_client: P2pKvClient | None = None
        self._expiry_task: asyncio.Task[None] | None = None
        self.metrics = WorkerMetrics(options.model_name, rank.engine.config.max_model_len)
        leases = self.leases if options.role != "decode" else None
        self.metrics.attach(rank.engine, leases, rank.dispatcher, rank.balancer)
        self.prefill_handoff = PrefillHandoff(
            options, rank.engine, self.loop, self.leases, self.metrics.kv, self.faults, _CHANNEL_OPTIONS
        )
        self.handoff = DecodeHandoff(
            options.worker_id,
            rank.engine,
            self.loop,
            self.metrics.kv,
            lambda: self._p2p_client,
            transfer_timeout_s=options.transfer_timeout_s,
            wait_s=options.handoff_wait_s,
            channel_options=_CHANNEL_OPTIONS,
            cluster_token=options.cluster_token,
        )
        self.metrics_endpoint: MetricsEndpoint | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------

    @classmethod
    async def start(cls, rank: GroupRank, options: WorkerOptions) -> WorkerServer:
        self = cls(rank, options)
        self.loop.start()
        if options.role in ("prefill", "mixed"):
            self.prefill_handoff.start()
        if options.role in ("decode", "mixed"):
            self._p2p_client = P2pKvClient(options.worker_id, options.transfer_timeout_s, lanes=options.kv_lanes)
        server = grpc.aio.server(options=_CHANNEL_OPTIONS, interceptors=token_interceptor(options.cluster_token))
        worker_pb2_grpc.add_WorkerServicer_to_server(self, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        port = server.add_insecure_port(f"{options.host}:{options.port}")
        if port == 0:
            raise OSError(f"cannot bind the worker service to {options.host}:{options.port}")
        await server.start()
        self.server = server
        self.address = self.prefill_handoff.address = f"{options.host}:{port}"
        if options.metrics_port is not None:
            self.metrics_endpoint = self.metrics.serve(options.host, options.metrics_port)
        self._expiry_task = asyncio.get_running_loop().create_task(self._expire_leases(), name="lease-expiry")
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.faults.active:
            logger.warning("worker %s: FAULT INJECTION ON: %s", options.worker_id, self.faults.describe())
        logger.info("worker %s (%s) serving on %s", options.worker_id, options.role, self.address)
        return self

    async def drain(self, grace_s: float) -> None:
        self.draining = True
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (
            self.engine.has_unfinished_requests()
            or len(self.leases)
            or len(self.handoff.queue)
            or len(self.handoff.pushes)
        ):
            await asyncio.sleep(0.02)

    async def _engine_failed(self, reason: str) -> None:
        """The engine loop's ``on_failed``: a dead engine (or a broken group) is unhealthy until restarted."""
        logger.error("worker %s: NOT_SERVING, the engine failed: %s", self.options.worker_id, reason)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    @property
    def metrics_address(self) -> str:
        """``host:port`` of its ``/metrics`` endpoint; "" without one."""
        return self.metrics_endpoint.address if self.metrics_endpoint is not None else ""

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.drain(grace_s)
        if self._expiry_task is not None:
            self._expiry_task.cancel()
        if self.server is not None:
            await self.server.stop(grace_s)
        with contextlib.suppress(TimeoutError):
            await self.loop.stop(timeout_s=grace_s)
        await self.prefill_handoff.stop()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()
        await self.handoff.pushes.close()
        if self._p2p_client is not None:
            self._p2p_client.close()

    def load(self) -> worker_pb2.Load:
        engine = self.engine
        stats = engine.kv.stats()
        return worker_pb2.Load(
            worker_id=self.options.worker_id,
            role=self.options.role,
            waiting=engine.scheduler.num_waiting,
            running=engine.scheduler.num_running,
            kv_usage=engine.pool.usage,
            num_blocks=engine.pool.num_blocks,
            free_blocks=engine.pool.num_free_blocks,
            prefix_queries=stats.prefix_cache_queries,
            prefix_hits=stats.prefix_cache_hits,
            leases=len(self.leases),
            pinned_blocks=engine.num_held_blocks,
            ep_rank=self.rank.ctx.rank,
            ep_size=self.rank.ctx.size,
            draining=self.draining,
            kv_bytes_sent=self.metrics.kv.sent_bytes,
            kv_bytes_received=self.metrics.kv.received_bytes,
            kv_transfers_ok=self.metrics.kv.ok,
            kv_transfers_failed=self.metrics.kv.failed,
            handoffs_waiting=len(self.handoff.queue),
            handoff_waits=self.metrics.kv.handoff_waits,
            engine_failed=engine.failure is not None,
            failure=engine.failure or "",
            busy_seconds=engine.busy_s,
            oldest_waiting_s=engine.scheduler.oldest_waiting_s(time.monotonic()),
        )

    # ---- RPCs ---------------------------------------------------------------------------------------------

    async def Generate(
        self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.TokenDelta]:
        async with status_codes(context):
            self._admit(context, "mixed")
            params = self._params(request.sampling)
            stream = await self.loop.generate(
                request.request_id,
                list(request.prompt_token_ids),
                params,
                priority=request.priority,
                cache_salt=request.cache_salt or None,
            )
            try:
                async for output in stream:
                    yield delta_to_proto(output)
            finally:
                self.handoff.notify()  # its blocks are free: a waiting Decode may take them (mixed ranks)

    async def Prefill(
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        async with status_codes(context):
            self._admit(context, "prefill")
            return await self.prefill_handoff.prefill(request, self._params(request.sampling))
        raise AssertionError("unreachable: context.abort raises")

    async def Decode(
        self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.TokenDelta]:
        async with status_codes(context):
            self._admit(context, "decode")
            params = self._params(request.sampling)
            self._check_handle(request)
            async for output in self.handoff.decode(request, params, context.time_remaining()):
                yield delta_to_proto(output)

    async def AcceptKv(
        self, request: worker_pb2.AcceptKvRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.AcceptKvResponse:
        async with status_codes(context):
            self._admit(context, "decode")
            handle = request.kv
            if not request.request_id or not handle.lease_id or not handle.transfer_rendezvous:
                raise ValueError("request_id, kv.lease_id and kv.transfer_rendezvous are required")
            self._check_layout(handle)
            if request.max_tokens < 0:
                raise ValueError(f"max_tokens: must be >= 0 (0 = up to the context limit), got {request.max_tokens}")
            return await self.handoff.pushes.accept(request.request_id, handle, request.max_tokens)
        raise AssertionError("unreachable: context.abort raises")

    async def StartKvSend(
        self, request: worker_pb2.StartKvSendRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.StartKvSendResponse:
        async with status_codes(context):
            transfer_id = self.prefill_handoff.start_send(request.lease_id, request.receiver_id)
            return worker_pb2.StartKvSendResponse(transfer_id=transfer_id)
        raise AssertionError("unreachable: context.abort raises")

    async def PullKv(
        self, request: worker_pb2.PullKvRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.KvChunk]:
        async with status_codes(context):
            async for chunk in self.prefill_handoff.pull(request.lease_id):
                yield chunk

    async def ReleaseKv(
        self, request: worker_pb2.ReleaseKvRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ReleaseKvResponse:
        released = await self.prefill_handoff.release(request.lease_id, request.success)
        return worker_pb2.ReleaseKvResponse(released=released)

    async def RenewKv(
        self, request: worker_pb2.RenewKvRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.RenewKvResponse:
        async with status_codes(context):
            ttl = self.prefill_handoff.renew(request.lease_id)
            return worker_pb2.RenewKvResponse(ttl_s=ttl, lease_expires_unix_ms=int((time.time() + ttl) * 1000))
        raise AssertionError("unreachable: context.abort raises")

    async def Abort(
        self, request: worker_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.AbortResponse:
        rid = request.request_id
        found = self.handoff.abort(rid)  # a Decode still waiting for blocks
        answered = False
        try:
            found = await self.loop.call(lambda e: e.abort(rid)) or found
            answered = True
        finally:
            if not answered:  # the caller's deadline cut the call short: the abort itself must not be lost
                self.loop.abort(rid)
        found = await self.prefill_handoff.abort(rid) or found  # a prefilled request nobody will pull
        return worker_pb2.AbortResponse(found=found)

    async def GetLoad(self, request: worker_pb2.GetLoadRequest, context: grpc.aio.ServicerContext) -> worker_pb2.Load:
        return self.load()

    # ---- helpers --------------------------------------------------------------------------------------------

    def _admit(self, context: grpc.aio.ServicerContext, role: Role) -> None:
        if self.draining:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, f"worker {self.options.worker_id} is draining")
        if self.engine.failure is not None:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, f"worker {self.options.worker_id}: {self.engine.failure}")
        if self.options.role not in (role, "mixed"):
            raise StatusError(
                grpc.StatusCode.FAILED_PRECONDITION, f"worker {self.options.worker_id} is a {self.options.role} rank"
            )

    def _params(self, message: worker_pb2.SamplingParams) -> SamplingParams:
        params = sampling_from_proto(message)
        if self.options.stop_token_ids and not params.ignore_eos:
            stops = tuple(dict.fromkeys((*params.stop_token_ids, *self.options.stop_token_ids)))
            params = dataclasses.replace(params, stop_token_ids=stops)
        return params

    def _check_handle(self, request: worker_pb2.DecodeRequest) -> None:
        handle = request.kv
        if not handle.lease_id or not handle.prefill_address:
            raise ValueError("kv: a KvHandle from Prefill is required")
        if handle.num_tokens != len(request.prompt_token_ids):
            raise ValueError(f"kv.num_tokens: {handle.num_tokens} for a prompt of {len(request.prompt_token_ids)}")
        self._check_layout(handle)

    def _check_layout(self, handle: worker_pb2.KvHandle) -> None:
        if handle.num_tokens < 1:
            raise ValueError(f"kv.num_tokens: must be >= 1, got {handle.num_tokens}")
        expected = cache_layout(self.engine, handle.num_tokens)
        if (handle.num_layers, handle.row_dim, handle.dtype) != (
            expected.num_layers,
            expected.row_dim,
            expected.dtype_name,
        ):
            raise ValueError(
                f"kv: layout {handle.num_layers} layers × {handle.row_dim} {handle.dtype} does not match this "
                f"rank's {expected.num_layers} × {expected.row_dim} {expected.dtype_name}"
            )

    async def _expire_leases(self) -> None:
        while True:
            await asyncio.sleep(self.prefill_handoff.expiry_period_s)
            await self.handoff.pushes.expire()
            await self.prefill_handoff.expire()
