"""``LeaseHeartbeat`` against a fake ``RenewKv`` stub (one seam): renewals, a lost lease, and a
``stop()`` or ``guard()`` whose caller is cancelled while the beat is still letting go."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from k2serve.proto import worker_pb2
from k2serve.workers.lease_heartbeat import LeaseHeartbeat, LeaseLostError


class _NotFound(grpc.aio.AioRpcError):
    def __init__(self) -> None:
        super().__init__(grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(), "no such lease")


class _Stub:
    """``RenewKv`` answers (``ttl_s``), refuses (NOT_FOUND) or hangs; a hung call that is cancelled
    takes ``cleanup_s`` to let go."""

    def __init__(self, mode: str = "answer", cleanup_s: float = 0.0) -> None:
        self.mode, self.cleanup_s, self.calls, self.entered = mode, cleanup_s, 0, asyncio.Event()

    async def RenewKv(self, request: worker_pb2.RenewKvRequest, timeout: float) -> worker_pb2.RenewKvResponse:
        self.calls += 1
        self.entered.set()
        if self.mode == "refuse":
            raise _NotFound()
        if self.mode == "hang":
            try:
                await asyncio.sleep(3600)
            finally:
                await asyncio.sleep(self.cleanup_s)
        return worker_pb2.RenewKvResponse(ttl_s=0.15)


def _handle(ttl_s: float = 0.15) -> worker_pb2.KvHandle:
    return worker_pb2.KvHandle(lease_id="lease-1", lease_ttl_s=ttl_s)


def test_the_heartbeat_renews_every_third_of_the_ttl_until_stopped() -> None:
    async def body() -> None:
        stub = _Stub()
        beat = LeaseHeartbeat(stub, _handle())  # type: ignore[arg-type]
        beat.start()
        assert await beat.guard(asyncio.sleep(0.4, "done")) == "done"
        await beat.stop()
        assert beat.renewals >= 3, beat.renewals
        calls = stub.calls
        await asyncio.sleep(0.15)
        assert stub.calls == calls  # nothing after stop()

    asyncio.run(body())


def test_a_refused_renewal_ends_the_guarded_work_with_lease_lost() -> None:
    async def body() -> None:
        beat = LeaseHeartbeat(_Stub("refuse"), _handle())  # type: ignore[arg-type]
        beat.start()
        started = time.monotonic()
        with pytest.raises(LeaseLostError, match="could not be renewed"):
            await beat.guard(asyncio.sleep(30))
        assert time.monotonic() - started < 5
        await beat.stop()

    asyncio.run(body())


def test_stop_passes_a_cancel_of_its_caller_on() -> None:
    """``stop()`` waits for a renewal that takes its time to let go; a cancel of whoever awaits
    ``stop()`` meanwhile reaches that caller instead of being swallowed."""

    async def body() -> None:
        stub = _Stub("hang", cleanup_s=0.3)
        beat = LeaseHeartbeat(stub, _handle())  # type: ignore[arg-type]
        beat.start()
        async with asyncio.timeout(5):
            await stub.entered.wait()
        stopper = asyncio.create_task(beat.stop())
        await asyncio.sleep(0.05)
        stopper.cancel()
        await asyncio.wait({stopper}, timeout=5)
        assert stopper.cancelled()

    asyncio.run(body())


def test_a_guard_whose_caller_is_cancelled_cancels_the_work_and_passes_the_cancel_on() -> None:
    async def body() -> None:
        beat = LeaseHeartbeat(_Stub(), _handle(ttl_s=30))  # type: ignore[arg-type]
        beat.start()
        cleaned = asyncio.Event()

        async def work() -> None:
            try:
                await asyncio.sleep(3600)
            finally:
                await asyncio.sleep(0.1)
                cleaned.set()

        guarded = asyncio.create_task(beat.guard(work()))
        await asyncio.sleep(0.05)
        guarded.cancel()
        await asyncio.wait({guarded}, timeout=5)
        assert guarded.cancelled() and cleaned.is_set()
        await beat.stop()

    asyncio.run(body())
