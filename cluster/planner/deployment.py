"""``deployment``: one planned layout as the files an operator deploys: Helm values or a cluster YAML.

Lifecycle: ``k2serve plan --helm-values FILE`` / ``--cluster-config FILE`` plans with the EP sizes
the runtime can run (``runnable_ep_sizes``), takes one layout (``pick``), turns it into a document
(``helm_values`` for the chart in helm/, ``cluster_config`` for ``k2serve cluster --config``) and
writes it with ``to_yaml``. Pure: dicts in, dicts out; the caller validates what it writes.

What carries over from the plan, per pool: groups and EP size, the redundant expert slots, one GPU
per rank, the KV room per GPU as blocks, and the longest request one rank's KV holds (capped by the
model's context). The autoscaler is switched on with the plan's SLOs and target load, each pool
bounded between ``min_groups`` and the planned groups (the GPUs the plan was given), and the decode
pool's ``max_seqs`` (sequences one group runs within the ITL SLO) is the plan's decode batch per
GPU x EP size: the batch the roofline found to hold the ITL, which the autoscaler's capacity model
then scales against. On Kubernetes a group's ranks fill whole pods: ``gpusPerPod`` is the largest
divisor of the EP size that fits one node, so no pod holds GPUs its group does not use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from k2serve.cluster.planner.model_spec import ModelSpec
from k2serve.cluster.planner.planner import Layout, PlanRequest, PlanResult, PoolPlan

DTYPE = "bfloat16"  # the latent cache and the dense weights on GPU (the roofline's KV bytes assume it)
DEFAULT_BLOCK_SIZE = 64


@dataclass(frozen=True)
class DeployOptions:
    block_size: int = DEFAULT_BLOCK_SIZE  # tokens per KV block
    max_model_len: int | None = None  # None: the model's context, capped by one rank's KV room
    min_groups: int = 1  # the autoscaler's floor per pool
    autoscale: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {self.block_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len: must be >= 2, got {self.max_model_len}")
        if self.min_groups < 1:  # the autoscaler keeps at least one group per pool
            raise ValueError(f"min_groups: must be >= 1, got {self.min_groups}")


@dataclass(frozen=True)
class PoolNumbers:
    """One pool of the layout, in the runtime's terms (per rank where it says so)."""

    name: str  # prefill | decode | colocated
    groups: int
    ep_size: int
    redundant_experts: int
    kv_cache_blocks: int  # per rank
    max_model_len: int
    max_seqs: int | None  # per group; pools that decode
    min_groups: int
    max_groups: int


def runnable_ep_sizes(model: ModelSpec, ep_sizes: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(the EP sizes that divide the model's routed experts, the others). The planner also counts sizes
    that only the redundant slots make even (DeepSeek's 320-GPU decode); k2serve's placement gives
    every rank the same share of the routed experts, so the pool config refuses them."""
    keep = tuple(ep for ep in ep_sizes if model.num_experts % ep == 0)
    return keep, tuple(ep for ep in ep_sizes if ep not in keep)


def pick(result: PlanResult, number: int) -> Layout:
    """Layout ``number`` as ``k2serve plan`` prints it (1 = the best)."""
    if not result.layouts:
        raise ValueError("no feasible layout to deploy (see the plan's 'not feasible' lines)")
    if not 1 <= number <= len(result.layouts):
        raise ValueError(f"layout: must be in [1, {len(result.layouts)}], got {number}")
    return result.layouts[number - 1]


def pool_numbers(pool: PoolPlan, model: ModelSpec, opts: DeployOptions) -> PoolNumbers:
    blocks = pool.kv_tokens_per_gpu // opts.block_size
    if blocks < 1:
        raise ValueError(f"{pool.role} pool: no KV block of {opts.block_size} tokens fits beside the weights")
    room = blocks * opts.block_size
    if opts.max_model_len is not None and opts.max_model_len > room:
        raise ValueError(
            f"max_model_len: {opts.max_model_len} tokens do not fit one {pool.role} rank's KV ({room} tokens)"
        )
    max_len = opts.max_model_len if opts.max_model_len is not None else min(model.max_context, room)
    max_seqs = pool.decode.batch * pool.ep_size if pool.decode is not None else None
    return PoolNumbers(
        name=pool.role,
        groups=pool.groups,
        ep_size=pool.ep_size,
        redundant_experts=pool.redundant_experts,
        kv_cache_blocks=blocks,
        max_model_len=max_len,
        max_seqs=max_seqs,
        min_groups=min(opts.min_groups, pool.groups),
        max_groups=pool.groups,
    )


def gpus_per_pod(ep_size: int, gpus_per_node: int) -> int:
    """The largest divisor of ``ep_size`` that fits one node: a group's ranks fill its pods exactly."""
    return max(d for d in range(1, min(ep_size, gpus_per_node) + 1) if ep_size % d == 0)


def scale_down_utilization(target: float) -> float:
    """The autoscaler's shrink threshold, in the same proportion to the target as its defaults (0.4 of 0.7)."""
    return round(target * 4.0 / 7.0, 3)


def cluster_config(layout: Layout, req: PlanRequest, model_path: str, opts: DeployOptions) -> dict[str, Any]:
    """The cluster YAML (``ClusterConfig``) of ``layout``."""
    pools = [pool_numbers(p, req.model, opts) for p in layout.pools]
    doc: dict[str, Any] = {"model": model_path, "pools": {p.name: _pool(p, opts) for p in pools}}
    if opts.autoscale:
        doc["autoscaler"] = _autoscaler(pools, req)
    return doc


def helm_values(layout: Layout, req: PlanRequest, opts: DeployOptions) -> dict[str, Any]:
    """Values for the chart in helm/: the pools, their worker pods and the autoscaler (the chart's
    names are the cluster YAML's in camelCase)."""
    if layout.shape != "disaggregated":
        raise ValueError(
            f"the chart runs a prefill and a decode pool; layout is {layout.shape} (try --shape disaggregated)"
        )
    pools = [pool_numbers(p, req.model, opts) for p in layout.pools]
    doc: dict[str, Any] = {}
    for p in pools:
        per_pod = gpus_per_pod(p.ep_size, layout.gpus_per_node)
        replicas = p.groups * (p.ep_size // per_pod)
        doc[p.name] = {
            "pool": camel(_pool(p, opts) | {"kv_cache_memory": ""}),
            "replicas": replicas,
            "minReplicas": replicas,  # with the autoscaler on, the chart derives both from its bounds
            "maxReplicas": replicas,
            "gpusPerPod": per_pod,
        }
    if opts.autoscale:
        doc["autoscaler"] = camel(_autoscaler(pools, req))
    return doc


def _pool(p: PoolNumbers, opts: DeployOptions) -> dict[str, Any]:
    return {
        "groups": p.groups,
        "ep_size": p.ep_size,
        "gpus_per_rank": 1,
        "kv_cache_blocks": p.kv_cache_blocks,
        "block_size": opts.block_size,
        "max_model_len": p.max_model_len,
        "redundant_experts": p.redundant_experts,
        "dtype": DTYPE,
    }


def _autoscaler(pools: list[PoolNumbers], req: PlanRequest) -> dict[str, Any]:
    w = req.workload
    bounds: dict[str, dict[str, int]] = {}
    for p in pools:
        bounds[p.name] = {"min_groups": p.min_groups, "max_groups": p.max_groups}
        if p.max_seqs is not None:
            bounds[p.name]["max_seqs"] = p.max_seqs
    return {
        "enabled": True,
        "ttft_slo_s": w.ttft_slo_s,
        "itl_slo_s": w.itl_slo_s,
        "target_utilization": w.target_utilization,
        "scale_down_utilization": scale_down_utilization(w.target_utilization),
        "pools": bounds,
    }


def camel(doc: dict[str, Any]) -> dict[str, Any]:
    """``ttft_slo_s`` -> ``ttftSloS``, through nested sections (the chart's names for the YAML's keys)."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        head, *rest = key.split("_")
        out[head + "".join(part[:1].upper() + part[1:] for part in rest)] = (
            camel(value) if isinstance(value, dict) else value
        )
    return out


def header(layout: Layout, req: PlanRequest, number: int) -> list[str]:
    """Comment lines that say which plan a file came from, and what it predicted."""
    w = req.workload
    pools = ", ".join(f"{p.role} {p.groups} x EP{p.ep_size}" for p in layout.pools)
    return [
        f"Written by `k2serve plan`: layout #{number} of {req.model.name} on {req.gpus} x {req.hardware.name}",
        f"({layout.shape}: {pools}). Workload: prompt {w.prompt_len:g}, output {w.output_len:g} tokens;",
        f"SLO TTFT {w.ttft_slo_s:g} s, ITL {w.itl_slo_s * 1000:g} ms; pools sized for {w.target_utilization:.0%} load.",
        f"Predicted (roofline, {req.efficiency.source}): {layout.requests_per_s:.2f} req/s, "
        f"TTFT ~{layout.ttft_s:.2f} s, ITL ~{layout.itl_s * 1000:.0f} ms.",
        "Measure, calibrate (--calibration) and plan again before trusting these for capacity.",
    ]


def to_yaml(doc: dict[str, Any], comments: list[str]) -> str:
    body = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
    return "".join(f"# {line}\n" for line in comments) + body
