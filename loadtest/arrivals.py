"""Open-loop arrival times and the in-flight cap, as vLLM ``bench serve`` draws them.

Lifecycle: ``arrival_offsets(n, rate, burstiness, seed)`` once per sweep point gives the send time
of each conversation (a request, or an agentic session's first round) in seconds from the point's
start; ``ConcurrencyCap`` is created per point and entered around every request.

- ``rate = inf``: everything at once (all offsets 0).
- otherwise the gaps are gamma distributed with shape ``burstiness`` and scale
  ``1 / (rate * burstiness)``: mean ``1 / rate`` whatever the burstiness; ``burstiness = 1`` is a
  Poisson process (exponential gaps, coefficient of variation 1); the CV is
  ``1 / sqrt(burstiness)``, so < 1 is burstier and > 1 more uniform. The first arrival is at 0.
- ``max_concurrency``: a semaphore; None = no cap. It also counts the peak it saw.
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType

import numpy as np


def arrival_offsets(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    if n <= 0:
        return []
    if rate <= 0:
        raise ValueError(f"--request-rate must be positive (or inf), got {rate}")
    if burstiness <= 0:
        raise ValueError(f"--burstiness must be positive, got {burstiness}")
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


class ConcurrencyCap:
    """``async with cap:`` around a request: waits for a slot when capped; tracks in-flight counts."""

    def __init__(self, max_concurrency: int | None) -> None:
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be at least 1, got {max_concurrency}")
        self.max_concurrency = max_concurrency
        self._semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        self.in_flight = 0
        self.peak = 0

    async def __aenter__(self) -> ConcurrencyCap:
        if self._semaphore is not None:
            await self._semaphore.acquire()
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.in_flight -= 1
        if self._semaphore is not None:
            self._semaphore.release()
