"""The Helm chart (helm/): rendered with the real Helm engine (helm-python-sdk), no cluster needed.

Two renders are checked: the default values (a small CPU-only cluster) and
helm/ci/production-values.yaml (8xH200 GPU nodes). For each: ``helm lint --strict`` is clean, every
document is YAML with the standard labels, every standard-kind manifest validates against the
Kubernetes 1.30 schemas (strict: unknown fields are errors), the RayCluster validates against the
KubeRay CRD's v1 schema (tests/data/crds, with unknown fields rejected) and its pod templates as
PodTemplateSpecs, and the ConfigMap's cluster YAML is accepted by ``ClusterConfig.from_dict``.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from k2serve.cli import build_parser
from k2serve.cluster.config import ClusterConfig
from k2serve.cluster.config_error import ClusterConfigError
from k2serve.proto import cluster_token

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm"
PRODUCTION_VALUES = CHART / "ci" / "production-values.yaml"
ALERTS = CHART / "files" / "k2serve-alerts.yaml"
RAYCLUSTER_CRD = ROOT / "tests" / "data" / "crds" / "ray.io_rayclusters.yaml"
KIMI_K2_CONFIG = ROOT / "tests" / "data" / "kimi_k2_thinking_config.json"
KUBE_VERSION = "1.30.0"
RELEASE, NAMESPACE = "k2", "llm"
CRD_KINDS = {"RayCluster", "ServiceMonitor", "ScrapeConfig", "PrometheusRule"}
CASES = ("default", "production")
GPU = "nvidia.com/gpu"

Doc = dict[str, Any]


def case_values(case: str) -> dict[str, Any]:
    if case == "default":
        return {}
    values: dict[str, Any] = yaml.safe_load(PRODUCTION_VALUES.read_text(encoding="utf-8"))
    return values


@functools.cache
def chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def render(values: dict[str, Any]) -> dict[str, str]:
    return chart().render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


@functools.cache
def _rendered(case: str) -> str:
    return json.dumps(render(case_values(case)))


def rendered(case: str) -> dict[str, str]:
    """{template path: manifest text} of a case (rendered once; a fresh copy each call)."""
    out: dict[str, str] = json.loads(_rendered(case))
    return out


def documents(case: str) -> list[tuple[str, Doc]]:
    """(template path, document) for every non-empty YAML document of a case (NOTES.txt excluded)."""
    out: list[tuple[str, Doc]] = []
    for path, text in sorted(rendered(case).items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc is not None:
                out.append((path, doc))
    return out


def the(case: str, kind: str) -> Doc:
    found = [doc for _, doc in documents(case) if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def named(case: str, kind: str, suffix: str) -> Doc:
    found = [doc for _, doc in documents(case) if doc["kind"] == kind and doc["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"expected one {kind} named *{suffix}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def containers(pod_spec: Doc) -> Iterator[Doc]:
    yield from pod_spec.get("initContainers", [])
    yield from pod_spec["containers"]


def ray_pod_templates(raycluster: Doc) -> dict[str, Doc]:
    spec = raycluster["spec"]
    out = {"head": spec["headGroupSpec"]["template"]}
    out |= {group["groupName"]: group["template"] for group in spec["workerGroupSpecs"]}
    return out


# ---- the KubeRay CRD as a JSON schema --------------------------------------------------------------


def structural_schema(node: Any) -> Any:
    """An OpenAPI v3 CRD schema as a JSON schema jsonschema can apply, rejecting unknown fields.

    Drops the ``x-kubernetes-*`` extensions (CEL rules and list/map types cannot be checked here),
    turns ``x-kubernetes-int-or-string`` into ``anyOf`` integer/string where controller-gen did not,
    ``nullable`` into a null type, and closes every object that lists its ``properties`` (what a
    structural schema means: the API server prunes, and with strict field validation rejects, any
    other field) unless it is ``x-kubernetes-preserve-unknown-fields``.
    """
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            out[key] = {name: structural_schema(sub) for name, sub in value.items()}
        elif key in ("items", "not") or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = structural_schema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [structural_schema(sub) for sub in value]
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def raycluster_validator() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(RAYCLUSTER_CRD.read_text(encoding="utf-8"))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1" and v["served"]]
    schema = structural_schema(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def crd_errors(doc: Doc) -> list[str]:
    errors = raycluster_validator().iter_errors(doc)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


# ---- lint, YAML, labels ------------------------------------------------------------------------


def test_chart_metadata() -> None:
    meta = chart().metadata
    assert (meta["apiVersion"], meta["name"], meta["appVersion"]) == ("v2", "k2serve", "0.1.0")
    assert meta["kubeVersion"] == ">=1.27.0-0"  # lint does not check it against KUBE_VERSION


@pytest.mark.parametrize("case", CASES)
def test_helm_lint_strict_is_clean(case: str) -> None:
    report = helm.lint(CHART, case_values(case), strict=True, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 = warning, 3 = error
    assert not report["errors"] and not problems, json.dumps(report["messages"] + report["errors"], indent=1)


@pytest.mark.parametrize("case", CASES)
def test_every_document_is_yaml_with_the_standard_labels(case: str) -> None:
    docs = documents(case)
    assert len(docs) >= 8
    chart_label = f"k2serve-{chart().version}"
    for path, doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
        labels = doc["metadata"].get("labels", {})
        expected = {
            "app.kubernetes.io/name": "k2serve",
            "app.kubernetes.io/instance": RELEASE,
            "app.kubernetes.io/version": chart().metadata["appVersion"],
            "app.kubernetes.io/managed-by": "Helm",
            "app.kubernetes.io/part-of": "k2serve",
            "helm.sh/chart": chart_label,
        }
        assert {k: labels.get(k) for k in expected} == expected, f"{path}: {doc['kind']} labels {labels}"
        name = doc["metadata"]["name"]
        assert len(name) <= 63 and name.startswith(f"{RELEASE}-k2serve"), f"{path}: {name}"


def test_long_release_names_leave_room_for_kuberay_suffixes() -> None:
    out = chart().render({}, name="r" * 53, namespace=NAMESPACE, is_install=True)
    raycluster = yaml.safe_load(out["k2serve/templates/raycluster.yaml"])
    name = raycluster["metadata"]["name"]
    assert len(f"{name}-decode-worker-abcde") <= 63 and len(f"{name}-head-svc") <= 63


# ---- Kubernetes schemas --------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_standard_manifests_validate_against_kubernetes_1_30(case: str) -> None:
    for path, doc in documents(case):
        if doc["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(map(str, exc.absolute_path))
            pytest.fail(f"{path}: {doc['kind']} {where}: {exc.message}")


@pytest.mark.parametrize("case", CASES)
def test_raycluster_validates_against_the_kuberay_crd(case: str) -> None:
    raycluster = the(case, "RayCluster")
    assert raycluster["apiVersion"] == "ray.io/v1"
    assert crd_errors(raycluster) == []
    # The check is real: an unknown field deep in a pod template is reported.
    broken = copy.deepcopy(raycluster)
    broken["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["gpus"] = 8
    assert any("gpus" in error for error in crd_errors(broken))


@pytest.mark.parametrize("case", CASES)
def test_ray_pod_templates_validate_as_pod_template_specs(case: str) -> None:
    templates = ray_pod_templates(the(case, "RayCluster"))
    assert set(templates) == {"head", "prefill", "decode"}
    for group, template in templates.items():
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": template}
        try:
            kubernetes_validate.validate(wrapped, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{group} pod template {'/'.join(map(str, exc.absolute_path))}: {exc.message}")


# ---- the cluster YAML ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_cluster_yaml_loads_with_cluster_config(case: str, tmp_path: Path) -> None:
    configmap = named(case, "ConfigMap", "-cluster")
    data = yaml.safe_load(configmap["data"]["cluster.yaml"])
    values = chart().merge_values(case_values(case))
    assert data["model"] == f"/models/{values['model']['name']}"
    # Check the pools against the real Kimi K2 Thinking config.json (EP size, KV memory budget).
    shutil.copy(KIMI_K2_CONFIG, tmp_path / "config.json")
    data["model"] = str(tmp_path)
    config = ClusterConfig.from_dict(data)
    assert [p.name for p in config.pools] == ["prefill", "decode"]
    for pool in config.pools:
        pv = values[pool.name]["pool"]
        assert (pool.groups, pool.ep_size, pool.gpus_per_rank) == (pv["groups"], pv["epSize"], pv["gpusPerRank"])
    assert config.ray.address == "auto" and config.ray.auth == "token"
    assert config.network.interface_host == "node"
    assert config.registry.port == values["cluster"]["registryPort"] == 50070
    assert (config.metrics.controller_port, config.metrics.worker_port) == (9400, 0)
    # Unknown keys are errors in ClusterConfig, so a key the chart renders but k2serve lacks fails here.
    with pytest.raises(ClusterConfigError, match="unknown"):
        ClusterConfig.from_dict({**data, "metrics": {**data["metrics"], "port": 1}})


# ---- wiring between the objects ---------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_selector_labels_match_between_deployment_service_and_pdb(case: str) -> None:
    deployment = the(case, "Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector["app.kubernetes.io/component"] == "router"
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert the(case, "Service")["spec"]["selector"] == selector
    if case == "production":
        assert the(case, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
        hpa = the(case, "HorizontalPodAutoscaler")
        assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        assert "replicas" not in deployment["spec"]  # the HPA owns it
        monitor = the(case, "ServiceMonitor")
        assert monitor["spec"]["selector"]["matchLabels"] == selector
        assert monitor["spec"]["endpoints"][0]["port"] == "http"


@pytest.mark.parametrize("case", CASES)
def test_head_runs_the_controller_without_a_router_and_the_router_follows_its_registry(case: str) -> None:
    raycluster = the(case, "RayCluster")
    assert raycluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    head_spec = raycluster["spec"]["headGroupSpec"]
    head = head_spec["template"]["spec"]["containers"][0]
    script = head["args"][0]
    assert script.index("ray start --head") < script.index("exec k2serve cluster --config /etc/k2serve/cluster.yaml")
    assert "--no-router" in script.splitlines()[-1]
    assert head_spec["rayStartParams"]["num-gpus"] == "0" and "--num-gpus='0'" in script
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports == {"gcs": 6379, "dashboard": 8265, "client": 10001, "registry": 50070, "k2s-controller": 9400}
    for group in raycluster["spec"]["workerGroupSpecs"]:
        worker = group["template"]["spec"]["containers"][0]
        assert f"--address={RELEASE}-k2serve-head-svc.{NAMESPACE}.svc:6379" in worker["args"][0]
        env = {e["name"]: e for e in worker["env"]}
        assert env["K2SERVE_HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == f"{RELEASE}-k2serve-ray-token"
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    router = the(case, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert f"--registry={RELEASE}-k2serve-head-svc.{NAMESPACE}.svc:50070" in router["args"]
    assert router["readinessProbe"]["httpGet"]["path"] == "/health"
    assert router["livenessProbe"]["grpc"]["port"] == 50051
    assert {e["name"] for e in router["env"]} >= {"K2SERVE_API_KEYS"}
    assert "resources" in router and GPU not in json.dumps(router["resources"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydantic v1-style fields in ray.serve
@pytest.mark.parametrize("case", CASES)
def test_rendered_commands_parse_with_the_ray_and_k2serve_clis(case: str) -> None:
    from ray.scripts.scripts import start  # the `ray start` click command (imported here: it is slow)

    configmap = yaml.safe_load(named(case, "ConfigMap", "-cluster")["data"]["cluster.yaml"])
    for group, template in ray_pod_templates(the(case, "RayCluster")).items():
        lines = template["spec"]["containers"][0]["args"][0].splitlines()
        (ray_line,) = [line for line in lines if "ray start" in line]
        argv = shlex.split(ray_line.removeprefix("exec "))[2:]
        start.make_context("start", argv)  # raises click.NoSuchOption / BadParameter on a wrong flag
        if group == "head":
            args = build_parser().parse_args(shlex.split(lines[-1])[2:])
            assert (args.command, str(args.config), args.no_router) == ("cluster", "/etc/k2serve/cluster.yaml", True)
            # The head must not give up on the pools before a group may have loaded the model.
            assert args.ready_timeout >= configmap["health"]["start_timeout_s"]
    router = the(case, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(router["args"])
    assert args.command == "router" and args.registry.endswith(".svc:50070")
    assert args.max_model_len == min(p["max_model_len"] for p in configmap["pools"].values())


def test_production_requests_gpus_on_both_worker_groups_only() -> None:
    raycluster = the("production", "RayCluster")
    for group in raycluster["spec"]["workerGroupSpecs"]:
        (worker,) = group["template"]["spec"]["containers"]
        assert worker["resources"]["limits"][GPU] == worker["resources"]["requests"][GPU] == "8", group["groupName"]
        assert group["rayStartParams"]["num-gpus"] == "8"
        assert group["template"]["spec"]["tolerations"][0]["key"] == GPU
    replicas = {g["groupName"]: g["replicas"] for g in raycluster["spec"]["workerGroupSpecs"]}
    assert replicas == {"prefill": 2, "decode": 4}
    head = raycluster["spec"]["headGroupSpec"]["template"]["spec"]
    router = the("production", "Deployment")["spec"]["template"]["spec"]
    for pod_spec in (head, router):
        for container in containers(pod_spec):
            assert GPU not in json.dumps(container.get("resources", {})), container["name"]


def test_default_values_request_no_gpu() -> None:
    assert GPU not in json.dumps(the("default", "RayCluster")) + json.dumps(the("default", "Deployment"))


def test_a_pool_larger_than_its_worker_group_fails_the_render() -> None:
    values = case_values("production")
    values["decode"]["replicas"] = values["decode"]["minReplicas"] = 3  # 4 groups of EP=8 need 4 pods
    with pytest.raises(helm.HelmRenderError, match="decode"):
        render(values)


# ---- secrets -----------------------------------------------------------------------------------------


def test_secrets_are_created_only_without_an_existing_secret() -> None:
    default = {doc["metadata"]["name"]: doc for _, doc in documents("default") if doc["kind"] == "Secret"}
    assert set(default) == {f"{RELEASE}-k2serve-{name}" for name in ("api-keys", "ray-token", "cluster-token")}
    production = {doc["metadata"]["name"] for _, doc in documents("production") if doc["kind"] == "Secret"}
    assert production == {f"{RELEASE}-k2serve-ray-token", f"{RELEASE}-k2serve-cluster-token"}  # keys: k2serve-api-keys
    router = the("production", "Deployment")["spec"]["template"]["spec"]["containers"][0]
    (keys,) = [e for e in router["env"] if e["name"] == "K2SERVE_API_KEYS"]
    assert keys["valueFrom"]["secretKeyRef"] == {"name": "k2serve-api-keys", "key": "api-keys"}


def test_a_given_api_key_is_used_and_none_is_invented_in_values() -> None:
    assert chart().values["apiKeys"]["value"] == "" and chart().values["rayAuth"]["token"] == ""
    out = render({"apiKeys": {"value": "k1,k2"}, "rayAuth": {"token": "t0"}})
    api = yaml.safe_load(out["k2serve/templates/secret-api-keys.yaml"])
    ray = yaml.safe_load(out["k2serve/templates/secret-ray-token.yaml"])
    assert api["data"] == {"api-keys": "azEsazI="} and ray["data"] == {"auth-token": "dDA="}  # base64
    off = render({"apiKeys": {"enabled": False}, "rayAuth": {"enabled": False}})
    assert not off["k2serve/templates/secret-api-keys.yaml"].strip()
    assert "K2SERVE_API_KEYS" not in off["k2serve/templates/deployment-router.yaml"]
    assert "auth: disabled" in off["k2serve/templates/configmap.yaml"]


def _cluster_token_refs(out: dict[str, str]) -> dict[str, Any]:
    """Container name -> the secretKeyRef of its K2SERVE_CLUSTER_TOKEN (the head and the routers)."""
    raycluster = yaml.safe_load(out["k2serve/templates/raycluster.yaml"])
    router = yaml.safe_load(out["k2serve/templates/deployment-router.yaml"])
    refs = {}
    for template in [*ray_pod_templates(raycluster).values(), router["spec"]["template"]]:
        for container in template["spec"]["containers"]:
            for env in container.get("env", []):
                if env["name"] == "K2SERVE_CLUSTER_TOKEN":
                    refs[container["name"]] = env["valueFrom"]["secretKeyRef"]
    return refs


def test_the_head_and_the_routers_share_one_cluster_token_secret() -> None:
    """``k2serve cluster --no-router`` refuses to start without K2SERVE_CLUSTER_TOKEN, and a router with
    another token is refused by the registry: both must read the same Secret key."""
    out = render({})
    refs = _cluster_token_refs(out)
    assert set(refs) == {"ray-head", "router"}, refs  # the ranks get it from the controller
    assert all(ref == {"name": f"{RELEASE}-k2serve-cluster-token", "key": "cluster-token"} for ref in refs.values())
    secret = yaml.safe_load(out["k2serve/templates/secret-cluster-token.yaml"])
    made = base64.b64decode(secret["data"]["cluster-token"]).decode()
    assert len(made) == 64 and cluster_token.checked_token(made) == made  # what the entry points accept
    given = render({"clusterToken": {"token": "t" * 16}})
    assert yaml.safe_load(given["k2serve/templates/secret-cluster-token.yaml"])["data"] == {
        "cluster-token": base64.b64encode(b"t" * 16).decode()
    }
    theirs = render({"clusterToken": {"existingSecret": "ours", "secretKey": "k"}})
    assert not theirs["k2serve/templates/secret-cluster-token.yaml"].strip()
    theirs_refs = _cluster_token_refs(theirs)
    assert set(theirs_refs) == {"ray-head", "router"}
    assert all(ref == {"name": "ours", "key": "k"} for ref in theirs_refs.values())
    with pytest.raises(helm.HelmRenderError, match="clusterToken"):
        render({"clusterToken": {"create": False}})
    with pytest.raises(helm.HelmValuesError, match="clusterToken"):
        render({"clusterToken": {"token": "short"}})  # the schema: what K2SERVE_CLUSTER_TOKEN accepts


# ---- values schema -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"router": {"replicaCount": -1}},
        {"replicaCount": 2},  # an unknown top-level key
        {"router": {"autoscaling": {"enable": True}}},  # a typo of `enabled`
        {"prefill": {"pool": {"epSize": 0}}},
        {"decode": {"gpusPerPod": "8"}},
        {"cluster": {"kvTransfer": {"transport": "tcp"}}},
        {"image": {"pullPolicy": "Sometimes"}},
    ],
)
def test_values_schema_rejects_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart().validate_schema(bad)
    with pytest.raises(helm.HelmValuesError):
        render(bad)


@pytest.mark.parametrize("case", CASES)
def test_values_schema_accepts_the_shipped_values(case: str) -> None:
    chart().validate_schema(case_values(case))


# ---- monitoring and helm test ------------------------------------------------------------------------


def test_prometheus_rule_is_the_alerts_file() -> None:
    rule = the("production", "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    alerts = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    assert rule["spec"] == {"groups": alerts["groups"]}
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_dashboards_configmap_holds_every_dashboard() -> None:
    configmap = named("production", "ConfigMap", "-dashboards")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    files = {path.name: json.loads(path.read_text(encoding="utf-8")) for path in (CHART / "dashboards").glob("*.json")}
    assert files, "helm/dashboards/*.json is empty"
    assert {name: json.loads(text) for name, text in configmap["data"].items()} == files
    relabelled = render({"metrics": {"dashboards": {"enabled": True, "labelName": "dash", "labelValue": "yes"}}})
    labels = yaml.safe_load(relabelled["k2serve/templates/configmap-dashboards.yaml"])["metadata"]["labels"]
    assert labels["dash"] == "yes" and "grafana_dashboard" not in labels


def test_worker_scrape_config_discovers_targets_through_the_router() -> None:
    scrape = the("production", "ScrapeConfig")
    assert scrape["apiVersion"] == "monitoring.coreos.com/v1alpha1"
    (sd,) = scrape["spec"]["httpSDConfigs"]
    assert sd["url"] == f"http://{RELEASE}-k2serve-router.{NAMESPACE}.svc:8000/metrics/targets"
    assert sd["authorization"] == {
        "type": "Bearer",
        "credentials": {"name": "k2serve-api-keys", "key": "prometheus-key"},
    }


@pytest.mark.parametrize("case", CASES)
def test_monitoring_objects_follow_their_switches(case: str) -> None:
    kinds = {doc["kind"] for _, doc in documents(case)}
    dashboards = any(doc["metadata"]["name"].endswith("-dashboards") for _, doc in documents(case))
    expected = case == "production"
    for kind in ("ServiceMonitor", "ScrapeConfig", "PrometheusRule"):
        assert (kind in kinds) == expected, kind
    assert dashboards == expected


@pytest.mark.parametrize("case", CASES)
def test_helm_test_pod_requests_models_and_a_chat_completion(case: str) -> None:
    (path,) = [p for p in rendered(case) if "/templates/tests/" in p]
    pod = yaml.safe_load(rendered(case)[path])
    assert pod["kind"] == "Pod" and pod["spec"]["restartPolicy"] == "Never"
    annotations = pod["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "test" and "helm.sh/hook-delete-policy" in annotations
    (container,) = pod["spec"]["containers"]
    script = container["args"][0]
    assert "set -eu" in script and "curl" in script and "-fsS" in script  # -f: an HTTP error fails the pod
    assert "/v1/models" in script and "/v1/chat/completions" in script and '\\"max_tokens\\": 4' in script
    assert any(e["name"] == "K2SERVE_API_KEYS" for e in container["env"])
