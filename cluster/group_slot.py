"""``GroupSlot``: the controller's record of one expert-parallel group of a pool, across its restarts.

Lifecycle: the ``Controller`` creates a slot per (pool, group index) when the desired count reaches
it, moves its ``state`` through ``GroupState`` (see the controller's docstring for the transitions),
keeps the live ``WorkerGroup`` and the restart bookkeeping on it, and drops it once a removed group
is gone. ``PUBLISHED_STATE`` maps each state to what the registry tells routers.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

from k2serve.cluster.config import ClusterConfig
from k2serve.cluster.pool_config import PoolConfig
from k2serve.cluster.worker_group import WorkerGroup
from k2serve.cluster.worker_record import WorkerRecord, WorkerState

GroupState = Literal["pending", "starting", "ready", "draining", "stopping", "backoff", "failed"]
PUBLISHED_STATE: dict[GroupState, WorkerState] = {
    "pending": "starting",
    "starting": "starting",
    "backoff": "starting",
    "ready": "ready",
    "draining": "draining",
    "stopping": "stopping",
    "failed": "failed",
}


@dataclass
class GroupSlot:
    pool: PoolConfig
    index: int
    state: GroupState = "pending"
    group: WorkerGroup | None = None
    generation: int = 0
    restarts: int = 0
    failures: int = 0  # consecutive unhealthy health rounds
    retry_at: float = 0.0
    ready_since: float = 0.0
    last_error: str = ""
    removing: bool = False  # above the desired count: drained, stopped, then dropped
    task: asyncio.Task[None] | None = None

    def records(self, config: ClusterConfig) -> list[WorkerRecord]:
        group = self.group or WorkerGroup(config, self.pool, self.index, self.generation)
        return group.records(PUBLISHED_STATE[self.state])
