"""``WorkerActor``: the Ray actor that hosts one rank of an expert-parallel group.

Lifecycle (driven by the controller; every call bounded on its side):

1. created in its group's placement group, one bundle per rank (``num_cpus=cpus_per_rank``,
   ``num_gpus=gpus_per_rank``);
2. rank 0 only: ``host_group_store(host, size)`` starts the group's ``TCPStore`` in this process
   and returns its ``host:port`` rendezvous, before any rank starts;
3. ``start(rank_spec, options)`` on every rank at once (joining the group is a collective): builds
   the ``GroupRank`` (loads the model; in a thread, so health calls keep being answered) and
   starts the gRPC ``WorkerServer``; returns its address;
4. ``health()`` / ``load()`` while it serves; ``drain(grace_s)`` before a planned stop;
5. ``stop()``, then the controller kills the actor.

The actor stays thin: all serving logic lives in ``k2serve.workers`` (``GroupRank``,
``WorkerServer``); Ray appears only here and in the rest of ``cluster``. The actor is async, so
``health`` and ``load`` run on its event loop between the engine's steps. torch and the model code
are imported inside the methods, so the controller (which imports this module) never loads them.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import ray
from google.protobuf.json_format import MessageToDict

from k2serve.cluster.rank_plan import build_rank_spec, resolve_host

if TYPE_CHECKING:
    from k2serve.workers.group_rank import GroupRank

logger = logging.getLogger(__name__)

MAX_CONCURRENCY = 32  # health / load / drain calls while a long start or step is in flight


class WorkerStartError(RuntimeError):
    """A rank could not be built or served; the message names the worker and the original error."""


class WorkerActor:
    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self._store: Any = None  # the group's TCPStore (rank 0), alive as long as this actor
        self._rank: GroupRank | None = None
        self._server: Any = None  # k2serve.workers.service.WorkerServer once started
        self._starting = False

    async def host_group_store(self, host: str, size: int, timeout_s: float) -> str:
        """Start this group's rendezvous store (rank 0, before the others start); ``host:port``."""
        from k2serve.workers.parallel import host_store

        if self._store is None:
            bind = resolve_host(host, ray.util.get_node_ip_address())
            self._store = host_store(bind, timeout_s=timeout_s)
        return f"{self._store.host}:{self._store.port}"

    async def start(self, rank_spec: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, str]:
        """Build the rank and serve it; returns ``{"address", "metrics_address"}`` (``host:port`` each)."""
        from k2serve.workers.group_rank import GroupRank
        from k2serve.workers.service import WorkerOptions, WorkerServer

        if self._server is not None or self._starting:
            raise RuntimeError(f"{self.worker_id}: already started")
        self._starting = True
        try:
            spec = build_rank_spec(rank_spec)
            opts = dict(options)
            opts["host"] = resolve_host(opts["host"], ray.util.get_node_ip_address())
            self._rank = await asyncio.to_thread(GroupRank.build, spec)
            self._server = await WorkerServer.start(self._rank, WorkerOptions(**opts))
        except Exception as exc:
            # errors cross the actor boundary as text: not every exception type survives pickling
            # (one with a custom __init__ arrives as Ray's UnserializableException)
            logger.exception("%s: start failed", self.worker_id)
            raise WorkerStartError(f"{self.worker_id}: {type(exc).__name__}: {exc}") from None
        logger.info("%s serving on %s (pid %d)", self.worker_id, self._server.address, os.getpid())
        return {"address": self._server.address, "metrics_address": self._server.metrics_address}

    async def health(self) -> bool:
        """Serving, with its expert-parallel group intact. Any answer proves the process is alive; False
        means the rank cannot serve until it is restarted (the engine failed, or a peer of its group)."""
        if self._server is None or self._rank is None:
            return False
        return self._rank.ctx.broken is None and self._rank.engine.failure is None

    async def load(self) -> dict[str, Any]:
        if self._server is None:
            return {}
        return MessageToDict(self._server.load(), preserving_proto_field_name=True)

    async def drain(self, grace_s: float) -> None:
        if self._server is not None:
            await self._server.drain(grace_s)

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop(grace_s)
        if self._rank is not None:
            rank, self._rank = self._rank, None
            rank.close()
        self._store = None

    async def pid(self) -> int:
        return os.getpid()


WORKER_ACTOR = ray.remote(WorkerActor)  # options (resources, placement, concurrency) are set per actor
