"""``PrefillHandoff``: the prefill side of the prefill → decode handoff of one rank (``Prefill``,
``StartKvSend``, ``PullKv``, ``ReleaseKv``, ``RenewKv`` and the lease part of ``Abort``).

Lifecycle: ``WorkerServer`` builds one per rank; on a prefill or mixed rank it calls ``start()``
(which hosts a ``P2pKvServer`` and a ``KvPusher``) before its gRPC server starts, and sets
``address`` once that server is bound (every ``KvHandle`` names it). It delegates those
RPCs once it has checked the role and the sampling, runs ``expire()`` every ``expiry_period_s``, and
``stop()`` last. A request goes through:

1. prefill: the prompt and the first token with ``hold_kv``; a request that ends there (stop token,
   ``max_tokens`` 1) releases its blocks at once; otherwise a lease on the pinned blocks is granted
   (``KvLeaseTable``) and the response carries its ``KvHandle``. Until the lease is in the table
   nothing else would ever release the held blocks, so every other exit (the caller gone, the group
   failed under the request, a failed call) releases them in this call, and stops a push;
2. send: ``StartKvSend`` starts a p2p sender on the lease (a second one for the same lease, a retry
   from another decode rank, replaces the first), or ``PullKv`` streams the rows over gRPC; a push
   (``push_to``) started its sender during step 1 and ends like a pull's;
3. end: ``ReleaseKv``, ``Abort`` of the request or lease expiry (``expire()``: a dead or hung decode
   rank's lease ends within ttl + the period of its last ``RenewKv``) unpin the blocks, after
   stopping a sender that may still read them (unless the receiver reported success).

Failures end the RPC with a ``StatusError``: NOT_FOUND for an unknown, released or expired lease,
FAILED_PRECONDITION on a rank without a KV sender, UNAVAILABLE for a prefill that ended early or a
dropped gRPC pull. Single event loop: every method runs on the service's asyncio loop; the engine is
touched only through ``EngineLoop.call`` (``stop`` excepted, once the loop has stopped).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from k2serve.proto import worker_pb2
from k2serve.workers.engine import Engine, EngineFailedError, RequestOutput
from k2serve.workers.engine_loop import EngineLoop
from k2serve.workers.fault_plan import FaultInjector
from k2serve.workers.kv_lease import KvLeaseTable, Lease
from k2serve.workers.kv_push import KvPush, KvPusher
from k2serve.workers.kv_transfer import CacheKvSource, KvLayout, KvTransfer, TransferError, TransferState
from k2serve.workers.kv_transfer_metrics import KvTransferMetrics
from k2serve.workers.kv_transport_grpc import kv_chunks
from k2serve.workers.kv_transport_p2p import P2pKvServer
from k2serve.workers.rpc_status import StatusError
from k2serve.workers.sampling_params import SamplingParams
from k2serve.workers.wire_format import logprobs_to_proto, usage_to_proto
from k2serve.workers.worker_options import WorkerOptions

logger = logging.getLogger(__name__)


def cache_layout(engine: Engine, num_tokens: int) -> KvLayout:
    """The rows ``num_tokens`` tokens have in this engine's KV cache."""
    cache = engine.kv_cache
    return KvLayout(len(cache), num_tokens, cache[0].shape[-1], cache[0].dtype)


class PrefillHandoff:
    """One rank's leases and KV senders (see the module docstring)."""

    def __init__(
        self,
        options: WorkerOptions,
        engine: Engine,
        loop: EngineLoop,
        leases: KvLeaseTable,
        metrics: KvTransferMetrics,
        faults: FaultInjector,
        channel_options: Sequence[tuple[str, Any]],
    ) -> None:
        self.options = options
        self.engine, self.loop, self.leases, self.metrics, self.faults = engine, loop, leases, metrics, faults
        self._channel_options = list(channel_options)
        self.address = ""  # the rank's Worker service (goes into every KvHandle)
        self._p2p_server: P2pKvServer | None = None
        self._pusher: KvPusher | None = None  # pushes to the decode rank a Prefill names
        self._senders: dict[str, KvTransfer] = {}  # lease id -> its p2p sender (kept until the lease ends)

    def start(self) -> None:
        """Host the transfer store and the pusher."""
        o = self.options
        self._p2p_server = P2pKvServer(o.worker_id, o.host, o.transfer_timeout_s)
        self._pusher = KvPusher(
            self._p2p_server,
            self.engine.kv_cache,
            timeout_s=o.transfer_timeout_s,
            checksum=o.checksum,
            next_fault=self.faults.next_kv_send,
            on_sender_done=self._count_sent,
            channel_options=self._channel_options,
            cluster_token=o.cluster_token,
        )

    @property
    def expiry_period_s(self) -> float:
        return min(1.0, self.leases.ttl_s / 4)  # a stranded lease ends within ttl + period of its last renewal

    async def stop(self) -> None:
        """After the engine loop stopped: end every lease (stopping its sender) and the transfer endpoints."""
        for lease in self.leases.expire_all():
            sender = self._senders.pop(lease.lease_id, None)
            if sender is not None:
                sender.cancel("the rank is stopping")
            self.engine.release_kv(lease.request_id)  # the loop is stopped: nothing else touches the engine
        if self._p2p_server is not None:
            self._p2p_server.close()
        if self._pusher is not None:
            await self._pusher.close()

    # ---- Prefill ---------------------------------------------------------------------------------------

    async def prefill(self, request: worker_pb2.PrefillRequest, params: SamplingParams) -> worker_pb2.PrefillResponse:
        """Step 1: prefill, then lease the held KV (or release it when the request ends here)."""
        if params.n != 1:
            raise ValueError("n: disaggregated requests take n = 1")
        transport = request.transport or self.options.transport
        if transport not in ("p2p", "grpc"):
            raise ValueError(f"transport: expected p2p or grpc, got {transport!r}")
        rid = request.request_id
        push = self._prepare_push(request, transport)
        leased = False
        try:
            try:
                first = await self._prefill(request, params, push)
            except (ValueError, EngineFailedError):
                raise  # refused at admission: this call holds nothing (the id may be another call's)
            except BaseException:
                await asyncio.shield(self._release_held(rid))  # e.g. the caller left: it may have finished
                raise
            try:
                if first.finish_reason == "error" or not first.new_token_ids:
                    raise StatusError(grpc.StatusCode.UNAVAILABLE, first.error or f"the prefill of {rid!r} ended early")
                response = worker_pb2.PrefillResponse(request_id=rid, first_token_id=first.new_token_ids[0])
                response.first_logprobs.extend(logprobs_to_proto(first.logprobs))
                held = await self.loop.call(lambda e: e.held_kv(rid))
                if held is None:
                    raise StatusError(grpc.StatusCode.UNAVAILABLE, first.error or "the prefill failed")
                assert first.usage is not None
                response.usage.CopyFrom(usage_to_proto(first.usage))
                ends = first.finish_reason == "stop" or params.max_tokens == 1
                if ends or (first.new_token_ids[0] in self.options.stop_token_ids and not params.ignore_eos):
                    response.finish_reason = (
                        "length" if params.max_tokens == 1 and first.finish_reason != "stop" else "stop"
                    )
                    return response
                layout = cache_layout(self.engine, held.num_tokens)
                lease_id = push.lease_id if push is not None else None
                lease = self.leases.grant(rid, held.block_ids, held.num_tokens, layout, lease_id=lease_id)
                leased = True
                response.sampler_state = held.sampler_state
                response.kv.CopyFrom(self._handle(lease.lease_id, held.num_tokens, transport))
                if push is not None and push.sender is not None and not push.ended:
                    self._senders[lease.lease_id] = push.sender  # ended like a pull's sender from here on
                    response.kv.pushed_to = push.target.worker_id
                return response
            finally:
                if not leased:
                    await asyncio.shield(self._release_held(rid))
        finally:
            if push is not None and not leased:
                push.cancel("the prefill ended without a lease")

    def _prepare_push(self, request: worker_pb2.PrefillRequest, transport: str) -> KvPush | None:
        """A push to the rank ``push_to`` names, when asked for and possible here (p2p); else the pull."""
        one_token = request.sampling.HasField("max_tokens") and request.sampling.max_tokens == 1
        if not request.HasField("push_to") or transport != "p2p" or self._pusher is None or one_token:
            return None  # (a request of one token ends with the prefill: nothing to decode)
        target = request.push_to
        if not target.worker_id or not target.address:
            raise ValueError("push_to: worker_id and address are both required")
        handle = self._handle("", len(request.prompt_token_ids), transport)
        handle.ClearField("lease_expires_unix_ms")
        max_tokens = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else 0
        return self._pusher.prepare(request.request_id, target, handle, max_tokens)

    def _handle(self, lease_id: str, num_tokens: int, transport: str) -> worker_pb2.KvHandle:
        layout = cache_layout(self.engine, num_tokens)
        ttl = self.leases.ttl_s
        return worker_pb2.KvHandle(
            lease_id=lease_id,
            prefill_worker_id=self.options.worker_id,
            prefill_address=self.address,
            transfer_rendezvous=self._p2p_server.rendezvous if self._p2p_server else "",
            transport=transport,
            num_tokens=num_tokens,
            num_layers=layout.num_layers,
            row_dim=layout.row_dim,
            dtype=layout.dtype_name,
            lease_expires_unix_ms=int((time.time() + ttl) * 1000),
            lease_ttl_s=ttl,
            checksum=self.options.checksum,
        )

    async def _prefill(
        self, request: worker_pb2.PrefillRequest, params: SamplingParams, push: KvPush | None
    ) -> RequestOutput:
        one = dataclasses.replace(params, max_tokens=1)
        stream = await self.loop.generate(
            request.request_id,
            list(request.prompt_token_ids),
            one,
            priority=request.priority,
            cache_salt=request.cache_salt or None,
            hold_kv=True,
            kv_progress=push.progress if push is not None else None,
        )
        last: RequestOutput | None = None
        async for output in stream:
            last = output
        assert last is not None and last.finished
        return last

    # ---- send --------------------------------------------------------------------------------------------

    def start_send(self, lease_id: str, receiver_id: str) -> str:
        """Step 2 (p2p): a sender of the lease's rows to ``receiver_id``; the transfer id."""
        lease = self._lease(lease_id)
        if self._p2p_server is None:
            raise StatusError(grpc.StatusCode.FAILED_PRECONDITION, "this rank does not send KV caches")
        source = CacheKvSource(self.engine.kv_cache, lease.block_ids, lease.num_tokens)
        earlier = self._senders.pop(lease_id, None)
        if earlier is not None:  # a retry from another decode rank: one sender per lease reads the blocks
            earlier.cancel("replaced by a new send of the same lease")
        sender = self._p2p_server.start_send(
            lease_id, receiver_id, source, checksum=self.options.checksum, fault=self.faults.next_kv_send()
        )
        self._senders[lease_id] = sender
        sender.add_done_callback(self._count_sent)
        return lease_id

    async def pull(self, lease_id: str) -> AsyncIterator[worker_pb2.KvChunk]:
        """Step 2 (gRPC): the lease's rows as ``KvChunk`` messages, while the lease lasts."""
        lease = self._lease(lease_id)
        source = CacheKvSource(self.engine.kv_cache, lease.block_ids, lease.num_tokens)
        started, moved, ok = time.monotonic(), 0, False
        fault = self.faults.next_kv_send()
        try:
            await asyncio.sleep(fault.delay_s)
            for chunk in kv_chunks(source, checksum=self.options.checksum, fault=fault):
                if self.leases.get(lease_id) is None:  # released or expired: the blocks may be reused
                    raise StatusError(grpc.StatusCode.NOT_FOUND, f"lease {lease_id!r} ended during the pull")
                moved += len(chunk.data)
                yield chunk
            ok = True
        except TransferError as exc:  # an injected drop
            raise StatusError(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
        finally:
            self.metrics.finished("send", "grpc", moved, time.monotonic() - started, ok)

    # ---- end -----------------------------------------------------------------------------------------------

    async def release(self, lease_id: str, success: bool) -> bool:
        """Step 3 (``ReleaseKv``): whether the lease was still held."""
        lease = self.leases.release(lease_id)
        if lease is None:
            return False
        # after a success the sender reads nothing more (the receiver had every row); else stop it first
        await self._end_lease(lease, None if success else "the receiver released the lease")
        return True

    def renew(self, lease_id: str) -> float:
        """``RenewKv``: the TTL the lease has again."""
        if self.leases.renew(lease_id) is None:
            raise StatusError(grpc.StatusCode.NOT_FOUND, f"lease {lease_id!r} is unknown or expired")
        self.metrics.lease_renewed()
        return self.leases.ttl_s

    async def abort(self, request_id: str) -> bool:
        """The lease part of ``Abort``: a prefilled request nobody will pull; whether it had one."""
        found = False
        for lease in self.leases.release_request(request_id):
            await self._end_lease(lease, "the request was aborted")
            found = True
        return found

    async def expire(self) -> None:
        """End the leases whose TTL ran out since their last renewal."""
        for lease in self.leases.expire():
            logger.warning("lease %s of %s expired unclaimed", lease.lease_id, lease.request_id)
            await self._end_lease(lease, "the lease expired")

    def _lease(self, lease_id: str) -> Lease:
        lease = self.leases.get(lease_id)
        if lease is None:
            raise StatusError(grpc.StatusCode.NOT_FOUND, f"lease {lease_id!r} is unknown or expired")
        return lease

    def _count_sent(self, sender: KvTransfer) -> None:
        ok = sender.poll() is TransferState.SUCCESS
        self.metrics.finished("send", "p2p", sender.bytes_moved, sender.seconds, ok)

    async def _release_kv(self, request_id: str) -> None:
        await self.loop.call(lambda e: e.release_kv(request_id))

    async def _end_lease(self, lease: Lease, cancel_reason: str | None) -> None:
        """Unpin a lease's blocks; with ``cancel_reason``, first stop a sender that may still read them
        (``cancel`` returns once it no longer touches its source)."""
        sender = self._senders.pop(lease.lease_id, None)
        if sender is not None and cancel_reason is not None:
            sender.cancel(cancel_reason)
        # the lease is gone from the table already: the unpin must happen even if this caller is cancelled
        await asyncio.shield(self._release_kv(lease.request_id))

    async def _release_held(self, request_id: str) -> None:
        """``_release_kv`` on a path that is already failing: a stopped loop must not hide the first error."""
        try:
            await self._release_kv(request_id)
        except (RuntimeError, TimeoutError) as exc:
            logger.warning("%s: could not release the held KV of %s: %s", self.options.worker_id, request_id, exc)
