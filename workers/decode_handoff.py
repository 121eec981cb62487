"""``DecodeHandoff``: the decode side of the prefill → decode handoff of one rank (the ``Decode`` RPC).

Lifecycle: ``WorkerServer`` builds one per rank and delegates ``Decode`` to ``decode(...)`` once it
has checked the role, the sampling and the handle. Each call goes through four steps:

1. fit: a request whose prompt + ``max_tokens`` need more blocks than the rank's whole pool could
   never run here; it is refused at once with RESOURCE_EXHAUSTED naming both numbers;
2. wait: the call waits in the rank's ``HandoffQueue`` (first come, first served) until the blocks of
   its prompt can be reserved (``Engine.reserve_kv``) while the engine has no request of its own
   waiting (preempted requests recompute first: the queue never takes the blocks they wait for, and
   holds nothing itself, so it cannot deadlock against preemption); at most ``wait_s`` or the
   call's deadline, whichever is first, then RESOURCE_EXHAUSTED "no KV blocks within N s";
3. pull: the KV named by the handle moves into the reservation (p2p by default, the gRPC stream when
   the handle says so); then the lease is always released on the prefill rank (``ReleaseKv``);
4. decode: the engine admits the request (``add_prefilled_request``, which takes the reservation
   over) and streams the tokens after the first.

Pushed KV (``pushes``, kv_push_receiver.py): when the prefill rank already pushed the handle's KV
here (``AcceptKv`` during its last forward), steps 2 and 3 become "wait for that receiver"; the
lease is released as after a pull. A failed push falls back to steps 2 and 3.

From the start of 2 to the end of 3 a ``LeaseHeartbeat`` renews the lease every third of its TTL; a
lease found lost ends the call with UNAVAILABLE "prefill rank P: ...", as a failed pull does (the
router's cue to prefill again elsewhere). A refusal at 1 or 2 leaves the lease to the caller (decode
elsewhere with the same handle, or ``Abort`` on the prefill rank; else it expires one TTL after the
last beat). ``abort(request_id)`` ends a waiting call with CANCELLED and releases its lease. Any exit
with blocks still reserved (a failed pull or admission, the caller gone) first cancels the receiver
(it never writes again), then frees the reservation. ``notify()`` is the service's "blocks may have
been freed" signal (a request of this rank ended, a reservation was cancelled); the queue also polls.

Single event loop: every method runs on the service's asyncio loop; the engine is touched only
through ``EngineLoop.call`` (reads of plain counters for the queue's hint excepted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

from k2serve.proto import worker_pb2, worker_pb2_grpc
from k2serve.proto.cluster_token import authorized
from k2serve.workers.engine import Engine, RequestOutput
from k2serve.workers.engine_loop import EngineLoop
from k2serve.workers.handoff_queue import HandoffAborted, HandoffQueue, HandoffTimeout
from k2serve.workers.kv_push_receiver import PushReceiver
from k2serve.workers.kv_transfer import CacheKvSink, KvReceiver, TransferState
from k2serve.workers.kv_transfer_metrics import KvTransferMetrics
from k2serve.workers.kv_transport_grpc import GrpcKvReceiver
from k2serve.workers.kv_transport_p2p import P2pKvClient
from k2serve.workers.lease_heartbeat import LeaseHeartbeat, LeaseLostError
from k2serve.workers.rpc_status import StatusError
from k2serve.workers.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
RELEASE_TIMEOUT_S = 5.0


class DecodeHandoff:
    def __init__(
        self,
        worker_id: str,
        engine: Engine,
        loop: EngineLoop,
        metrics: KvTransferMetrics,
        p2p_client: Callable[[], P2pKvClient | None],
        *,
        transfer_timeout_s: float,
        wait_s: float,
        channel_options: Sequence[tuple[str, Any]] = (),
        poll_s: float = 0.05,
        cluster_token: str | None = None,
    ) -> None:
        if wait_s < 0:
            raise ValueError(f"handoff_wait_s: must be >= 0, got {wait_s}")
        self.worker_id = worker_id
        self.engine = engine
        self.loop = loop
        self.metrics = metrics
        self._p2p_client = p2p_client
        self.transfer_timeout_s = transfer_timeout_s
        self.wait_s = wait_s
        self._channel_options = list(channel_options)
        self._cluster_token = cluster_token
        self.queue = HandoffQueue(poll_s)
        self._undoing: set[asyncio.Task[None]] = set()  # reservations made for callers that left meanwhile
        self._decoding: set[str] = set()  # request ids of the Decode calls running here
        self.pushes = PushReceiver(
            engine,
            metrics,
            p2p_client,
            self._reserve,
            self._cancel_reservation,
            self._push_busy,
            transfer_timeout_s=transfer_timeout_s,
        )
        metrics.watch_handoff_queue(lambda: len(self.queue))

    def notify(self) -> None:
        self.queue.notify()

    def abort(self, request_id: str) -> bool:
        return self.pushes.abort(request_id) | self.queue.abort(request_id)

    def _push_busy(self, request_id: str) -> str | None:
        if request_id in self._decoding:
            return f"a Decode of {request_id!r} is already running here"
        if len(self.queue):
            return f"{len(self.queue)} Decode calls wait for KV blocks here"
        return None

    async def decode(
        self, request: worker_pb2.DecodeRequest, params: SamplingParams, time_left_s: float | None
    ) -> AsyncIterator[RequestOutput]:
        """The request's deltas after the first token; ``StatusError`` for a refusal or a failed handoff."""
        rid, handle = request.request_id, request.kv
        try:
            self._check_fits(rid, len(request.prompt_token_ids), params)
        except StatusError:
            self.pushes.refused(handle.lease_id)
            raise
        wait_s = self.wait_s if time_left_s is None else max(0.0, min(self.wait_s, time_left_s))
        finished = False  # the engine ran the request to a normal end (it owned the blocks and freed them)
        if rid in self._decoding:
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, f"request_id: a Decode of {rid!r} is already running")
        self._decoding.add(rid)
        try:
            await self._handoff(handle, rid, wait_s)
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
                finished = bool(output.finish_reason) and output.finish_reason != "error"
                yield output
        finally:
            if not finished:
                # A reservation the engine did not take over (admission failed, the caller left at any
                # point, a race with an abort) is freed here, whatever happened before: a no-op once the
                # engine took it over (add_prefilled_request) or when _handoff already freed it.
                await asyncio.shield(self._cancel_reservation(rid))
            self._decoding.discard(rid)
            self.notify()  # the request ended here (or its reservation was freed): blocks may be free

    # ---- the steps -------------------------------------------------------------------------------------

    def _check_fits(self, rid: str, num_prompt: int, params: SamplingParams) -> None:
        config, pool = self.engine.config, self.engine.pool
        max_tokens = params.max_tokens if params.max_tokens is not None else config.max_model_len - num_prompt
        needed = -(-min(num_prompt + max_tokens, config.max_model_len) // config.block_size)
        if needed > pool.num_blocks:
            self.metrics.handoff_ended("too_large", None)
            raise StatusError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request {rid!r} needs {needed} KV blocks ({num_prompt} prompt + {max_tokens} max_tokens tokens); "
                f"decode rank {self.worker_id} has {pool.num_blocks} in all",
            )

    async def _handoff(self, handle: worker_pb2.KvHandle, rid: str, wait_s: float) -> list[int]:
        """Steps 2 and 3 under the heartbeat: the filled blocks, reserved for ``rid``; on any failure
        nothing stays reserved (the reservation is cancelled after the receiver)."""
        needed = -(-handle.num_tokens // self.engine.config.block_size)
        try:
            async with grpc.aio.insecure_channel(handle.prefill_address, options=self._channel_options) as channel:
                stub = authorized(worker_pb2_grpc.WorkerStub(channel), self._cluster_token)
                heartbeat = LeaseHeartbeat(stub, handle)
                heartbeat.start()
                blocks: list[int] | None = None
                success, release = False, False
                try:
                    await self.pushes.pending(rid)
                    pushed = self.pushes.claim(handle.lease_id, rid)
                    if pushed is not None:
                        release = True  # the push tried: the lease is ours to end whatever happens
                        blocks = await heartbeat.guard(self.pushes.settle(pushed))
                        if blocks is not None:
                            self.metrics.handoff_ended("pushed", None)
                            success = True
                            return blocks
                    admission = await heartbeat.guard(self.queue.admit(rid, self._try_reserve(rid, handle), wait_s))
                    blocks = admission.value
                    self.metrics.handoff_ended(
                        "immediate" if admission.waited_s is None else "waited", admission.waited_s
                    )
                    release = True  # from here on the lease is ours to end
                    await heartbeat.guard(self._transfer(stub, handle, blocks))
                    success = True
                    return blocks
                except HandoffTimeout as exc:
                    self.metrics.handoff_ended("timed_out", wait_s)
                    pool = self.engine.pool
                    raise StatusError(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"no KV blocks within {wait_s:g} s: request {rid!r} needs {needed} for {handle.num_tokens} "
                        f"prompt tokens; decode rank {self.worker_id} has {pool.num_free_blocks} of {pool.num_blocks} "
                        f"free, {len(self.queue)} other calls waiting",
                    ) from exc
                except HandoffAborted as exc:
                    self.metrics.handoff_ended("aborted", None)
                    release = True  # nobody will pull it
                    raise StatusError(grpc.StatusCode.CANCELLED, f"request {rid!r} was aborted while waiting") from exc
                except LeaseLostError as exc:
                    if blocks is None:  # lost while waiting: a handoff that failed without a pull
                        self.metrics.handoff_ended("lease_lost", None)
                        self.metrics.finished("receive", handle.transport or "p2p", 0, 0.0, False)
                    raise StatusError(
                        grpc.StatusCode.UNAVAILABLE, f"prefill rank {handle.prefill_worker_id}: {exc}"
                    ) from exc
                except BaseException:
                    if blocks is None:  # the caller left while waiting, or the rank stopped or failed
                        self.metrics.handoff_ended("left", None)
                    raise
                finally:
                    await heartbeat.stop()
                    if not success:  # the receiver was cancelled first; also when the admission was cut short
                        # between reserving and returning (blocks still None): unknown ids are ignored
                        await asyncio.shield(self._cancel_reservation(rid))
                    if release:
                        with contextlib.suppress(grpc.aio.AioRpcError):
                            await stub.ReleaseKv(
                                worker_pb2.ReleaseKvRequest(lease_id=handle.lease_id, success=success),
                                timeout=RELEASE_TIMEOUT_S,
                            )
        except grpc.aio.AioRpcError as exc:
            raise StatusError(
                grpc.StatusCode.UNAVAILABLE, f"prefill rank {handle.prefill_worker_id}: {exc.details()}"
            ) from exc

    def _try_reserve(self, rid: str, handle: worker_pb2.KvHandle) -> Callable[[], Awaitable[list[int] | None]]:
        """The queue's ``try_admit``: the reserved blocks, or None while they are not free."""
        num_tokens = handle.num_tokens
        needed = -(-num_tokens // self.engine.config.block_size)

        async def try_reserve() -> list[int] | None:
            engine = self.engine
            if engine.failure is not None:
                raise StatusError(grpc.StatusCode.UNAVAILABLE, f"worker {self.worker_id}: {engine.failure}")
            if engine.pool.num_free_blocks < needed or engine.scheduler.num_waiting:
                return None  # a hint read off the engine thread; the reservation itself decides
            return await self._reserve(rid, num_tokens)

        return try_reserve

    async def _reserve(self, rid: str, num_tokens: int) -> list[int] | None:
        """``reserve_kv`` on the engine's thread, unless the engine has requests of its own waiting."""

        def reserve(engine: Engine) -> list[int] | None:
            return None if engine.scheduler.num_waiting else engine.reserve_kv(rid, num_tokens)

        call = asyncio.ensure_future(self.loop.call(reserve))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            # the caller left while the engine may be reserving: whatever it reserves is given back
            call.add_done_callback(lambda done: self._undo(rid, done))
            raise
        except (RuntimeError, TimeoutError) as exc:  # the loop stopped, or is stuck
            raise StatusError(grpc.StatusCode.UNAVAILABLE, f"worker {self.worker_id}: {exc!r}") from exc

    def _undo(self, rid: str, done: asyncio.Future[list[int] | None]) -> None:
        if done.cancelled() or done.exception() is not None or done.result() is None:
            return
        task = asyncio.get_running_loop().create_task(self._cancel_reservation(rid))
        self._undoing.add(task)
        task.add_done_callback(self._undoing.discard)

    async def _transfer(self, stub: worker_pb2_grpc.WorkerStub, handle: worker_pb2.KvHandle, blocks: list[int]) -> None:
        """Move the handle's rows into ``blocks``. Any exit without success (a failed or timed-out
        transfer, the caller gone, the lease lost) cancels the receiver first: once ``cancel`` returns
        it never writes again, so the caller may free ``blocks``."""
        sink = CacheKvSink(self.engine.kv_cache, blocks, handle.num_tokens)
        success = False
        receiver: KvReceiver | None = None
        try:
            receiver = await self._start_receiver(stub, handle, sink)
            state = await receiver.settled(self.transfer_timeout_s)
            if not state.done:
                raise StatusError(grpc.StatusCode.UNAVAILABLE, "KV transfer timed out")
            if state is TransferState.FAILED:
                raise StatusError(grpc.StatusCode.UNAVAILABLE, f"KV transfer failed: {receiver.error}")
            success = True
        finally:
            if not success and receiver is not None:
                receiver.cancel("the decode rank gave up the transfer")
            moved, seconds = (receiver.bytes_moved, receiver.seconds) if receiver is not None else (0, 0.0)
            self.metrics.finished("receive", handle.transport or "p2p", moved, seconds, success)

    async def _start_receiver(
        self, stub: worker_pb2_grpc.WorkerStub, handle: worker_pb2.KvHandle, sink: CacheKvSink
    ) -> KvReceiver:
        if handle.transport == "grpc":
            return GrpcKvReceiver(
                handle.prefill_address,
                handle.lease_id,
                sink,
                self.transfer_timeout_s,
                handle.checksum,
                cluster_token=self._cluster_token,
            )
        client = self._p2p_client()
        if client is None:
            raise StatusError(grpc.StatusCode.FAILED_PRECONDITION, "this rank has no p2p KV client")
        # the sender first: a prefill rank that is gone or refuses (lease expired) costs no receive thread
        await stub.StartKvSend(
            worker_pb2.StartKvSendRequest(lease_id=handle.lease_id, receiver_id=self.worker_id), timeout=10.0
        )
        return client.start_receive(
            handle.lease_id, handle.prefill_worker_id, handle.transfer_rendezvous, sink, handle.checksum
        )

    async def _cancel_reservation(self, request_id: str) -> None:
        try:
            await self.loop.call(lambda e: e.cancel_reservation(request_id))
        except (RuntimeError, TimeoutError) as exc:
            logger.warning("%s: could not free the reservation of %s: %s", self.worker_id, request_id, exc)
        self.notify()
