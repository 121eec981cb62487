"""``ControllerHandle``: the driver-side, synchronous API of the ``Controller`` actor.

Lifecycle: ``ControllerHandle.launch(config)`` creates the named controller actor (detached when
``ray.detached`` is set) on this driver's node, so the registry binds an interface of the node
the operator chose, and starts it; ``connect(namespace)`` finds a running (detached) one; the
methods forward to the actor with bounded waits; ``shutdown()`` stops everything the controller
started, then kills the controller itself. Needs a connected Ray (``RayRuntime.start``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from k2serve.cluster.config import ClusterConfig
from k2serve.cluster.controller import CONTROLLER_ACTOR, CONTROLLER_MAX_CONCURRENCY
from k2serve.cluster.worker_record import WorkerRecord

CONTROLLER_NAME = "k2serve-controller"


@dataclass
class ControllerHandle:
    actor: Any  # ray ActorHandle of a Controller
    registry_address: str
    call_timeout_s: float = 30.0

    @classmethod
    def launch(
        cls,
        config: ClusterConfig,
        *,
        name: str = CONTROLLER_NAME,
        timeout_s: float = 60.0,
        cluster_token: str | None = None,
    ) -> ControllerHandle:
        """Start the controller actor on this node; with ``cluster_token`` its registry and every rank
        require that token (``proto/cluster_token.py``)."""
        here = ray.get_runtime_context().get_node_id()
        actor: Any = CONTROLLER_ACTOR.options(
            name=name,
            namespace=config.ray.namespace,
            num_cpus=0,
            max_concurrency=CONTROLLER_MAX_CONCURRENCY,
            max_restarts=0,
            max_task_retries=0,
            lifetime="detached" if config.ray.detached else None,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
        ).remote(config, cluster_token)
        try:
            address = ray.get(actor.start.remote(), timeout=timeout_s)
        except BaseException:
            ray.kill(actor, no_restart=True)
            raise
        return cls(actor, str(address))

    @classmethod
    def connect(cls, namespace: str, *, name: str = CONTROLLER_NAME, timeout_s: float = 30.0) -> ControllerHandle:
        actor = ray.get_actor(name, namespace=namespace)
        return cls(actor, str(ray.get(actor.registry_address.remote(), timeout=timeout_s)))

    def _call(self, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        return ray.get(getattr(self.actor, method).remote(*args), timeout=timeout_s or self.call_timeout_s)

    def live_workers(self) -> list[WorkerRecord]:
        return [WorkerRecord(**w) for w in self._call("live_workers")]

    def status(self) -> list[dict[str, Any]]:
        return list(self._call("status"))

    def desired(self) -> dict[str, int]:
        return dict(self._call("desired"))

    def wait_ready(self, timeout_s: float) -> bool:
        return bool(self._call("wait_ready", timeout_s, timeout_s=timeout_s + self.call_timeout_s))

    def scale(self, pool: str, groups: int, grace_s: float = 30.0) -> dict[str, int]:
        return dict(self._call("scale", pool, groups, grace_s))

    def drain(self, pool: str, group: int, grace_s: float = 30.0) -> bool:
        return bool(self._call("drain", pool, group, grace_s, timeout_s=grace_s + 3 * self.call_timeout_s))

    def autoscaler_decisions(self) -> list[dict[str, Any]]:
        return list(self._call("autoscaler_decisions"))

    def loads(self) -> dict[str, dict[str, Any]]:
        return dict(self._call("loads"))

    def shutdown(self, grace_s: float = 0.0, timeout_s: float = 60.0) -> None:
        """Stop every group and the registry, then kill the controller actor (even if that failed)."""
        try:
            ray.get(self.actor.shutdown.remote(grace_s), timeout=grace_s + timeout_s)
        finally:
            ray.kill(self.actor, no_restart=True)
