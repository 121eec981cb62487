"""``SignalCollector``: a pool's gauges now, and its rates and p90s over the window, from rank and router samples.

Rank bodies come from real prometheus_client registries with the ranks' series names and buckets;
router bodies from the real ``RouterMetrics``. Time is passed in, never slept.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from k2serve.cluster.metric_window import parse_snapshot
from k2serve.cluster.pool_signals import (
    FINISHED,
    GENERATION_TOKENS,
    ITL,
    PROMPT_TOKENS,
    QUEUE_TIME,
    RANK_FAMILIES,
    ROUTER_FAMILIES,
    TTFT,
    PoolSignals,
    RankSample,
    SignalCollector,
    SignalInputError,
)
from k2serve.router.admission import Admission
from k2serve.router.dispatcher import Dispatcher
from k2serve.router.router_metrics import RouterMetrics
from k2serve.workers.request_metrics import ITL_BUCKETS, REQUEST_TIME_BUCKETS, TTFT_BUCKETS, RequestMetrics


class RankExporter:
    """A rank's request series (RequestMetrics' names and buckets) that a test can feed directly."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.queue = Histogram(QUEUE_TIME, "q", labels, buckets=REQUEST_TIME_BUCKETS, registry=r).labels("k2")
        self.ttft = Histogram(TTFT, "t", labels, buckets=TTFT_BUCKETS, registry=r).labels("k2")
        self.itl = Histogram(ITL, "i", labels, buckets=ITL_BUCKETS, registry=r).labels("k2")
        self.finished = Counter(FINISHED, "f", [*labels, "finished_reason"], registry=r)
        self.prompt = Counter(PROMPT_TOKENS, "p", labels, registry=r).labels("k2")
        self.generated = Counter(GENERATION_TOKENS, "g", labels, registry=r).labels("k2")
        self.busy_s = 0.0

    def serve(self, n: int, ttft_s: float = 0.2, queue_s: float = 0.1, itl_s: float = 0.02, busy_s: float = 0.0) -> None:  # fmt: skip
        for _ in range(n):
            self.queue.observe(queue_s)
            self.ttft.observe(ttft_s)
            self.itl.observe(itl_s)
            self.finished.labels("k2", "stop").inc()
            self.prompt.inc(100)
            self.generated.inc(10)
        self.busy_s += busy_s

    def sample(self, worker_id: str, **now: float | int) -> RankSample:
        pool, group = worker_id.split("-g")[0], int(worker_id.split("-g")[1].split("-r")[0])
        fields: dict[str, float | int] = dict(waiting=0, running=0, kv_usage=0.0, handoffs_waiting=0, oldest_waiting_s=0.0)  # fmt: skip
        fields.update(now)
        return RankSample(
            worker_id=worker_id,
            pool=pool,
            group=group,
            busy_seconds=self.busy_s,
            metrics_text=generate_latest(self.registry).decode(),
            **fields,
        )


def router() -> RouterMetrics:
    return RouterMetrics("k2", Admission(), Dispatcher())


def body(m: RouterMetrics) -> str:
    return generate_latest(m.registry).decode()


def test_the_series_read_here_are_the_ones_ranks_and_routers_export() -> None:
    registry = CollectorRegistry()
    RequestMetrics("k2", registry, 4096)
    rank = parse_snapshot(generate_latest(registry).decode())
    assert set(RANK_FAMILIES) <= set(rank.created), "a rank series was renamed: update pool_signals"
    r = router()
    r.observe_first_token(0.1)  # the router's latency series appear with their first observation
    r.observe_token_gap(0.01)
    routers = parse_snapshot(body(r))
    assert set(ROUTER_FAMILIES) <= set(routers.buckets), "a router series was renamed: update pool_signals"


def test_gauges_are_the_newest_samples_of_the_pools_ranks_only() -> None:
    c, a, b, other = SignalCollector(30.0), RankExporter(), RankExporter(), RankExporter()
    c.observe(0.0, [a.sample("decode-g0-r0", waiting=9)])
    c.observe(
        10.0,
        [
            a.sample("decode-g0-r0", waiting=1, running=5, kv_usage=0.2, handoffs_waiting=1, oldest_waiting_s=0.5),
            b.sample("decode-g1-r0", waiting=2, running=7, kv_usage=0.6, handoffs_waiting=2, oldest_waiting_s=1.5),
            other.sample("prefill-g0-r0", waiting=50, running=1, kv_usage=1.0, oldest_waiting_s=99.0),
        ],
    )
    s = c.signals("decode", ready_groups=2, desired_groups=3)
    assert (s.pool, s.ready_groups, s.desired_groups) == ("decode", 2, 3)
    assert (s.waiting, s.running, s.handoffs_waiting) == (3, 12, 3)
    assert s.kv_usage == pytest.approx(0.4) and s.kv_usage_max == pytest.approx(0.6)
    assert s.oldest_waiting_s == 1.5


def test_a_single_observation_has_no_window_and_no_rates() -> None:
    c, a = SignalCollector(30.0), RankExporter()
    a.serve(10, busy_s=5.0)
    c.observe(100.0, [a.sample("prefill-g0-r0", waiting=4)])
    s = c.signals("prefill", 1, 1)
    assert s.window_s == 0.0 and s.waiting == 4
    assert s.utilization is None and s.requests_per_s is None and s.busy_s_per_request is None
    assert s.ttft_p90_s is None and s.queue_wait_p90_s is None


def test_utilization_is_the_mean_busy_fraction_over_the_window_clipped_to_one() -> None:
    c, a, b = SignalCollector(30.0), RankExporter(), RankExporter()
    c.observe(0.0, [a.sample("prefill-g0-r0"), b.sample("prefill-g1-r0")])
    a.busy_s += 15.0  # half of 30 s
    b.busy_s += 45.0  # more than the span (timer skew): counts as fully busy
    c.observe(30.0, [a.sample("prefill-g0-r0"), b.sample("prefill-g1-r0")])
    s = c.signals("prefill", 2, 2)
    assert s.window_s == 30.0
    assert s.utilization == pytest.approx((0.5 + 1.0) / 2)


def test_rates_and_p90s_cover_only_what_happened_inside_the_window() -> None:
    c, a = SignalCollector(30.0), RankExporter()
    a.serve(500, ttft_s=30.0, queue_s=20.0, busy_s=100.0)  # long before: slow
    c.observe(0.0, [a.sample("prefill-g0-r0")])
    c.observe(10.0, [a.sample("prefill-g0-r0")])
    a.serve(60, ttft_s=0.3, queue_s=0.2, busy_s=12.0)
    c.observe(40.0, [a.sample("prefill-g0-r0")])  # t=0 is now outside the window: baseline t=10
    s = c.signals("prefill", 1, 1)
    assert s.window_s == 30.0
    assert s.requests_per_s == pytest.approx(60 / 30)
    assert s.prompt_tokens_per_s == pytest.approx(6000 / 30)
    assert s.generation_tokens_per_s == pytest.approx(600 / 30)
    assert s.busy_s_per_request == pytest.approx(12.0 / 60)
    assert s.utilization == pytest.approx(12.0 / 30)
    assert s.ttft_p90_s is not None and 0.25 < s.ttft_p90_s <= 0.5  # the bucket of 0.3 s, not 30 s
    assert s.queue_wait_p90_s is not None and 0.0 < s.queue_wait_p90_s <= 0.3
    assert s.itl_p90_s is None  # a prefill pool has no ITL


def test_a_baseline_slightly_older_than_the_window_still_counts() -> None:
    c, a = SignalCollector(30.0), RankExporter()
    c.observe(0.0, [a.sample("prefill-g0-r0")])
    c.observe(32.0, [a.sample("prefill-g0-r0")])  # loop jitter: 2 s late
    assert c.signals("prefill", 1, 1).window_s == 32.0
    c.observe(80.0, [a.sample("prefill-g0-r0")])  # 48 s gap: nothing usable in the window
    assert c.signals("prefill", 1, 1).window_s == 0.0


def test_busy_seconds_per_request_is_in_group_seconds() -> None:
    """Two ranks of one group each busy 10 s for 5 requests: the group spent 10 s on 10 requests."""
    c, r0, r1 = SignalCollector(30.0), RankExporter(), RankExporter()
    c.observe(0.0, [r0.sample("prefill-g0-r0"), r1.sample("prefill-g0-r1")])
    r0.serve(5, busy_s=10.0)
    r1.serve(5, busy_s=10.0)
    c.observe(20.0, [r0.sample("prefill-g0-r0"), r1.sample("prefill-g0-r1")])
    s = c.signals("prefill", 1, 1)
    assert s.busy_s_per_request == pytest.approx(1.0)
    assert s.requests_per_s == pytest.approx(10 / 20)
    assert s.utilization == pytest.approx(0.5)


def test_a_restarted_rank_counts_from_zero_not_negative() -> None:
    c, before = SignalCollector(30.0), RankExporter()
    before.serve(200, busy_s=500.0)
    c.observe(0.0, [before.sample("prefill-g0-r0")])
    after = RankExporter()  # same worker id, a new process: counters and busy time start again
    after.serve(6, ttft_s=0.3, busy_s=3.0)
    c.observe(20.0, [after.sample("prefill-g0-r0")])
    s = c.signals("prefill", 1, 1)
    assert s.requests_per_s == pytest.approx(6 / 20)
    assert s.utilization == pytest.approx(3.0 / 20)
    assert s.busy_s_per_request == pytest.approx(0.5)
    assert s.ttft_p90_s is not None and 0.25 < s.ttft_p90_s <= 0.5


def test_a_new_rank_adds_its_gauges_but_no_rates_and_a_vanished_rank_is_ignored() -> None:
    c, old, new, gone = SignalCollector(30.0), RankExporter(), RankExporter(), RankExporter()
    c.observe(0.0, [old.sample("decode-g0-r0"), gone.sample("decode-g1-r0", running=40)])
    old.busy_s += 10.0
    new.busy_s += 1000.0  # its whole life: not a rate over this window
    c.observe(20.0, [old.sample("decode-g0-r0", running=3), new.sample("decode-g2-r0", running=4, kv_usage=0.5)])
    s = c.signals("decode", 2, 2)
    assert s.running == 7 and s.kv_usage == pytest.approx(0.25)
    assert s.utilization == pytest.approx(10.0 / 20)


def test_router_latencies_are_used_when_routers_observed_any() -> None:
    c, rank, r = SignalCollector(30.0), RankExporter(), router()
    c.observe(0.0, [rank.sample("colocated-g0-r0")], [body(r)])
    rank.serve(20, ttft_s=0.1, itl_s=0.02)
    for _ in range(20):  # what clients saw: the admission queue and the network on top
        r.observe_first_token(4.0)
        r.observe_token_gap(0.3)
    c.observe(10.0, [rank.sample("colocated-g0-r0")], [body(r)])
    s = c.signals("colocated", 1, 1)
    assert s.ttft_p90_s is not None and 2.5 < s.ttft_p90_s <= 5.0
    assert s.itl_p90_s is not None and 0.2 < s.itl_p90_s <= 0.3


def test_ranks_latencies_are_used_when_routers_observed_nothing_in_the_window() -> None:
    c, p, d, r = SignalCollector(30.0), RankExporter(), RankExporter(), router()
    r.observe_first_token(40.0)  # before the window
    c.observe(0.0, [p.sample("prefill-g0-r0"), d.sample("decode-g0-r0")], [body(r)])
    p.serve(20, ttft_s=0.3)
    d.serve(20, itl_s=0.04)
    c.observe(10.0, [p.sample("prefill-g0-r0"), d.sample("decode-g0-r0")], [body(r), None])
    prefill, decode = c.signals("prefill", 1, 1), c.signals("decode", 1, 1)
    assert prefill.ttft_p90_s is not None and 0.25 < prefill.ttft_p90_s <= 0.5
    assert prefill.itl_p90_s is None
    assert decode.itl_p90_s is not None and 0.025 < decode.itl_p90_s <= 0.05
    assert decode.ttft_p90_s is None  # a decode rank's first token came from prefill


def test_a_body_that_does_not_parse_counts_as_a_failed_scrape() -> None:
    c, a = SignalCollector(30.0), RankExporter()
    c.observe(0.0, [a.sample("prefill-g0-r0")])
    a.serve(5, busy_s=2.0)
    c.observe(10.0, [replace(a.sample("prefill-g0-r0"), metrics_text="<html>502</html>")], ["not metrics"])
    assert c.parse_errors == ("prefill-g0-r0", "router[0]")
    s = c.signals("prefill", 1, 1)
    assert s.utilization == pytest.approx(0.2)  # GetLoad figures still count
    assert s.requests_per_s is None and s.ttft_p90_s is None


def test_rates_start_at_the_first_scrape_that_worked_in_the_window() -> None:
    c, a = SignalCollector(30.0), RankExporter()
    c.observe(0.0, [replace(a.sample("prefill-g0-r0"), metrics_text=None)])  # scrape failed
    a.serve(100, busy_s=10.0)  # before any body was seen: not countable
    c.observe(10.0, [a.sample("prefill-g0-r0")])
    a.serve(20, busy_s=4.0)
    c.observe(30.0, [a.sample("prefill-g0-r0")])
    s = c.signals("prefill", 1, 1)
    assert s.window_s == 30.0 and s.utilization == pytest.approx(14.0 / 30)  # GetLoad: the whole window
    assert s.requests_per_s == pytest.approx(20 / 20)  # metrics: from t=10
    assert s.busy_s_per_request == pytest.approx(4.0 / 20)


def test_history_is_bounded_by_the_window_and_by_length() -> None:
    by_window, by_length, a = SignalCollector(30.0), SignalCollector(30.0, max_history=8), RankExporter()
    for i in range(200):
        sample = a.sample("prefill-g0-r0")
        by_window.observe(i * 10.0, [sample])
        by_length.observe(i * 0.01, [sample])
    assert by_window.observations == 4  # t-30 .. t (the slack keeps nothing older than 33 s)
    assert by_length.observations == 8


def test_a_pool_without_ranks_has_zeros_and_no_window() -> None:
    c = SignalCollector(30.0)
    assert c.signals("decode", 0, 1) == PoolSignals("decode", 0, 1, 0.0)
    c.observe(0.0, [])
    assert c.signals("decode", 0, 1).window_s == 0.0


@pytest.mark.parametrize(
    ("field", "value"),
    [("kv_usage", 1.5), ("kv_usage", math.nan), ("waiting", -1), ("busy_seconds", -2.0), ("pool", "gpu")],
)
def test_a_bad_sample_names_its_field(field: str, value: object) -> None:
    good = RankExporter().sample("decode-g0-r0")
    with pytest.raises(SignalInputError, match=field) as info:
        replace(good, **{field: value})
    assert info.value.field.endswith(field)


def test_bad_calls_name_what_is_wrong() -> None:
    c, a = SignalCollector(30.0), RankExporter()
    c.observe(10.0, [])
    with pytest.raises(SignalInputError, match="now"):
        c.observe(5.0, [])
    with pytest.raises(SignalInputError, match="twice"):
        c.observe(20.0, [a.sample("decode-g0-r0"), a.sample("decode-g0-r0")])
    with pytest.raises(SignalInputError, match="pool"):
        c.signals("gpu", 1, 1)
    with pytest.raises(SignalInputError, match="ready_groups"):
        c.signals("decode", -1, 1)
    with pytest.raises(SignalInputError, match="window_s"):
        SignalCollector(0.0)
