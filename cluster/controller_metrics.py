"""``ControllerMetrics``: the controller's view of its pools as Prometheus series, in its own registry.

Lifecycle: the ``Controller`` builds one, serves its registry over HTTP next to the registry
(``metrics.controller_port``; the address travels in every ``WorkerSet`` so routers can list it for
service discovery), calls ``observe`` every time it publishes the live set (gauges: desired and
live groups by state, ready ranks), ``restarted`` when a failed group is scheduled for re-creation
and ``scaled`` when a pool's desired count changes. All calls come from the controller's event
loop; scrapes read from the HTTP thread through prometheus_client's own locks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge

PUBLISHED_STATES = ("starting", "ready", "draining", "stopping", "failed")


class ControllerMetrics:
    def __init__(self, pools: Sequence[str]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._desired = Gauge("k2serve_pool_groups_desired", "Groups the pool should have.", ["pool"], registry=r)
        self._groups = Gauge("k2serve_pool_groups", "Groups of the pool by state.", ["pool", "state"], registry=r)
        self._ranks_ready = Gauge("k2serve_pool_ranks_ready", "Ranks of the pool's ready groups.", ["pool"], registry=r)
        self._restarts = Counter("k2serve_pool_restarts", "Groups re-created after a failure.", ["pool"], registry=r)
        self._scale = Counter(
            "k2serve_pool_scale_events", "Changes of the desired group count.", ["pool", "direction"], registry=r
        )
        self._pools = tuple(pools)
        for pool in self._pools:
            self._restarts.labels(pool)
            for direction in ("up", "down"):
                self._scale.labels(pool, direction)

    def observe(self, desired: Mapping[str, int], groups: Iterable[tuple[str, str, int]]) -> None:
        """``groups``: (pool, published state, ranks) of every group slot."""
        counts = {(pool, state): 0 for pool in self._pools for state in PUBLISHED_STATES}
        ready = dict.fromkeys(self._pools, 0)
        for pool, state, ranks in groups:
            counts[(pool, state)] = counts.get((pool, state), 0) + 1
            if state == "ready":
                ready[pool] = ready.get(pool, 0) + ranks
        for pool, want in desired.items():
            self._desired.labels(pool).set(want)
        for (pool, state), count in counts.items():
            self._groups.labels(pool, state).set(count)
        for pool, ranks in ready.items():
            self._ranks_ready.labels(pool).set(ranks)

    def restarted(self, pool: str) -> None:
        self._restarts.labels(pool).inc()

    def scaled(self, pool: str, before: int, after: int) -> None:
        if after != before:
            self._scale.labels(pool, "up" if after > before else "down").inc()
