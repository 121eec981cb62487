"""``k2serve plan``: size a Kimi K2 deployment (GPUs per pool, EP size, batch, tokens/s, TTFT/ITL) from a roofline.

Lifecycle: ``add_plan_parser`` registers the command; ``run_plan`` builds one ``PlanRequest`` from
the flags (a hardware preset with optional custom figures, a model preset or a checkpoint folder's
config.json, the workload and SLOs, an optional calibration file), prints the best layouts (or
JSON), and with ``--validate`` compares the model with published deployments. ``--helm-values`` and
``--cluster-config`` write one layout (``--layout``, the best by default) as the chart's values or a
cluster YAML (``planner.deployment``), searching only the EP sizes the runtime runs; the cluster
YAML is read back with ``ClusterConfig`` before it is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from k2serve.cluster.planner.calibration import load_calibration
from k2serve.cluster.planner.deployment import (
    DEFAULT_BLOCK_SIZE,
    DeployOptions,
    cluster_config,
    header,
    helm_values,
    pick,
    runnable_ep_sizes,
    to_yaml,
)
from k2serve.cluster.planner.hardware import GB, TB, TFLOP, Efficiency, hardware_preset
from k2serve.cluster.planner.model_spec import MODEL_PRESETS, ModelSpec, from_model_config, model_preset
from k2serve.cluster.planner.plan_report import plan_json, render_plan, render_validation
from k2serve.cluster.planner.planner import DEFAULT_EP_SIZES, PlanRequest, PlanResult, Shape, Workload, plan
from k2serve.cluster.planner.published import PUBLISHED, compare


def add_plan_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "plan",
        help="capacity plan: feasible layouts, tokens/s, TTFT/ITL and the binding resource (roofline)",
        description="Roofline capacity planner for Kimi K2 serving (docs/PLANNING.md).",
    )
    p.add_argument("--hardware", default="h200", help="h100, h200, h800 or b200 (default h200)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs in the deployment (default 8)")
    p.add_argument("--model", default="kimi-k2-thinking", help=f"preset: {', '.join(MODEL_PRESETS)}")
    p.add_argument("--model-dir", default=None, help="a checkpoint folder: use its config.json instead of a preset")
    p.add_argument("--prompt-len", type=float, default=2000.0, help="mean prompt tokens")
    p.add_argument("--output-len", type=float, default=1000.0, help="mean output tokens")
    p.add_argument("--cached-fraction", type=float, default=0.0, help="share of prompt tokens hit in a prefix cache")
    p.add_argument("--ttft-slo", type=float, default=2.0, help="seconds (default 2)")
    p.add_argument("--itl-slo", type=float, default=0.05, help="seconds (default 0.05)")
    p.add_argument("--target-utilization", type=float, default=0.7, help="load a pool is sized for (default 0.7)")
    p.add_argument("--ep", type=int, nargs="+", default=list(DEFAULT_EP_SIZES), help="EP sizes to consider")
    p.add_argument("--redundant-experts", type=int, default=0, help="extra expert slots per group (EPLB)")
    p.add_argument("--shape", choices=("both", "disaggregated", "colocated"), default="both")
    p.add_argument("--bf16-dispatch", action="store_true", help="dispatch bf16 activations (default fp8)")
    p.add_argument("--calibration", default=None, help="YAML/JSON of measured figures (see docs/PLANNING.md)")
    p.add_argument("--overlap", type=float, default=None, help="share of all-to-all hidden under compute (0-1)")
    for flag, text in (
        ("--memory-gb", "GPU memory, GB"),
        ("--hbm-tbs", "HBM bandwidth, TB/s"),
        ("--bf16-tflops", "dense bf16 TFLOP/s"),
        ("--fp8-tflops", "dense FP8 TFLOP/s"),
        ("--nvlink-gbs", "NVLink GB/s per GPU per direction"),
        ("--nic-gbs", "NIC GB/s per GPU"),
    ):
        p.add_argument(flag, type=float, default=None, help=f"custom hardware: {text}")
    p.add_argument("--gpus-per-node", type=int, default=None)
    p.add_argument("--top", type=int, default=5, help="layouts to print")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--validate", action="store_true", help="compare the model with published deployments")
    deploy = p.add_argument_group("deploy a layout (docs/PLANNING.md)")
    deploy.add_argument("--helm-values", default=None, metavar="FILE", help="write the layout as Helm values")
    deploy.add_argument("--cluster-config", default=None, metavar="FILE", help="write the layout as a cluster YAML")
    deploy.add_argument("--layout", type=int, default=1, help="which printed layout to write (default 1, the best)")
    deploy.add_argument("--model-path", default=None, help="the cluster YAML's model folder (default --model-dir)")
    deploy.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="tokens per KV block")
    deploy.add_argument("--max-model-len", type=int, default=None, help="default: the model's context, capped by KV")
    deploy.add_argument("--min-groups", type=int, default=1, help="the autoscaler's floor per pool (default 1)")
    deploy.add_argument("--no-autoscaler", action="store_true", help="fixed pools: leave the autoscaler off")
    p.set_defaults(func=run_plan)


def _model(args: argparse.Namespace) -> ModelSpec:
    if args.model_dir:
        from k2serve.workers.config import ModelConfig

        return from_model_config(ModelConfig.from_model_dir(Path(args.model_dir)), Path(args.model_dir).name)
    return model_preset(args.model)


def _scaled(value: float | None, unit: float) -> float | None:
    return None if value is None else value * unit


def run_plan(args: argparse.Namespace) -> int:
    hw = hardware_preset(args.hardware).with_overrides(
        memory_bytes=_scaled(args.memory_gb, GB),
        hbm_bw=_scaled(args.hbm_tbs, TB),
        bf16_flops=_scaled(args.bf16_tflops, TFLOP),
        fp8_flops=_scaled(args.fp8_tflops, TFLOP),
        nvlink_bw=_scaled(args.nvlink_gbs, GB),
        nic_bw=_scaled(args.nic_gbs, GB),
        gpus_per_node=args.gpus_per_node,
    )
    model = _model(args)
    eff = load_calibration(args.calibration, hw, model.weights_fp8) if args.calibration else Efficiency()
    if args.overlap is not None:
        eff = dataclasses.replace(eff, overlap=args.overlap)
    shapes: tuple[Shape, ...] = ("disaggregated", "colocated") if args.shape == "both" else (args.shape,)
    deploying = bool(args.helm_values or args.cluster_config)
    ep_sizes, left_out = runnable_ep_sizes(model, tuple(args.ep)) if deploying else (tuple(args.ep), ())
    if not ep_sizes:
        raise ValueError(f"ep: none of {args.ep} divides the model's {model.num_experts} routed experts")
    if args.helm_values and args.shape == "both":
        shapes = ("disaggregated",)  # the chart runs a prefill and a decode pool
    workload = Workload(
        args.prompt_len, args.output_len, args.cached_fraction, args.ttft_slo, args.itl_slo, args.target_utilization
    )
    request = PlanRequest(
        model, hw, args.gpus, workload, eff, ep_sizes, args.redundant_experts, shapes, not args.bf16_dispatch
    )
    result = plan(request)
    comparisons = [c for d in PUBLISHED for c in compare(d, eff)] if args.validate else []
    if args.json:
        out = plan_json(result)
        if args.validate:
            out["validation"] = [vars(c) | {"ratio": c.ratio, "within": c.within} for c in comparisons]
        print(json.dumps(out, indent=2, default=str))
    else:
        print(render_plan(result, args.top))
        if args.validate:
            print()
            print(render_validation(comparisons))
    if deploying:  # after the plan, whose "not feasible" lines explain a plan with no layout
        _write_deployment(args, result, left_out)
    return 0 if result.layouts else 1


def _write_deployment(args: argparse.Namespace, result: PlanResult, left_out: tuple[int, ...]) -> None:
    """Write the chosen layout as the files asked for; every check runs before the first file is written."""
    from k2serve.cluster.config import ClusterConfig

    layout = pick(result, args.layout)
    opts = DeployOptions(args.block_size, args.max_model_len, args.min_groups, not args.no_autoscaler)
    comments = header(layout, result.request, args.layout)
    if left_out:
        comments.append(f"EP sizes left out (k2serve gives every rank the same routed experts): {list(left_out)}")
    files: list[tuple[str, str]] = []
    if args.helm_values:
        files.append((args.helm_values, to_yaml(helm_values(layout, result.request, opts), comments)))
    if args.cluster_config:
        model_path = args.model_path or args.model_dir
        if not model_path:
            raise ValueError("cluster-config: name the model folder the cluster loads (--model-path or --model-dir)")
        doc = cluster_config(layout, result.request, model_path, opts)
        ClusterConfig.from_dict(doc)  # ClusterConfigError (a ValueError) names the key
        files.append((args.cluster_config, to_yaml(doc, comments)))
    for path, text in files:
        Path(path).write_text(text, encoding="utf-8")
        print(f"wrote {path} (layout #{args.layout}, {layout.shape})", file=sys.stderr)
