"""Parsing /metrics bodies into snapshots, their window deltas, and PromQL-style quantiles and rates.

The histograms are made by prometheus_client itself (observe known values, render, parse), and every
quantile is compared with the exact quantile of the observed values: the estimate must fall in the
bucket that holds the exact value (that is all a histogram can resolve).
"""

from __future__ import annotations

import math
import random
import time
from bisect import bisect_left

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from k2serve.cluster.metric_window import (
    MetricSnapshot,
    MetricsParseError,
    merge,
    observations,
    parse_snapshot,
    quantile,
    rate,
    window_delta,
)
from k2serve.workers.request_metrics import TTFT_BUCKETS

NAME = "k2serve_time_to_first_token_seconds"


class Process:
    """One exporting process: a TTFT histogram and a request counter with two label sets each."""

    def __init__(self, buckets: tuple[float, ...] = TTFT_BUCKETS) -> None:
        self.registry = CollectorRegistry()
        self.ttft = Histogram(NAME, "ttft", ["model_name"], buckets=buckets, registry=self.registry)
        self.finished = Counter(
            "k2serve_request_success", "done", ["model_name", "finished_reason"], registry=self.registry
        )
        Gauge("k2serve_unrelated", "noise", registry=self.registry).set(7)

    def observe(self, values: list[float], model: str = "m") -> None:
        for v in values:
            self.ttft.labels(model).observe(v)
            self.finished.labels(model, "stop" if v < 1 else "length").inc()

    def snapshot(self, families: tuple[str, ...] | None = None) -> MetricSnapshot:
        return parse_snapshot(generate_latest(self.registry).decode(), families)


def exact_quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def same_bucket(estimate: float, exact: float, bounds: tuple[float, ...] = TTFT_BUCKETS) -> bool:
    """True when both fall in the same (lower, upper] bucket (the +Inf bucket reports the last bound)."""
    if exact > bounds[-1]:
        return estimate == bounds[-1]
    i = bisect_left(bounds, exact)
    lower = bounds[i - 1] if i > 0 else 0.0
    return lower <= estimate <= bounds[i]


def lognormal(seed: int, n: int, mu: float = -1.0, sigma: float = 1.2) -> list[float]:
    rng = random.Random(seed)
    return [rng.lognormvariate(mu, sigma) for _ in range(n)]


@pytest.mark.parametrize("q", [0.5, 0.9, 0.99])
def test_quantile_falls_in_the_bucket_of_the_exact_quantile(q: float) -> None:
    p, values = Process(), lognormal(1, 2000)
    p.observe(values[:1000], "a")
    p.observe(values[1000:], "b")  # two label sets: summed by le
    snap = p.snapshot()
    assert observations(snap, NAME) == 2000
    estimate = quantile(snap, NAME, q)
    assert estimate is not None and same_bucket(estimate, exact_quantile(values, q))


def test_quantile_interpolates_linearly_inside_the_bucket() -> None:
    p = Process(buckets=(1.0, 2.0, 4.0))
    p.observe([0.5] * 10 + [3.0] * 10)  # 10 in (0, 1], 10 in (2, 4]
    snap = p.snapshot()
    assert quantile(snap, NAME, 0.25) == pytest.approx(0.5)  # rank 5 of 10 in (0, 1]
    assert quantile(snap, NAME, 0.75) == pytest.approx(3.0)  # rank 15: 5 of 10 in (2, 4]
    assert quantile(snap, NAME, 1.0) == pytest.approx(4.0)


def test_observations_beyond_the_last_bound_report_the_last_finite_bound() -> None:
    p = Process(buckets=(0.1, 1.0))
    p.observe([0.05, 5.0, 6.0, 7.0])
    assert quantile(p.snapshot(), NAME, 0.9) == 1.0


def test_no_observations_or_no_series_gives_none() -> None:
    snap = Process().snapshot()
    assert observations(snap, NAME) == 0
    assert quantile(snap, NAME, 0.9) is None
    assert quantile(snap, "k2serve_no_such_histogram", 0.9) is None


@pytest.mark.parametrize("q", [-0.1, 1.5, math.nan])
def test_quantile_outside_zero_one_is_refused(q: float) -> None:
    with pytest.raises(ValueError, match="quantile q"):
        quantile(Process().snapshot(), NAME, q)


def test_window_delta_keeps_only_what_was_observed_in_between() -> None:
    p = Process()
    before, during = lognormal(2, 1000, mu=1.5), lognormal(3, 500, mu=-2.0)  # slow then fast: they differ
    p.observe(before)
    old = p.snapshot()
    p.observe(during)
    d = window_delta(p.snapshot(), old)
    assert observations(d, NAME) == 500
    assert d.values[f"{NAME}_count"] == 500
    assert d.values[f"{NAME}_sum"] == pytest.approx(sum(during))
    assert d.values["k2serve_request_success_total"] == 500
    estimate = quantile(d, NAME, 0.9)
    assert estimate is not None and same_bucket(estimate, exact_quantile(during, 0.9))
    assert not same_bucket(estimate, exact_quantile(before + during, 0.9))


def test_a_counter_that_went_down_restarted_and_its_new_value_is_the_delta() -> None:
    old_process, new_process = Process(), Process()
    old_process.observe([0.2] * 100)
    new_process.observe([0.2] * 7)
    d = window_delta(new_process.snapshot(), old_process.snapshot())
    assert d.values["k2serve_request_success_total"] == 7
    assert observations(d, NAME) == 7


def test_a_restart_that_already_counted_past_the_old_value_is_seen_through_created(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(time, "time", lambda: 1000.0)
    old_process = Process()
    old_process.observe([0.2] * 5)
    old = old_process.snapshot()
    monkeypatch.setattr(time, "time", lambda: 2000.0)
    new_process = Process()
    new_process.observe([0.2] * 9)
    d = window_delta(new_process.snapshot(), old)
    assert d.values["k2serve_request_success_total"] == 9  # not 9 - 5
    assert observations(d, NAME) == 9


def test_merge_of_processes_equals_one_histogram_of_all_values() -> None:
    a, b, values_a, values_b = Process(), Process(), lognormal(4, 800), lognormal(5, 300, mu=0.5)
    a.observe(values_a)
    b.observe(values_b)
    merged = merge([a.snapshot(), b.snapshot()])
    assert observations(merged, NAME) == 1100
    assert merged.values["k2serve_request_success_total"] == 1100
    estimate = quantile(merged, NAME, 0.9)
    assert estimate is not None and same_bucket(estimate, exact_quantile(values_a + values_b, 0.9))


def test_merge_of_different_bucket_layouts_stays_cumulative() -> None:
    a, b = Process(buckets=(1.0, 2.0)), Process(buckets=(1.5,))
    a.observe([0.5, 1.8])
    b.observe([1.2, 3.0])
    merged = merge([a.snapshot(), b.snapshot()]).buckets[NAME]
    counts = [c for _, c in merged]
    assert [le for le, _ in merged] == [1.0, 1.5, 2.0, math.inf]
    assert counts == sorted(counts) and counts[-1] == 4
    assert dict(merged)[1.5] == 2  # 0.5 from a (counted at its bound 1.0) and 1.2 from b


def test_rate_is_the_delta_per_second() -> None:
    p = Process()
    old = p.snapshot()
    p.observe([0.1] * 30)
    d = window_delta(p.snapshot(), old)
    assert rate(d, "k2serve_request_success_total", 15.0) == pytest.approx(2.0)
    assert rate(d, "k2serve_request_success_total", 0.0) is None
    assert rate(d, "k2serve_absent_total", 15.0) is None


def test_families_filter_keeps_only_the_named_series() -> None:
    p = Process()
    p.observe([0.3])
    snap = p.snapshot(families=("k2serve_request_success",))
    assert set(snap.values) == {"k2serve_request_success_total"}
    assert snap.buckets == {}
    assert set(snap.created) == {"k2serve_request_success"}


def test_openmetrics_bodies_parse_to_the_same_snapshot() -> None:
    p = Process()
    p.observe(lognormal(6, 50))
    text = p.snapshot()
    om = parse_snapshot(generate_openmetrics(p.registry).decode())
    assert om.values["k2serve_request_success_total"] == text.values["k2serve_request_success_total"]
    assert om.buckets[NAME] == text.buckets[NAME]
    assert set(om.created) == set(text.created)


@pytest.mark.parametrize(
    "body", ["this is not metrics", 'x{le="1" 1', '# TYPE h histogram\nh_bucket{le="wide"} 1\nh_bucket{le="+Inf"} 1\n']
)
def test_a_bad_body_raises_a_parse_error_naming_its_source(body: str) -> None:
    with pytest.raises(MetricsParseError, match="decode-g0-r1") as info:
        parse_snapshot(body, source="decode-g0-r1")
    assert info.value.source == "decode-g0-r1"
