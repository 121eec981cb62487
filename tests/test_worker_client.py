"""``WorkerClient.stream``: a consumer cancelled while it reads a call stops reading and cancels it.

The call is a fake (one seam: ``read``/``cancel`` of ``grpc.aio.UnaryStreamCall``) whose every read
completes after one loop pass, so a cancel often lands just as a read finishes: the case Python
3.11's ``asyncio.wait_for`` got wrong (it returned the read and dropped the cancel, and the router
read a departed client's stream to its end).
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from k2serve.router.worker_client import WorkerClient, WorkerEndpoint

DELTAS = 5_000  # far more than the reads before the cancel: the stream never ends on its own here
STALL_S = 5.0  # the stall bound is on (the bounded read path), far longer than the test


class BusyCall:
    """A call that always has the next delta after one pass of the loop."""

    def __init__(self) -> None:
        self.reads = 0
        self.cancelled = False

    async def read(self) -> Any:
        await asyncio.sleep(0)
        self.reads += 1
        return grpc.aio.EOF if self.reads > DELTAS else self.reads

    def cancel(self) -> bool:
        self.cancelled = True
        return True


async def _cancelled_after(client: WorkerClient, passes: int) -> tuple[BaseException | None, BusyCall]:
    call = BusyCall()

    async def consume() -> None:
        async for _ in client.stream(call, STALL_S):  # type: ignore[arg-type]
            pass

    task = asyncio.ensure_future(consume())
    for _ in range(passes):
        await asyncio.sleep(0)
    task.cancel()
    (outcome,) = await asyncio.gather(task, return_exceptions=True)
    return outcome, call


def test_a_cancel_that_lands_as_a_read_finishes_ends_the_stream_and_cancels_the_call() -> None:
    async def body() -> list[str]:
        client = WorkerClient.connect(WorkerEndpoint("decode-0", "decode", "127.0.0.1:1"))  # never dialled
        wrong = []
        try:
            for passes in range(1, 64):  # every phase of a read: before, during, as it finishes
                outcome, call = await _cancelled_after(client, passes)
                if not isinstance(outcome, asyncio.CancelledError) or not call.cancelled or call.reads >= DELTAS:
                    wrong.append(f"cancelled after {passes} passes: {outcome!r}, {call.reads} reads")
        finally:
            await client.channel.close()
        return wrong

    assert asyncio.run(body()) == []
