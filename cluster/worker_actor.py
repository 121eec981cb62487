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

SIGTERM to a serving rank's process (an operator, a node shutdown) drains instead of exiting at
once: gRPC health turns NOT_SERVING and new calls get UNAVAILABLE "draining" right away, and the
rank asks the controller to drain and replace its whole group (an expert-parallel group cannot lose
one rank while its peers still serve; the controller drains every rank for the grace,
``K2SERVE_WORKER_GRACE_S``, stops the group, kills it and starts a fresh one). Without a
controller the rank drains alone and exits when idle or at the grace. Every path ends the process
within the grace plus ``SIGTERM_EXIT_MARGIN_S``; a second SIGTERM, or one to a rank that is not
serving, exits at once (Ray's own behaviour).

The actor stays thin: all serving logic lives in ``k2serve.workers`` (``GroupRank``,
``WorkerServer``); Ray appears only here and in the rest of ``cluster``. The actor is async, so
``health`` and ``load`` run on its event loop between the engine's steps. torch and the model code
are imported inside the methods, so the controller (which imports this module) never loads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import ray
from google.protobuf.json_format import MessageToDict

from k2serve.cluster.rank_plan import build_rank_spec, resolve_host

if TYPE_CHECKING:
    from k2serve.workers.group_rank import GroupRank

logger = logging.getLogger(__name__)

MAX_CONCURRENCY = 32  # health / load / drain calls while a long start or step is in flight
GRACE_ENV = "K2SERVE_WORKER_GRACE_S"  # seconds a rank's requests get after a SIGTERM to its process
DEFAULT_GRACE_S = 20.0  # under Kubernetes' default terminationGracePeriodSeconds (30 s)
SIGTERM_EXIT_MARGIN_S = 25.0  # on top of the grace: the controller's stop and kill of the group
_WORKER_ID = re.compile(r"^(?P<pool>.+)-g(?P<group>\d+)-r(?P<rank>\d+)$")  # worker_record.worker_id


class WorkerStartError(RuntimeError):
    """A rank could not be built or served; the message names the worker and the original error."""


class WorkerActor:
    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self._store: Any = None  # the group's TCPStore (rank 0), alive as long as this actor
        self._rank: GroupRank | None = None
        self._server: Any = None  # k2serve.workers.service.WorkerServer once started
        self._starting = False
        self._terminating: asyncio.Task[None] | None = None  # the drain a SIGTERM started

    async def host_group_store(self, host: str, size: int, timeout_s: float) -> str:
        """Start this group's rendezvous store (rank 0, before the others start); ``host:port``."""
        from k2serve.workers.parallel import host_store

        if self._store is None:
            bind = resolve_host(host, ray.util.get_node_ip_address())
            self._store = host_store(bind, timeout_s=timeout_s)
        return f"{self._store.host}:{self._store.port}"

    async def start(self, rank_spec: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, str]:
        """Build the rank and serve it; returns ``{"address", "metrics_address"}`` (``host:port`` each)."""
        from k2serve.workers.fault_plan import ENV_VAR as FAULTS_ENV
        from k2serve.workers.fault_plan import FaultPlan
        from k2serve.workers.group_rank import GroupRank
        from k2serve.workers.service import WorkerOptions, WorkerServer

        if self._server is not None or self._starting:
            raise RuntimeError(f"{self.worker_id}: already started")
        self._starting = True
        try:
            spec = build_rank_spec(rank_spec)
            opts = dict(options)
            opts["host"] = resolve_host(opts["host"], ray.util.get_node_ip_address())
            # test-only fault hooks: the env of the actor's process (a local Ray passes the driver's on)
            opts["faults"] = FaultPlan.parse(os.environ.get(FAULTS_ENV, ""))
            self._rank = await asyncio.to_thread(GroupRank.build, spec)
            self._server = await WorkerServer.start(self._rank, WorkerOptions(**opts))
        except Exception as exc:
            # errors cross the actor boundary as text: not every exception type survives pickling
            # (one with a custom __init__ arrives as Ray's UnserializableException)
            logger.exception("%s: start failed", self.worker_id)
            raise WorkerStartError(f"{self.worker_id}: {type(exc).__name__}: {exc}") from None
        self._drain_on_sigterm(float(os.environ.get(GRACE_ENV, DEFAULT_GRACE_S)))
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

    # ---- SIGTERM -----------------------------------------------------------------------------------------

    def _drain_on_sigterm(self, grace_s: float) -> None:
        """Make SIGTERM start ``_terminate`` on this actor's loop instead of exiting at once.

        Ray's worker installs its own SIGTERM handler in the process's main thread, and this async
        actor's methods run on another thread, where ``signal.signal`` is refused. That handler calls
        ``ray._private.worker.raise_sys_exit_with_custom_error_message`` (a module global, looked up
        at each call) to exit; wrapping that global is the one seam left. The wrapper runs in the
        main thread and only hands over to the loop; anything else still exits the Ray way."""
        import ray._private.worker as ray_worker

        loop = asyncio.get_running_loop()
        exit_now = ray_worker.raise_sys_exit_with_custom_error_message

        def on_exit(message: str, exit_code: int = 0) -> None:
            if "SIGTERM" in message and self._server is not None and self._terminating is None:
                loop.call_soon_threadsafe(self._begin_terminate, grace_s)
                return
            exit_now(message, exit_code)

        ray_worker.raise_sys_exit_with_custom_error_message = on_exit

    def _begin_terminate(self, grace_s: float) -> None:
        if self._terminating is None:
            self._terminating = asyncio.get_running_loop().create_task(self._terminate(grace_s), name="sigterm")

    async def _terminate(self, grace_s: float) -> None:
        """Drain (at once: NOT_SERVING, new calls UNAVAILABLE); the controller drains, stops and kills
        the group, or this rank stops alone; the process ends within ``grace_s + SIGTERM_EXIT_MARGIN_S``."""
        started = time.monotonic()
        logger.warning("%s: SIGTERM: draining for up to %.0f s", self.worker_id, grace_s)
        server = self._server
        local = asyncio.create_task(server.drain(grace_s)) if server is not None else None
        try:
            async with asyncio.timeout(grace_s + SIGTERM_EXIT_MARGIN_S):
                if await self._controller_replaces_group(grace_s):
                    await asyncio.Event().wait()  # until the controller kills this actor (or the bound)
                if local is not None:
                    await local  # idle, or the grace ran out
                await self.stop(grace_s=1.0)
        except TimeoutError:
            logger.warning("%s: not stopped by the controller in time", self.worker_id)
        except Exception:
            logger.exception("%s: the SIGTERM drain failed", self.worker_id)
        logger.warning("%s: exiting %.1f s after SIGTERM", self.worker_id, time.monotonic() - started)
        logging.shutdown()
        os._exit(0)  # Ray reports the actor dead; the controller restarts its group if it still wants it

    async def _controller_replaces_group(self, grace_s: float) -> bool:
        """Ask the controller to drain and replace this rank's group. True: it does (its ``drain``
        returns only after killing this actor), or it is already stopping or replacing the group
        (``drain`` says False at once); False: there is no controller to ask."""
        from k2serve.cluster.controller_handle import CONTROLLER_NAME  # the controller imports this module

        match = _WORKER_ID.match(self.worker_id)
        if match is None:
            return False
        namespace = ray.get_runtime_context().namespace
        try:
            controller = await asyncio.to_thread(ray.get_actor, CONTROLLER_NAME, namespace)
            drain: Any = controller.drain.remote(match["pool"], int(match["group"]), grace_s)
        except Exception as exc:  # no controller (a test's bare actor, a stopping cluster)
            logger.warning("%s: no controller to drain the group: %s", self.worker_id, exc)
            return False
        with contextlib.suppress(Exception):
            await drain
        return True


WORKER_ACTOR = ray.remote(WorkerActor)  # options (resources, placement, concurrency) are set per actor
