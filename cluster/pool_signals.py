"""``SignalCollector``: the autoscaler's view of each pool, from a short history of rank and router samples.

Lifecycle: the autoscaler loop builds one per controller with ``window_s``; every round it calls
``observe(now, samples, router_texts)`` with what it just collected (each rank's ``GetLoad`` figures,
cumulative busy time and /metrics body; each router's /metrics body) and then ``signals(pool, ready,
desired)`` for every pool, which it hands to ``ScalePolicy.decide``. Nothing here does I/O or reads a
clock: ``now`` comes from the caller, so tests replay time.

Per rank, ``signals`` compares the newest observation with the oldest one inside the window that has
the rank (a rank that joined mid-window gets a shorter window; one present only in the newest
contributes its instantaneous figures and no rates; one that vanished is ignored). Counter resets (a
restarted rank) count from zero, as Prometheus' ``rate`` does. Rates are summed over a pool's ranks;
histograms are merged, then read as p90. TTFT and ITL come from the routers (what clients see,
including the router's admission queue) when router bodies were given and observed something in the
window, else from the ranks: TTFT only for prefill and colocated pools, ITL only for decode and
colocated. Metrics bodies are parsed once, on arrival, and only the families used here are kept;
the history holds at most ``max_history`` observations and none older than the window (+10%).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace

from k2serve.cluster.metric_window import (
    MetricSnapshot,
    MetricsParseError,
    merge,
    observations,
    parse_snapshot,
    quantile,
    window_delta,
)

POOLS = ("prefill", "decode", "colocated")
QUEUE_TIME = "k2serve_request_queue_time_seconds"
TTFT = "k2serve_time_to_first_token_seconds"
ITL = "k2serve_inter_token_latency_seconds"
FINISHED = "k2serve_request_success"
PROMPT_TOKENS = "k2serve_prompt_tokens"
GENERATION_TOKENS = "k2serve_generation_tokens"
ROUTER_TTFT = "k2serve_router_time_to_first_token_seconds"
ROUTER_ITL = "k2serve_router_inter_token_latency_seconds"
RANK_FAMILIES = frozenset({QUEUE_TIME, TTFT, ITL, FINISHED, PROMPT_TOKENS, GENERATION_TOKENS})
ROUTER_FAMILIES = frozenset({ROUTER_TTFT, ROUTER_ITL})
P = 0.9
WINDOW_SLACK = 0.1  # a baseline up to 10% older than window_s still counts: loop jitter must not halve the window


class SignalInputError(ValueError):
    """A sample or argument the collector cannot use; ``field`` names it."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field


@dataclass(frozen=True)
class RankSample:
    worker_id: str  # "{pool}-g{group}-r{rank}"
    pool: str  # prefill | decode | colocated
    group: int
    waiting: int  # GetLoad: requests waiting to be scheduled now
    running: int  # GetLoad: sequences running now
    kv_usage: float  # GetLoad: used / all KV blocks, 0..1
    handoffs_waiting: int  # GetLoad: Decode calls waiting for free KV blocks now (decode queue)
    busy_seconds: float  # cumulative seconds this rank's engine spent in steps with work
    oldest_waiting_s: float  # age of this rank's oldest waiting request now (0: none waiting)
    metrics_text: str | None  # the rank's Prometheus /metrics body (None: scrape failed)

    def __post_init__(self) -> None:
        where = f"RankSample({self.worker_id!r})"
        if self.pool not in POOLS:
            raise SignalInputError(f"{where}.pool", f"expected one of {', '.join(POOLS)}, got {self.pool!r}")
        for name in ("group", "waiting", "running", "handoffs_waiting"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise SignalInputError(f"{where}.{name}", f"expected an integer >= 0, got {value!r}")
        if not _finite(self.kv_usage) or not 0.0 <= self.kv_usage <= 1.0:
            raise SignalInputError(f"{where}.kv_usage", f"expected a fraction in [0, 1], got {self.kv_usage!r}")
        for name in ("busy_seconds", "oldest_waiting_s"):
            value = getattr(self, name)
            if not _finite(value) or value < 0:
                raise SignalInputError(f"{where}.{name}", f"expected seconds >= 0, got {value!r}")


@dataclass(frozen=True)
class PoolSignals:
    pool: str
    ready_groups: int
    desired_groups: int
    window_s: float  # span the rates cover (the longest of the pool's ranks); 0.0: a single sample, no rates
    waiting: int = 0  # sums over the pool's ranks now
    running: int = 0
    handoffs_waiting: int = 0
    kv_usage: float = 0.0  # mean over the ranks now
    kv_usage_max: float = 0.0
    oldest_waiting_s: float = 0.0  # max over the ranks now
    utilization: float | None = None  # mean busy fraction over the window, in [0, 1]
    queue_wait_p90_s: float | None = None  # None: no observation in the window
    ttft_p90_s: float | None = None
    itl_p90_s: float | None = None
    requests_per_s: float | None = None  # finished requests (every reason); None: no window
    busy_s_per_request: float | None = None  # busy group-seconds per finished request; None: none finished
    prompt_tokens_per_s: float | None = None
    generation_tokens_per_s: float | None = None


@dataclass(frozen=True)
class _Observation:
    now: float
    ranks: dict[str, tuple[RankSample, MetricSnapshot | None]]  # samples without their text
    routers: tuple[MetricSnapshot | None, ...]  # by position in the router list; None: no usable body


@dataclass(frozen=True)
class _RankWindow:
    """One rank's change between its baseline and now."""

    span_s: float
    busy_s: float
    metrics_span_s: float  # 0.0: no metrics baseline
    metrics_busy_s: float  # busy seconds over the metrics span
    metrics: MetricSnapshot | None


class SignalCollector:
    def __init__(self, window_s: float, max_history: int = 256) -> None:
        if not _finite(window_s) or window_s <= 0:
            raise SignalInputError("window_s", f"expected seconds > 0, got {window_s!r}")
        if max_history < 2:
            raise SignalInputError("max_history", f"expected >= 2, got {max_history!r}")
        self.window_s = window_s
        self._history: deque[_Observation] = deque(maxlen=max_history)
        self.parse_errors: tuple[str, ...] = ()  # sources whose body the last observe could not parse

    @property
    def observations(self) -> int:
        """Observations held (bounded by ``max_history`` and the window)."""
        return len(self._history)

    def observe(self, now: float, samples: Sequence[RankSample], router_texts: Sequence[str | None] = ()) -> None:
        """Record one round. ``router_texts[i]`` is router i's /metrics body (None: scrape failed); keep
        the order stable between rounds. A body that does not parse counts as a failed scrape and is
        listed in ``parse_errors``."""
        if not _finite(now) or (self._history and now < self._history[-1].now):
            raise SignalInputError("now", f"expected a finite time >= the last observation's, got {now!r}")
        errors: list[str] = []
        ranks: dict[str, tuple[RankSample, MetricSnapshot | None]] = {}
        for s in samples:
            if s.worker_id in ranks:
                raise SignalInputError("samples", f"worker {s.worker_id!r} appears twice")
            ranks[s.worker_id] = (replace(s, metrics_text=None), _parse(s.metrics_text, RANK_FAMILIES, s.worker_id, errors))  # fmt: skip
        routers = tuple(_parse(t, ROUTER_FAMILIES, f"router[{i}]", errors) for i, t in enumerate(router_texts))
        self._history.append(_Observation(now, ranks, routers))
        self.parse_errors = tuple(errors)
        horizon = now - self.window_s * (1 + WINDOW_SLACK)
        while self._history[0].now < horizon:
            self._history.popleft()

    def signals(self, pool: str, ready_groups: int, desired_groups: int) -> PoolSignals:
        if pool not in POOLS:
            raise SignalInputError("pool", f"expected one of {', '.join(POOLS)}, got {pool!r}")
        for name, value in (("ready_groups", ready_groups), ("desired_groups", desired_groups)):
            if not isinstance(value, int) or value < 0:
                raise SignalInputError(name, f"expected an integer >= 0, got {value!r}")
        empty = PoolSignals(pool, ready_groups, desired_groups, 0.0)
        if not self._history:
            return empty
        newest = self._history[-1]
        now = [s for s, _ in newest.ranks.values() if s.pool == pool]
        if not now:
            return empty
        gauges = replace(
            empty,
            waiting=sum(s.waiting for s in now),
            running=sum(s.running for s in now),
            handoffs_waiting=sum(s.handoffs_waiting for s in now),
            kv_usage=sum(s.kv_usage for s in now) / len(now),
            kv_usage_max=max(s.kv_usage for s in now),
            oldest_waiting_s=max(s.oldest_waiting_s for s in now),
        )
        windows = [w for s in now if (w := self._rank_window(s.worker_id)) is not None]
        if not windows:
            return gauges
        return self._with_rates(gauges, windows, ranks_per_group=len(now) / len({s.group for s in now}))

    def _with_rates(self, g: PoolSignals, windows: list[_RankWindow], ranks_per_group: float) -> PoolSignals:
        utilization = sum(min(1.0, max(0.0, w.busy_s / w.span_s)) for w in windows) / len(windows)
        measured = [(w.metrics, w) for w in windows if w.metrics is not None]
        delta = merge(m for m, _ in measured)
        finished = delta.values.get(f"{FINISHED}_total", 0.0)

        def per_s(name: str) -> float | None:
            return sum(m.values.get(name, 0.0) / w.metrics_span_s for m, w in measured) if measured else None

        # busy rank-seconds / ranks per group = busy group-seconds, the unit W = utilization x groups uses
        busy = sum(w.metrics_busy_s for _, w in measured) / ranks_per_group
        routers = self._router_delta()
        ttft = _end_to_end(routers, ROUTER_TTFT, delta, TTFT) if g.pool in ("prefill", "colocated") else None
        itl = _end_to_end(routers, ROUTER_ITL, delta, ITL) if g.pool in ("decode", "colocated") else None
        return replace(
            g,
            window_s=max(w.span_s for w in windows),
            utilization=utilization,
            queue_wait_p90_s=_p90(delta, QUEUE_TIME),
            ttft_p90_s=ttft,
            itl_p90_s=itl,
            requests_per_s=per_s(f"{FINISHED}_total"),
            busy_s_per_request=busy / finished if finished > 0 else None,
            prompt_tokens_per_s=per_s(f"{PROMPT_TOKENS}_total"),
            generation_tokens_per_s=per_s(f"{GENERATION_TOKENS}_total"),
        )

    def _in_window(self) -> list[_Observation]:
        """Observations older than the newest and within the window, oldest first."""
        newest = self._history[-1]
        limit = self.window_s * (1 + WINDOW_SLACK)
        return [o for o in self._history if o.now < newest.now and newest.now - o.now <= limit]

    def _rank_window(self, worker_id: str) -> _RankWindow | None:
        newest = self._history[-1]
        sample, metrics = newest.ranks[worker_id]
        past = [(o.now, *o.ranks[worker_id]) for o in self._in_window() if worker_id in o.ranks]
        if not past:
            return None
        since, base, _ = past[0]
        window = _RankWindow(newest.now - since, _grew(sample.busy_seconds, base.busy_seconds), 0.0, 0.0, None)
        # the metrics baseline may be younger than the busy one (a scrape failed at the start of the window)
        m_since, m_base, m_old = next(((t, b, m) for t, b, m in past if m is not None), (0.0, base, None))
        if metrics is None or m_old is None:
            return window
        return replace(
            window,
            metrics_span_s=newest.now - m_since,
            metrics_busy_s=_grew(sample.busy_seconds, m_base.busy_seconds),
            metrics=window_delta(metrics, m_old),
        )

    def _router_delta(self) -> MetricSnapshot:
        newest = self._history[-1]
        past = self._in_window()
        deltas: list[MetricSnapshot] = []
        for i, current in enumerate(newest.routers):
            base = next((o.routers[i] for o in past if i < len(o.routers) and o.routers[i] is not None), None)
            if current is not None and base is not None:
                deltas.append(window_delta(current, base))
        return merge(deltas)


def _parse(text: str | None, families: frozenset[str], source: str, errors: list[str]) -> MetricSnapshot | None:
    if text is None:
        return None
    try:
        return parse_snapshot(text, families, source)
    except MetricsParseError:
        errors.append(source)
        return None


def _p90(d: MetricSnapshot, histogram: str) -> float | None:
    return quantile(d, histogram, P) if observations(d, histogram) > 0 else None


def _end_to_end(routers: MetricSnapshot, router_name: str, ranks: MetricSnapshot, rank_name: str) -> float | None:
    """The routers' p90 when they observed anything in the window, else the ranks'."""
    seen = _p90(routers, router_name)
    return seen if seen is not None else _p90(ranks, rank_name)


def _grew(now: float, before: float) -> float:
    """A cumulative counter's growth; one that went down restarted from zero."""
    return now if now < before else now - before


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
