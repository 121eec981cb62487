"""``ScalePolicy``: each rule and guard of the pool-scaling model on its own, then a load step end to end.

Signals are built by hand (``PoolSignals``) and time is passed in; the last test drives the
``SignalCollector`` and the policy together with a fluid model of a prefill pool.
"""

from __future__ import annotations

import math
from dataclasses import replace
from itertools import pairwise

from prometheus_client import CollectorRegistry, Counter, generate_latest

from k2serve.cluster.autoscaler_settings import AutoscalerSettings, PoolScaling
from k2serve.cluster.pool_signals import FINISHED, PoolSignals, RankSample, SignalCollector
from k2serve.cluster.scale_policy import REASONS, ScaleDecision, ScalePolicy

SETTINGS = AutoscalerSettings(
    enabled=True,
    ttft_slo_s=2.0,
    itl_slo_s=0.1,
    target_utilization=0.7,
    scale_down_utilization=0.4,
    kv_target=0.8,
    up_cooldown_s=30.0,
    down_cooldown_s=120.0,
    down_stable_s=60.0,
    max_step_up=2,
    pools={"prefill": PoolScaling(1, 6), "decode": PoolScaling(1, 6), "colocated": PoolScaling(1, 6)},
)


def prefill(groups: int = 2, utilization: float | None = 0.5, **kw: float | int | None) -> PoolSignals:
    s = PoolSignals("prefill", groups, groups, 30.0, utilization=utilization, ttft_p90_s=0.5, queue_wait_p90_s=0.1)
    return replace(s, **kw)


def decode(groups: int = 2, kv_usage: float = 0.5, **kw: float | int | None) -> PoolSignals:
    s = PoolSignals("decode", groups, groups, 30.0, kv_usage=kv_usage, kv_usage_max=kv_usage, itl_p90_s=0.03)
    return replace(s, **kw)


def policy(**changes: object) -> ScalePolicy:
    return ScalePolicy(replace(SETTINGS, **changes))


def check(d: ScaleDecision, direction: str, target: int, reason: str) -> None:
    assert (d.direction, d.target, d.reason) == (direction, target, reason), d
    assert d.reason in REASONS and d.detail


# ---- prefill: work, backlog and the queue override ------------------------------------------------------------


def test_work_over_target_utilization_sets_the_prefill_size() -> None:
    d = policy().decide(prefill(groups=2, utilization=0.9), now=0.0)  # W = 1.8 -> 1.8 / 0.7 = 2.6
    check(d, "up", 3, "utilization")
    assert d.predicted == 3 and d.current == 2


def test_a_pool_at_target_utilization_holds() -> None:
    check(policy().decide(prefill(groups=3, utilization=0.7), now=0.0), "hold", 3, "steady")


def test_saturated_pool_with_a_growing_queue_scales_up_although_work_alone_would_not() -> None:
    """Busy fraction caps at 1: with target 1.0, W says 2 groups suffice while requests pile up."""
    p = policy(target_utilization=1.0, scale_down_utilization=0.4)
    calm = prefill(groups=2, utilization=1.0)
    check(p.decide(calm, now=0.0), "hold", 2, "steady")
    piling = replace(calm, waiting=40, busy_s_per_request=0.5)  # B = 20 s of work, D = 1 s
    d = p.decide(piling, now=1.0)
    assert d.direction == "up" and d.reason == "queue"
    assert d.predicted == math.ceil(2.0 + 20.0 / 1.0)


def test_one_waiting_request_at_low_load_does_not_add_a_group() -> None:
    """The target utilization is headroom for steady work; a backlog only has to drain within
    D = ttft_slo / 2 with every group busy (the first load-step run grew at 1 req/s without this)."""
    quiet = prefill(groups=1, utilization=0.4, waiting=1, busy_s_per_request=0.38)  # 0.4 + 0.38 / 1 s < 1
    check(policy().decide(quiet, now=0.0), "hold", 1, "steady")
    behind = replace(quiet, waiting=3)  # 0.4 + 1.14 group-seconds per second: one group cannot drain it
    assert policy().decide(behind, now=0.0).target == 2


def test_old_waiting_requests_force_a_scale_up_when_nothing_has_finished() -> None:
    stuck = prefill(groups=2, utilization=1.0, waiting=12, busy_s_per_request=None, oldest_waiting_s=5.0)
    d = policy(target_utilization=1.0).decide(stuck, now=0.0)
    check(d, "up", 3, "queue")


def test_queue_wait_p90_over_half_the_slo_forces_a_scale_up() -> None:
    check(policy().decide(prefill(groups=2, utilization=0.3, queue_wait_p90_s=1.5), now=0.0), "up", 3, "queue")


def test_ttft_breach_alone_scales_up() -> None:
    quiet = prefill(groups=2, utilization=0.15)
    check(policy().decide(quiet, now=0.0), "hold", 2, "stabilizing")  # idle enough to want down...
    check(policy().decide(replace(quiet, ttft_p90_s=2.5), now=0.0), "up", 3, "ttft_slo")  # ...but over SLO


# ---- decode: KV, sequences, breaches; never busy fraction ------------------------------------------------------


def test_decode_kv_pressure_scales_up() -> None:
    d = policy().decide(decode(groups=2, kv_usage=0.9, kv_usage_max=0.92), now=0.0)  # 1.8 / 0.8 = 2.25
    check(d, "up", 3, "kv")


def test_a_full_rank_is_a_breach_even_when_the_mean_is_fine() -> None:
    check(policy().decide(decode(groups=2, kv_usage=0.5, kv_usage_max=0.97), now=0.0), "up", 3, "kv")


def test_itl_breach_and_waiting_handoffs_each_scale_decode_up() -> None:
    check(policy().decide(decode(itl_p90_s=0.2), now=0.0), "up", 3, "itl_slo")
    check(policy().decide(decode(handoffs_waiting=3), now=0.0), "up", 3, "handoff_queue")


def test_max_seqs_sizes_decode_by_running_sequences() -> None:
    p = policy(pools={"decode": PoolScaling(1, 6, max_seqs=10)})
    d = p.decide(decode(groups=2, kv_usage=0.3, running=30), now=0.0)  # 30 / (10 x 0.7) = 4.3
    check(d, "up", 4, "seqs")  # step limit: 2 + 2
    assert d.predicted == 5


def test_decode_ignores_busy_fraction() -> None:
    busy = decode(groups=3, kv_usage=0.1, utilization=1.0, running=3)
    assert policy().decide(busy, now=0.0).direction != "up"


def test_colocated_takes_the_larger_of_prefill_and_decode() -> None:
    s = PoolSignals("colocated", 2, 2, 30.0, kv_usage=0.95, kv_usage_max=0.95, utilization=0.2, itl_p90_s=0.03)
    d = policy(max_step_up=4).decide(s, now=0.0)  # prefill wants 1, decode 2 x 0.95 / 0.8 = 2.4 -> 3
    check(d, "up", 3, "kv")
    breach = replace(s, kv_usage=0.1, kv_usage_max=0.1, ttft_p90_s=3.0)
    check(policy().decide(breach, now=0.0), "up", 3, "ttft_slo")


# ---- guards: cooldowns, steps, bounds, no data -----------------------------------------------------------------


def test_up_cooldown_holds_a_second_scale_up() -> None:
    p, hot = policy(), prefill(groups=2, utilization=1.0)
    check(p.decide(hot, now=0.0), "up", 3, "utilization")  # 2 / 0.7 = 2.9
    again = prefill(groups=3, utilization=1.0)
    d = p.decide(again, now=29.0)
    check(d, "hold", 3, "cooldown")
    assert d.predicted == 5  # 3 / 0.7 = 4.3
    check(p.decide(again, now=30.0), "up", 5, "utilization")


def test_step_up_is_limited_and_max_groups_caps_it() -> None:
    d = policy(max_step_up=1).decide(prefill(groups=2, utilization=1.0, waiting=100, busy_s_per_request=1.0), now=0.0)
    check(d, "up", 3, "queue")
    assert d.predicted > 3
    check(policy().decide(prefill(groups=5, utilization=1.0), now=0.0), "up", 6, "utilization")
    check(policy().decide(prefill(groups=6, utilization=1.0), now=0.0), "hold", 6, "at_max")


def test_desired_outside_the_bounds_is_moved_inside_regardless_of_cooldown() -> None:
    p = policy()
    p.record_external_change("prefill", now=0.0)
    check(p.decide(replace(prefill(groups=0), desired_groups=0), now=1.0), "up", 1, "at_min")
    check(p.decide(prefill(groups=9, utilization=1.0), now=2.0), "down", 6, "at_max")


def test_no_window_or_no_utilization_holds_and_never_scales_down() -> None:
    p = policy(down_stable_s=0.0, down_cooldown_s=0.0)
    check(p.decide(prefill(groups=4, utilization=0.0, window_s=0.0), now=0.0), "hold", 4, "no_data")
    check(p.decide(prefill(groups=4, utilization=None), now=1.0), "hold", 4, "no_data")
    check(p.decide(decode(groups=4, kv_usage=0.0, window_s=0.0), now=2.0), "hold", 4, "no_data")


# ---- scale-down hysteresis -------------------------------------------------------------------------------------


def test_scale_down_waits_for_down_stable_s_of_continuous_wish() -> None:
    p, idle = policy(), prefill(groups=3, utilization=0.1)  # W = 0.3: 0.3 / 2 < 0.4
    for t in (0.0, 10.0, 30.0, 59.0):
        check(p.decide(idle, now=t), "hold", 3, "stabilizing")
    check(p.decide(idle, now=60.0), "down", 2, "idle")


def test_a_single_blip_restarts_the_down_clock() -> None:
    p, idle = policy(), prefill(groups=3, utilization=0.1)
    p.decide(idle, now=0.0)
    p.decide(idle, now=40.0)
    check(p.decide(replace(idle, waiting=1), now=50.0), "hold", 3, "steady")  # one round with a queue
    check(p.decide(idle, now=60.0), "hold", 3, "stabilizing")
    check(p.decide(idle, now=110.0), "hold", 3, "stabilizing")
    check(p.decide(idle, now=120.0), "down", 2, "idle")


def test_down_cooldown_follows_any_change_and_steps_are_one_group() -> None:
    p, idle = policy(down_stable_s=0.0), prefill(groups=4, utilization=0.0)
    p.record_external_change("prefill", now=0.0)  # an operator scaled to 4
    check(p.decide(idle, now=100.0), "hold", 4, "cooldown")
    d = p.decide(idle, now=120.0)
    check(d, "down", 3, "idle")
    assert d.predicted == 0
    check(p.decide(prefill(groups=3, utilization=0.0), now=200.0), "hold", 3, "cooldown")
    check(p.decide(prefill(groups=3, utilization=0.0), now=240.0), "down", 2, "idle")


def test_no_scale_down_when_one_group_fewer_would_pass_the_low_water_mark() -> None:
    p = policy(down_stable_s=0.0)
    check(p.decide(prefill(groups=3, utilization=0.3), now=0.0), "hold", 3, "steady")  # 0.9 / 2 = 0.45 >= 0.4
    check(p.decide(decode(groups=3, kv_usage=0.35), now=0.0), "hold", 3, "steady")  # 1.05 / 2 >= 0.46
    check(p.decide(decode(groups=3, kv_usage=0.25), now=1.0), "down", 2, "idle")  # 0.75 / 2 < 0.46


def test_decode_with_max_seqs_keeps_groups_for_its_running_sequences() -> None:
    p = policy(down_stable_s=0.0, pools={"decode": PoolScaling(1, 6, max_seqs=10)})
    check(p.decide(decode(groups=3, kv_usage=0.05, running=10), now=0.0), "hold", 3, "steady")  # 10 / 2 >= 4
    check(p.decide(decode(groups=3, kv_usage=0.05, running=6), now=1.0), "down", 2, "idle")


def test_never_below_min_groups() -> None:
    p = policy(down_stable_s=0.0, pools={"prefill": PoolScaling(2, 6)})
    check(p.decide(prefill(groups=2, utilization=0.0), now=0.0), "hold", 2, "at_min")


def test_a_scale_up_stuck_pending_can_still_be_undone() -> None:
    """dynamo#14251: desired 3 but only 1 group ever became ready, and the load went away."""
    p, stuck = policy(down_stable_s=0.0), replace(prefill(groups=1, utilization=0.1), desired_groups=3)
    check(p.decide(stuck, now=0.0), "down", 2, "idle")


# ---- a load step end to end ------------------------------------------------------------------------------------


class FluidPrefillPool:
    """Requests arrive at a rate, each costs ``cost_s`` group-seconds, a queue forms when groups are short.
    A new group becomes ready ``start_s`` after it is asked for; each group exports its finished
    requests through a real registry, as a rank's /metrics would."""

    def __init__(self, cost_s: float = 0.5, start_s: float = 20.0) -> None:
        self.cost_s, self.start_s = cost_s, start_s
        self.groups: list[FluidGroup] = [FluidGroup(ready_at=0.0)]
        self.queue, self.oldest_s = 0.0, 0.0  # requests waiting; how long the last of them will have waited

    @property
    def desired(self) -> int:
        return len(self.groups)

    def ready(self, now: float) -> list[FluidGroup]:
        return [g for g in self.groups if g.ready_at <= now]

    def scale(self, target: int, now: float) -> None:
        self.groups = self.groups[:target] + [FluidGroup(now + self.start_s) for _ in range(target - self.desired)]

    def advance(self, now: float, dt: float, arrivals_per_s: float) -> list[RankSample]:
        ready = self.ready(now)
        self.queue += arrivals_per_s * dt
        served = min(self.queue, len(ready) * dt / self.cost_s)
        self.queue -= served
        for g in ready:
            g.serve(served / len(ready), self.cost_s)
        self.oldest_s = self.queue * self.cost_s / len(ready) if self.queue >= 1 else 0.0
        share = int(self.queue) // max(len(ready), 1)
        return [g.sample(i, share, self.oldest_s) for i, g in enumerate(self.groups) if g in ready]


class FluidGroup:
    def __init__(self, ready_at: float) -> None:
        self.ready_at, self.busy_s, self.served = ready_at, 0.0, 0.0
        self.registry = CollectorRegistry()
        self.finished = Counter(FINISHED, "done", ["model_name", "finished_reason"], registry=self.registry)

    def serve(self, requests: float, cost_s: float) -> None:
        self.busy_s += requests * cost_s
        whole = int(self.served + requests) - int(self.served)
        self.served += requests
        self.finished.labels("k2", "stop").inc(whole)

    def sample(self, group: int, waiting: int, oldest_s: float) -> RankSample:
        text = generate_latest(self.registry).decode()
        return RankSample(f"prefill-g{group}-r0", "prefill", group, waiting, 1, 0.1, 0, self.busy_s, oldest_s, text)


def test_a_load_step_scales_the_pool_up_then_back_down() -> None:
    settings = replace(SETTINGS, pools={"prefill": PoolScaling(1, 6)})
    collector, p, pool = SignalCollector(settings.window_s), ScalePolicy(settings), FluidPrefillPool()
    rounds: list[tuple[float, int, int, float]] = []  # (time, desired after the round, predicted, oldest waiting)
    dt = settings.interval_s
    for step in range(int(2400 / dt)):
        now = step * dt
        rate = 6.0 if 300 <= now < 900 else 0.5  # low -> high -> low; high is 3 group-seconds/s -> 5 at 70%
        collector.observe(now, pool.advance(now, dt, rate))
        d = p.decide(collector.signals("prefill", len(pool.ready(now)), pool.desired), now)
        if d.changes:
            pool.scale(d.target, now)
        rounds.append((now, pool.desired, d.predicted, pool.oldest_s))
    at = {t: (desired, predicted) for t, desired, predicted, _ in rounds}
    assert at[290.0] == (1, 1)  # low load: one group
    first_up = min(t for t, desired, _, _ in rounds if desired > 1)
    assert 300 <= first_up <= 320  # the queue is seen within a round or two of the step
    assert at[890.0][1] == 5 and at[890.0][0] >= 5  # the model settles on 5; the pool has at least that
    assert max(oldest for t, _, _, oldest in rounds if 450 <= t < 900) < settings.ttft_slo_s  # queue drained
    high = [desired for t, desired, _, _ in rounds if t < 900]
    assert high == sorted(high)  # no scale-down while the load is high
    downs = [(t, b) for (_, a, _, _), (t, b, _, _) in pairwise(rounds) if b < a]  # (when, to)
    assert rounds[-1][1] == 1  # back to one group after the load left
    assert all(b == a - 1 for (_, a), (_, b) in zip([(0.0, at[890.0][0]), *downs], downs, strict=False))
    assert downs[0][0] >= 900 + settings.down_stable_s
    assert all(t2 - t1 >= settings.down_cooldown_s for (t1, _), (t2, _) in pairwise(downs))
