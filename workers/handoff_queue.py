"""``HandoffQueue``: the decode rank's bounded FIFO of KV handoffs waiting for free KV blocks.

Lifecycle: one per rank (``DecodeHandoff`` owns it). A ``Decode`` call asks ``admit(request_id,
try_admit, timeout_s)``: with nobody queued it tries at once; otherwise, or when that first try
finds no blocks, it joins the tail. Only the head of the queue tries again (first come, first
served: a large handoff is not starved by smaller ones behind it), whenever ``notify()`` says blocks
may have been freed (a request on the rank finished or was aborted, a reservation was cancelled)
and at the latest every ``poll_s``. Each waiter leaves the queue exactly once, however its wait ends:
``try_admit`` returned its result (admitted), ``timeout_s`` ran out (``HandoffTimeout``), ``abort``
named its request (``HandoffAborted``), ``try_admit`` raised, or the caller was cancelled; the next
in line is then woken at once. The queue itself holds no blocks: whatever ``try_admit`` reserves
belongs to its caller, so a waiter never holds anything the engine's own preempted requests need.

Single event loop: every method is called from the service's asyncio loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


class HandoffTimeout(Exception):
    """No blocks within the wait."""


class HandoffAborted(Exception):
    """``abort`` named the waiting request."""


@dataclass(eq=False)
class _Waiter:
    request_id: str
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    aborted: bool = False


@dataclass(frozen=True)
class Admission(Generic[T]):
    """``admit``'s answer: what ``try_admit`` returned and how long the caller waited (None: not queued)."""

    value: T
    waited_s: float | None


class HandoffQueue:
    def __init__(self, poll_s: float = 0.05) -> None:
        if poll_s <= 0:
            raise ValueError(f"poll_s: must be > 0, got {poll_s}")
        self.poll_s = poll_s  # the longest the head goes without trying (a missed notify costs this)
        self._waiters: deque[_Waiter] = deque()

    def __len__(self) -> int:
        return len(self._waiters)

    def notify(self) -> None:
        """Blocks may have been freed: the head tries again now."""
        if self._waiters:
            self._waiters[0].wake.set()

    def abort(self, request_id: str) -> bool:
        """End the wait of ``request_id`` with ``HandoffAborted``; False when it is not queued."""
        found = False
        for waiter in self._waiters:
            if waiter.request_id == request_id:
                waiter.aborted = found = True
                waiter.wake.set()
        return found

    async def admit(
        self, request_id: str, try_admit: Callable[[], Awaitable[T | None]], timeout_s: float
    ) -> Admission[T]:
        """``try_admit()``'s first non-None result, trying in FIFO order for at most ``timeout_s``.

        Raises ``HandoffTimeout``, ``HandoffAborted``, or whatever ``try_admit`` raises; a cancelled
        caller leaves the queue on the way out."""
        if not self._waiters:
            value = await try_admit()
            if value is not None:
                return Admission(value, None)
        started = time.monotonic()
        deadline = started + timeout_s
        waiter = _Waiter(request_id)
        self._waiters.append(waiter)
        try:
            while True:
                if waiter.aborted:
                    raise HandoffAborted(request_id)
                waiter.wake.clear()  # before the try: a notify that comes during it is kept
                if self._waiters[0] is waiter:
                    value = await try_admit()
                    if value is not None:
                        return Admission(value, time.monotonic() - started)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise HandoffTimeout(request_id)
                # the head polls; the others sleep until they become the head (woken by the leaver)
                if self._waiters[0] is waiter:
                    remaining = min(self.poll_s, remaining)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await waiter.wake.wait()
        finally:
            self._waiters.remove(waiter)
            self.notify()  # the next in line tries at once
