"""Text and JSON views of a ``PlanResult`` and of the comparison with published deployments.

Lifecycle: ``k2serve plan`` renders one result once (``render_plan`` or ``plan_json``) and, with
``--validate``, the comparisons (``render_validation``). Pure formatting: no arithmetic beyond units.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from k2serve.cluster.planner.planner import Layout, PlanResult, PoolPlan
from k2serve.cluster.planner.published import TOLERANCE, Comparison


def _pool_line(p: PoolPlan) -> str:
    head = f"{p.role:<10} {p.gpus:>4} GPUs = {p.groups} x EP{p.ep_size}"
    if p.redundant_experts:
        head += f" (+{p.redundant_experts} redundant)"
    parts = [head, f"KV room {p.kv_tokens_per_gpu / 1000:,.0f}k tok/GPU"]
    if p.prefill is not None:
        parts.append(f"prefill {p.prefill.tokens_per_s:,.0f} tok/s/GPU ({p.prefill.binding})")
    if p.decode is not None:
        d = p.decode
        parts.append(f"decode batch {d.batch}/GPU, {d.tokens_per_s:,.0f} tok/s/GPU, step {d.step_s * 1000:.1f} ms ({d.binding})")  # fmt: skip
    return "  " + " | ".join(parts)


def _layout_block(i: int, lay: Layout) -> list[str]:
    nodes = lay.gpus / lay.gpus_per_node
    lines = [
        f"#{i} {lay.shape}: {lay.requests_per_s:,.2f} req/s; input {lay.input_tokens_per_s:,.0f} tok/s, "
        f"output {lay.output_tokens_per_s:,.0f} tok/s ({lay.output_tokens_per_s_per_gpu:,.0f} per GPU, "
        f"{lay.output_tokens_per_s / nodes:,.0f} per node); TTFT ~{lay.ttft_s:.2f} s, ITL ~{lay.itl_s * 1000:.0f} ms; "
        f"bound by {lay.bottleneck}",
    ]
    lines += [_pool_line(p) for p in lay.pools]
    lines += [f"  note: {n}" for n in lay.notes]
    return lines


def render_plan(result: PlanResult, top: int = 5) -> str:
    req, w = result.request, result.request.workload
    hw, eff = req.hardware, req.efficiency
    lines = [
        f"k2serve plan: {req.model.name} on {req.gpus} x {hw.name} ({hw.gpus_per_node} per node)",
        f"  weights {req.model.checkpoint_bytes / 1e9:,.1f} GB; KV {req.model.kv_bytes_per_token:,.0f} B/token; "
        f"GPU {hw.memory_bytes / 1e9:.1f} GB, HBM {hw.hbm_bw / 1e12:.2f} TB/s, NIC {hw.nic_bw / 1e9:.0f} GB/s",
        f"  workload: prompt {w.prompt_len:,.0f} (cached {w.cached_fraction:.0%}), output {w.output_len:,.0f}; "
        f"SLO TTFT {w.ttft_slo_s:g} s, ITL {w.itl_slo_s * 1000:g} ms; pools sized for {w.target_utilization:.0%} load",
        f"  efficiency ({eff.source}): HBM {eff.hbm:.2f}, linear {eff.linear:.2f}, attention {eff.attention:.2f}, "
        f"NIC {eff.nic:.2f}, NVLink {eff.nvlink:.2f}, overlap {eff.overlap:.2f}",
        "",
    ]
    if not result.layouts:
        lines.append("no feasible layout")
    for i, lay in enumerate(result.layouts[:top], start=1):
        lines += _layout_block(i, lay)
    if result.infeasible:
        lines += ["", "not feasible:"] + [f"  - {why}" for why in result.infeasible]
    return "\n".join(lines)


def _pool_json(p: PoolPlan) -> dict[str, Any]:
    out: dict[str, Any] = {
        "role": p.role,
        "gpus": p.gpus,
        "ep_size": p.ep_size,
        "groups": p.groups,
        "redundant_experts": p.redundant_experts,
        "kv_tokens_per_gpu": p.kv_tokens_per_gpu,
        "binding": p.binding,
    }
    if p.prefill is not None:
        out["prefill_tokens_per_s_per_gpu"] = p.prefill.tokens_per_s
        out["prefill_request_s"] = p.prefill.request_s
    if p.decode is not None:
        out.update(
            decode_batch_per_gpu=p.decode.batch,
            decode_tokens_per_s_per_gpu=p.decode.tokens_per_s,
            decode_step_s=p.decode.step_s,
        )
    return out


def plan_json(result: PlanResult) -> dict[str, Any]:
    req = result.request
    return {
        "model": req.model.name,
        "hardware": req.hardware.name,
        "gpus": req.gpus,
        "workload": asdict(req.workload),
        "efficiency": asdict(req.efficiency),
        "layouts": [
            {
                "shape": lay.shape,
                "requests_per_s": lay.requests_per_s,
                "input_tokens_per_s": lay.input_tokens_per_s,
                "output_tokens_per_s": lay.output_tokens_per_s,
                "ttft_s": lay.ttft_s,
                "itl_s": lay.itl_s,
                "bottleneck": lay.bottleneck,
                "pools": [_pool_json(p) for p in lay.pools],
                "notes": list(lay.notes),
            }
            for lay in result.layouts
        ],
        "infeasible": list(result.infeasible),
    }


def render_validation(comparisons: list[Comparison]) -> str:
    lines = [f"published deployments (model vs published, per node; a match is within ±{TOLERANCE:.0%}):"]
    for c in comparisons:
        verdict = "ok" if c.within else ("explained" if c.explained else "MISS")
        lines.append(
            f"  {c.deployment:<22} {c.figure}: published {c.published:,.0f}, model {c.predicted:,.0f} "
            f"({c.ratio:.2f}x) {verdict} [{c.detail}]"
        )
        if c.explained and not c.within:
            lines.append(
                f"      differs: {c.explained}; the published figure is {1 / c.ratio:.2f} of the model's capacity"
            )
    return "\n".join(lines)
