"""``plan``: the feasible layouts of a Kimi K2 deployment on N GPUs, best first, each with its binding resource.

Lifecycle: ``k2serve plan`` (or a test) builds one ``PlanRequest`` and calls ``plan`` once; the
result is printed (``plan_report.py``) or written as JSON. Two shapes are searched:

- disaggregated: whole nodes split between a prefill pool and a decode pool; each pool takes the
  expert-parallel size that gives it the most tokens/s per GPU (prefill: computed prompt tokens;
  decode: output tokens at the largest batch whose ITL meets the SLO and whose KV fits). The split
  that serves the most requests per second wins: prefill capacity = P x prefill rate x load / computed
  prompt tokens, decode capacity = D x decode rate / output tokens. The prefill load is capped where
  the M/D/1 queue keeps the estimated TTFT (queue + prefill + KV transfer + one ITL) under the SLO.
- colocated: one pool does both by time sharing: a request costs computed / prefill rate + output /
  decode rate GPU-seconds; prefill steps stretch the decode ITL by the prefill share of time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from k2serve.cluster.planner.hardware import Efficiency, Hardware
from k2serve.cluster.planner.model_spec import ModelSpec
from k2serve.cluster.planner.roofline import (
    DecodeEstimate,
    PrefillEstimate,
    RankLayout,
    kv_transfer_s,
    max_decode_batch,
    memory,
    prefill_rate,
    queue_factor,
)

Shape = Literal["disaggregated", "colocated"]
DEFAULT_EP_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass(frozen=True)
class Workload:
    prompt_len: float = 2000.0  # mean prompt tokens
    output_len: float = 1000.0  # mean output tokens
    cached_fraction: float = 0.0  # share of prompt tokens found in a prefix cache
    ttft_slo_s: float = 2.0
    itl_slo_s: float = 0.05
    target_utilization: float = 0.7  # the load a pool is sized for (headroom for bursts)

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.output_len < 1:
            raise ValueError("prompt_len and output_len: must be >= 1")
        if not 0 <= self.cached_fraction < 1:
            raise ValueError(f"cached_fraction: must be in [0, 1), got {self.cached_fraction}")
        if self.ttft_slo_s <= 0 or self.itl_slo_s <= 0:
            raise ValueError("ttft_slo_s and itl_slo_s: must be > 0")
        if not 0 < self.target_utilization < 1:
            raise ValueError(f"target_utilization: must be in (0, 1), got {self.target_utilization}")

    @property
    def computed_len(self) -> float:
        return self.prompt_len * (1.0 - self.cached_fraction)

    @property
    def decode_context(self) -> float:
        """Mean context of a decode step: the prompt plus half the output."""
        return self.prompt_len + self.output_len / 2.0


@dataclass(frozen=True)
class PlanRequest:
    model: ModelSpec
    hardware: Hardware
    gpus: int
    workload: Workload = field(default_factory=Workload)
    efficiency: Efficiency = field(default_factory=Efficiency)
    ep_sizes: tuple[int, ...] = DEFAULT_EP_SIZES
    redundant_experts: int = 0  # per group, both pools (rounded up to fill the group's slots evenly)
    shapes: tuple[Shape, ...] = ("disaggregated", "colocated")
    dispatch_fp8: bool = True

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise ValueError(f"gpus: must be >= 1, got {self.gpus}")
        if not self.ep_sizes or any(ep < 1 for ep in self.ep_sizes):
            raise ValueError(f"ep_sizes: must be positive, got {self.ep_sizes}")


@dataclass(frozen=True)
class PoolPlan:
    role: str  # prefill | decode | colocated
    gpus: int
    ep_size: int
    groups: int
    redundant_experts: int
    kv_tokens_per_gpu: int
    prefill: PrefillEstimate | None
    decode: DecodeEstimate | None
    binding: str


@dataclass(frozen=True)
class Layout:
    shape: Shape
    pools: tuple[PoolPlan, ...]
    requests_per_s: float  # sustainable within both SLOs at the target load
    input_tokens_per_s: float
    output_tokens_per_s: float
    ttft_s: float
    itl_s: float
    bottleneck: str  # the pool (and its resource) that caps requests_per_s
    gpus_per_node: int
    notes: tuple[str, ...] = ()

    @property
    def gpus(self) -> int:
        return sum(p.gpus for p in self.pools)

    @property
    def output_tokens_per_s_per_gpu(self) -> float:
        return self.output_tokens_per_s / self.gpus


@dataclass(frozen=True)
class PlanResult:
    request: PlanRequest
    layouts: tuple[Layout, ...]  # best first
    infeasible: tuple[str, ...] = field(default_factory=tuple)  # why a shape or pool size had no layout


def _layout_for(req: PlanRequest, ep: int) -> RankLayout | None:
    """The EP size's rank layout, or None when the experts (with redundancy) do not split evenly."""
    experts = req.model.num_experts
    redundant = math.ceil(req.redundant_experts / ep) * ep if req.redundant_experts else 0
    if (experts + redundant) % ep:
        return None
    return RankLayout(ep, redundant, req.dispatch_fp8)


def _best_prefill(req: PlanRequest, gpus: int, why: list[str]) -> PoolPlan | None:
    w, best = req.workload, None
    for ep in req.ep_sizes:
        layout = _layout_for(req, ep)
        if layout is None or gpus % ep:
            continue
        mem = memory(req.model, req.hardware, layout)
        if not mem.kv_tokens_per_gpu >= w.prompt_len:
            continue
        est = prefill_rate(req.model, req.hardware, req.efficiency, layout, w.prompt_len, w.prompt_len - w.computed_len)
        if best is None or est.tokens_per_s > best.prefill.tokens_per_s:  # type: ignore[union-attr]
            best = PoolPlan("prefill", gpus, ep, gpus // ep, layout.redundant_experts, mem.kv_tokens_per_gpu, est, None, est.binding)  # fmt: skip
    if best is None:
        why.append(f"prefill pool of {gpus} GPUs: no EP size in {list(req.ep_sizes)} holds the weights and one prompt")
    return best


def _best_decode(req: PlanRequest, gpus: int, role: str, itl_slo_s: float, why: list[str]) -> PoolPlan | None:
    w, best = req.workload, None
    for ep in req.ep_sizes:
        layout = _layout_for(req, ep)
        if layout is None or gpus % ep:
            continue
        est = max_decode_batch(req.model, req.hardware, req.efficiency, layout, w.decode_context, itl_slo_s)
        if est is None:
            continue
        if best is None or est.tokens_per_s > best.decode.tokens_per_s:  # type: ignore[union-attr]
            mem = memory(req.model, req.hardware, layout)
            best = PoolPlan(role, gpus, ep, gpus // ep, layout.redundant_experts, mem.kv_tokens_per_gpu, None, est, est.binding)  # fmt: skip
    if best is None:
        why.append(
            f"{role} pool of {gpus} GPUs: no EP size in {list(req.ep_sizes)} holds the weights and the KV of one "
            f"{w.decode_context:.0f}-token sequence within an ITL of {itl_slo_s * 1000:.0f} ms"
        )
    return best


def _max_load(service_s: float, fixed_s: float, slo_s: float, target: float) -> float:
    """The highest utilization at which service x M/D/1 factor + fixed stays within the SLO."""
    allowed = (slo_s - fixed_s) / service_s
    if allowed < 1:
        return 0.0
    rho = 2 * (allowed - 1) / (2 * allowed - 1)  # solves 1 + rho / (2 (1 - rho)) = allowed
    return min(target, rho)


def _disaggregated(req: PlanRequest, why: list[str]) -> list[Layout]:
    hw, w, gpn = req.hardware, req.workload, req.hardware.gpus_per_node
    out: list[Layout] = []
    step = gpn if req.gpus >= 2 * gpn else 1
    sizes: list[str] = []  # per-split reasons, summarized below when no split works
    for p_gpus in range(step, req.gpus, step):
        d_gpus = req.gpus - p_gpus
        pre = _best_prefill(req, p_gpus, sizes)
        dec = _best_decode(req, d_gpus, "decode", w.itl_slo_s, sizes)
        if pre is None or dec is None or pre.prefill is None or dec.decode is None:
            continue
        fixed = kv_transfer_s(req.model, hw, req.efficiency, w.prompt_len) + dec.decode.itl_s
        load = _max_load(pre.prefill.request_s, fixed, w.ttft_slo_s, w.target_utilization)
        p_cap = p_gpus * pre.prefill.tokens_per_s * load / w.computed_len
        d_cap = d_gpus * dec.decode.tokens_per_s / w.output_len
        rate = min(p_cap, d_cap)
        if rate <= 0:
            sizes.append(f"{p_gpus}P/{d_gpus}D: one prompt's prefill alone misses the TTFT SLO")
            continue
        rho = rate * w.computed_len / (p_gpus * pre.prefill.tokens_per_s)
        ttft = pre.prefill.request_s * queue_factor(rho) + fixed
        neck = f"prefill ({pre.binding})" if p_cap <= d_cap else f"decode ({dec.binding})"
        out.append(
            Layout(
                "disaggregated",
                (pre, dec),
                rate,
                rate * w.prompt_len,
                rate * w.output_len,
                ttft,
                dec.decode.itl_s,
                neck,
                gpn,
            )
        )
    if not out:
        smallest = _smallest_pool(req)
        why.append(
            f"disaggregated: no split of {req.gpus} GPUs gives both pools a layout"
            + (f" (one pool needs at least {smallest} GPUs to hold the weights)" if smallest else "")
            + (f"; e.g. {sizes[-1]}" if sizes else "")
        )
    return out


def _smallest_pool(req: PlanRequest) -> int | None:
    fits = [
        ep for ep in sorted(req.ep_sizes) if (lay := _layout_for(req, ep)) and memory(req.model, req.hardware, lay).fits
    ]
    return fits[0] if fits else None


def _colocated(req: PlanRequest, why: list[str]) -> list[Layout]:
    hw, w = req.hardware, req.workload
    pre = _best_prefill(req, req.gpus, why)
    # prefill steps take a share of every GPU's time; decode must still meet the ITL between them,
    # so size decode for a tighter ITL and keep the squeeze that serves the most
    best: Layout | None = None
    for squeeze in (0.9, 0.75, 0.6, 0.45, 0.3):
        dec = _best_decode(req, req.gpus, "colocated", w.itl_slo_s * squeeze, [])
        if pre is None or dec is None or pre.prefill is None or dec.decode is None:
            continue
        per_request = w.computed_len / pre.prefill.tokens_per_s + w.output_len / dec.decode.tokens_per_s
        rate = req.gpus * w.target_utilization / per_request
        prefill_share = rate * w.computed_len / (req.gpus * pre.prefill.tokens_per_s)
        itl = dec.decode.itl_s / max(1e-9, 1.0 - prefill_share)
        if itl > w.itl_slo_s:
            continue
        ttft = pre.prefill.request_s * queue_factor(w.target_utilization) + dec.decode.itl_s
        if ttft > w.ttft_slo_s:
            why.append(f"colocated {req.gpus} GPUs: TTFT {ttft:.2f} s over the SLO")
            continue
        neck = "prefill" if prefill_share >= 0.5 else "decode"
        pool = PoolPlan("colocated", req.gpus, dec.ep_size, dec.groups, dec.redundant_experts, dec.kv_tokens_per_gpu, pre.prefill, dec.decode, dec.binding)  # fmt: skip
        note = f"prefill takes {prefill_share:.0%} of GPU time; decode sized at ITL {dec.decode.itl_s * 1000:.0f} ms before interference"  # fmt: skip
        layout = Layout("colocated", (pool,), rate, rate * w.prompt_len, rate * w.output_len, ttft, itl, f"{neck} ({dec.binding})", hw.gpus_per_node, (note,))  # fmt: skip
        if best is None or layout.requests_per_s > best.requests_per_s:
            best = layout
    if best is None and pre is not None:
        why.append(f"colocated {req.gpus} GPUs: no decode batch meets the ITL SLO once prefill shares the GPUs")
    return [best] if best is not None else []


def plan(req: PlanRequest) -> PlanResult:
    why: list[str] = []
    layouts: list[Layout] = []
    if "disaggregated" in req.shapes:
        if req.gpus < 2:
            why.append("disaggregated: needs at least 2 GPUs")
        else:
            layouts += _disaggregated(req, why)
    if "colocated" in req.shapes:
        layouts += _colocated(req, why)
    layouts.sort(key=lambda lay: lay.requests_per_s, reverse=True)
    return PlanResult(req, tuple(layouts), tuple(dict.fromkeys(why)))
