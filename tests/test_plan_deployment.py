"""``k2serve plan --helm-values / --cluster-config``: a planned layout written as files that deploy.

The expected numbers come from the planner's own result for the same request (``plan``), never
typed in: each pool keeps its groups and EP size, its KV room as blocks, the decode batch as the
autoscaler's ``max_seqs``. The Helm values are rendered with the real Helm engine over the
production values (as ``helm install -f production.yaml -f plan.yaml`` merges them): the RayCluster
must validate against the KubeRay CRD, its worker groups must hold exactly the planned GPUs, and the
ConfigMap's cluster YAML must load with ``ClusterConfig`` against Kimi K2's config.json.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_helm_autoscaler import cluster_yaml, docs_of, one
from test_helm_chart import KIMI_K2_CONFIG, case_values, chart, crd_errors

from k2serve.cli import main
from k2serve.cluster.config import ClusterConfig
from k2serve.cluster.planner.deployment import DeployOptions, gpus_per_pod, helm_values, runnable_ep_sizes
from k2serve.cluster.planner.hardware import hardware_preset
from k2serve.cluster.planner.model_spec import model_preset
from k2serve.cluster.planner.planner import PlanRequest, PlanResult, Workload, plan

K2 = model_preset("kimi-k2-thinking")
GPU = "nvidia.com/gpu"
# (hardware, GPUs, EP sizes, layout number): one group per pod; two and three pods per group
CASES = [("h200", 16, (8, 16), 1), ("h100", 64, (8, 16, 24, 32), 3), ("h200", 12, (4, 6, 12), 1)]


def planned(hardware: str, gpus: int, ep: tuple[int, ...]) -> PlanResult:
    return plan(PlanRequest(K2, hardware_preset(hardware), gpus, ep_sizes=ep, shapes=("disaggregated",)))


def plan_args(hardware: str, gpus: int, ep: tuple[int, ...], *extra: str) -> list[str]:
    return ["plan", "--hardware", hardware, "--gpus", str(gpus), "--ep", *map(str, ep), *extra]


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def k2_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "Kimi-K2-Thinking"
    folder.mkdir()
    shutil.copy(KIMI_K2_CONFIG, folder / "config.json")
    return folder


@pytest.mark.parametrize(("hardware", "gpus", "ep", "number"), CASES)
def test_helm_values_render_to_the_planned_gpus_and_a_cluster_yaml_that_loads(
    hardware: str, gpus: int, ep: tuple[int, ...], number: int, tmp_path: Path
) -> None:
    out = tmp_path / "plan-values.yaml"
    assert main(plan_args(hardware, gpus, ep, "--layout", str(number), "--helm-values", str(out))) == 0
    values = yaml.safe_load(out.read_text())
    layout = planned(hardware, gpus, ep).layouts[number - 1]
    assert {"prefill", "decode"} == {p.role for p in layout.pools} <= set(values)
    for p in layout.pools:
        got = values[p.role]["pool"]
        assert (got["groups"], got["epSize"], got["redundantExperts"]) == (p.groups, p.ep_size, p.redundant_experts)
        assert got["kvCacheBlocks"] == p.kv_tokens_per_gpu // 64  # the default block size
        assert got["maxModelLen"] == min(K2.max_context, got["kvCacheBlocks"] * 64)

    merged = deep_merge(case_values("production"), values)
    chart().validate_schema(merged)
    docs = docs_of(merged)
    raycluster = one(docs, "RayCluster")
    assert not crd_errors(raycluster)
    for group in raycluster["spec"]["workerGroupSpecs"]:
        pool = next(p for p in layout.pools if p.role == group["groupName"])
        (container,) = [c for c in group["template"]["spec"]["containers"] if GPU in c["resources"]["limits"]]
        per_pod = int(container["resources"]["limits"][GPU])
        assert per_pod <= layout.gpus_per_node and pool.ep_size % per_pod == 0
        assert group["replicas"] * per_pod == pool.gpus  # every planned GPU, none beside
        assert group["maxReplicas"] * per_pod == pool.gpus  # the autoscaler's ceiling is the plan
        assert group["minReplicas"] * per_pod == pool.ep_size  # its floor: one group

    data = cluster_yaml(docs)
    data["model"] = str(k2_folder(tmp_path))
    config = ClusterConfig.from_dict(data)
    auto = config.autoscaler
    decode = next(p for p in layout.pools if p.role == "decode")
    assert decode.decode is not None
    assert auto.enabled and auto.pools["decode"].max_seqs == decode.decode.batch * decode.ep_size
    w = Workload()  # the plan's default SLOs and load
    assert (auto.ttft_slo_s, auto.itl_slo_s, auto.target_utilization) == (
        w.ttft_slo_s,
        w.itl_slo_s,
        w.target_utilization,
    )
    assert auto.scale_down_utilization < auto.target_utilization


@pytest.mark.parametrize("shape", ["disaggregated", "colocated"])
def test_cluster_config_loads_with_the_planned_pools(shape: str, tmp_path: Path) -> None:
    folder, out = k2_folder(tmp_path), tmp_path / "cluster.yaml"
    args = plan_args("h200", 16, (8, 16), "--shape", shape, "--model-dir", str(folder), "--block-size", "16")
    assert main([*args, "--cluster-config", str(out), "--max-model-len", "131072"]) == 0
    config = ClusterConfig.from_yaml(out)
    result = plan(PlanRequest(K2, hardware_preset("h200"), 16, ep_sizes=(8, 16), shapes=(shape,)))
    layout = result.layouts[0]
    assert config.shape == shape
    for p in layout.pools:
        pool = next(c for c in config.pools if c.name == p.role)
        assert (pool.groups, pool.ep_size, pool.gpus_per_rank, pool.dtype) == (p.groups, p.ep_size, 1.0, "bfloat16")
        assert pool.kv_cache_blocks == p.kv_tokens_per_gpu // 16 and pool.max_model_len == 131072
        scaling = config.autoscaler.pools[p.role]
        assert (scaling.min_groups, scaling.max_groups) == (1, p.groups)
        want = p.decode.batch * p.ep_size if p.decode is not None else None
        assert scaling.max_seqs == want


def test_no_autoscaler_leaves_fixed_pools(tmp_path: Path) -> None:
    out = tmp_path / "values.yaml"
    assert main(plan_args("h200", 16, (8,), "--helm-values", str(out), "--no-autoscaler")) == 0
    values = yaml.safe_load(out.read_text())
    assert "autoscaler" not in values
    assert values["decode"]["replicas"] == values["decode"]["minReplicas"] == values["decode"]["maxReplicas"] == 1


def test_only_ep_sizes_the_runtime_runs_are_planned_for_deployment(tmp_path: Path) -> None:
    assert runnable_ep_sizes(K2, (8, 96, 128, 192, 256, 320)) == ((8, 96, 128, 192), (256, 320))
    out = tmp_path / "values.yaml"
    assert main(plan_args("h200", 512, (256, 128), "--helm-values", str(out))) == 0
    assert "[256]" in out.read_text()  # said in the file's header
    values = yaml.safe_load(out.read_text())
    assert {values[p]["pool"]["epSize"] for p in ("prefill", "decode")} <= {128}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ep", "256"], "ep: none of [256] divides the model's 384 routed experts"),
        (["--layout", "9"], "layout: must be in [1, "),
        (["--max-model-len", "99999999"], "max_model_len: 99999999 tokens do not fit one"),
        (["--block-size", "0"], "block_size: must be >= 1"),
        (["--min-groups", "0"], "min_groups: must be >= 1"),
    ],
)
def test_bad_deployment_flags_are_clear_errors_and_write_nothing(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "values.yaml"
    args = ["plan", "--hardware", "h200", "--gpus", "16", "--helm-values", str(out), *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cluster_config_needs_a_model_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cluster.yaml"
    assert main(["plan", "--gpus", "16", "--cluster-config", str(out)]) == 2
    assert "--model-path or --model-dir" in capsys.readouterr().err
    assert not out.exists()


def test_helm_values_refuse_a_colocated_layout() -> None:
    result = plan(PlanRequest(K2, hardware_preset("h200"), 16, ep_sizes=(8,), shapes=("colocated",)))
    with pytest.raises(ValueError, match="the chart runs a prefill and a decode pool"):
        helm_values(result.layouts[0], result.request, DeployOptions())


@pytest.mark.parametrize(("ep", "node", "want"), [(8, 8, 8), (16, 8, 8), (24, 8, 8), (12, 8, 6), (4, 8, 4), (14, 8, 7)])
def test_a_group_fills_whole_pods(ep: int, node: int, want: int) -> None:
    per_pod = gpus_per_pod(ep, node)
    assert per_pod == want and ep % per_pod == 0 and per_pod <= node
