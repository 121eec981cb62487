"""``ScalePolicy``: how many groups a pool should have, from its ``PoolSignals``, with hysteresis and cooldowns.

Lifecycle: the autoscaler loop builds one from ``AutoscalerSettings`` and calls ``decide(signals, now)``
for every pool every round; it actuates decisions whose direction is not ``hold`` and tells the policy
about changes made by anyone else (an operator's ``k2serve pools scale``, a restart) through
``record_external_change``. The policy keeps per pool the time of the last change and since when a
scale-down has been wanted; it never reads a clock or does I/O. A decision that moves the count is
taken as applied at ``now`` (its cooldowns start).

The model (``current`` is the desired group count, ``ready`` the groups serving now):

- prefill and colocated pools, work in busy group-seconds per second: ``W = utilization x ready``;
  backlog ``B = waiting x busy_s_per_request`` (0 while no request finished in the window); drain time
  ``D = ttft_slo_s / 2``; ``needed = max(ceil(W / target_utilization), ceil(W + B / D))`` (the
  target is headroom for steady work; a backlog only has to drain within D with every group busy). Utilization saturates at
  1 and hides demand beyond it, so the queue overrides: p90 TTFT above ``ttft_slo_s``, p90 queue wait
  above ``ttft_slo_s / 2`` or the oldest waiting request older than ``ttft_slo_s`` is a breach, and a
  breach asks for at least ``current + 1`` whatever W says (the planner that watched service time and
  not the queue let client TTFT reach minutes: anchors.md §4 item 17).
- decode and colocated pools: ``needed = ceil(ready x kv_usage / kv_target)``, and with
  ``max_seqs`` at least ``ceil(running / (max_seqs x target_utilization))``; a breach (p90 ITL above
  ``itl_slo_s``, Decode calls waiting for KV blocks, or some rank's KV above 95%) asks for at least
  ``current + 1``. A decode rank's busy fraction is not used: one stream keeps a rank busy.
- colocated: the larger of both, a breach of either.
- up (``needed > current``): ``min(needed, current + max_step_up, max_groups)``, once
  ``up_cooldown_s`` has passed since the last change (else hold, ``cooldown``).
- down, by one group: only without a breach, with nothing waiting (requests or handoffs), when one
  group fewer would stay under the low-water mark (prefill: ``W / (current - 1) <
  scale_down_utilization``; decode: ``ready x kv_usage / (current - 1) < kv_target x
  scale_down_utilization / target_utilization`` and, with ``max_seqs``, ``running / (current - 1) <
  max_seqs x scale_down_utilization``; to zero groups only when idle), when that wish has held in every
  round for ``down_stable_s`` (a round without it restarts the clock) and ``down_cooldown_s`` has
  passed since the last change. ``current`` counts groups still starting: a scale-up stuck pending
  can still be undone (dynamo#14251).
- no window yet (or, for prefill, no utilization): hold, ``no_data``; never down on no data.
- a desired count outside ``[min_groups, max_groups]`` is moved inside at once (``at_min``/``at_max``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from k2serve.cluster.autoscaler_settings import AutoscalerSettings, PoolScaling
from k2serve.cluster.pool_signals import POOLS, PoolSignals

KV_FULL = 0.95  # some rank's KV above this: admissions stall on blocks (a breach)
REASONS = (
    "queue",
    "ttft_slo",
    "utilization",
    "kv",
    "seqs",
    "itl_slo",
    "handoff_queue",
    "idle",
    "cooldown",
    "stabilizing",
    "at_max",
    "at_min",
    "steady",
    "no_data",
)


@dataclass(frozen=True)
class ScaleDecision:
    pool: str
    current: int  # the desired group count the decision started from
    target: int  # what it should be now (== current when holding)
    predicted: int  # what the model asked for before bounds, cooldowns and step limits
    direction: str  # up | down | hold
    reason: str  # one of REASONS (a metric label)
    detail: str  # one line with the numbers that drove it

    @property
    def changes(self) -> bool:
        return self.direction != "hold"


@dataclass(frozen=True)
class _Need:
    groups: int
    reason: str
    breach: bool


@dataclass(frozen=True)
class _Estimate:
    needed: int
    reason: str  # of the largest need
    breach: bool
    shrinkable: bool  # one group fewer would stay under the low-water mark
    detail: str


class ScalePolicy:
    def __init__(self, settings: AutoscalerSettings) -> None:
        self.settings = settings
        self._last_change: dict[str, float] = {}  # pool -> when its desired count last changed
        self._down_since: dict[str, float] = {}  # pool -> since when a scale-down has been wanted without a break

    def record_external_change(self, pool: str, now: float) -> None:
        """A change the policy did not decide (manual scale, the loop's own retry): cooldowns restart."""
        self._last_change[pool] = now
        self._down_since.pop(pool, None)

    def decide(self, s: PoolSignals, now: float) -> ScaleDecision:
        if s.pool not in POOLS:
            raise ValueError(f"PoolSignals.pool: expected one of {', '.join(POOLS)}, got {s.pool!r}")
        if not math.isfinite(now):
            raise ValueError(f"now: expected a finite time, got {now!r}")
        bounds, current = self.settings.pool(s.pool), s.desired_groups
        if current < bounds.min_groups:
            return self._change(s, now, bounds.min_groups, current, "at_min", f"desired {current} < min_groups {bounds.min_groups}")  # fmt: skip
        if current > bounds.max_groups:
            return self._change(s, now, bounds.max_groups, current, "at_max", f"desired {current} > max_groups {bounds.max_groups}")  # fmt: skip
        est = self._estimate(s, bounds)
        if est is None:
            self._down_since.pop(s.pool, None)
            return _hold(s, current, "no_data", f"window {s.window_s:.0f}s, utilization {_f(s.utilization)}")
        last = self._last_change.get(s.pool, -math.inf)
        if est.needed > current:
            self._down_since.pop(s.pool, None)
            if current >= bounds.max_groups:
                return _hold(s, est.needed, "at_max", f"{est.reason} wants {est.needed} > max_groups; {est.detail}")
            if now < last + self.settings.up_cooldown_s:
                return _hold(s, est.needed, "cooldown", f"{est.reason} wants {est.needed}; {est.detail}")
            target = min(est.needed, current + self.settings.max_step_up, bounds.max_groups)
            return self._change(s, now, target, est.needed, est.reason, est.detail)
        if est.shrinkable and not est.breach and s.waiting == 0 and s.handoffs_waiting == 0:
            since = self._down_since.setdefault(s.pool, now)
            if current <= bounds.min_groups:
                return _hold(s, est.needed, "at_min", est.detail)
            if now - since < self.settings.down_stable_s:
                return _hold(s, est.needed, "stabilizing", f"down wanted for {now - since:.0f}s; {est.detail}")
            if now < last + self.settings.down_cooldown_s:
                return _hold(s, est.needed, "cooldown", f"down wanted; {est.detail}")
            return self._change(s, now, current - 1, est.needed, "idle", est.detail)
        self._down_since.pop(s.pool, None)
        return _hold(s, est.needed, "steady", est.detail)

    def _change(self, s: PoolSignals, now: float, target: int, predicted: int, reason: str, detail: str) -> ScaleDecision:  # fmt: skip
        self._last_change[s.pool] = now
        self._down_since.pop(s.pool, None)
        direction = "up" if target > s.desired_groups else "down"
        return ScaleDecision(s.pool, s.desired_groups, target, predicted, direction, reason, detail)

    def _estimate(self, s: PoolSignals, bounds: PoolScaling) -> _Estimate | None:
        if s.window_s <= 0:
            return None
        parts: list[tuple[list[_Need], bool, str]] = []
        if s.pool in ("prefill", "colocated"):
            if s.utilization is None:
                return None
            parts.append(self._prefill(s))
        if s.pool in ("decode", "colocated"):
            parts.append(self._decode(s, bounds))
        needs = [n for p in parts for n in p[0]]
        # the largest need names the decision; on a tie a breach is the better explanation
        top = max(needs, key=lambda n: (n.groups, n.breach))
        return _Estimate(
            needed=top.groups,
            reason=top.reason,
            breach=any(n.breach for n in needs),
            shrinkable=all(p[1] for p in parts),
            detail="; ".join(p[2] for p in parts),
        )

    def _prefill(self, s: PoolSignals) -> tuple[list[_Need], bool, str]:
        st, current = self.settings, s.desired_groups
        work = (s.utilization or 0.0) * s.ready_groups
        backlog = s.waiting * s.busy_s_per_request if s.busy_s_per_request is not None else 0.0
        drain_s = st.ttft_slo_s / 2
        from_work = _ceil(work / st.target_utilization)
        # the target utilization is headroom for steady work; a backlog only needs to be drained within
        # D with every group busy (a request or two waiting at a low load is not a reason to grow)
        with_backlog = max(from_work, _ceil(work + backlog / drain_s))
        needs = [_Need(with_backlog, "queue" if with_backlog > from_work else "utilization", False)]
        if s.ttft_p90_s is not None and s.ttft_p90_s > st.ttft_slo_s:
            needs.append(_Need(current + 1, "ttft_slo", True))
        if (s.queue_wait_p90_s is not None and s.queue_wait_p90_s > drain_s) or s.oldest_waiting_s > st.ttft_slo_s:
            needs.append(_Need(current + 1, "queue", True))
        shrinkable = work / (current - 1) < st.scale_down_utilization if current > 1 else work <= 0
        detail = (
            f"prefill W={work:.2f} (util {_f(s.utilization)} x {s.ready_groups} ready) B={backlog:.1f}s"
            f" (waiting {s.waiting}) D={drain_s:g}s ttft_p90={_f(s.ttft_p90_s)}/{st.ttft_slo_s:g}s"
            f" queue_p90={_f(s.queue_wait_p90_s)}s oldest={s.oldest_waiting_s:.2f}s"
        )
        return needs, shrinkable, detail

    def _decode(self, s: PoolSignals, bounds: PoolScaling) -> tuple[list[_Need], bool, str]:
        st, current = self.settings, s.desired_groups
        kv_groups = s.ready_groups * s.kv_usage  # groups' worth of KV in use
        needs = [_Need(_ceil(kv_groups / st.kv_target), "kv", False)]
        low_water = st.kv_target * st.scale_down_utilization / st.target_utilization
        shrinkable = kv_groups / (current - 1) < low_water if current > 1 else kv_groups <= 0 and s.running == 0
        if bounds.max_seqs is not None:
            needs.append(_Need(_ceil(s.running / (bounds.max_seqs * st.target_utilization)), "seqs", False))
            if current > 1:
                shrinkable = shrinkable and s.running / (current - 1) < bounds.max_seqs * st.scale_down_utilization
        if s.itl_p90_s is not None and s.itl_p90_s > st.itl_slo_s:
            needs.append(_Need(current + 1, "itl_slo", True))
        if s.handoffs_waiting > 0:
            needs.append(_Need(current + 1, "handoff_queue", True))
        if s.kv_usage_max > KV_FULL:
            needs.append(_Need(current + 1, "kv", True))
        detail = (
            f"decode kv={s.kv_usage:.2f} (max {s.kv_usage_max:.2f}, target {st.kv_target:g}) x {s.ready_groups} ready"
            f" running={s.running} max_seqs={bounds.max_seqs} handoffs_waiting={s.handoffs_waiting}"
            f" itl_p90={_f(s.itl_p90_s)}/{st.itl_slo_s:g}s"
        )
        return needs, shrinkable, detail


def _hold(s: PoolSignals, predicted: int, reason: str, detail: str) -> ScaleDecision:
    return ScaleDecision(s.pool, s.desired_groups, s.desired_groups, predicted, "hold", reason, detail)


def _ceil(x: float) -> int:
    """Ceiling that ignores float dust (3 x 0.7 / 0.7 must be 3, not 4)."""
    return max(0, math.ceil(x - 1e-9))


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"
