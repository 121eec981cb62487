"""``LeaseHeartbeat``: the decode rank's heartbeat that keeps one prefill-side KV lease alive.

Lifecycle: ``DecodeHandoff`` makes one per ``Decode`` call, over the call's channel to the prefill
rank, and ``start``s it as soon as the handle arrives. Its task sends ``RenewKv`` every third of the
lease's TTL (the handle's ``lease_ttl_s``, then the prefill rank's answers), the first one a third of
the TTL after the start, or sooner when the handle's expiry says the lease is already half gone.
``guard(work)`` runs one piece of the handoff (the wait for blocks, the pull) and raises
``LeaseLostError`` as soon as the lease is known lost: NOT_FOUND (released, expired or unknown on the
prefill rank), or no renewal answered before the lease would have ended (the prefill rank is dead or
unreachable). ``stop()`` ends the task, before the caller's ``ReleaseKv``, so no renewal races the
release. A fast handoff (pulled within a third of the TTL) sends no renewal at all.

A decode rank that dies or hangs (SIGKILL, SIGSTOP) sends nothing more: the prefill rank frees the
blocks one TTL after the last beat (plus its expiry period). A live but slow one keeps its lease.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TypeVar

import grpc

from k2serve.proto import worker_pb2, worker_pb2_grpc

T = TypeVar("T")
MIN_INTERVAL_S = 0.05  # a handle with a tiny TTL is not hammered (its lease is lost anyway)


class LeaseLostError(Exception):
    """The lease ended on the prefill rank, or could not be renewed before it would have."""


class LeaseHeartbeat:
    def __init__(self, stub: worker_pb2_grpc.WorkerStub, handle: worker_pb2.KvHandle) -> None:
        self._stub = stub
        self.lease_id = handle.lease_id
        # the prefill rank's wall clock: only a hint for the first beat (clocks of two hosts may differ)
        left_s = handle.lease_expires_unix_ms / 1000 - time.time() if handle.lease_expires_unix_ms else 0.0
        self.ttl_s = handle.lease_ttl_s if handle.lease_ttl_s > 0 else max(left_s, 3 * MIN_INTERVAL_S)
        self._expires_at = time.monotonic() + (left_s if handle.lease_expires_unix_ms else self.ttl_s)
        self.renewals = 0  # answered renewals
        self._task: asyncio.Task[None] | None = None

    @property
    def interval_s(self) -> float:
        return max(self.ttl_s / 3, MIN_INTERVAL_S)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"lease-heartbeat-{self.lease_id}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await _cancel(task)

    async def guard(self, work: Awaitable[T]) -> T:
        """``await work``, or ``LeaseLostError`` (with ``work`` cancelled) if the lease is lost first."""
        job = asyncio.ensure_future(work)
        beating = self._task
        if beating is None:
            return await job
        try:
            await asyncio.wait({job, beating}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            await _cancel(job)
            raise
        if job.done():
            return job.result()
        await _cancel(job)
        exc = beating.exception() if not beating.cancelled() else None
        if isinstance(exc, LeaseLostError):
            raise exc
        raise LeaseLostError(f"KV lease {self.lease_id}: the heartbeat stopped ({exc!r})")

    async def _run(self) -> None:
        delay = min(self.interval_s, max(0.0, self._expires_at - time.monotonic()) / 2)
        while True:
            await asyncio.sleep(delay)
            sent = time.monotonic()
            try:
                answer = await self._stub.RenewKv(
                    worker_pb2.RenewKvRequest(lease_id=self.lease_id), timeout=self.interval_s
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    raise LeaseLostError(f"KV lease {self.lease_id} could not be renewed: {exc.details()}") from exc
                left = self._expires_at - time.monotonic()
                if left <= 0:
                    raise LeaseLostError(
                        f"KV lease {self.lease_id}: no renewal answered before it expired "
                        f"({exc.code().name}: {exc.details()})"
                    ) from exc
                delay = min(self.interval_s, max(MIN_INTERVAL_S, left / 2))  # try again before it ends
                continue
            self.renewals += 1
            if answer.ttl_s > 0:
                self.ttl_s = answer.ttl_s
            self._expires_at = sent + self.ttl_s
            delay = self.interval_s


async def _cancel(job: asyncio.Future[T]) -> None:
    """Cancel ``job`` and wait until it has run its cleanup (its own outcome is dropped). A cancel of
    the caller itself propagates: ``gather`` passes it on, where ``suppress(CancelledError)`` would
    swallow it."""
    job.cancel()
    await asyncio.gather(job, return_exceptions=True)
