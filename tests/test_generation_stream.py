"""``GenerationStream.aclose``: the request's choice tasks are cancelled once and their cleanup runs to
its end, the slot comes back whatever the closer's own cancellation, and a task that never ends
holds the slot no longer than ``CLOSE_LIMIT_S``.

The frontend and the slot are fakes (this is the close seam only; the live router tests cover the
whole path).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from types import SimpleNamespace
from typing import Any

import pytest

from k2serve.router import frontend as frontend_module
from k2serve.router.frontend import GenerationStream
from k2serve.router.generation_event import ChoiceFinished
from k2serve.router.generation_request import GenerationRequest

BOUND_S = 5.0
CLEANUP_S = 0.3  # a release RPC on a loaded machine: longer than one loop pass, far below the bound


class _Stream:
    """A ``GenerationStream`` over one choice task, with a fake frontend and slot."""

    def __init__(self, choice: Coroutine[Any, Any, None]) -> None:
        self.released: list[str] = []
        self.forgotten: list[str] = []
        frontend = SimpleNamespace(_forget=self.forgotten.append)
        self.stream = GenerationStream(frontend, GenerationRequest("req-1", (1, 2, 3)))  # type: ignore[arg-type]
        self.choice = asyncio.ensure_future(choice)

    async def begin(self) -> None:
        @contextlib.asynccontextmanager
        async def slot() -> AsyncIterator[None]:
            yield
            self.released.append("slot")

        await asyncio.sleep(0)  # the choice task is waiting
        held = slot()
        await held.__aenter__()
        self.stream._tasks.append(self.choice)
        self.stream._slot = held

    def assert_closed(self) -> None:
        assert self.released == ["slot"] and self.forgotten == ["req-1"]
        assert self.stream._queue.get_nowait() == ChoiceFinished(0, "abort")


def test_a_cancelled_first_closer_still_lets_the_cleanup_finish_and_the_slot_come_back() -> None:
    cleaned: list[str] = []

    async def choice_with_slow_cleanup() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(CLEANUP_S)  # e.g. the release of a push on the decode rank
            cleaned.append("released")

    async def body() -> _Stream:
        s = _Stream(choice_with_slow_cleanup())
        await s.begin()
        first = asyncio.ensure_future(s.stream.aclose())
        await asyncio.sleep(0)
        first.cancel()  # the first closer goes away at once (a cancelled response)
        await asyncio.gather(first, return_exceptions=True)
        async with asyncio.timeout(BOUND_S):
            await s.stream.aclose()  # returns only once the closing is done
        assert s.choice.done()
        return s

    closed = asyncio.run(body())
    assert cleaned == ["released"]  # the cleanup was not cut short by a second cancel
    closed.assert_closed()


def test_a_choice_task_that_ignores_its_cancel_holds_the_slot_only_until_the_bound(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(frontend_module, "CLOSE_LIMIT_S", 0.2)

    async def stubborn() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(60)
        await asyncio.sleep(60)

    async def body() -> _Stream:
        s = _Stream(stubborn())
        await s.begin()
        async with asyncio.timeout(BOUND_S):
            await s.stream.aclose()
        assert not s.choice.done()
        s.choice.cancel()
        await asyncio.gather(s.choice, return_exceptions=True)
        return s

    with caplog.at_level(logging.ERROR, logger=frontend_module.__name__):
        closed = asyncio.run(body())
    closed.assert_closed()
    assert "still running" in caplog.text
