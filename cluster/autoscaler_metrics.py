"""``AutoscalerMetrics``: every decision of the pool autoscaler and the signals behind it, as Prometheus series.

Lifecycle: the ``Controller`` builds one on its own registry (served at the controller's /metrics)
when the autoscaler is on; the autoscaler calls ``observe`` once per pool per round and ``failed``
when a resize could not be applied. Series:

- ``k2serve_autoscaler_decisions_total{pool,direction,reason}``: up / down / hold, and why;
- ``k2serve_autoscaler_target_groups{pool}`` and ``..._predicted_groups{pool}``: what the round chose,
  and what the capacity model asked for before bounds, cooldowns and step limits;
- ``k2serve_autoscaler_signal{pool,signal}``: utilization, queue_wait_p90_s, ttft_p90_s, itl_p90_s,
  kv_usage, waiting, oldest_waiting_s (NaN when the window had no observation);
- ``k2serve_autoscaler_errors_total{pool}``: resizes that failed (Kubernetes API, controller).
"""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge

from k2serve.cluster.pool_signals import PoolSignals
from k2serve.cluster.scale_policy import ScaleDecision

SIGNALS = ("utilization", "queue_wait_p90_s", "ttft_p90_s", "itl_p90_s", "kv_usage", "waiting", "oldest_waiting_s")


class AutoscalerMetrics:
    def __init__(self, registry: CollectorRegistry, pools: tuple[str, ...]) -> None:
        r = registry
        self._decisions = Counter(
            "k2serve_autoscaler_decisions", "Autoscaler rounds by outcome.", ["pool", "direction", "reason"], registry=r
        )
        self._target = Gauge("k2serve_autoscaler_target_groups", "Groups the last round chose.", ["pool"], registry=r)
        self._predicted = Gauge(
            "k2serve_autoscaler_predicted_groups", "Groups the capacity model asked for.", ["pool"], registry=r
        )
        self._signal = Gauge("k2serve_autoscaler_signal", "Inputs of the last round.", ["pool", "signal"], registry=r)
        self._errors = Counter("k2serve_autoscaler_errors", "Resizes that failed.", ["pool"], registry=r)
        for pool in pools:
            self._errors.labels(pool)

    def observe(self, signals: PoolSignals, decision: ScaleDecision) -> None:
        pool = decision.pool
        self._decisions.labels(pool, decision.direction, decision.reason).inc()
        self._target.labels(pool).set(decision.target)
        self._predicted.labels(pool).set(decision.predicted)
        for name in SIGNALS:
            value = getattr(signals, name)
            self._signal.labels(pool, name).set(math.nan if value is None else float(value))

    def failed(self, pool: str) -> None:
        self._errors.labels(pool).inc()
