"""``LoadMonitor``: the latest ``GetLoad`` report of every live worker, for the routing policies.

Lifecycle: built and started by ``Dispatcher.start_monitor()`` over a callable that lists the
dispatcher's current workers; ``stop()`` (from ``Dispatcher.close()``) cancels it. Every
``interval_s`` it asks all of them at once, each call bounded by ``timeout_s``. A report is kept
with the router's own in-flight count around the call (``policy.WorkerLoad.requests`` needs both)
and is served by ``latest`` until it is ``stale_after_s`` old. A failed call (timeout, dead
worker, closed channel, anything) drops the worker's report, i.e. marks it stale: the policies then
use the router's own count. Nothing here raises into the dispatcher; a worker that leaves the set
stops being polled at the next round and its report is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from k2serve.proto import worker_pb2

log = logging.getLogger(__name__)


class LoadTarget(Protocol):
    """One worker as the monitor polls it (``WorkerClient`` is one)."""

    @property
    def worker_id(self) -> str: ...

    @property
    def in_flight(self) -> int: ...

    async def get_load(self, timeout_s: float) -> worker_pb2.Load: ...


@dataclass(frozen=True)
class LoadReport:
    worker_id: str
    waiting: int
    running: int
    kv_usage: float
    draining: bool
    in_flight_at_report: int  # the router's calls on the worker around the call (the larger of asked, answered)
    at: float  # monotonic seconds


class LoadMonitor:
    def __init__(
        self,
        targets: Callable[[], Iterable[LoadTarget]],
        *,
        interval_s: float = 0.5,
        timeout_s: float = 1.0,
        stale_after_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0 or timeout_s <= 0:
            raise ValueError(f"need interval_s > 0 and timeout_s > 0, got {interval_s} and {timeout_s}")
        self._targets = targets
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.stale_after_s = stale_after_s if stale_after_s is not None else 4 * interval_s
        self._clock = clock
        self._reports: dict[str, LoadReport] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Poll in the background from now on (idempotent; needs a running event loop)."""
        if not self.running:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="load-monitor")

    async def stop(self) -> None:
        """Cancel the polling task and wait for it to end. A cancel of the caller itself propagates
        (``gather`` passes it on, where ``suppress(CancelledError)`` would swallow it)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def latest(self, worker_id: str) -> LoadReport | None:
        """The worker's last report, None when there is none or it is stale."""
        report = self._reports.get(worker_id)
        if report is None or self._clock() - report.at > self.stale_after_s:
            return None
        return report

    def forget(self, worker_id: str) -> None:
        self._reports.pop(worker_id, None)

    async def poll_once(self) -> None:
        """Ask every current worker once (concurrently, each bounded); never raises."""
        targets = list(self._targets())
        current = {t.worker_id for t in targets}
        for worker_id in [w for w in self._reports if w not in current]:
            del self._reports[worker_id]
        await asyncio.gather(*(self._poll(t) for t in targets))

    async def _run(self) -> None:
        while True:
            started = self._clock()
            try:
                await self.poll_once()
            except Exception:  # a bug in a target; keep the monitor alive, the reports go stale
                log.exception("load monitor round failed")
            await asyncio.sleep(max(0.0, self.interval_s - (self._clock() - started)))

    async def _poll(self, target: LoadTarget) -> None:
        worker_id = target.worker_id
        asked_with = target.in_flight
        try:
            async with asyncio.timeout(self.timeout_s):
                load = await target.get_load(self.timeout_s)
        except Exception as exc:  # timeout, dead worker, closed channel: the report is stale
            if self._reports.pop(worker_id, None) is not None:
                log.debug("GetLoad of %s failed (%s); its load report is stale", worker_id, exc)
            return
        if not any(t is target for t in self._targets()):
            return  # the worker left (or was replaced) while the call ran
        self._reports[worker_id] = LoadReport(
            worker_id=worker_id,
            waiting=load.waiting,
            running=load.running,
            kv_usage=load.kv_usage,
            draining=load.draining or load.engine_failed,  # a dead engine takes no request either
            # the worker counted its requests somewhere between the two: the larger never takes this
            # router's own requests (just ended or just sent) for another router's
            in_flight_at_report=max(asked_with, target.in_flight),
            at=self._clock(),
        )
