"""The Kubernetes side of the autoscaler: the JSON Patch that resizes a RayCluster worker group, and the request sending it.

The RayCluster here is the chart's, rendered with the real Helm engine (production values, autoscaler
on, a decode pool of EP=16 over 8-GPU pods: two pods per group). The scaler's settings are read from
that render's cluster YAML. Patches are applied by a small RFC 6902 applier and the result is checked
against the KubeRay CRD's v1 schema. Requests go through a real ``kubernetes`` ApiClient to a
loopback HTTP server that plays the API server for that one RayCluster.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from kubernetes import client
from kubernetes.config import kube_config
from test_helm_chart import KIMI_K2_CONFIG, NAMESPACE, PRODUCTION_VALUES, crd_errors, render

from k2serve.cluster.autoscaler_settings import KubernetesScaling
from k2serve.cluster.config import ClusterConfig
from k2serve.cluster.raycluster_scaler import (
    RayClusterScaleError,
    RayClusterScaler,
    ResizeResult,
    UnknownWorkerGroupError,
    plan_resize,
    resize_patch,
)

Doc = dict[str, Any]
RC_PATH = f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayclusters/k2-k2serve"


# ---- the chart's RayCluster and the settings its cluster YAML gives ----------------------------------


@pytest.fixture(scope="module")
def chart_render(tmp_path_factory: pytest.TempPathFactory) -> tuple[Doc, KubernetesScaling]:
    values = yaml.safe_load(PRODUCTION_VALUES.read_text(encoding="utf-8"))
    values["autoscaler"] = {"enabled": True, "pools": {"decode": {"minGroups": 1, "maxGroups": 4}}}
    values["decode"]["pool"] |= {"epSize": 16, "groups": 2}  # 2 groups x 16 GPUs = 4 pods of 8
    values["decode"]["replicas"] = 4
    out = render(values)
    raycluster = yaml.safe_load(out["k2serve/templates/raycluster.yaml"])
    data = yaml.safe_load(yaml.safe_load(out["k2serve/templates/configmap.yaml"])["data"]["cluster.yaml"])
    model = tmp_path_factory.mktemp("model")
    shutil.copy(KIMI_K2_CONFIG, model / "config.json")
    data["model"] = str(model)
    return raycluster, ClusterConfig.from_dict(data).autoscaler.kubernetes


@pytest.fixture
def raycluster(chart_render: tuple[Doc, KubernetesScaling]) -> Doc:
    return copy.deepcopy(chart_render[0])


@pytest.fixture
def settings(chart_render: tuple[Doc, KubernetesScaling]) -> KubernetesScaling:
    return chart_render[1]


def group(raycluster: Doc, name: str) -> Doc:
    (found,) = [g for g in raycluster["spec"]["workerGroupSpecs"] if g["groupName"] == name]
    return found


# ---- a tiny RFC 6902 applier (test, replace, add) -------------------------------------------------------


class PatchFailed(Exception):
    pass


def apply_patch(doc: Doc, ops: list[Doc]) -> Doc:
    """``doc`` patched by ``ops`` (a copy; the whole patch fails when one operation does)."""
    out = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        target: Any = out
        for part in parents:
            try:
                target = target[int(part)] if isinstance(target, list) else target[part]
            except (KeyError, IndexError, ValueError) as exc:
                raise PatchFailed(f"{op['path']}: no {part!r}") from exc
        key: Any = int(last) if isinstance(target, list) else last
        present = key < len(target) if isinstance(target, list) else key in target
        if op["op"] == "test":
            if not present or target[key] != op["value"]:
                raise PatchFailed(f"test {op['path']}: {target[key] if present else 'absent'!r} != {op['value']!r}")
        elif op["op"] == "replace":
            if not present:
                raise PatchFailed(f"replace {op['path']}: absent")
            target[key] = copy.deepcopy(op["value"])
        elif op["op"] == "add":
            if isinstance(target, list):
                target.insert(key, copy.deepcopy(op["value"]))
            else:
                target[key] = copy.deepcopy(op["value"])
        else:
            raise PatchFailed(f"unsupported op {op['op']!r}")
    return out


# ---- the patch ------------------------------------------------------------------------------------------


def test_the_chart_sizes_the_decode_group_in_pods_per_group(raycluster: Doc, settings: KubernetesScaling) -> None:
    assert settings.pods_per_group["decode"] == 2 and settings.pods_per_group["prefill"] == 1
    decode = group(raycluster, "decode")
    assert (decode["replicas"], decode["minReplicas"], decode["maxReplicas"]) == (4, 2, 8)
    assert crd_errors(raycluster) == []


def test_scale_up_patch_tests_the_group_name_then_replaces_replicas(raycluster: Doc) -> None:
    index = [g["groupName"] for g in raycluster["spec"]["workerGroupSpecs"]].index("decode")
    ops = resize_patch(raycluster, "decode", 6)
    assert ops == [
        {"op": "test", "path": f"/spec/workerGroupSpecs/{index}/groupName", "value": "decode"},
        {"op": "replace", "path": f"/spec/workerGroupSpecs/{index}/replicas", "value": 6},
    ]
    patched = apply_patch(raycluster, ops)
    assert crd_errors(patched) == []
    expected = copy.deepcopy(raycluster)
    group(expected, "decode")["replicas"] = 6
    assert patched == expected  # the decode group's replicas and nothing else


def test_scale_down_names_the_drained_pods_on_that_group_only(raycluster: Doc) -> None:
    pods = ["k2-k2serve-decode-worker-abcde", "k2-k2serve-decode-worker-fghij"]
    patched = apply_patch(raycluster, resize_patch(raycluster, "decode", 2, pods))
    assert crd_errors(patched) == []
    assert group(patched, "decode")["replicas"] == 2
    assert group(patched, "decode")["scaleStrategy"] == {"workersToDelete": pods}
    assert group(patched, "prefill") == group(raycluster, "prefill")


def test_a_later_scale_down_replaces_the_names_in_the_existing_scale_strategy(raycluster: Doc) -> None:
    first = apply_patch(raycluster, resize_patch(raycluster, "decode", 3, ["k2-k2serve-decode-worker-aaaaa"]))
    ops = resize_patch(first, "decode", 2, ["k2-k2serve-decode-worker-bbbbb"])
    assert ops[-1]["path"].endswith("/scaleStrategy/workersToDelete")
    second = apply_patch(first, ops)
    assert crd_errors(second) == []
    assert group(second, "decode")["scaleStrategy"] == {"workersToDelete": ["k2-k2serve-decode-worker-bbbbb"]}


def test_replicas_outside_the_bounds_are_clamped_and_the_bounds_stay(raycluster: Doc) -> None:
    up = plan_resize(raycluster, "decode", 20)
    down = plan_resize(raycluster, "decode", 0)
    assert (up.old_replicas, up.new_replicas, up.clamped) == (4, 8, True)
    assert (down.new_replicas, down.clamped) == (2, True)
    assert plan_resize(raycluster, "decode", 8).clamped is False
    patched = apply_patch(raycluster, list(up.patch))
    assert (group(patched, "decode")["minReplicas"], group(patched, "decode")["maxReplicas"]) == (2, 8)


def test_a_group_without_replicas_gets_them_added(raycluster: Doc) -> None:
    del group(raycluster, "prefill")["replicas"]
    ops = resize_patch(raycluster, "prefill", 3)
    assert ops[1]["op"] == "add"
    assert group(apply_patch(raycluster, ops), "prefill")["replicas"] == 3


def test_the_patch_fails_to_apply_when_the_groups_were_reordered(raycluster: Doc) -> None:
    ops = resize_patch(raycluster, "decode", 6)
    raycluster["spec"]["workerGroupSpecs"].reverse()
    with pytest.raises(PatchFailed, match="groupName"):
        apply_patch(raycluster, ops)


def test_an_unknown_group_names_itself_and_the_groups_present(raycluster: Doc) -> None:
    with pytest.raises(UnknownWorkerGroupError, match=r"'colocated'.*prefill, decode") as info:
        resize_patch(raycluster, "colocated", 1)
    assert issubclass(UnknownWorkerGroupError, ValueError) and info.value.groups == ("prefill", "decode")


@pytest.mark.parametrize(
    ("replicas", "pods", "field_name"),
    [
        (-1, [], "replicas"),
        (True, [], "replicas"),
        (3, ["a", "b"], "workers_to_delete"),  # 4 -> 3 removes one pod, not two
        (3, ["a", "a"], "workers_to_delete"),
        (6, ["a"], "workers_to_delete"),  # a scale-up deletes no pod
    ],
)
def test_bad_requests_are_value_errors_naming_the_argument(
    raycluster: Doc, replicas: Any, pods: list[str], field_name: str
) -> None:
    with pytest.raises(ValueError, match=field_name):
        resize_patch(raycluster, "decode", replicas, pods)


# ---- the request: a loopback API server for one RayCluster -------------------------------------------------


@dataclass
class FakeKubeApi:
    """The API server's side: the stored RayCluster, the requests seen, scripted failures."""

    raycluster: Doc
    pods: list[Doc] = field(default_factory=list)
    requests: list[Doc] = field(default_factory=list)
    patch_statuses: list[int] = field(default_factory=list)  # answered (in order) before any real PATCH
    after_get: Callable[[Doc], None] | None = None  # runs once after the first GET (a concurrent writer)
    release: threading.Event = field(default_factory=threading.Event)
    patch_delay_s: float = 0.0

    def handle(self, method: str, url: str, headers: dict[str, str], body: bytes) -> tuple[int, Doc]:
        parts = urlsplit(url)
        self.requests.append(
            {
                "method": method,
                "path": parts.path,
                "query": parse_qs(parts.query),
                "content_type": headers.get("Content-Type"),
                "body": json.loads(body) if body else None,
            }
        )
        if method == "GET" and parts.path == f"/api/v1/namespaces/{NAMESPACE}/pods":
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": self.pods}
        if parts.path != RC_PATH:
            return 404, status(404, "NotFound")
        if method == "GET":
            answer = copy.deepcopy(self.raycluster)
            if self.after_get is not None:
                self.after_get(self.raycluster)
                self.after_get = None
            return 200, answer
        if method != "PATCH":
            return 405, status(405, "MethodNotAllowed")
        if self.patch_delay_s:
            self.release.wait(self.patch_delay_s)
        if self.patch_statuses:
            code = self.patch_statuses.pop(0)
            return code, status(code, {403: "Forbidden", 409: "Conflict", 422: "Invalid"}.get(code, "Error"))
        if headers.get("Content-Type") != "application/json-patch+json":
            return 415, status(415, "UnsupportedMediaType")
        try:
            patched = apply_patch(self.raycluster, json.loads(body))
        except PatchFailed as exc:
            return 422, status(422, "Invalid", str(exc))
        if errors := crd_errors(patched):
            return 422, status(422, "Invalid", "; ".join(errors))
        self.raycluster = patched
        return 200, copy.deepcopy(patched)

    def methods(self) -> list[str]:
        return [r["method"] for r in self.requests]


Kube = tuple[FakeKubeApi, str]  # the fake API server's state and its base URL


def status(code: int, reason: str, message: str = "") -> Doc:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "reason": reason,
        "code": code,
        "message": message,
    }


class _QuietServer(ThreadingHTTPServer):
    """Says nothing when a client hangs up before its answer is written (a test's timed-out request)."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


@pytest.fixture
def kube(raycluster: Doc) -> Iterator[Kube]:
    api = FakeKubeApi(raycluster)

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            code, answer = api.handle(self.command, self.path, dict(self.headers), body)
            data = json.dumps(answer).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PATCH = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = _QuietServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield api, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        api.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def scaler_for(url: str, settings: KubernetesScaling) -> RayClusterScaler:
    configuration = client.Configuration(host=url)
    return RayClusterScaler(settings, client.CustomObjectsApi(client.ApiClient(configuration)))


def test_resize_sends_one_json_patch_to_the_raycluster(kube: Kube, settings: KubernetesScaling) -> None:
    api, url = kube
    index = [g["groupName"] for g in api.raycluster["spec"]["workerGroupSpecs"]].index("decode")
    result = scaler_for(url, settings).resize("decode", 3)
    assert result == ResizeResult("decode", "decode", 4, 6, False, 6)
    assert api.methods() == ["GET", "PATCH"]
    get, patch = api.requests
    assert get["path"] == patch["path"] == RC_PATH
    assert patch["content_type"] == "application/json-patch+json"
    assert patch["body"] == [
        {"op": "test", "path": f"/spec/workerGroupSpecs/{index}/groupName", "value": "decode"},
        {"op": "replace", "path": f"/spec/workerGroupSpecs/{index}/replicas", "value": 6},
    ]
    assert group(api.raycluster, "decode")["replicas"] == 6 and crd_errors(api.raycluster) == []


def test_a_scale_down_deletes_the_named_pods(kube: Kube, settings: KubernetesScaling) -> None:
    api, url = kube
    pods = ["k2-k2serve-decode-worker-aaaaa", "k2-k2serve-decode-worker-bbbbb"]
    result = scaler_for(url, settings).resize("decode", 1, workers_to_delete=pods)
    assert (result.old_replicas, result.new_replicas, result.clamped) == (4, 2, False)
    assert group(api.raycluster, "decode")["scaleStrategy"] == {"workersToDelete": pods}
    assert api.requests[-1]["body"][-1]["value"] == {"workersToDelete": pods}


def test_an_unchanged_size_writes_nothing(kube: Kube, settings: KubernetesScaling) -> None:
    api, url = kube
    scaler = scaler_for(url, settings)
    assert scaler.replicas("decode") == 4
    assert scaler.resize("decode", 2) == ResizeResult("decode", "decode", 4, 4, False, 4)
    assert api.methods() == ["GET", "GET"]


def test_groups_reordered_between_get_and_patch_are_read_again_once(kube: Kube, settings: KubernetesScaling) -> None:
    api, url = kube
    api.after_get = lambda rc: rc["spec"]["workerGroupSpecs"].reverse()  # a concurrent writer
    result = scaler_for(url, settings).resize("decode", 4)
    assert result.new_replicas == 8
    assert api.methods() == ["GET", "PATCH", "GET", "PATCH"]
    first, second = api.requests[1]["body"][0]["path"], api.requests[3]["body"][0]["path"]
    assert first != second  # the retry tested the group at its new index
    assert group(api.raycluster, "decode")["replicas"] == 8 and group(api.raycluster, "prefill")["replicas"] == 2


def test_a_conflict_once_is_retried(kube: Kube, settings: KubernetesScaling) -> None:
    api, url = kube
    api.patch_statuses = [409]
    assert scaler_for(url, settings).resize("prefill", 3).new_replicas == 3
    assert api.methods() == ["GET", "PATCH", "GET", "PATCH"] and group(api.raycluster, "prefill")["replicas"] == 3


def test_a_second_failed_test_is_an_error(kube: Kube, settings: KubernetesScaling) -> None:
    api, url = kube
    api.patch_statuses = [422, 422]
    with pytest.raises(RayClusterScaleError) as info:
        scaler_for(url, settings).resize("prefill", 3)
    assert info.value.status == 422 and api.methods().count("PATCH") == 2


@pytest.mark.parametrize(("where", "code"), [("patch", 403), ("get", 404)])
def test_other_api_errors_name_the_pool_and_the_status(
    kube: Kube, settings: KubernetesScaling, where: str, code: int
) -> None:
    api, url = kube
    if where == "patch":
        api.patch_statuses = [code]
    else:
        settings = dataclasses.replace(settings, raycluster="missing")
    with pytest.raises(RayClusterScaleError, match=rf"decode.*{code}") as info:
        scaler_for(url, settings).resize("decode", 3)
    assert (info.value.pool, info.value.status) == ("decode", code)
    assert api.methods().count("PATCH") == (1 if where == "patch" else 0)  # no retry


def test_every_call_is_bounded_by_the_request_timeout(kube: Kube, settings: KubernetesScaling) -> None:
    api, url = kube
    api.patch_delay_s = 10.0
    settings = dataclasses.replace(settings, request_timeout_s=0.3)
    with pytest.raises(RayClusterScaleError, match="decode") as info:
        scaler_for(url, settings).resize("decode", 3)
    assert info.value.status is None  # no answer within 0.3 s (the server still holds the PATCH)


def test_worker_pods_are_listed_by_ray_labels(kube: Kube, settings: KubernetesScaling) -> None:
    api, url = kube

    def pod(name: str, ip: str | None, deleting: bool = False) -> Doc:
        meta: Doc = {"name": name, "namespace": NAMESPACE}
        if deleting:
            meta["deletionTimestamp"] = "2025-01-01T00:00:00Z"
        return {"metadata": meta, "status": {"podIP": ip} if ip else {}}

    api.pods = [pod("w-a", "10.0.0.1"), pod("w-b", "10.0.0.2"), pod("w-c", None), pod("w-d", "10.0.0.4", deleting=True)]
    assert scaler_for(url, settings).pod_names_by_ip("decode") == {"10.0.0.1": "w-a", "10.0.0.2": "w-b"}
    assert api.requests[-1]["query"]["labelSelector"] == ["ray.io/cluster=k2-k2serve,ray.io/group=decode"]


def test_from_settings_uses_the_kubeconfig_outside_a_pod_and_the_pod_namespace_file(
    kube: Kube, settings: KubernetesScaling, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api, url = kube
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "loop", "cluster": {"server": url}}],
        "users": [{"name": "me", "user": {"token": "t0"}}],
        "contexts": [{"name": "loop", "context": {"cluster": "loop", "user": "me"}}],
        "current-context": "loop",
    }
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig), encoding="utf-8")
    (tmp_path / "namespace").write_text(f"{NAMESPACE}\n", encoding="utf-8")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod: in-cluster config fails
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "kubeconfig"))
    unresolved = dataclasses.replace(settings, namespace=None)
    scaler = RayClusterScaler.from_settings(unresolved, namespace_file=tmp_path / "namespace")
    assert scaler.replicas("prefill") == 2 and api.requests[-1]["path"] == RC_PATH
    with pytest.raises(ValueError, match=r"autoscaler\.kubernetes\.namespace"):
        RayClusterScaler.from_settings(unresolved, namespace_file=tmp_path / "absent")


def test_a_pool_without_a_worker_group_is_a_value_error(settings: KubernetesScaling) -> None:
    scaler = scaler_for("http://127.0.0.1:9", dataclasses.replace(settings, worker_groups={}))
    with pytest.raises(ValueError, match=r"worker_groups.*decode"):
        scaler.resize("decode", 1)
    with pytest.raises(ValueError, match="groups"):
        scaler.resize("decode", -1)
