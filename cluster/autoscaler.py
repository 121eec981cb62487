"""``Autoscaler``: the controller's loop that sizes the prefill and decode pools from what they measure.

Lifecycle: the ``Controller`` creates one when ``autoscaler.enabled`` and calls ``start()`` after its
own start; ``stop()`` cancels the loop (bounded). Every ``interval_s`` one round:

1. sample every ready rank: ``GetLoad`` (waiting, running, KV use, handoffs waiting, busy seconds,
   oldest waiting age) and its /metrics text (queue time, TTFT, ITL histograms), plus the routers'
   /metrics when ``router_metrics_urls`` are given (end-to-end TTFT, including router queues);
2. ``SignalCollector`` turns the window of samples into ``PoolSignals`` per pool;
3. ``ScalePolicy`` decides (queue-aware capacity model, hysteresis, cooldowns, bounds);
4. a change is applied: on Kubernetes the RayCluster worker group grows first (pods for the new
   group), then the controller's desired count; on the way down the controller drains and stops
   the group first, then the worker group shrinks, naming the pods that hosted it so that KubeRay
   deletes those and not a busy one. A failed resize is logged, counted and retried next round.

Every decision is logged (INFO for changes and SLO breaches), kept in a bounded history
(``decisions()``, the controller's ``autoscaler_decisions``) and exported (``AutoscalerMetrics``).
Scaling by hand (``Controller.scale``) is noted so cooldowns apply to it too.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.request
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from k2serve.cluster.autoscaler_metrics import AutoscalerMetrics
from k2serve.cluster.autoscaler_settings import AutoscalerSettings
from k2serve.cluster.config import ClusterConfig
from k2serve.cluster.pool_signals import PoolSignals, RankSample, SignalCollector
from k2serve.cluster.scale_policy import ScaleDecision, ScalePolicy
from k2serve.cluster.worker_record import WorkerRecord

logger = logging.getLogger(__name__)

SCRAPE_TIMEOUT_S = 2.0
LOAD_TIMEOUT_S = 3.0
HISTORY = 500  # decisions kept for status()
SCALE_DOWN_GRACE_S = 30.0


class PoolControl(Protocol):
    """What the autoscaler needs from the controller (the ``Controller`` actor implements it)."""

    def desired_groups(self) -> dict[str, int]: ...
    def ready_groups(self) -> dict[str, int]: ...
    def ready_ranks(self) -> list[WorkerRecord]: ...
    def group_hosts(self, pool: str, first_removed: int) -> list[str]: ...
    async def loads(self, timeout_s: float = 5.0) -> dict[str, dict[str, Any]]: ...
    async def apply_scale(self, pool: str, groups: int, grace_s: float = 30.0) -> dict[str, int]: ...
    async def wait_removed(self, pool: str, groups: int, timeout_s: float) -> bool: ...


class ClusterResizer(Protocol):
    """The Kubernetes side (``RayClusterScaler`` wrapped for asyncio); None when not on Kubernetes."""

    async def grow(self, pool: str, groups: int) -> None: ...
    async def shrink(self, pool: str, groups: int, hosts: Sequence[str]) -> None: ...


@dataclass(frozen=True)
class DecisionRecord:
    at: float  # wall-clock seconds
    pool: str
    current: int
    target: int
    predicted: int
    direction: str
    reason: str
    detail: str
    applied: bool
    error: str = ""


Scrape = Callable[[str], Awaitable[str | None]]


async def scrape_text(url: str) -> str | None:
    """One /metrics body (None when the endpoint does not answer in time)."""

    def get() -> str:
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
            return str(response.read().decode("utf-8", "replace"))

    try:
        return await asyncio.to_thread(get)
    except (OSError, ValueError):
        return None


class Autoscaler:
    def __init__(
        self,
        settings: AutoscalerSettings,
        control: PoolControl,
        metrics: AutoscalerMetrics,
        resizer: ClusterResizer | None = None,
        scrape: Scrape = scrape_text,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.control = control
        self.metrics = metrics
        self.resizer = resizer
        self._scrape = scrape
        self._clock = clock
        self.collector = SignalCollector(settings.window_s)
        self.policy = ScalePolicy(settings)
        self._history: deque[DecisionRecord] = deque(maxlen=HISTORY)
        self._task: asyncio.Task[None] | None = None

    # ---- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="autoscaler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=5.0)
            self._task = None

    def decisions(self) -> list[dict[str, Any]]:
        return [asdict(d) for d in self._history]

    def noted_external_change(self, pool: str) -> None:
        self.policy.record_external_change(pool, self._clock())

    async def _run(self) -> None:
        while True:
            started = self._clock()
            try:
                await self.round()
            except Exception:  # one bad round must not end the loop
                logger.exception("autoscaler: round failed")
            await asyncio.sleep(max(0.0, self.settings.interval_s - (self._clock() - started)))

    # ---- one round ------------------------------------------------------------------------------------

    async def round(self) -> list[ScaleDecision]:
        now = self._clock()
        samples, routers = await self._sample()
        self.collector.observe(now, samples, routers)
        desired, ready = self.control.desired_groups(), self.control.ready_groups()
        out = []
        for pool in desired:
            signals = self.collector.signals(pool, ready.get(pool, 0), desired[pool])
            decision = self.policy.decide(signals, now)
            error = await self._apply(decision) if decision.target != decision.current else ""
            self._record(signals, decision, error)
            out.append(decision)
        return out

    async def _sample(self) -> tuple[list[RankSample], list[str]]:
        ranks = self.control.ready_ranks()
        loads, texts, routers = await asyncio.gather(
            self.control.loads(LOAD_TIMEOUT_S),
            asyncio.gather(*(self._metrics_of(r) for r in ranks)),
            asyncio.gather(*(self._scrape(url) for url in self.settings.router_metrics_urls)),
        )
        samples = []
        for record, text in zip(ranks, texts, strict=True):
            load = loads.get(record.worker_id)
            if load is None:
                continue
            samples.append(
                RankSample(
                    worker_id=record.worker_id,
                    pool=record.pool,
                    group=record.group,
                    waiting=int(load.get("waiting", 0)),
                    running=int(load.get("running", 0)),
                    kv_usage=float(load.get("kv_usage", 0.0)),
                    handoffs_waiting=int(load.get("handoffs_waiting", 0)),
                    busy_seconds=float(load.get("busy_seconds", 0.0)),
                    oldest_waiting_s=float(load.get("oldest_waiting_s", 0.0)),
                    metrics_text=text,
                )
            )
        return samples, [t for t in routers if t is not None]

    async def _metrics_of(self, record: WorkerRecord) -> str | None:
        if not record.metrics_address:
            return None
        return await self._scrape(f"http://{record.metrics_address}/metrics")

    async def _apply(self, decision: ScaleDecision) -> str:
        pool, target = decision.pool, decision.target
        try:
            if decision.target > decision.current:
                if self.resizer is not None:
                    await self.resizer.grow(pool, target)  # pods first: the new group needs their GPUs
                await self.control.apply_scale(pool, target, SCALE_DOWN_GRACE_S)
            else:
                hosts = self.control.group_hosts(pool, target) if self.resizer is not None else []
                await self.control.apply_scale(pool, target, SCALE_DOWN_GRACE_S)
                if self.resizer is not None:
                    if not await self.control.wait_removed(pool, target, SCALE_DOWN_GRACE_S + 30.0):
                        raise TimeoutError(f"the removed groups of {pool} did not stop in time")
                    await self.resizer.shrink(pool, target, hosts)
        except Exception as exc:  # the Kubernetes API, the controller: retried next round
            self.metrics.failed(pool)
            logger.warning("autoscaler: %s %d -> %d failed: %s", pool, decision.current, target, exc)
            return f"{type(exc).__name__}: {exc}"
        return ""

    def _record(self, signals: PoolSignals, decision: ScaleDecision, error: str) -> None:
        changed = decision.target != decision.current
        record = DecisionRecord(
            time.time(),
            decision.pool,
            decision.current,
            decision.target,
            decision.predicted,
            decision.direction,
            decision.reason,
            decision.detail,
            changed and not error,
            error,
        )
        self._history.append(record)
        self.metrics.observe(signals, decision)
        level = logging.INFO if changed or decision.reason.endswith("slo") else logging.DEBUG
        logger.log(
            level,
            "autoscaler: %s %s %d -> %d (%s): %s%s",
            decision.pool,
            decision.direction,
            decision.current,
            decision.target,
            decision.reason,
            decision.detail,
            f"; failed: {error}" if error else "",
        )


class KubeResizer:
    """``ClusterResizer`` over a ``RayClusterScaler`` (its blocking client calls run in a thread)."""

    def __init__(self, scaler: Any) -> None:
        self.scaler = scaler  # RayClusterScaler

    async def grow(self, pool: str, groups: int) -> None:
        await asyncio.to_thread(self.scaler.resize, pool, groups)

    async def shrink(self, pool: str, groups: int, hosts: Sequence[str]) -> None:
        by_ip = await asyncio.to_thread(self.scaler.pod_names_by_ip, pool)
        await asyncio.to_thread(self.scaler.resize, pool, groups, [by_ip[h] for h in hosts if h in by_ip])


def build_autoscaler(config: ClusterConfig, control: PoolControl, registry: CollectorRegistry) -> Autoscaler:
    """The controller's autoscaler: metrics on ``registry``; on Kubernetes, a RayCluster resizer."""
    settings = config.autoscaler
    resizer = None
    if settings.kubernetes.enabled:
        from k2serve.cluster.raycluster_scaler import RayClusterScaler  # the kubernetes client loads here only

        resizer = KubeResizer(RayClusterScaler.from_settings(settings.kubernetes))
    metrics = AutoscalerMetrics(registry, tuple(p.name for p in config.pools))
    return Autoscaler(settings, control, metrics, resizer)
