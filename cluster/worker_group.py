"""``WorkerGroup``: the live resources of one expert-parallel group (placement group + one actor per rank).

Lifecycle (one object per attempt; a restart builds a new one with the next ``generation``):

1. ``start(timeout_s)``: reserve the placement group (``STRICT_PACK`` when one node holds the
   group, else ``PACK``), create one ``WorkerActor`` per bundle, let rank 0 host the group's
   rendezvous store, start every rank at once (joining the group is collective), then wait until
   every rank's gRPC health says SERVING. All of it within ``timeout_s``; on any failure the
   partial group is killed and ``GroupStartError`` says which step failed.
2. ``check(probe, timeout_s)`` while it serves: actor liveness and gRPC health of every rank, in
   parallel. An EP group cannot lose a rank, so one dead actor is the death of the group, and so is
   a rank that reports its engine or its group failed (a peer's collective timed out or broke: no
   rank of that group can serve again, so there is nothing to wait for).
3. ``drain(grace_s)`` before a planned stop; ``stop(grace_s)`` asks every rank to stop (bounded),
   then ``kill()`` kills the actors and removes the placement group. ``kill()`` alone is for a
   failed group; it is idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from k2serve.cluster import placement
from k2serve.cluster.config import ClusterConfig
from k2serve.cluster.health_probe import HealthProbe
from k2serve.cluster.pool_config import PoolConfig
from k2serve.cluster.rank_plan import rank_spec_dict, worker_options_dict
from k2serve.cluster.worker_actor import MAX_CONCURRENCY, WORKER_ACTOR
from k2serve.cluster.worker_record import WorkerRecord, WorkerState, worker_id

logger = logging.getLogger(__name__)
T = TypeVar("T")
ACTOR_NAME_PREFIX = "k2serve-worker"


class GroupStartError(RuntimeError):
    """A group could not be started; the message names the group and the step."""


@dataclass(frozen=True)
class GroupHealth:
    dead: str | None = None  # an actor is gone, or a rank reports its group failed: the group is lost
    problems: tuple[str, ...] = ()  # unhealthy answers or timeouts (counted by the controller)

    @property
    def ok(self) -> bool:
        return self.dead is None and not self.problems


@dataclass
class RankSlot:
    worker_id: str
    rank: int
    actor: Any = None  # ray ActorHandle of a WorkerActor
    address: str = ""
    metrics_address: str = ""


@dataclass
class WorkerGroup:
    config: ClusterConfig
    pool: PoolConfig
    index: int
    generation: int
    ranks: list[RankSlot] = field(default_factory=list)
    placement_group: Any = None
    strategy: str = ""
    cluster_token: str | None = field(default=None, repr=False)  # each rank's server requires it

    def __post_init__(self) -> None:
        if not self.ranks:
            self.ranks = [RankSlot(worker_id(self.pool.name, self.index, r), r) for r in range(self.pool.ep_size)]

    @property
    def name(self) -> str:
        return f"{self.pool.name}-g{self.index}"

    def actor_name(self, slot: RankSlot) -> str:
        return f"{ACTOR_NAME_PREFIX}:{slot.worker_id}:{self.generation}"

    def records(self, state: WorkerState) -> list[WorkerRecord]:
        return [
            WorkerRecord(
                worker_id=slot.worker_id,
                pool=self.pool.name,
                role=self.pool.role,
                group=self.index,
                rank=slot.rank,
                ep_size=self.pool.ep_size,
                address=slot.address,
                state=state,
                metrics_address=slot.metrics_address,
            )
            for slot in self.ranks
        ]

    # ---- start ------------------------------------------------------------------------------------------

    async def start(self, timeout_s: float, probe: HealthProbe, check_timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        try:
            await self._start(deadline, probe, check_timeout_s)
        except BaseException as exc:
            self.kill()
            if isinstance(exc, GroupStartError | asyncio.CancelledError):
                raise
            raise GroupStartError(f"{self.name}: {_describe(exc)}") from exc

    async def _start(self, deadline: float, probe: HealthProbe, check_timeout_s: float) -> None:
        resources = self.pool.rank_resources()
        try:
            self.placement_group = await placement.reserve(
                f"k2serve:{self.name}:{self.generation}", resources, self.pool.ep_size, _left(deadline)
            )
        except TimeoutError as exc:
            fits = placement.fits_cluster(resources, self.pool.ep_size, placement.alive_node_resources())
            why = "waiting for free resources" if fits else "the cluster's nodes cannot hold it at all"
            raise GroupStartError(
                f"{self.name}: placement group of {self.pool.ep_size} x {resources} not reserved in time ({why})"
            ) from exc
        self.strategy = placement.group_strategy(resources, self.pool.ep_size, placement.alive_node_resources())
        host = self.config.network.interface_host
        if _loopback(host) and len(placement.nodes_of(self.placement_group)) > 1:
            raise GroupStartError(
                f"{self.name}: the group spans several nodes but network.interface_host is {host}; "
                "set it to 'node' (each node's Ray IP) or a routable address"
            )
        for slot in self.ranks:
            slot.actor = WORKER_ACTOR.options(
                name=self.actor_name(slot),
                namespace=self.config.ray.namespace,
                max_concurrency=MAX_CONCURRENCY,
                max_restarts=0,
                max_task_retries=0,
                num_cpus=self.pool.cpus_per_rank,
                num_gpus=self.pool.gpus_per_rank,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.placement_group, placement_group_bundle_index=slot.rank
                ),
            ).remote(slot.worker_id)
        rendezvous: str | None = None
        if self.pool.ep_size > 1:
            host = self.config.network.interface_host
            store = self.ranks[0].actor.host_group_store.remote(host, self.pool.ep_size, self.pool.collective_timeout_s)
            rendezvous = await _bounded(store, deadline, f"{self.name}: rank 0 hosting the group store")
        starts = [
            slot.actor.start.remote(
                rank_spec_dict(self.config, self.pool, slot.rank, rendezvous),
                worker_options_dict(self.config, self.pool, slot.worker_id, self.cluster_token),
            )
            for slot in self.ranks
        ]
        served: list[Any] = await _bounded(_gather(starts), deadline, f"{self.name}: building and serving the ranks")
        for slot, endpoints in zip(self.ranks, served, strict=True):
            slot.address, slot.metrics_address = str(endpoints["address"]), str(endpoints["metrics_address"])
        await self._until_serving(deadline, probe, check_timeout_s)

    async def _until_serving(self, deadline: float, probe: HealthProbe, check_timeout_s: float) -> None:
        while True:
            answers = await asyncio.gather(
                *(probe.check(slot.address, min(check_timeout_s, _left(deadline))) for slot in self.ranks)
            )
            problems = [a for a in answers if a is not None]
            if not problems:
                return
            if _left(deadline) <= 0.1:
                raise GroupStartError(f"{self.name}: ranks not SERVING in time: {'; '.join(problems)}")
            await asyncio.sleep(min(0.1, _left(deadline)))

    # ---- serve ------------------------------------------------------------------------------------------

    async def check(self, probe: HealthProbe, timeout_s: float, *, expect_serving: bool = True) -> GroupHealth:
        """Liveness of every actor, and (unless draining) SERVING on every rank's gRPC health."""
        alive = await asyncio.gather(*(self._actor_alive(slot, timeout_s) for slot in self.ranks))
        if None in alive and any(a is not None and a.startswith("failed:") for a in alive):
            # a rank that answered healthy beside a failed peer may have died just after (the cause): ask again
            again = [
                self._actor_alive(s, timeout_s) if a is None else _now(a)
                for s, a in zip(self.ranks, alive, strict=True)
            ]
            alive = await asyncio.gather(*again)
        # a dead actor first (the cause), else a survivor whose group failed (the effect)
        for fatal in ("dead:", "failed:"):
            lost = next((a for a in alive if a is not None and a.startswith(fatal)), None)
            if lost is not None:
                return GroupHealth(dead=f"{self.name}: {lost}")
        problems = [a for a in alive if a is not None]
        if expect_serving:
            answers = await asyncio.gather(*(probe.check(slot.address, timeout_s) for slot in self.ranks))
            problems += [a for a in answers if a is not None]
        return GroupHealth(problems=tuple(f"{self.name}: {p}" for p in problems))

    async def _actor_alive(self, slot: RankSlot, timeout_s: float) -> str | None:
        try:
            async with asyncio.timeout(timeout_s):
                serving = await _await(slot.actor.health.remote())
        except RayActorError as exc:
            return f"dead: rank {slot.rank} ({slot.worker_id}) actor died: {_first_line(exc)}"
        except (TimeoutError, GetTimeoutError):
            return f"rank {slot.rank} ({slot.worker_id}) actor did not answer within {timeout_s:g}s"
        if not serving:
            return f"failed: rank {slot.rank} ({slot.worker_id}) reports its engine or its expert-parallel group failed"
        return None

    async def load(self, timeout_s: float) -> list[dict[str, Any]]:
        return list(await _bounded(_gather([s.actor.load.remote() for s in self.ranks]), time.monotonic() + timeout_s))

    # ---- stop -------------------------------------------------------------------------------------------

    async def drain(self, grace_s: float, timeout_s: float) -> None:
        """Health NOT_SERVING, refuse new requests, let in-flight ones finish (at most ``grace_s``)."""
        await self._on_every_rank("drain", grace_s, timeout_s)

    async def stop(self, grace_s: float, timeout_s: float) -> None:
        """Ask every rank to stop (bounded), then kill whatever is left."""
        try:
            await self._on_every_rank("stop", grace_s, timeout_s)
        finally:
            self.kill()

    async def _on_every_rank(self, method: str, grace_s: float, timeout_s: float) -> None:
        refs = [getattr(s.actor, method).remote(grace_s) for s in self.ranks if s.actor is not None]
        try:
            await _bounded(_gather(refs), time.monotonic() + grace_s + timeout_s, f"{self.name}: {method}")
        except (GroupStartError, RayError) as exc:
            logger.warning("%s: %s did not complete on every rank: %s", self.name, method, _describe(exc))

    def kill(self) -> None:
        for slot in self.ranks:
            if slot.actor is not None:
                try:
                    ray.kill(slot.actor, no_restart=True)
                except (RayError, ValueError) as exc:
                    logger.debug("%s: kill: %s", slot.worker_id, exc)
                slot.actor = None
        placement.release(self.placement_group)
        self.placement_group = None

    def actor_names(self) -> list[str]:
        return [self.actor_name(slot) for slot in self.ranks]


def _loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host in ("::1", "[::1]")


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


async def _await(ref: Any) -> Any:
    return await ref


async def _now(value: T) -> T:
    return value


async def _gather(refs: Iterable[Any]) -> list[Any]:
    return list(await asyncio.gather(*(_await(r) for r in refs)))


async def _bounded(work: Awaitable[T] | Any, deadline: float, what: str = "call") -> T:
    try:
        async with asyncio.timeout(_left(deadline)):
            return await _await(work)
    except TimeoutError as exc:
        raise GroupStartError(f"{what}: timed out") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _describe(exc: BaseException) -> str:
    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None else exc
    return f"{type(cause).__name__}: {_first_line(cause)}"
