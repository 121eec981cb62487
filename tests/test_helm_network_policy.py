"""The chart's NetworkPolicies, checked by what they let through.

A small evaluator of NetworkPolicy ingress (networking.k8s.io/v1) decides whether a source pod may
open a connection to a port of a destination pod. It covers what the chart uses: podSelector
(matchLabels, matchExpressions In/NotIn/Exists/DoesNotExist), namespaceSelector, policyTypes, and
ports by number, range or name (resolved against the destination's container ports). A pod that no
Ingress policy selects accepts everything; a selected pod accepts only what some rule of some
selecting policy allows. ipBlock peers are not modelled (how they apply to pod IPs is up to the
CNI): the evaluator refuses them.

The pods are the ones the chart renders (router Deployment, RayCluster head and worker groups, the
helm test pod) with their labels and container ports, for the default values and for
helm/ci/production-values.yaml; outside pods (another release, an unlabeled pod elsewhere,
Prometheus) are built here. Rendering uses the real Helm engine through tests/test_helm_chart.py,
whose Kubernetes 1.30 schema check covers every standard-kind document of both cases, NetworkPolicy
included; the variants rendered here are validated the same way.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
from test_helm_autoscaler import docs_of
from test_helm_chart import CASES, KUBE_VERSION, NAMESPACE, RELEASE, case_values, chart, render

Doc = dict[str, Any]

NAME = "app.kubernetes.io/name"
INSTANCE = "app.kubernetes.io/instance"
COMPONENT = "app.kubernetes.io/component"
NAMESPACE_NAME = "kubernetes.io/metadata.name"  # set by Kubernetes on every namespace
ANY_PORT = 43111  # stands for a port the OS picks at run time (worker gRPC, gloo/NCCL, KV stores, Ray)
RUNTIME_PORTS = (ANY_PORT, 1024, 29500, 65000)
RAY_PODS = ("head", "prefill", "decode")


# ---- the evaluator -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: Mapping[str, str]
    ports: tuple[tuple[str, int, str], ...] = ()  # (name, containerPort, protocol) of its containers
    namespace_labels: Mapping[str, str] = field(default_factory=dict)  # besides kubernetes.io/metadata.name

    def all_namespace_labels(self) -> dict[str, str]:
        return {NAMESPACE_NAME: self.namespace, **self.namespace_labels}

    def port(self, name: str) -> int:
        (number,) = [number for port_name, number, _ in self.ports if port_name == name]
        return number


def selector_matches(selector: Doc, labels: Mapping[str, str]) -> bool:
    """A LabelSelector: every matchLabels pair and every matchExpressions requirement hold ({} matches all)."""
    if any(labels.get(key) != value for key, value in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        if operator == "In":
            ok = key in labels and labels[key] in values
        elif operator == "NotIn":
            ok = key not in labels or labels[key] not in values
        elif operator == "Exists":
            ok = key in labels
        elif operator == "DoesNotExist":
            ok = key not in labels
        else:
            raise ValueError(f"unknown selector operator {operator!r}")
        if not ok:
            return False
    return True


def policy_namespace(policy: Doc) -> str:
    return str(policy["metadata"].get("namespace", NAMESPACE))  # Helm installs into the release namespace


def restricts_ingress(policy: Doc) -> bool:
    types = policy["spec"].get("policyTypes")
    return True if types is None else "Ingress" in types  # without policyTypes, Ingress always applies


def selecting(policies: list[Doc], pod: Pod) -> list[Doc]:
    """The Ingress policies that select ``pod``."""
    return [
        policy
        for policy in policies
        if restricts_ingress(policy)
        and policy_namespace(policy) == pod.namespace
        and selector_matches(policy["spec"]["podSelector"], pod.labels)
    ]


def peer_matches(peer: Doc, namespace: str, src: Pod) -> bool:
    """A NetworkPolicyPeer of a policy in ``namespace``: a podSelector alone means that namespace."""
    if "ipBlock" in peer:
        raise NotImplementedError("ipBlock peers are not modelled")
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], src.all_namespace_labels()):
            return False
    elif src.namespace != namespace:
        return False
    return "podSelector" not in peer or selector_matches(peer["podSelector"], src.labels)


def port_matches(rule_port: Doc, dst: Pod, port: int, protocol: str) -> bool:
    if rule_port.get("protocol", "TCP") != protocol:
        return False
    if "port" not in rule_port:
        return True  # every port of the protocol
    wanted = rule_port["port"]
    if isinstance(wanted, str):  # a named port of the destination's containers
        return any(name == wanted and number == port and proto == protocol for name, number, proto in dst.ports)
    first = int(wanted)
    return first <= port <= int(rule_port.get("endPort", first))


def rule_allows(rule: Doc, namespace: str, src: Pod, dst: Pod, port: int, protocol: str) -> bool:
    ports, peers = rule.get("ports") or [], rule.get("from") or []  # absent or empty: every port / source
    if ports and not any(port_matches(p, dst, port, protocol) for p in ports):
        return False
    return not peers or any(peer_matches(peer, namespace, src) for peer in peers)


def ingress_allowed(policies: list[Doc], src: Pod, dst: Pod, port: int, protocol: str = "TCP") -> bool:
    """May ``src`` connect to ``dst`` on ``port``, as far as ``dst``'s ingress policies go?"""
    applying = selecting(policies, dst)
    if not applying:
        return True
    return any(
        rule_allows(rule, policy_namespace(policy), src, dst, port, protocol)
        for policy in applying
        for rule in policy["spec"].get("ingress") or []
    )


# ---- the rendered pods and policies -------------------------------------------------------------------


def network_policies(docs: list[Doc]) -> list[Doc]:
    return [doc for doc in docs if doc["kind"] == "NetworkPolicy"]


def pod_of(name: str, template: Doc, extra_labels: Mapping[str, str] | None = None) -> Pod:
    spec = template["spec"]
    ports = tuple(
        (p.get("name", ""), int(p["containerPort"]), p.get("protocol", "TCP"))
        for container in [*spec.get("initContainers", []), *spec["containers"]]
        for p in container.get("ports", [])
    )
    return Pod(name, NAMESPACE, {**template["metadata"]["labels"], **(extra_labels or {})}, ports)


def release_pods(docs: list[Doc]) -> dict[str, Pod]:
    """The pods the chart's objects make: router, head, prefill, decode (KubeRay's own labels added), test."""
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (raycluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    (test_pod,) = [d for d in docs if d["kind"] == "Pod" and d["metadata"]["annotations"]["helm.sh/hook"] == "test"]
    cluster = raycluster["metadata"]["name"]
    pods = {"router": pod_of("router", deployment["spec"]["template"])}
    head = raycluster["spec"]["headGroupSpec"]["template"]
    pods["head"] = pod_of("head", head, {"ray.io/cluster": cluster, "ray.io/node-type": "head"})
    for group in raycluster["spec"]["workerGroupSpecs"]:
        labels = {"ray.io/cluster": cluster, "ray.io/node-type": "worker", "ray.io/group": group["groupName"]}
        pods[group["groupName"]] = pod_of(group["groupName"], group["template"], labels)
    pods["test"] = pod_of("test", test_pod)
    return pods


def of_another_release(pod: Pod) -> Pod:
    """The same pod of a release named "other" in the same namespace."""
    return Pod(f"other-{pod.name}", pod.namespace, {**pod.labels, INSTANCE: "other"}, pod.ports)


STRANGER = Pod("stranger", "elsewhere", {})
PROMETHEUS = Pod(
    "prometheus-kube-prometheus-stack-prometheus-0",
    "monitoring",
    {
        NAME: "prometheus",
        INSTANCE: "kube-prometheus-stack-prometheus",
        "app.kubernetes.io/managed-by": "prometheus-operator",
        "prometheus": "kube-prometheus-stack-prometheus",
    },
)
GRAFANA = Pod("grafana-0", "monitoring", {NAME: "grafana", INSTANCE: "kube-prometheus-stack"})


def ray_targets(pods: dict[str, Pod]) -> list[tuple[Pod, int]]:
    """(Ray pod, port) pairs: every declared port of the head and the workers, and runtime ports on each."""
    out: list[tuple[Pod, int]] = []
    for name in RAY_PODS:
        pod = pods[name]
        out += [(pod, number) for _, number, _ in pod.ports] + [(pod, port) for port in RUNTIME_PORTS]
    return out


def with_network_policy(case: str, **settings: Any) -> dict[str, Any]:
    values = copy.deepcopy(case_values(case))
    values["networkPolicy"] = settings
    return values


def validate(doc: Doc) -> None:
    try:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{doc['metadata']['name']} {'/'.join(map(str, exc.absolute_path))}: {exc.message}")


# ---- the evaluator on its own --------------------------------------------------------------------------


def test_evaluator_label_selectors() -> None:
    labels = {"a": "1", "b": "2"}
    assert selector_matches({}, labels) and selector_matches({}, {})
    assert selector_matches({"matchLabels": {"a": "1"}}, labels)
    assert not selector_matches({"matchLabels": {"a": "1", "c": "3"}}, labels)
    expression = {"key": "a", "operator": "In", "values": ["0", "1"]}
    assert selector_matches({"matchExpressions": [expression]}, labels)
    assert not selector_matches({"matchExpressions": [expression]}, {"b": "2"})
    not_in = {"key": "a", "operator": "NotIn", "values": ["1"]}
    assert not selector_matches({"matchExpressions": [not_in]}, labels)
    assert selector_matches({"matchExpressions": [not_in]}, {"b": "2"})  # NotIn holds where the key is absent
    assert selector_matches({"matchExpressions": [{"key": "b", "operator": "Exists"}]}, labels)
    assert not selector_matches({"matchExpressions": [{"key": "c", "operator": "Exists"}]}, labels)
    assert selector_matches({"matchExpressions": [{"key": "c", "operator": "DoesNotExist"}]}, labels)
    both = {"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "b", "operator": "In", "values": ["9"]}]}
    assert not selector_matches(both, labels)


def _policy(pod_selector: Doc, ingress: list[Doc] | None, types: tuple[str, ...] | None = ("Ingress",)) -> Doc:
    spec: Doc = {"podSelector": pod_selector}
    if types is not None:
        spec["policyTypes"] = list(types)
    if ingress is not None:
        spec["ingress"] = ingress
    return {"kind": "NetworkPolicy", "metadata": {"name": "p"}, "spec": spec}


def test_evaluator_policy_semantics() -> None:
    server = Pod("server", NAMESPACE, {"app": "server"}, (("web", 8080, "TCP"), ("dns", 53, "UDP")))
    client = Pod("client", NAMESPACE, {"app": "client"})
    outsider = Pod("outsider", "elsewhere", {"app": "client"})
    assert ingress_allowed([], outsider, server, 1)  # no policy: everything
    assert ingress_allowed([_policy({"matchLabels": {"app": "other"}}, None)], outsider, server, 1)
    deny_all = _policy({}, None)
    assert not ingress_allowed([deny_all], client, server, 8080)  # selected, no rule: nothing
    assert ingress_allowed([_policy({}, None, ("Egress",))], client, server, 8080)  # egress only
    assert not ingress_allowed([_policy({}, None, None)], client, server, 8080)  # no policyTypes: Ingress
    everyone = _policy({}, [{}])
    assert ingress_allowed([deny_all, everyone], outsider, server, 9)  # rules of all policies add up
    by_number = _policy({}, [{"ports": [{"port": 8080}, {"port": 9000, "endPort": 9010}]}])
    assert ingress_allowed([by_number], outsider, server, 8080) and ingress_allowed([by_number], client, server, 9005)
    assert not ingress_allowed([by_number], client, server, 8081)
    assert not ingress_allowed([by_number], client, server, 8080, "UDP")
    by_name = _policy({}, [{"ports": [{"port": "web"}, {"protocol": "UDP", "port": "dns"}]}])
    assert ingress_allowed([by_name], client, server, 8080) and ingress_allowed([by_name], client, server, 53, "UDP")
    assert not ingress_allowed([by_name], client, server, 53)  # dns is a UDP port
    assert not ingress_allowed([by_name], client, Pod("s2", NAMESPACE, {}, (("web", 80, "TCP"),)), 8080)
    same_namespace = _policy({}, [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}])
    assert ingress_allowed([same_namespace], client, server, 1)
    assert not ingress_allowed([same_namespace], outsider, server, 1)  # a podSelector alone: own namespace
    any_namespace = _policy(
        {}, [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "client"}}}]}]
    )
    assert ingress_allowed([any_namespace], outsider, server, 1)
    assert not ingress_allowed([any_namespace], Pod("x", "elsewhere", {}), server, 1)
    named_namespace = _policy({}, [{"from": [{"namespaceSelector": {"matchLabels": {NAMESPACE_NAME: "elsewhere"}}}]}])
    assert ingress_allowed([named_namespace], Pod("x", "elsewhere", {}), server, 1)
    assert not ingress_allowed([named_namespace], client, server, 1)
    other_namespace = {**deny_all, "metadata": {"name": "p", "namespace": "elsewhere"}}
    assert ingress_allowed([other_namespace], client, server, 1)  # a policy selects pods of its namespace only
    with pytest.raises(NotImplementedError):
        ingress_allowed([_policy({}, [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}])], client, server, 1)


# ---- the chart's policies ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_the_policies_select_the_ray_pods_and_the_router_and_leave_egress_open(case: str) -> None:
    docs = docs_of(case_values(case))
    policies = network_policies(docs)
    names = {p["metadata"]["name"] for p in policies}
    assert names == {f"{RELEASE}-k2serve-ray", f"{RELEASE}-k2serve-router"}
    pods = release_pods(docs)
    assert set(pods) == {"router", *RAY_PODS, "test"}
    by_name = {p["metadata"]["name"]: p for p in policies}
    for name in RAY_PODS:
        assert selecting(policies, pods[name]) == [by_name[f"{RELEASE}-k2serve-ray"]], name
    assert selecting(policies, pods["router"]) == [by_name[f"{RELEASE}-k2serve-router"]]
    assert selecting(policies, pods["test"]) == []  # a client only
    for name in RAY_PODS:  # another release's pods are not this release's policies' business
        assert selecting(policies, of_another_release(pods[name])) == []
    for policy in policies:
        assert policy["spec"]["policyTypes"] == ["Ingress"] and "egress" not in policy["spec"]


@pytest.mark.parametrize("case", CASES)
def test_the_release_pods_reach_each_other(case: str) -> None:
    docs = docs_of(case_values(case))
    policies, pods = network_policies(docs), release_pods(docs)
    router, head, test = pods["router"], pods["head"], pods["test"]
    workers = [pods["prefill"], pods["decode"]]
    assert ingress_allowed(policies, router, head, head.port("registry"))
    assert ingress_allowed(policies, test, router, router.port("http"))
    for worker in workers:
        assert ingress_allowed(policies, router, worker, ANY_PORT)  # worker gRPC on an OS-chosen port
        assert ingress_allowed(policies, worker, head, head.port("gcs"))
        assert ingress_allowed(policies, worker, head, ANY_PORT)  # Ray's worker processes on the head
        assert ingress_allowed(policies, head, worker, worker.port("raylet"))
        assert ingress_allowed(policies, head, worker, ANY_PORT)  # the controller's health checks
        for peer in workers:  # Ray, gloo/NCCL, TCPStore, KV transfer, within and across the pools
            for port in RUNTIME_PORTS:
                assert ingress_allowed(policies, peer, worker, port), (peer.name, worker.name, port)


@pytest.mark.parametrize("case", CASES)
def test_other_pods_are_kept_from_the_ray_pods_but_reach_the_router_ports(case: str) -> None:
    docs = docs_of(case_values(case))
    policies, pods = network_policies(docs), release_pods(docs)
    router = pods["router"]
    outsiders = [STRANGER, GRAFANA, *(of_another_release(pods[name]) for name in ("router", *RAY_PODS, "test"))]
    for src in outsiders:
        for dst, port in ray_targets(pods):
            assert not ingress_allowed(policies, src, dst, port), (src.name, dst.name, port)
        assert ingress_allowed(policies, src, router, router.port("http")), src.name
        assert ingress_allowed(policies, src, router, router.port("grpc")), src.name
        assert not ingress_allowed(policies, src, router, 9090), src.name  # nothing else on the router
    # The policies are what keeps them out: without them everything is open.
    assert ingress_allowed([], STRANGER, pods["decode"], ANY_PORT)


@pytest.mark.parametrize("case", CASES)
def test_prometheus_scrapes_the_ranks_the_controller_and_the_router(case: str) -> None:
    docs = docs_of(case_values(case))
    policies, pods = network_policies(docs), release_pods(docs)
    head = pods["head"]
    assert ingress_allowed(policies, PROMETHEUS, head, head.port("k2s-controller"))
    for name in ("prefill", "decode"):
        assert ingress_allowed(policies, PROMETHEUS, pods[name], ANY_PORT)  # a rank's /metrics (workerPort 0)
    assert ingress_allowed(policies, PROMETHEUS, pods["router"], pods["router"].port("http"))
    elsewhere = Pod("prometheus-0", "observability", {NAME: "prometheus"})
    assert ingress_allowed(policies, elsewhere, pods["decode"], ANY_PORT)  # any namespace by default
    assert not ingress_allowed(policies, GRAFANA, pods["decode"], ANY_PORT)  # the namespace alone is not enough


@pytest.mark.parametrize("case", CASES)
def test_router_from_limits_the_router_but_keeps_the_release_pods_and_prometheus(case: str) -> None:
    ingress = Pod("ingress-nginx-controller", "ingress-nginx", {NAME: "ingress-nginx"})
    only_ingress = [{"namespaceSelector": {"matchLabels": {NAMESPACE_NAME: "ingress-nginx"}}}]
    docs = docs_of(with_network_policy(case, router={"from": only_ingress}))
    policies, pods = network_policies(docs), release_pods(docs)
    router = pods["router"]
    http, grpc = router.port("http"), router.port("grpc")
    for src in (ingress, pods["test"], PROMETHEUS):
        assert ingress_allowed(policies, src, router, http) and ingress_allowed(policies, src, router, grpc), src.name
    for src in (STRANGER, GRAFANA, of_another_release(router)):
        assert not ingress_allowed(policies, src, router, http), src.name
        assert not ingress_allowed(policies, src, router, grpc), src.name
    for dst, port in ray_targets(pods):  # router.from opens nothing on the Ray pods
        assert not ingress_allowed(policies, ingress, dst, port), (dst.name, port)
    assert ingress_allowed(policies, router, pods["decode"], ANY_PORT)
    assert ingress_allowed(policies, router, pods["head"], pods["head"].port("registry"))
    # Without the release's pods and metricsFrom in `from`, the test pod and Prometheus would be out.
    (rule,) = next(p for p in policies if p["metadata"]["name"].endswith("-router"))["spec"]["ingress"]
    bare = [_policy({"matchLabels": {COMPONENT: "router"}}, [{"ports": rule["ports"], "from": only_ingress}])]
    assert not ingress_allowed(bare, pods["test"], router, http) and not ingress_allowed(bare, PROMETHEUS, router, http)


def test_metrics_from_and_ray_extra_from_decide_who_else_reaches_the_ray_pods() -> None:
    docs = docs_of(with_network_policy("default", metricsFrom=[]))
    policies, pods = network_policies(docs), release_pods(docs)
    assert not ingress_allowed(policies, PROMETHEUS, pods["decode"], ANY_PORT)
    assert ingress_allowed(policies, PROMETHEUS, pods["router"], pods["router"].port("http"))  # any source
    assert ingress_allowed(policies, pods["router"], pods["decode"], ANY_PORT)

    own_prometheus = [
        {
            "namespaceSelector": {"matchLabels": {NAMESPACE_NAME: "metrics"}},
            "podSelector": {"matchLabels": {"app": "prometheus"}},
        }
    ]
    ops = [{"namespaceSelector": {"matchLabels": {"team": "ops"}}}]
    docs = docs_of(with_network_policy("default", metricsFrom=own_prometheus, ray={"extraFrom": ops}))
    policies, pods = network_policies(docs), release_pods(docs)
    mine = Pod("prometheus-0", "metrics", {"app": "prometheus"})
    assert ingress_allowed(policies, mine, pods["decode"], ANY_PORT)
    assert ingress_allowed(policies, mine, pods["head"], pods["head"].port("k2s-controller"))
    assert not ingress_allowed(policies, Pod("prometheus-0", "other", {"app": "prometheus"}), pods["decode"], ANY_PORT)
    assert not ingress_allowed(policies, PROMETHEUS, pods["decode"], ANY_PORT)  # the default is replaced
    tooling = Pod("ray-dashboard-client", "tools", {}, namespace_labels={"team": "ops"})
    assert ingress_allowed(policies, tooling, pods["head"], pods["head"].port("dashboard"))
    assert ingress_allowed(policies, tooling, pods["prefill"], ANY_PORT)
    assert not ingress_allowed(policies, Pod("x", "tools", {}), pods["head"], pods["head"].port("dashboard"))


def test_the_router_policy_follows_the_router_container_ports() -> None:
    docs = docs_of({"router": {"httpPort": 8080, "grpcPort": 50052}})
    policies, pods = network_policies(docs), release_pods(docs)
    router = pods["router"]
    assert (router.port("http"), router.port("grpc")) == (8080, 50052)
    assert ingress_allowed(policies, STRANGER, router, 8080) and ingress_allowed(policies, STRANGER, router, 50052)
    assert not ingress_allowed(policies, STRANGER, router, 8000) and not ingress_allowed(
        policies, STRANGER, router, 50051
    )


@pytest.mark.parametrize("case", CASES)
def test_disabled_renders_no_network_policy(case: str) -> None:
    docs = docs_of(with_network_policy(case, enabled=False))
    assert network_policies(docs) == []
    assert chart().values["networkPolicy"]["enabled"] is True  # on by default
    assert len(network_policies(docs_of(case_values(case)))) == 2


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"router": {"from": [{"namespaceSelector": {"matchLabels": {NAMESPACE_NAME: "ingress-nginx"}}}]}},
        {
            "metricsFrom": [{"namespaceSelector": {"matchLabels": {NAMESPACE_NAME: "metrics"}}}],
            "ray": {"extraFrom": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}]},
            "router": {"from": [{"ipBlock": {"cidr": "192.168.0.0/16"}}, {"podSelector": {}}]},
        },
        {
            "metricsFrom": [],
            "ray": {"extraFrom": [{"podSelector": {"matchExpressions": [{"key": "team", "operator": "Exists"}]}}]},
        },
    ],
)
@pytest.mark.parametrize("case", CASES)
def test_network_policies_validate_against_kubernetes_1_30(case: str, settings: dict[str, Any]) -> None:
    policies = network_policies(docs_of(with_network_policy(case, **settings)))
    assert len(policies) == 2
    for policy in policies:
        validate(policy)
    # The check is real: a misspelt field is rejected.
    broken = copy.deepcopy(policies[0])
    broken["spec"]["ingress"][0]["form"] = broken["spec"]["ingress"][0].pop("from")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSION, strict=True)


@pytest.mark.parametrize(
    "bad",
    [
        {"networkPolicy": {"enabeld": True}},  # a typo of `enabled`
        {"networkPolicy": {"enabled": "yes"}},
        {"networkPolicy": {"metricsFrom": {"podSelector": {}}}},  # a peer, not a list of peers
        {"networkPolicy": {"metricsFrom": [{}]}},  # a peer must say whom
        {"networkPolicy": {"router": {"from": [{"podSelektor": {}}]}}},
        {"networkPolicy": {"router": {"form": []}}},
        {"networkPolicy": {"ray": {"extraFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}}},
        {"networkPolicy": {"ray": {"extraFrom": [{"ipBlock": {"except": ["10.0.0.0/8"]}}]}}},
        {"networkPolicy": {"ray": {"extraFrom": [{"podSelector": {"matchLabels": {"a": 1}}}]}}},
        {
            "networkPolicy": {
                "ray": {"extraFrom": [{"podSelector": {"matchExpressions": [{"key": "a", "operator": "in"}]}}]}
            }
        },
        {"networkPolicy": {"ray": {"extra": []}}},
    ],
)
def test_values_schema_rejects_bad_network_policy_values(bad: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart().validate_schema(bad)
    with pytest.raises(helm.HelmValuesError):
        render(bad)


@pytest.mark.parametrize(
    "peer",
    [
        {"podSelector": {}},
        {"namespaceSelector": {}},
        {
            "namespaceSelector": {"matchLabels": {"a": "b"}},
            "podSelector": {"matchExpressions": [{"key": "c", "operator": "Exists"}]},
        },
        {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
    ],
)
def test_values_schema_accepts_network_policy_peers(peer: Doc) -> None:
    chart().validate_schema(
        {"networkPolicy": {"metricsFrom": [peer], "ray": {"extraFrom": [peer]}, "router": {"from": [peer]}}}
    )
