"""The routed experts this rank holds for one MoE layer, stacked, and their grouped computation.

Lifecycle: built once per MoE layer with the logical expert ids this rank owns (``expert_ids``, in
local index order); ``load_state_dict`` fills the stacks. Two weight formats (``weight_format``):
- ``"dense"`` (default): ``mlp.experts.gate_up_proj`` [E_local, 2I, H] (rows 0..I-1 gate_proj,
  I..2I-1 up_proj) and ``mlp.experts.down_proj`` [E_local, H, I], already dequantized to the model
  dtype by the loader (``load_weights``);
- ``"int4"``: the checkpoint's packed INT4 words and group scales, as ``load_weights(...,
  keep_packed=True)`` names them: ``mlp.experts.gate_up_proj_packed`` int32 [E_local, 2I, H/8],
  ``..gate_up_proj_scale`` [E_local, 2I, H/gs], ``..down_proj_packed`` int32 [E_local, H, I/8],
  ``..down_proj_scale`` [E_local, H, I/gs] (buffers; scales in the model dtype). The forward pass is
  ``k2serve.kernels.moe_w4a16.fused_moe_w4a16``: the Triton W4A16 kernels on CUDA, its torch
  reference elsewhere (``kernel_impl`` forces one, for tests). Both formats give the same tokens.
The logical -> local index table is a non-persistent buffer (not in the state dict).

Dense compute: the token-expert assignments are sorted by local expert once, then the loop runs over
the experts that received tokens, one pair of GEMMs per expert on all of its tokens (never a loop
over tokens). Sorting needs the per-expert counts on the host: one device sync per MoE layer,
the price of plain torch; a grouped-GEMM kernel removes it later. Weighted expert outputs are
accumulated in fp32 and cast to the model dtype once.

Legend: T = tokens, K = experts per token, H = hidden_size, I = moe_intermediate_size,
E = n_routed_experts (logical), E_local = experts held here, A = assignments to local experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from k2serve.kernels.dispatch import Impl
from k2serve.kernels.moe_w4a16 import fused_moe_w4a16
from k2serve.workers.config import ModelConfig

ExpertWeightFormat = Literal["dense", "int4"]
EXPERT_WEIGHT_FORMATS: tuple[ExpertWeightFormat, ...] = ("dense", "int4")


def _distinct_ids(expert_ids: Sequence[int], num_experts: int) -> tuple[int, ...]:
    ids = tuple(int(e) for e in expert_ids)
    if len(set(ids)) != len(ids) or any(not 0 <= e < num_experts for e in ids):
        raise ValueError(f"expert_ids must be distinct ids in [0, {num_experts}), got {list(ids)}")
    return ids


class LocalExperts(nn.Module):
    logical_to_local: torch.Tensor  # [E] int64, non-persistent
    gate_up_proj_packed: torch.Tensor  # int4 format only, see the module docstring
    gate_up_proj_scale: torch.Tensor
    down_proj_packed: torch.Tensor
    down_proj_scale: torch.Tensor

    def __init__(
        self,
        config: ModelConfig,
        expert_ids: Sequence[int],
        *,
        device: torch.device | str | None,
        dtype: torch.dtype,
        weight_format: ExpertWeightFormat = "dense",
        layer_id: int = -1,
    ) -> None:
        super().__init__()
        ids = _distinct_ids(expert_ids, config.n_routed_experts)
        if weight_format not in EXPERT_WEIGHT_FORMATS:
            raise ValueError(f"weight_format {weight_format!r}; expected one of {EXPERT_WEIGHT_FORMATS}")
        self.layer_id = layer_id  # the model layer this block belongs to (the dispatcher routes per layer)
        self.num_routed_experts = config.n_routed_experts
        self.expert_ids = ids
        self.intermediate_size = config.moe_intermediate_size
        self.weight_format: ExpertWeightFormat = weight_format
        self.kernel_impl: Impl = "auto"  # which fused_moe_w4a16 implementation the int4 format runs
        hidden, inter = config.hidden_size, config.moe_intermediate_size
        if weight_format == "dense":
            self.gate_up_proj = nn.Parameter(torch.empty(len(ids), 2 * inter, hidden, device=device, dtype=dtype))
            self.down_proj = nn.Parameter(torch.empty(len(ids), hidden, inter, device=device, dtype=dtype))
        else:
            self._register_packed(config, len(ids), device=device, dtype=dtype)
        self.register_buffer("logical_to_local", self._local_table(ids, device), persistent=False)  # [E]

    def _local_table(self, ids: tuple[int, ...], device: torch.device | str | None) -> torch.Tensor:
        table = torch.full((self.num_routed_experts,), -1, dtype=torch.int64)  # [E], -1 = not held here
        table[list(ids)] = torch.arange(len(ids), dtype=torch.int64)
        return table.to(device)

    def replace_experts(self, expert_ids: Sequence[int], stacks: dict[str, torch.Tensor]) -> None:
        """Hold ``expert_ids`` from now on (same count, new ids; EPLB rebalancing between steps).

        ``stacks``: this layer's expert tensors by their short name (``gate_up_proj``, ``down_proj``,
        or the int4 ``*_packed``/``*_scale`` names), [E_local, ...] in ``expert_ids`` order, as
        ``weights.load_expert_stacks`` returns them. Copied into the existing storage, so the
        memory of a rank does not grow.
        """
        ids = _distinct_ids(expert_ids, self.num_routed_experts)
        if len(ids) != self.num_local_experts:
            raise ValueError(f"expert_ids: a rank keeps {self.num_local_experts} slots, got {len(ids)} ids")
        own = dict(self.named_parameters(recurse=False)) | {
            n: b for n, b in self.named_buffers(recurse=False) if n != "logical_to_local"
        }
        if set(stacks) != set(own):
            raise ValueError(f"stacks: expected tensors {sorted(own)}, got {sorted(stacks)}")
        with torch.no_grad():
            for name, tensor in own.items():
                tensor.copy_(stacks[name])
        self.expert_ids = ids
        self.logical_to_local = self._local_table(ids, self.logical_to_local.device)

    def _register_packed(
        self, config: ModelConfig, num_experts: int, *, device: torch.device | str | None, dtype: torch.dtype
    ) -> None:
        if config.quantization is None:
            raise ValueError("weight_format='int4' needs a checkpoint with a quantization_config")
        group, hidden, inter = config.quantization.group_size, config.hidden_size, config.moe_intermediate_size
        for name, rows, cols in (("gate_up_proj", 2 * inter, hidden), ("down_proj", hidden, inter)):
            packed = torch.empty(num_experts, rows, cols // 8, device=device, dtype=torch.int32)
            self.register_buffer(f"{name}_packed", packed)  # [E_local, rows, cols/8]
            self.register_buffer(
                f"{name}_scale", torch.empty(num_experts, rows, cols // group, device=device, dtype=dtype)
            )

    @property
    def num_local_experts(self) -> int:
        return len(self.expert_ids)

    def to_local(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Logical expert ids (any shape) -> local indices, -1 where the expert is not held here."""
        return self.logical_to_local[topk_ids]

    def forward(self, hidden_states: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Σ_k weights[t, k] · Expert_{local_ids[t, k]}(hidden_states[t]) over local ids >= 0.

        hidden_states [T, H] model dtype; local_ids [T, K] int64 (-1 = skip); weights [T, K] fp32.
        Returns [T, H] in the model dtype.
        """
        if self.weight_format == "int4":
            return fused_moe_w4a16(
                hidden_states,
                local_ids,
                weights,
                self.gate_up_proj_packed,
                self.gate_up_proj_scale,
                self.down_proj_packed,
                self.down_proj_scale,
                impl=self.kernel_impl,
            )
        top_k = local_ids.shape[1]
        out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)  # [T, H]
        flat_ids = local_ids.flatten()  # [T*K]
        order = torch.argsort(flat_ids, stable=True)  # skipped (-1) assignments first, then by expert
        counts = torch.bincount(flat_ids + 1, minlength=self.num_local_experts + 1).tolist()  # host sync
        token_of = order // top_k  # [T*K] token of each sorted assignment
        weight_of = weights.flatten()[order]  # [T*K]
        start = counts[0]
        for local, count in enumerate(counts[1:]):
            if count == 0:
                continue
            rows = token_of[start : start + count]  # [A_e]
            gate, up = F.linear(hidden_states[rows], self.gate_up_proj[local]).split(self.intermediate_size, dim=-1)
            expert_out = F.linear(F.silu(gate) * up, self.down_proj[local])  # [A_e, H]
            out.index_add_(0, rows, expert_out.float() * weight_of[start : start + count, None])
            start += count
        return out.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return (
            f"num_local_experts={self.num_local_experts}, intermediate_size={self.intermediate_size}, "
            f"weight_format={self.weight_format}"
        )
