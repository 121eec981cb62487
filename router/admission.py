"""``Admission``: the router's bounded queue in front of the workers (429 before any stream byte).

Lifecycle: one per router process, shared by REST and gRPC. ``async with admission.slot(cost)``
around one request's whole life: at most ``max_running`` cost units run at once (a request with
``n`` choices costs ``n``, clamped to ``max_running`` so it can run at all); up to ``max_waiting``
more wait, strictly in arrival order (a newcomer never overtakes a waiter, so a large request is
never starved by small ones), at most ``max_wait_s`` (or the client's own deadline when shorter);
anyone beyond that, or whose wait runs out, gets ``ApiError(OVERLOADED)`` with a ``Retry-After``
at once. A waiter that leaves (timeout or cancellation) never keeps a slot: a slot granted in the
same instant is given back, and the waiters behind it are reconsidered at once. Setting
``draining`` refuses every new request with UNAVAILABLE (503) and turns away every waiter too,
while the running ones finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from k2serve.router.api_error import ApiError, ErrorKind


@dataclass(frozen=True)
class AdmissionLimits:
    max_running: int = 256  # cost units (choices) admitted at once
    max_waiting: int = 1024  # requests allowed to wait for a slot
    max_wait_s: float = 30.0  # the longest a request waits before 429
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        if self.max_running < 1 or self.max_waiting < 0 or not self.max_wait_s >= 0 or self.retry_after_s < 0:
            raise ValueError(f"invalid admission limits: {self}")


class _Waiter:
    """One queued request: its cost and a future that resolves True (admitted) or False (refused)."""

    __slots__ = ("cost", "future")

    def __init__(self, cost: int, future: asyncio.Future[bool]) -> None:
        self.cost, self.future = cost, future


class Admission:
    def __init__(self, limits: AdmissionLimits = AdmissionLimits()) -> None:
        self.limits = limits
        self._running = 0
        self._waiters: deque[_Waiter] = deque()
        self._draining = False
        self.rejected = 0  # requests refused for overload (a counter for metrics)

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def draining(self) -> bool:
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self._draining = bool(value)
        if self._draining:  # the waiters will not get a slot on this replica: tell them now
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.future.done():
                    waiter.future.set_result(False)

    @contextlib.asynccontextmanager
    async def slot(self, cost: int = 1, *, deadline_s: float | None = None) -> AsyncIterator[None]:
        cost = max(1, min(cost, self.limits.max_running))
        await self._acquire(cost, deadline_s)
        try:
            yield
        finally:
            self._release(cost)

    async def _acquire(self, cost: int, deadline_s: float | None) -> None:
        if self._draining:
            raise self._unavailable()
        if not self._waiters and self._running + cost <= self.limits.max_running:
            self._running += cost
            return
        if len(self._waiters) >= self.limits.max_waiting:
            raise self._overloaded("the request queue is full")
        waiter = _Waiter(cost, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        wait = self.limits.max_wait_s if deadline_s is None else min(self.limits.max_wait_s, deadline_s)
        try:
            await asyncio.wait((waiter.future,), timeout=max(0.0, wait))
        except BaseException:  # cancelled while waiting: never keep a slot granted meanwhile
            self._leave(waiter)
            raise
        if waiter.future.done() and not waiter.future.cancelled():
            if waiter.future.result():
                return  # admitted (possibly in the very instant the wait ran out: keep it)
            raise self._unavailable()
        self._leave(waiter)
        raise self._overloaded(f"no capacity within {math.ceil(wait)} s")

    def _leave(self, waiter: _Waiter) -> None:
        """``waiter`` gives up: return a slot it was granted, or take it out of the queue."""
        future = waiter.future
        if future.done() and not future.cancelled():
            if future.result():
                self._release(waiter.cost)
            return
        future.cancel()
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        self._wake()  # it may have been the head that blocked smaller requests behind it

    def _release(self, cost: int) -> None:
        self._running -= cost
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters[0]
            if waiter.future.done():
                self._waiters.popleft()
                continue
            if self._running + waiter.cost > self.limits.max_running:
                return
            self._waiters.popleft()
            self._running += waiter.cost
            waiter.future.set_result(True)

    def _unavailable(self) -> ApiError:
        return ApiError(ErrorKind.UNAVAILABLE, "the server is draining; retry on another replica", retry_after_s=1)

    def _overloaded(self, why: str) -> ApiError:
        self.rejected += 1
        return ApiError(ErrorKind.OVERLOADED, f"server overloaded: {why}", retry_after_s=self.limits.retry_after_s)
