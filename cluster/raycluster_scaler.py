"""``RayClusterScaler``: resizes a pool's KubeRay worker group, so that Kubernetes adds or removes its pods.

On Kubernetes a pool's groups need worker pods (GPU nodes) before the controller can place them.
The autoscaler therefore resizes two things: the controller's desired groups, and the ``replicas``
of the pool's worker group in the RayCluster (``spec.workerGroupSpecs[i]``, found by ``groupName``).
Pods = groups x ``pods_per_group[pool]``.

Lifecycle: ``from_settings`` loads the in-cluster service-account config (or ``~/.kube/config``
outside a pod) and resolves the namespace once. Each ``resize`` then GETs the RayCluster, builds
an RFC 6902 JSON Patch with ``resize_patch`` and PATCHes it (``application/json-patch+json``).
The patch opens with a ``test`` of the group's ``groupName`` at the index the GET found, so a
worker-group list that changed between GET and PATCH makes the server refuse the whole patch. The
write cannot land on another group. On 409/422 the scaler reads again and retries once. Any other
API error becomes ``RayClusterScaleError``. Calls are synchronous and bounded by
``request_timeout_s``; the asyncio autoscaler runs them in ``asyncio.to_thread``.

KubeRay's rules that the patch follows (ray-operator ``reconcilePods``):

- KubeRay clamps ``replicas`` into ``[minReplicas, maxReplicas]``. The patch clamps too and never
  widens the bounds: they are the operator's GPU-node budget (the chart sets them from the
  autoscaler's min/max groups), so widening them would let a wrong decision spend past it, and an
  out-of-range ``replicas`` would be ignored by KubeRay anyway. A clamped resize says so
  (``ResizeResult.clamped``, ``requested_replicas``).
- With the Ray autoscaler off, KubeRay deletes *random* pods when ``replicas`` falls. It always
  deletes the pods named in ``scaleStrategy.workersToDelete`` first. A scale-down names the pods of
  the drained group there, in the same patch as ``replicas``, so exactly those pods go.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from k2serve.cluster.autoscaler_settings import KubernetesScaling

logger = logging.getLogger(__name__)

T = TypeVar("T")

RAYCLUSTER_GROUP, RAYCLUSTER_VERSION, RAYCLUSTER_PLURAL = "ray.io", "v1", "rayclusters"
JSON_PATCH = "application/json-patch+json"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_MAX_REPLICAS_DEFAULT = 2**31 - 1  # the CRD's defaults: minReplicas 0, maxReplicas int32 max, replicas 0
_RETRIED_STATUSES = (409, 422)  # a failed `test` op (the API server answers 422; some proxies 409)


class RayClusterSpecError(ValueError):
    """The RayCluster object cannot be resized as asked (a malformed field, duplicate groups)."""


class UnknownWorkerGroupError(RayClusterSpecError):
    """No worker group of that ``groupName``; ``groups`` are the names present."""

    def __init__(self, group_name: str, groups: Sequence[str]) -> None:
        present = ", ".join(groups) or "none"
        super().__init__(f"RayCluster has no worker group {group_name!r} (spec.workerGroupSpecs: {present})")
        self.group_name = group_name
        self.groups = tuple(groups)


class RayClusterScaleError(RuntimeError):
    """The Kubernetes API refused or failed a call for ``pool``: ``status`` (None: no HTTP answer) and ``reason``."""

    def __init__(self, pool: str, status: int | None, reason: str) -> None:
        super().__init__(f"resizing the {pool} worker group failed: HTTP {status}: {reason}")
        self.pool = pool
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class ResizePlan:
    index: int  # of the group in spec.workerGroupSpecs
    old_replicas: int
    new_replicas: int  # requested, clamped into [minReplicas, maxReplicas]
    clamped: bool
    patch: tuple[dict[str, Any], ...]  # RFC 6902 operations

    @property
    def changes_nothing(self) -> bool:
        return self.new_replicas == self.old_replicas and len(self.patch) == 2


@dataclass(frozen=True)
class ResizeResult:
    pool: str
    group_name: str
    old_replicas: int
    new_replicas: int
    clamped: bool  # the bounds cut the request: new_replicas != requested_replicas
    requested_replicas: int


def plan_resize(
    raycluster: Mapping[str, Any], group_name: str, replicas: int, workers_to_delete: Sequence[str] = ()
) -> ResizePlan:
    """The patch setting worker group ``group_name`` to ``replicas`` pods (clamped; see the module docstring).

    ``workers_to_delete`` (pod names, a scale-down only) replaces ``scaleStrategy.workersToDelete``:
    at most as many pods as the scale-down removes, since KubeRay would replace any extra one.
    """
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        raise ValueError(f"replicas: expected an integer >= 0, got {replicas!r}")
    names = _pod_names(workers_to_delete)
    index, group = _find_group(raycluster, group_name)
    low = _count(group, "minReplicas", 0, group_name)
    high = _count(group, "maxReplicas", _MAX_REPLICAS_DEFAULT, group_name)
    old = _count(group, "replicas", 0, group_name)
    if low > high:
        raise RayClusterSpecError(f"worker group {group_name!r}: minReplicas {low} > maxReplicas {high}")
    new = min(max(replicas, low), high)
    base = f"/spec/workerGroupSpecs/{index}"
    ops: list[dict[str, Any]] = [
        {"op": "test", "path": f"{base}/groupName", "value": group_name},
        {"op": "replace" if "replicas" in group else "add", "path": f"{base}/replicas", "value": new},
    ]
    if names:
        removed = (old - new) * max(1, _count(group, "numOfHosts", 1, group_name))  # pods per replica
        if len(names) > max(0, removed):
            raise ValueError(
                f"workers_to_delete: {len(names)} pods named, but {group_name!r} going from {old} to {new} "
                f"replicas removes {max(0, removed)} pods"
            )
        if isinstance(group.get("scaleStrategy"), Mapping):
            ops.append({"op": "add", "path": f"{base}/scaleStrategy/workersToDelete", "value": list(names)})
        else:  # absent or null: `add` creates (or replaces) the whole member
            ops.append({"op": "add", "path": f"{base}/scaleStrategy", "value": {"workersToDelete": list(names)}})
    return ResizePlan(index, old, new, new != replicas, tuple(ops))


def resize_patch(
    raycluster: Mapping[str, Any], group_name: str, replicas: int, workers_to_delete: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """RFC 6902 JSON Patch of ``raycluster`` resizing ``group_name`` (see ``plan_resize``)."""
    return list(plan_resize(raycluster, group_name, replicas, workers_to_delete).patch)


class RayClusterScaler:
    """Reads and resizes the worker groups of one RayCluster (``settings.raycluster`` in ``settings.namespace``)."""

    def __init__(self, settings: KubernetesScaling, api: client.CustomObjectsApi) -> None:
        if settings.namespace is None:
            raise ValueError("autoscaler.kubernetes.namespace: unresolved (RayClusterScaler.from_settings resolves it)")
        self._settings = settings
        self._namespace: str = settings.namespace
        self._api = api
        self._core = client.CoreV1Api(api.api_client)

    @classmethod
    def from_settings(
        cls, settings: KubernetesScaling, namespace_file: Path = SERVICE_ACCOUNT_NAMESPACE
    ) -> RayClusterScaler:
        """A scaler on the pod's service account (in a pod), else on the current kubeconfig context.

        Raises ``kubernetes.config.ConfigException`` when there is neither, and ``ValueError`` naming
        ``autoscaler.kubernetes.namespace`` when that is null and ``namespace_file`` unreadable.
        """
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)
        namespace = settings.namespace or _read_namespace(namespace_file)
        api = client.CustomObjectsApi(client.ApiClient(configuration))
        return cls(dataclasses.replace(settings, namespace=namespace), api)

    def replicas(self, pool: str) -> int:
        """The pool's worker group ``replicas`` as the API server holds it now."""
        group_name = self._group_name(pool)
        _, group = _find_group(self._call(pool, self._get), group_name)
        return _count(group, "replicas", 0, group_name)

    def resize(self, pool: str, groups: int, workers_to_delete: Sequence[str] = ()) -> ResizeResult:
        """Set the pool's worker group to ``groups`` x ``pods_per_group[pool]`` pods; unchanged: no write."""
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 0:
            raise ValueError(f"groups: expected an integer >= 0, got {groups!r}")
        group_name = self._group_name(pool)
        pods = self._settings.pods_per_group.get(pool)
        if pods is None:
            raise ValueError(f"autoscaler.kubernetes.pods_per_group: no entry for pool {pool!r}")
        requested = groups * pods
        try:
            return self._resize_once(pool, group_name, requested, workers_to_delete)
        except ApiException as exc:
            if exc.status not in _RETRIED_STATUSES:
                raise _scale_error(pool, exc) from exc
            logger.info("RayCluster changed under the %s resize (HTTP %s); reading it again", pool, exc.status)
        except HTTPError as exc:
            raise _scale_error(pool, exc) from exc
        return self._call(pool, lambda: self._resize_once(pool, group_name, requested, workers_to_delete))

    def pod_names_by_ip(self, pool: str) -> dict[str, str]:
        """Pod IP -> pod name of the pool's live worker pods (a rank's node IP is its pod's IP)."""
        selector = f"ray.io/cluster={self._settings.raycluster},ray.io/group={self._group_name(pool)}"
        pods = self._call(
            pool,
            lambda: self._core.list_namespaced_pod(
                self._namespace, label_selector=selector, _request_timeout=self._settings.request_timeout_s
            ),
        )
        out: dict[str, str] = {}
        for pod in pods.items:
            meta, status = pod.metadata, pod.status
            if meta is None or not meta.name or meta.deletion_timestamp is not None:
                continue  # a terminating pod is on its way out already
            if status is not None and status.pod_ip:
                out[status.pod_ip] = meta.name
        return out

    def _resize_once(self, pool: str, group_name: str, requested: int, names: Sequence[str]) -> ResizeResult:
        plan = plan_resize(self._get(), group_name, requested, names)
        result = ResizeResult(pool, group_name, plan.old_replicas, plan.new_replicas, plan.clamped, requested)
        if plan.changes_nothing:
            return result
        self._api.patch_namespaced_custom_object(
            RAYCLUSTER_GROUP,
            RAYCLUSTER_VERSION,
            self._namespace,
            RAYCLUSTER_PLURAL,
            self._settings.raycluster,
            list(plan.patch),
            # The client's default for this call is merge-patch whatever the body; a list needs this.
            _content_type=JSON_PATCH,
            _request_timeout=self._settings.request_timeout_s,
        )
        logger.info(
            "RayCluster %s/%s: worker group %s replicas %d -> %d%s%s",
            self._namespace,
            self._settings.raycluster,
            group_name,
            plan.old_replicas,
            plan.new_replicas,
            f" (asked {requested}, clamped to [minReplicas, maxReplicas])" if plan.clamped else "",
            f", deleting {', '.join(names)}" if names else "",
        )
        return result

    def _get(self) -> Mapping[str, Any]:
        obj = self._api.get_namespaced_custom_object(
            RAYCLUSTER_GROUP,
            RAYCLUSTER_VERSION,
            self._namespace,
            RAYCLUSTER_PLURAL,
            self._settings.raycluster,
            _request_timeout=self._settings.request_timeout_s,
        )
        if not isinstance(obj, Mapping):
            raise RayClusterSpecError(f"GET RayCluster {self._settings.raycluster}: expected an object, got {obj!r}")
        return obj

    def _call(self, pool: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (ApiException, HTTPError) as exc:
            raise _scale_error(pool, exc) from exc

    def _group_name(self, pool: str) -> str:
        name = self._settings.worker_groups.get(pool)
        if name is None:
            raise ValueError(f"autoscaler.kubernetes.worker_groups: no worker group for pool {pool!r}")
        return name


def _scale_error(pool: str, exc: ApiException | HTTPError) -> RayClusterScaleError:
    if isinstance(exc, ApiException):
        return RayClusterScaleError(pool, exc.status, str(exc.reason))
    return RayClusterScaleError(pool, None, f"{type(exc).__name__}: {exc}")


def _find_group(raycluster: Mapping[str, Any], group_name: str) -> tuple[int, Mapping[str, Any]]:
    spec = raycluster.get("spec") if isinstance(raycluster, Mapping) else None
    groups = spec.get("workerGroupSpecs") if isinstance(spec, Mapping) else None
    if groups is None:
        groups = []
    if not isinstance(groups, list) or not all(isinstance(g, Mapping) for g in groups):
        raise RayClusterSpecError(f"spec.workerGroupSpecs: expected a list of objects, got {groups!r}")
    names = [str(g.get("groupName")) for g in groups]
    if group_name not in names:
        raise UnknownWorkerGroupError(group_name, names)
    if names.count(group_name) > 1:
        raise RayClusterSpecError(f"spec.workerGroupSpecs: more than one group named {group_name!r}")
    index = names.index(group_name)
    return index, groups[index]


def _count(group: Mapping[str, Any], key: str, default: int, group_name: str) -> int:
    value = group.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RayClusterSpecError(f"worker group {group_name!r}: {key} must be an integer >= 0, got {value!r}")
    return value


def _pod_names(names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"workers_to_delete: expected a list of pod names, got {names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"workers_to_delete: duplicate pod names in {list(names)!r}")
    return tuple(names)


def _read_namespace(path: Path) -> str:
    try:
        namespace = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(
            f"autoscaler.kubernetes.namespace: null, and the pod's namespace is unreadable ({path}: {exc.strerror})"
        ) from exc
    if not namespace:
        raise ValueError(f"autoscaler.kubernetes.namespace: null, and {path} is empty")
    return namespace
