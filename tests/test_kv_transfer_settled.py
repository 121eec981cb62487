"""``KvTransfer.on_done`` and ``KvTransfer.settled``: how an event loop (the decode rank's handoffs)
learns that a transfer ended without polling it. In-process transport; every wait is bounded."""

from __future__ import annotations

import asyncio
import threading
import time

import torch
from kv_caches import paged_cache

from k2serve.workers.kv_transfer import CacheKvSink, CacheKvSource, InProcessTransport, TransferState

NUM_TOKENS = 40
BLOCKS = [3, 1, 4]


def _source() -> CacheKvSource:
    return CacheKvSource(paged_cache(torch.bfloat16, 0), BLOCKS, NUM_TOKENS)


def _sink() -> CacheKvSink:
    return CacheKvSink(paged_cache(torch.bfloat16, 0, zero=True), BLOCKS, NUM_TOKENS)


def test_settled_returns_the_end_state_of_a_transfer_that_succeeds() -> None:
    transport = InProcessTransport(timeout_s=5.0)

    source = _source()
    receiver = transport.start_receive("ok", _sink())

    async def main() -> TransferState:
        transport.start_send("ok", source)
        return await receiver.settled(5.0)

    assert asyncio.run(main()) is TransferState.SUCCESS
    assert receiver.bytes_moved == source.layout.nbytes


def test_settled_gives_up_after_its_timeout_and_wakes_at_once_on_a_cancel() -> None:
    transport = InProcessTransport(timeout_s=5.0)
    receiver = transport.start_receive("alone", _sink())  # no sender ever comes

    async def main() -> tuple[TransferState, TransferState, float]:
        waited = await receiver.settled(0.1)
        threading.Timer(0.1, receiver.cancel, args=("the caller left",)).start()
        started = time.monotonic()
        cancelled = await receiver.settled(5.0)
        return waited, cancelled, time.monotonic() - started

    waited, cancelled, seconds = asyncio.run(main())
    assert not waited.done
    assert cancelled is TransferState.FAILED and receiver.error == "the caller left"
    assert seconds < 2.0  # woken by the cancel, not by the 5 s timeout


def test_on_done_calls_each_hook_once_and_a_late_hook_at_once() -> None:
    transport = InProcessTransport(timeout_s=5.0)
    receiver = transport.start_receive("hooks", _sink())
    calls: list[str] = []
    receiver.on_done(lambda: calls.append("early"))
    receiver.cancel("stop")  # ends it on this thread; the transfer's own thread then ends too
    assert receiver.wait(5.0) is TransferState.FAILED
    receiver.on_done(lambda: calls.append("late"))
    assert calls == ["early", "late"]
