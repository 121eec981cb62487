"""``EngineObserver``: what an engine reports about its requests as it runs them (for metrics).

Lifecycle: an ``Engine`` holds one observer (``NullObserver`` until its owner sets
``engine.observer``, e.g. the worker's ``RequestMetrics``) and calls it on the engine's own thread:
``on_step`` once per step that ran the model, with the scheduled plan; ``on_token`` after every
token a request samples on this rank (the request already holds it); ``on_finished`` exactly once
per request (each child of an ``n > 1`` request) with its terminal status, whether it finished in a
step, was aborted or failed with its group. An observer is cheap, never raises, and may record
milestones in ``request.times``; it never changes anything else.
"""

from __future__ import annotations

from typing import Protocol

from k2serve.workers.request import Request, RequestStatus
from k2serve.workers.scheduler import SchedulerOutput


class EngineObserver(Protocol):
    def on_step(self, plan: SchedulerOutput) -> None: ...

    def on_token(self, request: Request) -> None: ...

    def on_finished(self, request: Request, status: RequestStatus) -> None: ...


class NullObserver:
    """Observes nothing (an engine without metrics, the offline runner, the tests)."""

    def on_step(self, plan: SchedulerOutput) -> None:
        return None

    def on_token(self, request: Request) -> None:
        return None

    def on_finished(self, request: Request, status: RequestStatus) -> None:
        return None
