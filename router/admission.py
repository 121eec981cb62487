"""``Admission``: the router's bounded queue in front of the workers (429 before any stream byte).

Lifecycle: one per router process, shared by REST and gRPC. ``async with admission.slot(cost)``
around one request's whole life: at most ``max_running`` cost units run at once (a request with
``n`` choices costs ``n``); up to ``max_waiting`` more wait, in arrival order, at most
``max_wait_s`` (or the client's own deadline when shorter); anyone beyond that, or whose wait runs
out, gets ``ApiError(OVERLOADED)`` with a ``Retry-After`` at once. ``draining`` refuses every new
request with UNAVAILABLE (503) while the running ones finish.
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


class Admission:
    def __init__(self, limits: AdmissionLimits = AdmissionLimits()) -> None:
        self.limits = limits
        self._running = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self.draining = False
        self.rejected = 0  # requests refused for overload (a counter for metrics)

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def slot(self, cost: int = 1, *, deadline_s: float | None = None) -> AsyncIterator[None]:
        cost = max(1, min(cost, self.limits.max_running))
        await self._acquire(cost, deadline_s)
        try:
            yield
        finally:
            self._running -= cost
            self._wake()

    async def _acquire(self, cost: int, deadline_s: float | None) -> None:
        if self.draining:
            raise ApiError(ErrorKind.UNAVAILABLE, "the server is draining; retry on another replica", retry_after_s=1)
        if not self._waiters and self._running + cost <= self.limits.max_running:
            self._running += cost
            return
        if len(self._waiters) >= self.limits.max_waiting:
            raise self._overloaded("the request queue is full")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (cost, future)
        self._waiters.append(entry)
        wait = self.limits.max_wait_s if deadline_s is None else min(self.limits.max_wait_s, deadline_s)
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout=max(0.0, wait))
        except TimeoutError:
            if future.done() and not future.cancelled():  # granted just as the wait ran out: keep it
                return
            raise self._overloaded(f"no capacity within {math.ceil(wait)} s") from None
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._running -= cost  # granted, but the caller left: give it back
                self._wake()
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)
            if not future.done():
                future.cancel()

    def _wake(self) -> None:
        while self._waiters:
            cost, future = self._waiters[0]
            if future.done():
                self._waiters.popleft()
                continue
            if self._running + cost > self.limits.max_running:
                return
            self._waiters.popleft()
            self._running += cost
            future.set_result(None)

    def _overloaded(self, why: str) -> ApiError:
        self.rejected += 1
        return ApiError(ErrorKind.OVERLOADED, f"server overloaded: {why}", retry_after_s=self.limits.retry_after_s)
