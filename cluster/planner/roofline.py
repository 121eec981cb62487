"""The roofline of one data-parallel attention + expert-parallel GPU: decode step time, prefill rate,
memory, and which resource binds.

Lifecycle: pure functions over (``ModelSpec``, ``Hardware``, ``Efficiency``, ``RankLayout``); the
planner calls them for every candidate layout. The arithmetic is performance.md §3-§6:

- memory: replicated weights + (experts + redundant slots) / EP per GPU; the rest minus a reserve
  holds KV at ``kv_bytes_per_token``.
- decode step (B sequences per GPU, context L, T = B x (1 + draft tokens) query tokens):
  linear part = max(weight bytes read / HBM, T x 2 x active params / linear peak), where a GPU
  reads the replicated set plus every local expert that some token of the EP group selects
  (n_local x [1 - (1 - k/E)^(T x EP)] under uniform routing); attention part = max(B x L x KV bytes /
  HBM, T x L x absorbed-MLA FLOPs / bf16 peak); all-to-all = T x k pairs x (dispatch + combine) per
  MoE layer, the share bound for other nodes over the NIC and the rest over NVLink, concurrently,
  plus a latency floor per dispatch and combine. step = local + comm - overlap x min(local, comm).
- prefill (per computed token, batches large enough that weight reads amortize): linear FLOPs +
  expanded-MLA attention over the context, and the node-deduplicated all-to-all of DeepEP's normal
  kernels (a token crosses to each remote node that holds one of its experts once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from k2serve.cluster.planner.hardware import Efficiency, Hardware
from k2serve.cluster.planner.model_spec import ModelSpec

PREFILL_CHUNK_TOKENS = 16384  # tokens per GPU per prefill step (DeepSeek's and SGLang's setting)


@dataclass(frozen=True)
class RankLayout:
    ep_size: int
    redundant_experts: int = 0
    dispatch_fp8: bool = True  # DeepEP's fp8 dispatch; W4A16 experts may want bf16 (accuracy)
    draft_tokens: int = 0  # speculative tokens verified per step (MTP); K2 ships no MTP head
    acceptance: float = 0.0  # accepted share of draft tokens

    def __post_init__(self) -> None:
        if self.ep_size < 1:
            raise ValueError(f"ep_size: must be >= 1, got {self.ep_size}")
        if self.redundant_experts < 0:  # (experts + redundant) % ep_size: checked against a model by the planner
            raise ValueError(f"redundant_experts: must be >= 0, got {self.redundant_experts}")
        if self.draft_tokens < 0 or not 0 <= self.acceptance <= 1:
            raise ValueError("draft_tokens must be >= 0 and acceptance in [0, 1]")

    @property
    def tokens_per_step(self) -> float:
        """Output tokens one sequence gains per decode step."""
        return 1.0 + self.draft_tokens * self.acceptance


@dataclass(frozen=True)
class Memory:
    weights_per_gpu: float
    kv_tokens_per_gpu: int  # 0 when the weights leave no room

    @property
    def fits(self) -> bool:
        return self.kv_tokens_per_gpu > 0


def memory(model: ModelSpec, hw: Hardware, layout: RankLayout) -> Memory:
    slots = (model.num_experts + layout.redundant_experts) / layout.ep_size
    weights = model.replicated_bytes + model.moe_layers * slots * model.expert_bytes
    free = hw.memory_bytes - hw.reserve_bytes - weights
    return Memory(weights, max(0, int(free // model.kv_bytes_per_token)))


@dataclass(frozen=True)
class DecodeEstimate:
    batch: int  # sequences per GPU
    context: float
    t_linear: float
    t_attention: float
    t_comm: float
    step_s: float
    itl_s: float
    tokens_per_s: float  # output tokens per second per GPU
    binding: str  # hbm | compute | network | nvlink | kv_capacity (the batch is capped by KV room)
    bytes_read: float


def _share_off_node(hw: Hardware, ep: int) -> tuple[float, float]:
    """(share of a GPU's pairs bound for other nodes, share for other GPUs of its node)."""
    on_node = min(ep, hw.gpus_per_node)
    return max(0.0, 1.0 - on_node / ep), (on_node - 1) / ep


def decode_step(
    model: ModelSpec, hw: Hardware, eff: Efficiency, layout: RankLayout, batch: int, context: float
) -> DecodeEstimate:
    ep = layout.ep_size
    tokens = batch * (1 + layout.draft_tokens)  # query tokens per GPU per step
    slots = (model.num_experts + layout.redundant_experts) / ep
    touched = slots * (1.0 - (1.0 - model.top_k / (model.num_experts + layout.redundant_experts)) ** (tokens * ep))
    weight_bytes = model.replicated_read_bytes + model.moe_layers * touched * model.expert_bytes
    kv_bytes = batch * context * model.kv_bytes_per_token
    hbm = hw.hbm_bw * eff.hbm
    t_weights = weight_bytes / hbm
    t_linear_flops = tokens * model.linear_flops_per_token / (hw.linear_flops(model.weights_fp8) * eff.linear)
    t_kv = kv_bytes / hbm
    t_attn_flops = tokens * context * model.decode_attention_flops_per_context_token / (hw.bf16_flops * eff.attention)
    t_linear, t_attention = max(t_weights, t_linear_flops), max(t_kv, t_attn_flops)
    t_comm, comm_kind = _decode_comm(model, hw, eff, layout, tokens)
    local = t_linear + t_attention
    step = local + t_comm - eff.overlap * min(local, t_comm)
    if t_comm > local:
        binding = comm_kind
    else:
        binding = "hbm" if t_weights + t_kv >= t_linear_flops + t_attn_flops else "compute"
    itl = step / layout.tokens_per_step
    return DecodeEstimate(batch, context, t_linear, t_attention, t_comm, step, itl, batch / itl, binding, weight_bytes + kv_bytes)  # fmt: skip


def _decode_comm(model: ModelSpec, hw: Hardware, eff: Efficiency, layout: RankLayout, tokens: int) -> tuple[float, str]:
    if layout.ep_size == 1:
        return 0.0, "nvlink"
    pair = model.dispatch_bytes_per_pair(layout.dispatch_fp8) + model.combine_bytes_per_pair
    per_layer = tokens * model.top_k * pair
    remote, local = _share_off_node(hw, layout.ep_size)
    t_nic = per_layer * remote / (hw.nic_bw * eff.nic)
    t_nvl = per_layer * local / (hw.nvlink_bw * eff.nvlink)
    t = model.moe_layers * (max(t_nic, t_nvl) + 2 * eff.collective_latency_s)
    return t, "network" if t_nic >= t_nvl else "nvlink"


def max_decode_batch(
    model: ModelSpec,
    hw: Hardware,
    eff: Efficiency,
    layout: RankLayout,
    context: float,
    itl_slo_s: float,
    limit: int = 4096,
) -> DecodeEstimate | None:
    """The largest batch per GPU whose ITL meets the SLO and whose KV fits; None if not even one."""
    room = memory(model, hw, layout).kv_tokens_per_gpu
    cap = min(limit, int(room // max(context, 1.0)))
    if cap < 1 or decode_step(model, hw, eff, layout, 1, context).itl_s > itl_slo_s:
        return None
    lo, hi = 1, cap  # ITL grows with the batch: bisect for the last batch within the SLO
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if decode_step(model, hw, eff, layout, mid, context).itl_s <= itl_slo_s:
            lo = mid
        else:
            hi = mid - 1
    best = decode_step(model, hw, eff, layout, lo, context)
    if lo == cap < limit and decode_step(model, hw, eff, layout, lo + 1, context).itl_s <= itl_slo_s:
        return replace(best, binding="kv_capacity")  # the ITL allows more: the KV room caps the batch
    return best


@dataclass(frozen=True)
class PrefillEstimate:
    prompt_len: float
    cached_len: float
    t_compute: float  # per computed token
    t_comm: float  # per computed token
    t_token: float
    tokens_per_s: float  # computed prompt tokens per second per GPU
    binding: str  # compute | hbm | network | nvlink
    request_s: float  # one prompt alone on one rank


def _none_on(model: ModelSpec, experts_held: float) -> float:
    """Chance that a group holding ``experts_held`` of the experts receives none of a token's top-k."""
    p = 1.0
    for i in range(model.top_k):
        p *= max(0.0, (model.num_experts - experts_held - i) / (model.num_experts - i))
    return p


def prefill_rate(
    model: ModelSpec, hw: Hardware, eff: Efficiency, layout: RankLayout, prompt_len: float, cached_len: float = 0.0
) -> PrefillEstimate:
    if not 0 <= cached_len < prompt_len:
        raise ValueError(f"cached_len: must be in [0, prompt_len), got {cached_len}")
    t_lin = model.prefill_linear_flops_per_token / (hw.linear_flops(model.weights_fp8) * eff.linear)
    t_attn = model.prefill_attention_flops_per_token(prompt_len, cached_len) / (hw.bf16_flops * eff.attention)
    slots = (model.num_experts + layout.redundant_experts) / layout.ep_size
    weights = model.replicated_read_bytes + model.moe_layers * slots * model.expert_bytes
    t_weights = weights / (hw.hbm_bw * eff.hbm) / PREFILL_CHUNK_TOKENS
    t_compute = max(t_lin + t_attn, t_weights)
    t_comm, comm_kind = _prefill_comm(model, hw, eff, layout)
    t_token = t_compute + t_comm - eff.overlap * min(t_compute, t_comm)
    binding = comm_kind if t_comm > t_compute else ("compute" if t_lin + t_attn >= t_weights else "hbm")
    computed = prompt_len - cached_len
    request_s = max(computed * t_token, weights / (hw.hbm_bw * eff.hbm))
    return PrefillEstimate(prompt_len, cached_len, t_compute, t_comm, t_token, 1.0 / t_token, binding, request_s)


def _prefill_comm(model: ModelSpec, hw: Hardware, eff: Efficiency, layout: RankLayout) -> tuple[float, str]:
    """Per token: DeepEP normal kernels send a token once to each remote node holding one of its
    experts (then forward over NVLink), and to each GPU of its own node that holds one."""
    ep, gpn = layout.ep_size, hw.gpus_per_node
    if ep == 1:
        return 0.0, "nvlink"
    pair = model.dispatch_bytes_per_pair(layout.dispatch_fp8) + model.combine_bytes_per_pair
    per_gpu = model.num_experts / ep
    nodes = max(1, ep // gpn)
    remote_nodes = (nodes - 1) * (1.0 - _none_on(model, per_gpu * gpn))
    gpus = min(ep, gpn) * (1.0 - _none_on(model, per_gpu))  # GPUs reached inside a node (incl. forwards)
    t_nic = remote_nodes * pair / (hw.nic_bw * eff.nic)
    t_nvl = gpus * pair / (hw.nvlink_bw * eff.nvlink)
    return model.moe_layers * max(t_nic, t_nvl), "network" if t_nic >= t_nvl else "nvlink"


def kv_transfer_s(model: ModelSpec, hw: Hardware, eff: Efficiency, prompt_len: float) -> float:
    """The prompt's latent KV over one NIC (prefill rank -> decode rank), not overlapped."""
    return prompt_len * model.kv_bytes_per_token / (hw.nic_bw * eff.nic)


def queue_factor(utilization: float) -> float:
    """Mean time in an M/D/1 queue in units of the service time: 1 + rho / (2 (1 - rho))."""
    if not 0 <= utilization < 1:
        return math.inf
    return 1.0 + utilization / (2.0 * (1.0 - utilization))
