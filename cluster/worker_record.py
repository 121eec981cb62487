"""``WorkerRecord``: what the cluster knows about one live rank, as the controller and the registry say it.

Lifecycle: the controller makes a new record whenever a rank's state or address changes (records
are frozen values); the registry turns a tuple of them into a ``WorkerSet`` message at its edge,
and ``RegistryClient`` turns messages back into records.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

WorkerState = Literal["starting", "ready", "draining", "failed", "stopping"]


def worker_id(pool: str, group: int, rank: int) -> str:
    """Stable across restarts of the group: ``"{pool}-g{group}-r{rank}"``."""
    return f"{pool}-g{group}-r{rank}"


@dataclass(frozen=True)
class WorkerRecord:
    worker_id: str
    pool: str  # prefill | decode | colocated
    role: str  # prefill | decode | mixed
    group: int
    rank: int
    ep_size: int
    address: str  # host:port of its Worker gRPC service; "" until it has one
    state: WorkerState
    metrics_address: str = ""  # host:port of its /metrics; "" when it serves none

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class WorkerSnapshot:
    """One published version of the live set."""

    version: int
    workers: tuple[WorkerRecord, ...]
    controller_metrics_address: str = ""

    def ready(self, pool: str | None = None) -> tuple[WorkerRecord, ...]:
        return tuple(w for w in self.workers if w.state == "ready" and (pool is None or w.pool == pool))
