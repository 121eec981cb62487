"""``Controller``: the Ray actor that owns the cluster's desired state and keeps the live state equal to it.

Desired state: for every pool (prefill + decode, or colocated) a number of expert-parallel groups
of ``ep_size`` ranks. Live state: one ``GroupSlot`` per group index, whose state moves

    pending -> starting -> ready -> (draining -> stopping ->) gone | pending (drain-and-replace)
                  |          |
                  +----------+--> backoff -> starting ...   (failure; after max_restarts: failed)

Lifecycle: ``start()`` starts the Registry gRPC server (on ``network.interface_host``) and the
reconcile loop, and returns the registry address. Every ``health.interval_s`` (or at once when
something changes) the loop creates missing groups (each start is its own task, bounded by
``health.start_timeout_s``), removes groups above the desired count (drain, then stop), checks
every ready group (actor liveness + gRPC health, bounded by ``health.timeout_s``) and publishes
the live set to the registry. A dead rank kills its whole group at once (an EP group cannot lose a
rank), and so does a rank that reports its group failed (a peer died or hangs: it never recovers);
``health.failures`` consecutive unhealthy rounds (timeouts, NOT_SERVING) do too. A failed group is
recreated after an exponential back-off, at most ``restart.max_restarts`` times. ``drain(pool, group)`` drains a
group and replaces it with a fresh one; ``scale(pool, groups)`` changes the desired count;
``shutdown()`` stops the loop, drains (optionally) and stops every group, kills the actors, removes
the placement groups and stops the registry. A group that failed for good stays ``failed`` (shown in
the registry and ``status()``) until the pool is scaled below it and back up. Worker ids are ``"{pool}-g{group}-r{rank}"`` and stay
the same across restarts; addresses change.

With ``autoscaler.enabled`` the controller also runs an ``Autoscaler`` (autoscaler.py) that reads the
ranks' load and metrics and calls the same scale path; ``autoscaler_decisions()`` lists what it did.

The controller runs in one asyncio event loop (a Ray async actor), so its state needs no locks;
``ControllerHandle`` (controller_handle.py) is the driver-side API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any

import ray
from ray.exceptions import RayError

from k2serve.cluster.autoscaler import Autoscaler, build_autoscaler
from k2serve.cluster.config import ClusterConfig
from k2serve.cluster.controller_metrics import ControllerMetrics
from k2serve.cluster.group_slot import PUBLISHED_STATE, GroupSlot
from k2serve.cluster.health_probe import HealthProbe
from k2serve.cluster.rank_plan import resolve_host
from k2serve.cluster.registry import RegistryServer, WorkerBoard
from k2serve.cluster.restart_policy import RestartPolicy
from k2serve.cluster.worker_group import ACTOR_NAME_PREFIX, GroupStartError, WorkerGroup
from k2serve.cluster.worker_record import WorkerRecord
from k2serve.workers.metrics_endpoint import MetricsEndpoint

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0  # on top of a grace period, for a stop/drain call to come back
STOP_GRACE_S = 2.0  # a rank's stop: the group's ranks agree to leave their lockstep loop (after any drain)


class Controller:
    def __init__(self, config: ClusterConfig, cluster_token: str | None = None) -> None:
        self.config = config
        self._cluster_token = cluster_token  # the registry and every rank require it (None: no check)
        self._desired: dict[str, int] = {pool.name: pool.groups for pool in config.pools}
        self._slots: dict[tuple[str, int], GroupSlot] = {}
        self._policy = RestartPolicy(config.restart)
        self._probe = HealthProbe()
        self._board = WorkerBoard()
        self.metrics = ControllerMetrics([pool.name for pool in config.pools])
        self._metrics_endpoint: MetricsEndpoint | None = None
        self._registry: RegistryServer | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._closed = False
        self._drain_grace_s: dict[tuple[str, int], float] = {}
        self._autoscaler: Autoscaler | None = None

    # ---- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> str:
        """Start the registry and the reconcile loop (idempotent); the registry's ``host:port``."""
        if self._registry is None:
            host = resolve_host(self.config.network.interface_host, ray.util.get_node_ip_address())
            self._metrics_endpoint = MetricsEndpoint.start(
                self.metrics.registry, host, self.config.metrics.controller_port
            )
            self._board.controller_metrics_address = self._metrics_endpoint.address
            self._registry = await RegistryServer.start(
                self._board, host, self.config.registry.port, cluster_token=self._cluster_token
            )
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="controller-reconcile")
            if self.config.autoscaler.enabled:
                self._autoscaler = build_autoscaler(self.config, self, self.metrics.registry)
                self._autoscaler.start()
        return self._registry.address

    async def shutdown(self, grace_s: float = 0.0) -> None:
        """Stop everything this controller started; bounded by ``grace_s`` + a few timeouts. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._autoscaler is not None:
            await self._autoscaler.stop()
        self._kick()
        names = [name for s in self._slots.values() if s.group is not None for name in s.group.actor_names()]
        tasks = [t for t in [self._loop_task, *(s.task for s in self._slots.values())] if t is not None]
        for task in tasks:
            task.cancel()  # a cancelled start kills its partial group itself
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT_S)
        live = [s.group for s in self._slots.values() if s.group is not None]
        if grace_s > 0:
            await asyncio.gather(*(g.drain(grace_s, STOP_TIMEOUT_S) for g in live))
        await asyncio.gather(*(g.stop(STOP_GRACE_S, STOP_TIMEOUT_S) for g in live))
        for slot in self._slots.values():
            slot.group, slot.state = None, "stopping"
        await self._board.publish([])
        await _until_gone(names, STOP_TIMEOUT_S)
        await self._probe.close()
        if self._registry is not None:
            await self._registry.stop(grace_s=0.5)
        if self._metrics_endpoint is not None:
            self._metrics_endpoint.stop()
        self._slots.clear()

    # ---- queries ---------------------------------------------------------------------------------------

    async def registry_address(self) -> str:
        return self._registry.address if self._registry is not None else ""

    async def live_workers(self) -> list[dict[str, Any]]:
        """Every rank of every group: worker_id, pool, role, group, rank, address, ep_size, state."""
        return [record.to_dict() for record in self._records()]

    async def status(self) -> list[dict[str, Any]]:
        """One entry per group: state, generation, restarts, last error, placement strategy."""
        return [
            {
                "pool": s.pool.name,
                "group": s.index,
                "state": s.state,
                "generation": s.generation,
                "restarts": s.restarts,
                "last_error": s.last_error,
                "strategy": s.group.strategy if s.group is not None else "",
                "desired": not s.removing,
            }
            for s in sorted(self._slots.values(), key=lambda s: (s.pool.name, s.index))
        ]

    async def desired(self) -> dict[str, int]:
        return dict(self._desired)

    async def wait_ready(self, timeout_s: float) -> bool:
        """True once every desired group is ready, no extra group is left and the registry lists them all;
        False at the timeout or as soon as a group has failed for good (see ``status()`` for why)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if any(s.state == "failed" for s in self._slots.values()):
                return False
            if self._converged():
                # a group turns ready a step before the loop that readied it publishes it: publish now, so
                # that a router reading the registry right after this returns sees every ready worker
                await self._publish()
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(0.1, left))

    async def loads(self, timeout_s: float = 5.0) -> dict[str, dict[str, Any]]:
        """``GetLoad`` of every ready rank, by worker id. A group that cannot answer (a rank just died; the
        health loop will notice) is left out instead of failing the whole call."""
        out: dict[str, dict[str, Any]] = {}
        for slot in list(self._slots.values()):
            group = slot.group
            if slot.state == "ready" and group is not None:
                try:
                    loads = await group.load(timeout_s)
                except (GroupStartError, RayError) as exc:
                    logger.warning("%s: no load: %s", group.name, exc)
                    continue
                out.update({r.worker_id: load for r, load in zip(group.ranks, loads, strict=True)})
        return out

    # ---- operations ------------------------------------------------------------------------------------

    async def scale(self, pool: str, groups: int, grace_s: float = 30.0) -> dict[str, int]:
        """Set ``pool``'s desired group count; removed groups are drained for ``grace_s``, then stopped.
        The autoscaler (when on) counts this as a change: its cooldowns start now."""
        if self._autoscaler is not None:
            self._autoscaler.noted_external_change(pool)
        return await self.apply_scale(pool, groups, grace_s)

    async def autoscaler_decisions(self) -> list[dict[str, Any]]:
        """The autoscaler's recent decisions, oldest first ([] when it is off)."""
        return self._autoscaler.decisions() if self._autoscaler is not None else []

    # ---- the autoscaler's view (autoscaler.PoolControl) -------------------------------------------------

    def desired_groups(self) -> dict[str, int]:
        return dict(self._desired)

    def ready_groups(self) -> dict[str, int]:
        out = dict.fromkeys(self._desired, 0)
        for (pool, _), slot in self._slots.items():
            out[pool] += slot.state == "ready" and not slot.removing
        return out

    def ready_ranks(self) -> list[WorkerRecord]:
        return [r for r in self._records() if r.state == "ready"]

    def group_hosts(self, pool: str, first_removed: int) -> list[str]:
        """Hosts only the ranks of ``pool``'s groups from ``first_removed`` on use (a scale-down frees them;
        a host that also runs a kept group stays)."""

        def hosts(removed: bool) -> set[str]:
            slots = [s for (p, i), s in self._slots.items() if (p == pool and i >= first_removed) == removed]
            return {r.address.rsplit(":", 1)[0] for s in slots for r in s.records(self.config) if r.address}

        return sorted(hosts(removed=True) - hosts(removed=False))

    async def wait_removed(self, pool: str, groups: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while any(name == pool and index >= groups for name, index in self._slots):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.2)
        return True

    async def apply_scale(self, pool: str, groups: int, grace_s: float = 30.0) -> dict[str, int]:
        if pool not in self._desired:
            raise ValueError(f"pool: no pool named {pool!r}; pools: {sorted(self._desired)}")
        if groups < 0:
            raise ValueError(f"groups: must be >= 0, got {groups}")
        self.metrics.scaled(pool, self._desired[pool], groups)
        self._desired[pool] = groups
        for (name, index), _slot in self._slots.items():
            if name == pool and index >= groups:
                self._drain_grace_s[(name, index)] = grace_s
        self._kick()
        return dict(self._desired)

    async def drain(self, pool: str, group: int, grace_s: float = 30.0) -> bool:
        """Drain a ready group (routers see ``draining``; in-flight requests get ``grace_s``), stop it and
        start a fresh one in its place; returns when the old one is gone. False if it was not ready."""
        slot = self._slots.get((pool, group))
        if slot is None or slot.state != "ready" or slot.task is not None or slot.group is None:
            return False
        slot.state = "draining"
        await self._publish()
        task = self._spawn(slot, self._drain_and_replace(slot, grace_s))
        await asyncio.wait([task], timeout=grace_s + 2 * STOP_TIMEOUT_S)
        return task.done()

    # ---- the reconcile loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wake is not None
        while not self._closed:
            try:
                await self._reconcile()
            except Exception:  # one bad round must not end supervision
                logger.exception("controller: reconcile round failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.health.interval_s):
                    await self._wake.wait()
            self._wake.clear()

    async def _reconcile(self) -> None:
        self._converge_counts()
        now = time.monotonic()
        for slot in list(self._slots.values()):
            if slot.task is not None:
                continue
            if slot.removing:
                self._spawn(slot, self._remove(slot))
            elif slot.state in ("pending", "backoff") and slot.retry_at <= now:
                self._spawn(slot, self._start_group(slot))
        await self._check_ready_groups()
        await self._publish()

    def _converge_counts(self) -> None:
        for pool in self.config.pools:
            want = self._desired[pool.name]
            for index in range(want):
                if (pool.name, index) not in self._slots:
                    self._slots[(pool.name, index)] = GroupSlot(pool, index)
            for (name, index), slot in self._slots.items():
                if name == pool.name and index >= want and not slot.removing:
                    slot.removing = True
                    if slot.task is not None and slot.state == "starting":
                        slot.task.cancel()  # the start's own cleanup kills the partial group

    async def _check_ready_groups(self) -> None:
        ready = [s for s in self._slots.values() if s.state == "ready" and s.task is None and s.group is not None]
        timeout_s = self.config.health.timeout_s
        results = await asyncio.gather(*(s.group.check(self._probe, timeout_s) for s in ready if s.group))
        now = time.monotonic()
        for slot, health in zip(ready, results, strict=True):
            if slot.state != "ready":
                continue  # changed while we were checking (drain, scale)
            if health.dead is not None:
                await self._group_failed(slot, health.dead)
            elif health.problems:
                slot.failures += 1
                why = "; ".join(health.problems)
                logger.warning(
                    "%s-g%d: unhealthy (%d/%d): %s",
                    slot.pool.name,
                    slot.index,
                    slot.failures,
                    self._max_failures(),
                    why,
                )
                if slot.failures >= self._max_failures():
                    await self._group_failed(slot, why)
            else:
                slot.failures = 0
                if slot.restarts and self._policy.forgives(now - slot.ready_since):
                    slot.restarts = 0

    def _max_failures(self) -> int:
        return self.config.health.failures

    async def _start_group(self, slot: GroupSlot) -> None:
        slot.generation += 1
        slot.state = "starting"
        group = WorkerGroup(self.config, slot.pool, slot.index, slot.generation, cluster_token=self._cluster_token)
        slot.group = group
        await self._publish()
        try:
            await group.start(self.config.health.start_timeout_s, self._probe, self.config.health.timeout_s)
        except GroupStartError as exc:
            await self._forget(group)
            slot.group = None
            self._after_failure(slot, str(exc))
            return
        except asyncio.CancelledError:
            await self._forget(group)
            slot.group, slot.state = None, "pending"
            raise
        slot.state, slot.failures, slot.ready_since = "ready", 0, time.monotonic()
        logger.info("%s: ready (generation %d, %s)", group.name, slot.generation, group.strategy)

    async def _group_failed(self, slot: GroupSlot, reason: str) -> None:
        logger.error("%s-g%d: failed, recreating it: %s", slot.pool.name, slot.index, reason)
        if slot.group is not None:
            slot.group.kill()
            await self._forget(slot.group)
        slot.group = None
        self._after_failure(slot, reason)

    def _after_failure(self, slot: GroupSlot, reason: str) -> None:
        slot.restarts += 1
        slot.last_error = reason
        slot.failures = 0
        if self._policy.exhausted(slot.restarts):
            slot.state = "failed"
            logger.error("%s-g%d: gave up after %d restarts", slot.pool.name, slot.index, slot.restarts - 1)
        else:
            slot.state = "backoff"
            self.metrics.restarted(slot.pool.name)
            slot.retry_at = time.monotonic() + self._policy.delay_s(slot.restarts)

    async def _drain_and_replace(self, slot: GroupSlot, grace_s: float) -> None:
        await self._drain_and_stop(slot, grace_s)
        slot.state, slot.retry_at = "pending", 0.0  # a planned replacement: not a restart

    async def _remove(self, slot: GroupSlot) -> None:
        grace_s = self._drain_grace_s.pop((slot.pool.name, slot.index), 0.0)
        await self._drain_and_stop(slot, grace_s)
        del self._slots[(slot.pool.name, slot.index)]
        logger.info("%s-g%d: removed", slot.pool.name, slot.index)

    async def _drain_and_stop(self, slot: GroupSlot, grace_s: float) -> None:
        group = slot.group
        if group is not None:
            if slot.state in ("ready", "draining") and grace_s > 0:
                slot.state = "draining"
                await self._publish()
                await group.drain(grace_s, STOP_TIMEOUT_S)
            slot.state = "stopping"
            await self._publish()
            await group.stop(STOP_GRACE_S, STOP_TIMEOUT_S)
            await self._forget(group)
        slot.group = None

    # ---- helpers ---------------------------------------------------------------------------------------

    def _spawn(self, slot: GroupSlot, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        slot.task = task

        def done(t: asyncio.Task[None]) -> None:
            if slot.task is t:
                slot.task = None
            if not t.cancelled() and t.exception() is not None:
                logger.error("%s-g%d: %r", slot.pool.name, slot.index, t.exception())
            self._kick()

        task.add_done_callback(done)
        return task

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _converged(self) -> bool:
        for pool in self.config.pools:
            want = self._desired[pool.name]
            slots = [s for (name, _), s in self._slots.items() if name == pool.name]
            if len(slots) != want or any(s.state != "ready" or s.task is not None for s in slots):
                return False
        return True

    def _records(self) -> list[WorkerRecord]:
        return [
            r
            for s in sorted(self._slots.values(), key=lambda s: (s.pool.name, s.index))
            for r in s.records(self.config)
        ]

    async def _publish(self) -> None:
        if not self._closed:
            slots = self._slots.values()
            self.metrics.observe(
                self._desired, ((s.pool.name, PUBLISHED_STATE[s.state], s.pool.ep_size) for s in slots)
            )
            await self._board.publish(self._records())

    async def _forget(self, group: WorkerGroup) -> None:
        for slot in group.ranks:
            if slot.address:
                await self._probe.forget(slot.address)


async def _until_gone(names: list[str], timeout_s: float) -> None:
    """Wait (bounded) until Ray no longer lists the killed actors as alive."""
    deadline = time.monotonic() + timeout_s
    wanted = set(names)
    while wanted and time.monotonic() < deadline:
        alive = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if isinstance(a, dict)}
        if not wanted & alive:
            return
        await asyncio.sleep(0.1)
    if wanted:
        logger.warning("controller: actors still listed after %.0fs: %s", timeout_s, sorted(wanted))


CONTROLLER_ACTOR = ray.remote(Controller)  # options are set by ControllerHandle.launch
CONTROLLER_MAX_CONCURRENCY = 64
__all__ = ["ACTOR_NAME_PREFIX", "CONTROLLER_ACTOR", "CONTROLLER_MAX_CONCURRENCY", "Controller", "GroupSlot"]
