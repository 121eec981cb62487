"""``KvTransfer.on_done`` and ``KvTransfer.settled``: how an event loop (the decode rank's handoffs)
learns that a transfer ended without polling it; and that an end once reported stays (a transfer that
succeeded before its last step ignores a late cancel). In-process transport; every wait is bounded."""

from __future__ import annotations

import asyncio
import threading
import time

import torch
from kv_caches import paged_cache

from k2serve.workers.kv_transfer import (
    CacheKvSink,
    CacheKvSource,
    KvLayout,
    KvTransfer,
    TransferError,
    TransferState,
)
from k2serve.workers.kv_transport_inproc import InProcessTransport

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


class _SucceedsThenAcknowledges(KvTransfer):
    """Reports SUCCESS, then blocks in its last step (a receiver's acknowledgement) until released."""

    def __init__(self) -> None:
        super().__init__("receiver", "early", KvLayout(1, 1, 8, torch.bfloat16), timeout_s=5.0)
        self.reported, self.release = threading.Event(), threading.Event()
        self.cancel_hook_calls = 0
        self.last_step_error: str | None = None

    def _run(self) -> None:
        self._succeed()
        self.reported.set()
        self.release.wait(5.0)
        try:
            self._remaining("sending the acknowledgement")  # what every blocking step checks first
        except TransferError as exc:
            self.last_step_error = str(exc)
            raise

    def _on_cancel(self) -> None:
        self.cancel_hook_calls += 1  # a transport lets go of its connection here


def test_a_transfer_that_succeeded_ignores_a_late_cancel_and_finishes_its_last_step() -> None:
    transfer = _SucceedsThenAcknowledges()
    ended: list[str] = []
    transfer.on_done(lambda: ended.append("ended"))
    transfer.start()
    assert transfer.reported.wait(5.0)
    assert transfer.poll() is TransferState.SUCCESS and ended == ["ended"]  # before its last step
    transfer.cancel("too late")
    transfer.release.set()
    assert transfer.wait(5.0) is TransferState.SUCCESS
    assert transfer.error is None and transfer.cancel_hook_calls == 0 and transfer.last_step_error is None
