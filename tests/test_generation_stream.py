"""``GenerationStream.aclose``: the request's choice tasks end and its slot comes back, whatever the
caller's own cancellation and even when a choice task drops a cancel.

The frontend and the slot are fakes (this is the close seam only; the live router tests cover the
whole path).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from types import SimpleNamespace

from k2serve.router.frontend import GenerationStream
from k2serve.router.generation_event import ChoiceFinished
from k2serve.router.generation_request import GenerationRequest

BOUND_S = 5.0


async def _drops_the_first_cancel() -> None:
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        pass  # dropped, as Python 3.11's wait_for could
    await asyncio.sleep(60)  # ends only when cancelled again


def test_closing_cancels_again_and_gives_back_the_slot_even_when_the_first_closer_is_cancelled() -> None:
    async def body() -> None:
        released: list[str] = []

        @contextlib.asynccontextmanager
        async def slot() -> AsyncIterator[None]:
            yield
            released.append("slot")

        forgotten: list[str] = []
        frontend = SimpleNamespace(_forget=forgotten.append)
        stream = GenerationStream(frontend, GenerationRequest("req-1", (1, 2, 3)))  # type: ignore[arg-type]
        choice = asyncio.ensure_future(_drops_the_first_cancel())
        await asyncio.sleep(0)  # the choice task is waiting
        held = slot()
        await held.__aenter__()
        stream._tasks.append(choice)
        stream._slot = held

        first = asyncio.ensure_future(stream.aclose())
        await asyncio.sleep(0)
        first.cancel()  # the first closer goes away at once (a cancelled response)
        await asyncio.gather(first, return_exceptions=True)
        async with asyncio.timeout(BOUND_S):
            await stream.aclose()  # returns only once the closing is done
        assert choice.done() and released == ["slot"] and forgotten == ["req-1"]
        assert stream._queue.get_nowait() == ChoiceFinished(0, "abort")

    asyncio.run(body())
