"""The chart with ``autoscaler.enabled``: the RBAC the head needs, the token on the head only, the cluster YAML, worker bounds.

Rendered with the real Helm engine, like tests/test_helm_chart.py (whose render and validation
helpers this reuses): every standard manifest validates against the Kubernetes 1.30 schemas, the
RayCluster against the KubeRay CRD, and the cluster YAML loads with ``ClusterConfig.from_dict``.
Pods per group are computed here from the values on their own (ceil(epSize x gpusPerRank / gpusPerPod)
for GPU pods, 1 for CPU pods), not read back from the chart.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from test_helm_chart import (
    CHART,
    CRD_KINDS,
    KIMI_K2_CONFIG,
    KUBE_VERSION,
    NAMESPACE,
    RELEASE,
    case_values,
    chart,
    crd_errors,
    render,
)

from k2serve.cluster.config import ClusterConfig

Doc = dict[str, Any]
POOLS = ("prefill", "decode")


def with_autoscaler(base: dict[str, Any], **autoscaler: Any) -> dict[str, Any]:
    values = copy.deepcopy(base)
    values["autoscaler"] = {"enabled": True, **autoscaler}
    return values


def production_ep12() -> dict[str, Any]:
    """Production, but prefill EP=12 on 8-GPU pods: 1.5 pods of GPUs per group, so 2 pods per group."""
    values = case_values("production")
    values["prefill"]["pool"]["epSize"] = 12
    values["prefill"] |= {"replicas": 4, "minReplicas": 4, "maxReplicas": 4}  # 2 groups x 2 pods
    return values


VARIANTS = {
    "default": lambda: with_autoscaler({}),
    "production": lambda: with_autoscaler(case_values("production"), pools={"decode": {"maxSeqs": 64}}),
    "production-ep12": lambda: with_autoscaler(production_ep12(), intervalS=5, windowS=20, maxStepUp=1),
}


def docs_of(values: dict[str, Any]) -> list[Doc]:
    out: list[Doc] = []
    for path, text in sorted(render(values).items()):
        if not path.endswith("NOTES.txt"):
            out.extend(doc for doc in yaml.safe_load_all(text) if doc is not None)
    return out


def one(docs: list[Doc], kind: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def cluster_yaml(docs: list[Doc]) -> Doc:
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-cluster")]
    data: Doc = yaml.safe_load(configmap["data"]["cluster.yaml"])
    return data


def pods_per_group(pool_values: Doc) -> int:
    pool, gpus_per_pod = pool_values["pool"], pool_values["gpusPerPod"]
    if gpus_per_pod > 0 and pool["gpusPerRank"] > 0:
        return math.ceil(pool["epSize"] * pool["gpusPerRank"] / gpus_per_pod)
    return 1


def pod_specs(docs: list[Doc]) -> dict[str, Doc]:
    spec = one(docs, "RayCluster")["spec"]
    out = {"head": spec["headGroupSpec"]["template"]["spec"]}
    out |= {g["groupName"]: g["template"]["spec"] for g in spec["workerGroupSpecs"]}
    out["router"] = one(docs, "Deployment")["spec"]["template"]["spec"]
    return out


# ---- autoscaler on ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_objects_validate_and_carry_the_standard_labels(variant: str) -> None:
    docs = docs_of(VARIANTS[variant]())
    assert {"Role", "RoleBinding"} <= {d["kind"] for d in docs}
    for doc in docs:
        name = doc["metadata"]["name"]
        assert name.startswith(f"{RELEASE}-k2serve"), name
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "k2serve", name
        if doc["kind"] == "RayCluster":
            assert crd_errors(doc) == []
        elif doc["kind"] not in CRD_KINDS:
            try:
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['kind']} {name} {'/'.join(map(str, exc.absolute_path))}: {exc.message}")


def test_helm_lint_strict_is_clean_with_the_autoscaler() -> None:
    report = helm.lint(CHART, VARIANTS["production"](), strict=True, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, json.dumps(report["messages"] + report["errors"], indent=1)


@pytest.mark.parametrize("service_account", [{}, {"create": False, "name": "k2-runner"}])
def test_role_grants_exactly_get_patch_on_this_raycluster_and_read_on_pods_to_the_pods_account(
    service_account: Doc,
) -> None:
    docs = docs_of(with_autoscaler({"serviceAccount": service_account}))
    role, binding = one(docs, "Role"), one(docs, "RoleBinding")
    raycluster = one(docs, "RayCluster")["metadata"]["name"]
    assert role["rules"] == [
        {
            "apiGroups": ["ray.io"],
            "resources": ["rayclusters"],
            "resourceNames": [raycluster],
            "verbs": ["get", "patch"],
        },
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
    ]
    role_ref = {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert binding["roleRef"] == role_ref
    head_account = pod_specs(docs)["head"]["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": head_account, "namespace": NAMESPACE}]
    accounts = [d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"]
    assert accounts == ([head_account] if not service_account else [])
    if service_account:
        assert head_account == "k2-runner"


def test_only_the_head_mounts_the_service_account_token() -> None:
    docs = docs_of(VARIANTS["production"]())
    mounts = {name: spec["automountServiceAccountToken"] for name, spec in pod_specs(docs).items()}
    assert mounts == {"head": True, "prefill": False, "decode": False, "router": False}
    assert one(docs, "ServiceAccount")["automountServiceAccountToken"] is False


@pytest.mark.parametrize("variant", VARIANTS)
def test_cluster_yaml_has_the_autoscaler_and_its_kubernetes_settings(variant: str, tmp_path: Path) -> None:
    values = VARIANTS[variant]()
    merged = chart().merge_values(values)
    docs = docs_of(values)
    data = cluster_yaml(docs)
    shutil.copy(KIMI_K2_CONFIG, tmp_path / "config.json")
    data["model"] = str(tmp_path)
    auto = ClusterConfig.from_dict(data).autoscaler
    a = merged["autoscaler"]
    assert auto.enabled
    fields = {
        "interval_s": "intervalS",
        "window_s": "windowS",
        "ttft_slo_s": "ttftSloS",
        "itl_slo_s": "itlSloS",
        "target_utilization": "targetUtilization",
        "scale_down_utilization": "scaleDownUtilization",
        "kv_target": "kvTarget",
        "up_cooldown_s": "upCooldownS",
        "down_cooldown_s": "downCooldownS",
        "down_stable_s": "downStableS",
        "max_step_up": "maxStepUp",
    }
    assert {k: getattr(auto, k) for k in fields} == {k: a[v] for k, v in fields.items()}
    for pool in POOLS:
        bounds = a["pools"][pool]
        assert (auto.pool(pool).min_groups, auto.pool(pool).max_groups) == (bounds["minGroups"], bounds["maxGroups"])
    assert auto.pool("decode").max_seqs == (a["pools"]["decode"]["maxSeqs"] or None)
    k8s = auto.kubernetes
    assert k8s.enabled and k8s.raycluster == one(docs, "RayCluster")["metadata"]["name"] and k8s.namespace == NAMESPACE
    group_names = [g["groupName"] for g in one(docs, "RayCluster")["spec"]["workerGroupSpecs"]]
    assert [k8s.worker_groups[p] for p in POOLS] == group_names == list(POOLS)
    assert {p: k8s.pods_per_group[p] for p in POOLS} == {p: pods_per_group(merged[p]) for p in POOLS}


@pytest.mark.parametrize("variant", VARIANTS)
def test_worker_group_bounds_are_the_autoscaler_bounds_in_pods(variant: str) -> None:
    values = VARIANTS[variant]()
    merged = chart().merge_values(values)
    for group in one(docs_of(values), "RayCluster")["spec"]["workerGroupSpecs"]:
        name = group["groupName"]
        pods, bounds = pods_per_group(merged[name]), merged["autoscaler"]["pools"][name]
        assert (group["minReplicas"], group["maxReplicas"]) == (bounds["minGroups"] * pods, bounds["maxGroups"] * pods)
        assert group["replicas"] == merged[name]["replicas"]  # the starting size stays the value
    if variant == "production-ep12":
        assert pods_per_group(merged["prefill"]) == 2  # the ceil case: 12 GPUs over 8-GPU pods


# ---- autoscaler off --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["default", "production"])
def test_autoscaler_off_renders_no_rbac_no_token_and_no_section(case: str) -> None:
    values = case_values(case)
    docs = docs_of({**values, "autoscaler": {"enabled": False}})
    assert not render(values)["k2serve/templates/role-autoscaler.yaml"].strip()
    assert not {"Role", "RoleBinding"} & {d["kind"] for d in docs}
    assert all(spec["automountServiceAccountToken"] is False for spec in pod_specs(docs).values())
    assert "autoscaler" not in cluster_yaml(docs)
    for group in one(docs, "RayCluster")["spec"]["workerGroupSpecs"]:
        expected = values.get(group["groupName"], {})
        defaults = chart().values[group["groupName"]]
        assert group["maxReplicas"] == expected.get("maxReplicas", defaults["maxReplicas"])


# ---- bad values ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"autoscaler": {"enable": True}},  # a typo of `enabled`
        {"autoscaler": {"targetUtilization": 1.5}},
        {"autoscaler": {"maxStepUp": 0}},
        {"autoscaler": {"pools": {"colocated": {"minGroups": 1}}}},
        {"autoscaler": {"pools": {"decode": {"maxGroups": 0}}}},
    ],
)
def test_values_schema_rejects_bad_autoscaler_values(bad: Doc) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart().validate_schema(bad)


@pytest.mark.parametrize(
    ("autoscaler", "message"),
    [
        ({"targetUtilization": 0.5, "scaleDownUtilization": 0.5}, "scaleDownUtilization"),
        ({"intervalS": 60, "windowS": 30}, "windowS"),
        ({"pools": {"decode": {"minGroups": 3, "maxGroups": 2}}}, "minGroups <= maxGroups"),
        ({"pools": {"prefill": {"minGroups": 2, "maxGroups": 4}}}, "prefill.pool.groups"),  # 1 group < min 2
    ],
)
def test_inconsistent_autoscaler_values_fail_the_render(autoscaler: Doc, message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        render(with_autoscaler({}, **autoscaler))
