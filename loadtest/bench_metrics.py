"""``compute_metrics``: one sweep point's ``RequestRecord``s -> ``BenchMetrics``, as vLLM ``bench serve``.

Lifecycle: called once per sweep point after its last request ended; pure.

Definitions (vLLM ``benchmarks/serve.py``; times reported in ms):
- ``completed`` / ``failed``: successful / failed records; ``duration``: the point's wall time.
- ``request_throughput`` = completed / duration; ``output_throughput`` = Σ output tokens / duration;
  ``total_token_throughput`` = (Σ prompt + Σ output tokens) / duration (successful requests).
- ``ttft``, ``e2el`` per successful request; ``tpot`` = (latency − ttft) / (output − 1) per request
  with at least 2 output tokens (1-token requests are left out of TPOT stats and count as
  TPOT 0 for goodput); ``itl`` pooled over all gaps of all successful requests.
- each as mean / median / std (population) / percentiles (numpy linear interpolation); an empty
  list reports 0, as vLLM does.
- ``request_goodput`` = successful requests meeting every SLO of ``--goodput`` (ttft, tpot, e2el
  in ms; a value equal to the SLO meets it) / duration; None without SLOs.
- ``max_output_tokens_per_s``: the most token chunks in one whole second of the run (vLLM's
  per-second buckets); ``max_concurrency``: the peak number of requests in flight at once
  (overlap of [start, start + latency) over every sent request, failures included).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from k2serve.loadtest.bench_options import DEFAULT_PERCENTILES
from k2serve.loadtest.bench_request import RequestRecord

REPORTED_PERCENTILES = (50.0, 90.0, 99.0)  # always computed: the summary table and the plots use them
SLO_METRICS = ("ttft", "tpot", "e2el")
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


def parse_percentiles(text: str) -> tuple[float, ...]:
    """``"50,90,99"`` -> (50.0, 90.0, 99.0); each in (0, 100]."""
    try:
        values = tuple(float(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise ValueError(f"--metric-percentiles: expected numbers like 50,90,99, got {text!r}") from None
    if not values or any(not 0 < v <= 100 for v in values):
        raise ValueError(f"--metric-percentiles: every percentile must be in (0, 100], got {text!r}")
    return values


def parse_goodput(items: Sequence[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> {"ttft": 500.0, "tpot": 50.0} (ms)."""
    slos: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"--goodput: expected NAME:MS with NAME one of {', '.join(SLO_METRICS)}, got {item!r}")
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"--goodput: {item!r} is not NAME:MS") from None
        if not slos[name] > 0:
            raise ValueError(f"--goodput: {item!r} must be positive")
    return slos


def percentile_key(p: float) -> str:
    return f"p{int(p)}" if float(p).is_integer() else f"p{p:g}"


@dataclass(frozen=True)
class Distribution:
    """A latency distribution in ms."""

    mean: float
    median: float
    std: float
    percentiles: tuple[tuple[float, float], ...]  # (percentile, ms)

    @classmethod
    def of_seconds(cls, values: Sequence[float], percentiles: Sequence[float]) -> Distribution:
        ms = np.asarray(values, dtype=np.float64) * 1000.0
        if ms.size == 0:
            return cls(0.0, 0.0, 0.0, tuple((p, 0.0) for p in percentiles))
        points = tuple((p, float(np.percentile(ms, p))) for p in percentiles)
        return cls(float(np.mean(ms)), float(np.median(ms)), float(np.std(ms)), points)

    def p(self, q: float) -> float:
        return dict(self.percentiles)[q]


@dataclass(frozen=True)
class BenchMetrics:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    cached_prompt_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    request_goodput: float | None
    max_output_tokens_per_s: float
    max_concurrency: int
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2el: Distribution

    def distribution(self, name: str) -> Distribution:
        return {"ttft": self.ttft, "tpot": self.tpot, "itl": self.itl, "e2el": self.e2el}[name]

    def to_json(self) -> dict[str, Any]:
        """vLLM's result keys (``mean_ttft_ms``, ``p99_tpot_ms``, ...)."""
        out: dict[str, Any] = {
            "completed": self.completed,
            "failed": self.failed,
            "duration": self.duration_s,
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "request_throughput": self.request_throughput,
            "request_goodput": self.request_goodput,
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_token_throughput,
            "max_output_tokens_per_s": self.max_output_tokens_per_s,
            "max_concurrent_requests": self.max_concurrency,
        }
        for name in LATENCY_METRICS:
            d = self.distribution(name)
            out[f"mean_{name}_ms"], out[f"median_{name}_ms"], out[f"std_{name}_ms"] = d.mean, d.median, d.std
            for p, value in d.percentiles:
                out[f"{percentile_key(p)}_{name}_ms"] = value
        return out


def compute_metrics(
    records: Sequence[RequestRecord],
    duration_s: float,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    goodput_slos: Mapping[str, float] | None = None,
) -> BenchMetrics:
    if duration_s <= 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    ok = [r for r in records if r.success]
    wanted = tuple(sorted(set(percentiles) | set(REPORTED_PERCENTILES)))
    total_in, total_out = sum(r.prompt_tokens for r in ok), sum(r.output_tokens for r in ok)
    tpots = [t for r in ok if (t := r.tpot) is not None]
    return BenchMetrics(
        completed=len(ok),
        failed=len(records) - len(ok),
        duration_s=duration_s,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        cached_prompt_tokens=sum(r.cached_tokens for r in ok),
        request_throughput=len(ok) / duration_s,
        output_throughput=total_out / duration_s,
        total_token_throughput=(total_in + total_out) / duration_s,
        request_goodput=good_requests(ok, goodput_slos) / duration_s if goodput_slos else None,
        max_output_tokens_per_s=max_chunks_per_second(ok),
        max_concurrency=max_concurrency(records),
        ttft=Distribution.of_seconds([r.ttft for r in ok], wanted),
        tpot=Distribution.of_seconds(tpots, wanted),
        itl=Distribution.of_seconds([gap for r in ok for gap in r.itl], wanted),
        e2el=Distribution.of_seconds([r.latency for r in ok], wanted),
    )


def good_requests(ok: Sequence[RequestRecord], slos: Mapping[str, float]) -> int:
    def value_ms(r: RequestRecord, name: str) -> float:
        seconds = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.latency}[name]
        return seconds * 1000.0

    return sum(all(value_ms(r, name) <= slo for name, slo in slos.items()) for r in ok)


def max_concurrency(records: Sequence[RequestRecord]) -> int:
    events = sorted(
        [(r.start_time, 1) for r in records if r.latency > 0]
        + [(r.start_time + r.latency, -1) for r in records if r.latency > 0]
    )  # at equal times the end (-1) sorts first: intervals are half-open
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def max_chunks_per_second(ok: Sequence[RequestRecord]) -> float:
    if not ok:
        return 0.0
    origin = min(r.start_time for r in ok)
    buckets = np.zeros(math.ceil(max(r.start_time + r.latency for r in ok) - origin) + 1)
    for r in ok:
        t = r.start_time + r.ttft
        times = [t]
        for gap in r.itl:
            t += gap
            times.append(t)
        for t in times:
            buckets[min(int(t - origin), buckets.size - 1)] += 1
    return float(buckets.max())
