"""Pushed KV handoff, decode side: the KV that prefill ranks push here before the ``Decode`` call comes.

Lifecycle of one push (keyed by its lease id), on the service's event loop:

1. ``accept(request_id, handle)`` (the ``AcceptKv`` RPC, called by the prefill rank when its last
   forward begins): refused at once, never queued, when this rank cannot take it now: not p2p,
   the request is already here, ``Decode`` calls or engine requests wait for blocks (a push must not
   jump that queue), or the blocks are not free. Else it reserves the prompt's blocks
   (``Engine.reserve_kv``) and starts the p2p receiver into them (transfer id ``<lease id>/push``).
2. ``claim(lease_id, request_id)`` by the ``Decode`` that names the lease: the push leaves the table;
   ``settle`` then waits (bounded) for the receiver. Success: the blocks are the Decode's reservation,
   exactly as after a pull. Failure: the receiver is cancelled and the reservation freed, and the
   Decode pulls as if nothing had been pushed (``fell_back``).
3. A push never claimed ends in ``expire`` (at once when its transfer failed; else its receiver's
   timeout plus the lease's TTL after it was accepted: the prefill rank has let the lease go by then), ``abort(request_id)``, ``refused``
   (its Decode was refused here) or ``close``:
   receiver cancelled first (it never writes again), then the reservation freed.

A Decode that arrives while ``accept`` of its request is still reserving waits for it
(``pending``), so the two never both reserve for one request id. An aborted request id is
remembered for ``ABORTED_KEEP_S``: its push, if the abort overtook it, is refused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from k2serve.proto import worker_pb2
from k2serve.workers.engine import Engine
from k2serve.workers.kv_pages import CacheKvSink
from k2serve.workers.kv_push import push_transfer_id
from k2serve.workers.kv_transfer import KvReceiver, TransferState
from k2serve.workers.kv_transfer_metrics import KvTransferMetrics
from k2serve.workers.kv_transport_p2p import P2pKvClient

logger = logging.getLogger(__name__)
ABORTED_KEEP_S = 120.0  # an aborted request id refuses a late push this long
ABORTED_MAX = 10_000


@dataclass
class PushedKv:
    request_id: str
    lease_id: str
    blocks: list[int]
    receiver: KvReceiver
    expires_at: float  # monotonic


class PushReceiver:
    def __init__(
        self,
        engine: Engine,
        metrics: KvTransferMetrics,
        p2p_client: Callable[[], P2pKvClient | None],
        reserve: Callable[[str, int], Awaitable[list[int] | None]],
        cancel_reservation: Callable[[str], Coroutine[Any, Any, None]],
        busy: Callable[[str], str | None],
        *,
        transfer_timeout_s: float,
    ) -> None:
        """``busy(request_id)``: why a push cannot be taken now (queue, a Decode of that request), or None."""
        self.engine = engine
        self.metrics = metrics
        self._p2p_client = p2p_client
        self._reserve = reserve
        self._cancel_reservation = cancel_reservation
        self._busy = busy
        self.transfer_timeout_s = transfer_timeout_s
        self._pushes: dict[str, PushedKv] = {}  # lease id -> push
        self._accepting: dict[str, asyncio.Future[None]] = {}  # request id -> accept in progress
        self._ending: set[asyncio.Task[None]] = set()
        self._aborted: OrderedDict[str, float] = OrderedDict()  # request id -> when: refuse a push that comes late

    def __len__(self) -> int:
        return len(self._pushes)

    async def accept(
        self, request_id: str, handle: worker_pb2.KvHandle, max_tokens: int = 0
    ) -> worker_pb2.AcceptKvResponse:
        """``max_tokens``: the request's (0 = up to the context limit), so a request the rank could never
        run is refused here rather than received and then refused by its Decode."""
        reason = self._refusal(request_id, handle, max_tokens)
        if reason is None:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._accepting[request_id] = done
            try:
                reason = await self._take(request_id, handle)
            finally:
                del self._accepting[request_id]
                done.set_result(None)
        self.metrics.push_ended("accepted" if reason is None else "refused")
        return worker_pb2.AcceptKvResponse(accepted=reason is None, reason=reason or "")

    def _refusal(self, request_id: str, handle: worker_pb2.KvHandle, max_tokens: int) -> str | None:
        if handle.transport != "p2p" or self._p2p_client() is None:
            return "this rank takes pushes over p2p only"
        if request_id in self._aborted:
            return f"request {request_id!r} was aborted here"
        if request_id in self._accepting or any(p.request_id == request_id for p in self._pushes.values()):
            return f"a push of {request_id!r} is already here"
        busy = self._busy(request_id)
        if busy is not None:
            return busy
        engine = self.engine
        if engine.failure is not None:
            return f"the engine failed: {engine.failure}"
        config, needed = engine.config, -(-handle.num_tokens // engine.config.block_size)
        total = min(handle.num_tokens + (max_tokens or config.max_model_len), config.max_model_len)
        if -(-total // config.block_size) > engine.pool.num_blocks:
            return (
                f"the request needs {-(-total // config.block_size)} KV blocks, this rank has {engine.pool.num_blocks}"
            )
        if engine.scheduler.num_waiting:
            return f"{engine.scheduler.num_waiting} requests of this rank wait for blocks"
        if engine.pool.num_free_blocks < needed:
            return f"{needed} KV blocks needed, {engine.pool.num_free_blocks} free"
        return None

    async def _take(self, request_id: str, handle: worker_pb2.KvHandle) -> str | None:
        try:
            blocks = await self._reserve(request_id, handle.num_tokens)
        except Exception as exc:  # the engine failed, or the id is running here already
            return f"cannot reserve: {exc}"
        if blocks is None:
            return "the blocks were taken meanwhile"
        client = self._p2p_client()
        assert client is not None  # checked in _refusal; a rank's client never goes away before close
        sink = CacheKvSink(self.engine.kv_cache, blocks, handle.num_tokens)
        receiver = client.start_receive(
            push_transfer_id(handle.lease_id),
            handle.prefill_worker_id,
            handle.transfer_rendezvous,
            sink,
            handle.checksum,
            timeout_s=self.transfer_timeout_s,
        )
        expires_at = time.monotonic() + self.transfer_timeout_s + max(handle.lease_ttl_s, 1.0)
        self._pushes[handle.lease_id] = PushedKv(request_id, handle.lease_id, blocks, receiver, expires_at)
        return None

    async def pending(self, request_id: str) -> None:
        """Wait for an ``accept`` of ``request_id`` that is still reserving (bounded by that reservation)."""
        accepting = self._accepting.get(request_id)
        if accepting is not None:
            await asyncio.shield(accepting)

    def claim(self, lease_id: str, request_id: str) -> PushedKv | None:
        push = self._pushes.get(lease_id)
        if push is None or push.request_id != request_id:
            return None
        return self._pushes.pop(lease_id)

    async def settle(self, push: PushedKv) -> list[int] | None:
        """The claimed push's filled blocks; None when it failed (receiver cancelled, blocks freed: pull
        instead). Any other exit (the caller left) cancels the receiver and frees the blocks too."""
        receiver, ok = push.receiver, False
        try:
            ok = await receiver.settled(self.transfer_timeout_s) is TransferState.SUCCESS
        finally:
            if not ok:
                await asyncio.shield(self._end(push, "the decode rank gave up the pushed transfer"))
            self.metrics.finished("receive", "p2p", receiver.bytes_moved, receiver.seconds, ok)
        self.metrics.push_ended("claimed" if ok else "fell_back")
        if not ok:
            logger.info("push of %s failed (%s): pulling instead", push.request_id, receiver.error)
        return push.blocks if ok else None

    async def expire(self) -> None:
        """Called periodically: a push whose transfer failed before its Decode came (the prefill failed or
        was aborted, the client left) gives its blocks back now; one never claimed, at its expiry."""
        now = time.monotonic()
        for push in list(self._pushes.values()):
            failed = push.receiver.poll() is TransferState.FAILED
            if not failed and now < push.expires_at:
                continue
            del self._pushes[push.lease_id]
            self.metrics.push_ended("failed" if failed else "expired")
            if failed:  # a failed receive, as when its Decode claims it first (``settle``)
                self.metrics.finished("receive", "p2p", push.receiver.bytes_moved, push.receiver.seconds, False)
            else:
                logger.warning("push of %s (lease %s) was never claimed", push.request_id, push.lease_id)
            await self._end(push, "the push was never claimed")

    def abort(self, request_id: str) -> bool:
        """Drop the pushes of ``request_id`` (the request was aborted), and refuse one that comes later
        (the router's abort can overtake the prefill rank's ``AcceptKv``)."""
        now = time.monotonic()
        self._aborted[request_id] = now
        self._aborted.move_to_end(request_id)
        while self._aborted and (
            len(self._aborted) > ABORTED_MAX or next(iter(self._aborted.values())) < now - ABORTED_KEEP_S
        ):
            self._aborted.popitem(last=False)
        return self._drop([p for p in self._pushes.values() if p.request_id == request_id], "aborted")

    def refused(self, lease_id: str) -> None:
        """Its Decode was refused here (too large): the push goes, the lease stays with the caller."""
        self._drop([p for p in self._pushes.values() if p.lease_id == lease_id], "aborted")

    def _drop(self, pushes: list[PushedKv], outcome: str) -> bool:
        for push in pushes:
            del self._pushes[push.lease_id]
            self.metrics.push_ended(outcome)
            push.receiver.cancel("the request was aborted")  # it never writes again: the blocks may go
            task = asyncio.get_running_loop().create_task(self._cancel_reservation(push.request_id))
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)
        return bool(pushes)

    async def close(self) -> None:
        for push in list(self._pushes.values()):
            del self._pushes[push.lease_id]
            await self._end(push, "the rank is stopping")

    async def _end(self, push: PushedKv, reason: str) -> None:
        push.receiver.cancel(reason)
        await self._cancel_reservation(push.request_id)
