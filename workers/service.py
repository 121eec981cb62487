"""``WorkerServer``: one rank's gRPC ``Worker`` service (proto/worker.proto) over its ``EngineLoop``.

Lifecycle: ``await WorkerServer.start(rank, options)`` starts the rank's engine loop, the KV
transfer side of its role and a ``grpc.aio`` server on ``options.host`` (never every interface by
default) with the ``Worker`` service, ``grpc.health.v1.Health`` (SERVING once up) and reflection;
``drain(grace_s)`` turns health NOT_SERVING, refuses new requests with UNAVAILABLE and waits for
in-flight ones; ``stop()`` drains, stops the server, the loop and the transfer endpoints.

Roles (``options.role``):
- ``mixed`` (colocated): ``Generate``;
- ``prefill``: ``Prefill`` computes the prompt and the first token with ``hold_kv``, grants a lease
  on the pinned blocks (``KvLeaseTable``) and returns a ``KvHandle``; ``StartKvSend`` (p2p) or
  ``PullKv`` (gRPC stream) move the rows; ``ReleaseKv``, ``Abort`` of the request or lease expiry
  (checked every second) unpin them, after stopping a sender that may still read them (unless the
  receiver reported success). A prefill whose group fails under it ends with UNAVAILABLE and the
  group's error; whatever a ``Prefill`` holds before its lease exists (its caller gone, a failure)
  is released by that call;
- ``decode``: ``Decode`` reserves blocks, pulls the KV named by the handle (p2p by default, the
  gRPC stream when the handle says so), always releases the lease on the prefill rank, then streams
  the tokens after the first. A failed pull ends the RPC with UNAVAILABLE; a failed pull or admission,
  or a caller that leaves, cancels the receiver (it never writes again) and frees the reservation.
Every rank answers ``Abort`` and ``GetLoad``, and keeps its Prometheus series in ``metrics``
(``WorkerMetrics``; served over HTTP on ``options.host`` when ``options.metrics_port`` is set).

Status codes: INVALID_ARGUMENT (bad field, named), FAILED_PRECONDITION (wrong role),
RESOURCE_EXHAUSTED (no blocks for the transfer), NOT_FOUND (unknown lease), UNAVAILABLE (draining,
group failed, transfer failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from k2serve.proto import worker_pb2, worker_pb2_grpc
from k2serve.workers.engine import Engine, EngineFailedError, RequestOutput
from k2serve.workers.engine_loop import EngineLoop
from k2serve.workers.group_rank import GroupRank
from k2serve.workers.kv_lease import KvLeaseTable, Lease
from k2serve.workers.kv_transfer import (
    CacheKvSink,
    CacheKvSource,
    KvLayout,
    KvReceiver,
    KvTransfer,
    TransferState,
)
from k2serve.workers.kv_transport_grpc import GrpcKvReceiver, kv_chunks
from k2serve.workers.kv_transport_p2p import P2pKvClient, P2pKvServer
from k2serve.workers.metrics_endpoint import MetricsEndpoint
from k2serve.workers.sampling_params import SamplingParams
from k2serve.workers.wire_format import delta_to_proto, logprobs_to_proto, sampling_from_proto, usage_to_proto
from k2serve.workers.worker_metrics import WorkerMetrics

logger = logging.getLogger(__name__)

Role = Literal["prefill", "decode", "mixed"]
Transport = Literal["p2p", "grpc"]
SERVICE_NAME = "k2serve.worker.v1.Worker"
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 256 * 2**20),
    ("grpc.max_receive_message_length", 256 * 2**20),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
]


@dataclass(frozen=True)
class WorkerOptions:
    worker_id: str
    role: Role
    host: str = "127.0.0.1"  # interface for the gRPC server and the KV transfer store
    port: int = 0  # 0 = any free port
    transport: Transport = "p2p"
    lease_ttl_s: float = 30.0
    transfer_timeout_s: float = 30.0
    checksum: bool = False
    stop_token_ids: tuple[int, ...] = ()
    model_name: str = ""  # the model_name label of its metrics
    metrics_port: int | None = None  # serve /metrics over HTTP on host (0 = any free port); None = no endpoint

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode", "mixed"):
            raise ValueError(f"role: expected prefill, decode or mixed, got {self.role!r}")
        if self.transport not in ("p2p", "grpc"):
            raise ValueError(f"transport: expected p2p or grpc, got {self.transport!r}")


class _RpcError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@contextlib.asynccontextmanager
async def _status_codes(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Typed failures inside an RPC -> its gRPC status (``context.abort`` raises and ends the RPC)."""
    try:
        yield
    except _RpcError as exc:
        await context.abort(exc.code, str(exc))
    except ValueError as exc:  # SamplingParamsError, RequestValidationError: the message names the field
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except EngineFailedError as exc:
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))


class WorkerServer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, rank: GroupRank, options: WorkerOptions) -> None:
        self.rank = rank
        self.options = options
        self.engine: Engine = rank.engine
        self.loop = EngineLoop(rank.engine)
        self.leases = KvLeaseTable(options.lease_ttl_s)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.address = ""
        self.draining = False
        self._p2p_server: P2pKvServer | None = None
        self._p2p_client: P2pKvClient | None = None
        self._expiry_task: asyncio.Task[None] | None = None
        self._senders: dict[str, KvTransfer] = {}  # lease id -> its p2p sender (kept until the lease ends)
        self._layout_dtype = str(rank.engine.kv_cache[0].dtype).removeprefix("torch.")
        self.metrics = WorkerMetrics(options.model_name, rank.engine.config.max_model_len)
        leases = self.leases if options.role != "decode" else None
        self.metrics.attach(rank.engine, leases, rank.dispatcher, rank.balancer)
        self.metrics_endpoint: MetricsEndpoint | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------

    @classmethod
    async def start(cls, rank: GroupRank, options: WorkerOptions) -> WorkerServer:
        self = cls(rank, options)
        self.loop.start()
        if options.role in ("prefill", "mixed"):
            self._p2p_server = P2pKvServer(options.worker_id, options.host, options.transfer_timeout_s)
        if options.role in ("decode", "mixed"):
            self._p2p_client = P2pKvClient(options.worker_id, options.transfer_timeout_s)
        server = grpc.aio.server(options=_CHANNEL_OPTIONS)
        worker_pb2_grpc.add_WorkerServicer_to_server(self, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        port = server.add_insecure_port(f"{options.host}:{options.port}")
        if port == 0:
            raise OSError(f"cannot bind the worker service to {options.host}:{options.port}")
        await server.start()
        self.server = server
        self.address = f"{options.host}:{port}"
        if options.metrics_port is not None:
            self.metrics_endpoint = self.metrics.serve(options.host, options.metrics_port)
        self._expiry_task = asyncio.get_running_loop().create_task(self._expire_leases(), name="lease-expiry")
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info("worker %s (%s) serving on %s", options.worker_id, options.role, self.address)
        return self

    async def drain(self, grace_s: float) -> None:
        self.draining = True
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (self.engine.has_unfinished_requests() or len(self.leases)):
            await asyncio.sleep(0.02)

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
        for lease in self.leases.expire_all():
            sender = self._senders.pop(lease.lease_id, None)
            if sender is not None:
                sender.cancel("the rank is stopping")
            self.engine.release_kv(lease.request_id)  # the loop is stopped: nothing else touches the engine
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()
        if self._p2p_server is not None:
            self._p2p_server.close()
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
        )

    # ---- RPCs ---------------------------------------------------------------------------------------------

    async def Generate(
        self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.TokenDelta]:
        async with _status_codes(context):
            self._admit(context, "mixed")
            params = self._params(request.sampling)
            stream = await self.loop.generate(
                request.request_id,
                list(request.prompt_token_ids),
                params,
                priority=request.priority,
                cache_salt=request.cache_salt or None,
            )
            async for output in stream:
                yield delta_to_proto(output)

    async def Prefill(
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        async with _status_codes(context):
            self._admit(context, "prefill")
            params = self._params(request.sampling)
            if params.n != 1:
                raise ValueError("n: disaggregated requests take n = 1")
            transport = request.transport or self.options.transport
            if transport not in ("p2p", "grpc"):
                raise ValueError(f"transport: expected p2p or grpc, got {transport!r}")
            return await self._prefill_and_lease(request, params, transport)
        raise AssertionError("unreachable: context.abort raises")

    async def _prefill_and_lease(
        self, request: worker_pb2.PrefillRequest, params: SamplingParams, transport: str
    ) -> worker_pb2.PrefillResponse:
        """Prefill, then lease the held KV (or release it when the request ends here). Until the lease is
        in the table nothing else would ever release the held blocks, so every other exit (the caller
        gone, the group failed under the request, a failed call) releases them here."""
        rid = request.request_id
        try:
            first = await self._prefill(request, params)
        except (ValueError, EngineFailedError):
            raise  # refused at admission: this call holds nothing (the id may be another call's)
        except BaseException:
            await asyncio.shield(self._release_held(rid))  # e.g. the caller left: it may have finished
            raise
        leased = False
        try:
            if first.finish_reason == "error" or not first.new_token_ids:
                raise _RpcError(grpc.StatusCode.UNAVAILABLE, first.error or f"the prefill of {rid!r} ended early")
            response = worker_pb2.PrefillResponse(request_id=rid, first_token_id=first.new_token_ids[0])
            response.first_logprobs.extend(logprobs_to_proto(first.logprobs))
            held = await self.loop.call(lambda e: e.held_kv(rid))
            if held is None:
                raise _RpcError(grpc.StatusCode.UNAVAILABLE, first.error or "the prefill failed")
            assert first.usage is not None
            response.usage.CopyFrom(usage_to_proto(first.usage))
            ends = first.finish_reason == "stop" or params.max_tokens == 1
            if ends or (first.new_token_ids[0] in self.options.stop_token_ids and not params.ignore_eos):
                response.finish_reason = (
                    "length" if params.max_tokens == 1 and first.finish_reason != "stop" else "stop"
                )
                return response
            layout = self._layout(held.num_tokens)
            lease = self.leases.grant(rid, held.block_ids, held.num_tokens, layout)
            leased = True
            response.sampler_state = held.sampler_state
            response.kv.CopyFrom(
                worker_pb2.KvHandle(
                    lease_id=lease.lease_id,
                    prefill_worker_id=self.options.worker_id,
                    prefill_address=self.address,
                    transfer_rendezvous=self._p2p_server.rendezvous if self._p2p_server else "",
                    transport=transport,
                    num_tokens=held.num_tokens,
                    num_layers=layout.num_layers,
                    row_dim=layout.row_dim,
                    dtype=self._layout_dtype,
                    lease_expires_unix_ms=int((time.time() + self.options.lease_ttl_s) * 1000),
                    checksum=self.options.checksum,
                )
            )
            return response
        finally:
            if not leased:
                await asyncio.shield(self._release_held(rid))

    async def _prefill(self, request: worker_pb2.PrefillRequest, params: SamplingParams) -> RequestOutput:
        one = dataclasses.replace(params, max_tokens=1)
        stream = await self.loop.generate(
            request.request_id,
            list(request.prompt_token_ids),
            one,
            priority=request.priority,
            cache_salt=request.cache_salt or None,
            hold_kv=True,
        )
        last: RequestOutput | None = None
        async for output in stream:
            last = output
        assert last is not None and last.finished
        return last

    async def Decode(
        self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.TokenDelta]:
        rid, handle = request.request_id, request.kv
        reserved = False  # this call holds a reservation the engine has not taken over
        try:
            async with _status_codes(context):
                self._admit(context, "decode")
                params = self._params(request.sampling)
                self._check_handle(request)
                blocks = await self.loop.call(lambda e: e.reserve_kv(rid, handle.num_tokens))
                if blocks is None:
                    raise _RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"no KV blocks for {handle.num_tokens} tokens")
                reserved = True
                await self._pull(handle, blocks)
                stream = await self.loop.generate_prefilled(
                    rid,
                    list(request.prompt_token_ids),
                    params,
                    request.first_token_id,
                    sampler_state=request.sampler_state,
                    priority=request.priority,
                    cache_salt=request.cache_salt or None,
                )
                async for output in stream:
                    reserved = False  # admitted: the engine owns the blocks (cancel_reservation is a no-op)
                    yield delta_to_proto(output)
        finally:
            if reserved:  # a failed pull or admission, or the caller left: give the blocks back
                await asyncio.shield(self._cancel_reservation(rid))

    async def _pull(self, handle: worker_pb2.KvHandle, blocks: list[int]) -> None:
        """Move the handle's rows into ``blocks``; always tells the prefill rank to release the lease.
        Any exit without success (a failed or timed-out transfer, the caller gone) cancels the receiver
        first: once ``cancel`` returns it never writes again, so the caller may free ``blocks``."""
        sink = CacheKvSink(self.engine.kv_cache, blocks, handle.num_tokens)
        success = False
        receiver: KvReceiver | None = None
        try:
            async with grpc.aio.insecure_channel(handle.prefill_address, options=_CHANNEL_OPTIONS) as channel:
                stub = worker_pb2_grpc.WorkerStub(channel)
                try:
                    receiver = await self._start_receiver(stub, handle, sink)
                    deadline = time.monotonic() + self.options.transfer_timeout_s
                    while (state := receiver.poll()) not in (TransferState.SUCCESS, TransferState.FAILED):
                        if time.monotonic() > deadline:
                            raise _RpcError(grpc.StatusCode.UNAVAILABLE, "KV transfer timed out")
                        await asyncio.sleep(0.002)
                    if state is TransferState.FAILED:
                        raise _RpcError(grpc.StatusCode.UNAVAILABLE, f"KV transfer failed: {receiver.error}")
                    success = True
                finally:
                    if not success and receiver is not None:
                        receiver.cancel("the decode rank gave up the transfer")
                    moved, seconds = (receiver.bytes_moved, receiver.seconds) if receiver is not None else (0, 0.0)
                    self.metrics.kv.finished("receive", handle.transport or "p2p", moved, seconds, success)
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await stub.ReleaseKv(
                            worker_pb2.ReleaseKvRequest(lease_id=handle.lease_id, success=success), timeout=5.0
                        )
        except grpc.aio.AioRpcError as exc:
            raise _RpcError(
                grpc.StatusCode.UNAVAILABLE, f"prefill rank {handle.prefill_worker_id}: {exc.details()}"
            ) from exc

    async def _start_receiver(
        self, stub: worker_pb2_grpc.WorkerStub, handle: worker_pb2.KvHandle, sink: CacheKvSink
    ) -> KvReceiver:
        if handle.transport == "grpc":
            return GrpcKvReceiver(
                handle.prefill_address, handle.lease_id, sink, self.options.transfer_timeout_s, handle.checksum
            )
        if self._p2p_client is None:
            raise _RpcError(grpc.StatusCode.FAILED_PRECONDITION, "this rank has no p2p KV client")
        # the sender first: a prefill rank that is gone or refuses (lease expired) costs no receive thread
        await stub.StartKvSend(
            worker_pb2.StartKvSendRequest(lease_id=handle.lease_id, receiver_id=self.options.worker_id), timeout=10.0
        )
        return self._p2p_client.start_receive(
            handle.lease_id, handle.prefill_worker_id, handle.transfer_rendezvous, sink, handle.checksum
        )

    async def StartKvSend(
        self, request: worker_pb2.StartKvSendRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.StartKvSendResponse:
        lease = self.leases.get(request.lease_id)
        if lease is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"lease {request.lease_id!r} is unknown or expired")
        if self._p2p_server is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this rank does not send KV caches")
        assert lease is not None and self._p2p_server is not None
        source = CacheKvSource(self.engine.kv_cache, lease.block_ids, lease.num_tokens)
        earlier = self._senders.pop(request.lease_id, None)
        if earlier is not None:  # a retry from another decode rank: one sender per lease reads the blocks
            earlier.cancel("replaced by a new send of the same lease")
        sender = self._p2p_server.start_send(
            request.lease_id, request.receiver_id, source, checksum=self.options.checksum
        )
        self._senders[request.lease_id] = sender
        sender.add_done_callback(self._count_sent)
        return worker_pb2.StartKvSendResponse(transfer_id=request.lease_id)

    async def PullKv(
        self, request: worker_pb2.PullKvRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.KvChunk]:
        lease = self.leases.get(request.lease_id)
        if lease is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"lease {request.lease_id!r} is unknown or expired")
        assert lease is not None
        source = CacheKvSource(self.engine.kv_cache, lease.block_ids, lease.num_tokens)
        started, moved, ok = time.monotonic(), 0, False
        try:
            for chunk in kv_chunks(source, checksum=self.options.checksum):
                if self.leases.get(request.lease_id) is None:  # released or expired: the blocks may be reused
                    await context.abort(grpc.StatusCode.NOT_FOUND, f"lease {request.lease_id!r} ended during the pull")
                moved += len(chunk.data)
                yield chunk
            ok = True
        finally:
            self.metrics.kv.finished("send", "grpc", moved, time.monotonic() - started, ok)

    async def ReleaseKv(
        self, request: worker_pb2.ReleaseKvRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ReleaseKvResponse:
        lease = self.leases.release(request.lease_id)
        if lease is None:
            return worker_pb2.ReleaseKvResponse(released=False)
        # after a success the sender reads nothing more (the receiver had every row); else stop it first
        await self._end_lease(lease, None if request.success else "the receiver released the lease")
        return worker_pb2.ReleaseKvResponse(released=True)

    async def Abort(
        self, request: worker_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.AbortResponse:
        rid = request.request_id
        found = await self.loop.call(lambda e: e.abort(rid))
        for lease in self.leases.release_request(rid):  # a prefilled request nobody will pull
            await self._end_lease(lease, "the request was aborted")
            found = True
        return worker_pb2.AbortResponse(found=found)

    async def GetLoad(self, request: worker_pb2.GetLoadRequest, context: grpc.aio.ServicerContext) -> worker_pb2.Load:
        return self.load()

    # ---- helpers --------------------------------------------------------------------------------------------

    def _admit(self, context: grpc.aio.ServicerContext, role: Role) -> None:
        if self.draining:
            raise _RpcError(grpc.StatusCode.UNAVAILABLE, f"worker {self.options.worker_id} is draining")
        if self.engine.failure is not None:
            raise _RpcError(grpc.StatusCode.UNAVAILABLE, f"worker {self.options.worker_id}: {self.engine.failure}")
        if self.options.role not in (role, "mixed"):
            raise _RpcError(
                grpc.StatusCode.FAILED_PRECONDITION, f"worker {self.options.worker_id} is a {self.options.role} rank"
            )

    def _params(self, message: worker_pb2.SamplingParams) -> SamplingParams:
        params = sampling_from_proto(message)
        if self.options.stop_token_ids and not params.ignore_eos:
            stops = tuple(dict.fromkeys((*params.stop_token_ids, *self.options.stop_token_ids)))
            params = dataclasses.replace(params, stop_token_ids=stops)
        return params

    def _layout(self, num_tokens: int) -> KvLayout:
        cache = self.engine.kv_cache
        return KvLayout(len(cache), num_tokens, cache[0].shape[-1], cache[0].dtype)

    def _check_handle(self, request: worker_pb2.DecodeRequest) -> None:
        handle = request.kv
        if not handle.lease_id or not handle.prefill_address:
            raise ValueError("kv: a KvHandle from Prefill is required")
        if handle.num_tokens != len(request.prompt_token_ids):
            raise ValueError(f"kv.num_tokens: {handle.num_tokens} for a prompt of {len(request.prompt_token_ids)}")
        expected = self._layout(handle.num_tokens)
        if (handle.num_layers, handle.row_dim, handle.dtype) != (
            expected.num_layers,
            expected.row_dim,
            self._layout_dtype,
        ):
            raise ValueError(
                f"kv: layout {handle.num_layers} layers × {handle.row_dim} {handle.dtype} does not match this "
                f"rank's {expected.num_layers} × {expected.row_dim} {self._layout_dtype}"
            )

    async def _expire_leases(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for lease in self.leases.expire():
                logger.warning("lease %s of %s expired unclaimed", lease.lease_id, lease.request_id)
                await self._end_lease(lease, "the lease expired")

    def _count_sent(self, sender: KvTransfer) -> None:
        ok = sender.poll() is TransferState.SUCCESS
        self.metrics.kv.finished("send", "p2p", sender.bytes_moved, sender.seconds, ok)

    async def _release_kv(self, request_id: str) -> None:
        await self.loop.call(lambda e: e.release_kv(request_id))

    async def _cancel_reservation(self, request_id: str) -> None:
        try:
            await self.loop.call(lambda e: e.cancel_reservation(request_id))
        except (RuntimeError, TimeoutError) as exc:
            logger.warning("%s: could not free the reservation of %s: %s", self.options.worker_id, request_id, exc)

    async def _end_lease(self, lease: Lease, cancel_reason: str | None) -> None:
        """Unpin a lease's blocks; with ``cancel_reason``, first stop a sender that may still read them
        (``cancel`` returns once it no longer touches its source)."""
        sender = self._senders.pop(lease.lease_id, None)
        if sender is not None and cancel_reason is not None:
            sender.cancel(cancel_reason)
        await self._release_kv(lease.request_id)

    async def _release_held(self, request_id: str) -> None:
        """``_release_kv`` on a path that is already failing: a stopped loop must not hide the first error."""
        try:
            await self._release_kv(request_id)
        except (RuntimeError, TimeoutError) as exc:
            logger.warning("%s: could not release the held KV of %s: %s", self.options.worker_id, request_id, exc)
