"""The MoE block of layers ``>= first_k_dense_replace``: gate, routed experts via the dispatcher, shared expert.

Lifecycle: one ``MoE`` per MoE layer, built by the model with this rank's ``expert_ids`` and the
rank's ``ExpertDispatcher``; ``load_state_dict`` fills ``mlp.gate.weight`` [E, H],
``mlp.gate.e_score_correction_bias`` [E] (kept fp32 whatever the model dtype), the shared expert
and the stacked local experts.

Gate (``noaux_tc`` with sigmoid scores, reference kimi-k2.md §3.3):
1. ``logits = x·W_gateᵀ`` in fp32, ``s = sigmoid(logits)``;
2. selection on ``s + bias`` only; with ``n_group > 1`` each group scores the sum of its top-2
   biased scores, the best ``topk_group`` groups survive and the others are masked with -inf;
   then top-``K`` of the masked biased scores;
3. weights from the *unbiased* ``s`` of the chosen experts, divided by their sum (+1e-20) when
   ``norm_topk_prob``, then always multiplied by ``routed_scaling_factor``.
Output: ``Σ_k w_k · Expert_k(x) + SharedExpert(x)`` (shared expert unweighted).

Legend: T = tokens, H = hidden_size, E = n_routed_experts, K = num_experts_per_tok, G = n_group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from k2serve.workers.config import ModelConfig
from k2serve.workers.dispatcher import ExpertDispatcher
from k2serve.workers.model.experts import ExpertWeightFormat, LocalExperts
from k2serve.workers.model.mlp import MLP


class MoEGate(nn.Module):
    e_score_correction_bias: torch.Tensor  # [E] fp32, persistent (checkpoint name)

    def __init__(self, config: ModelConfig, *, device: torch.device | str | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        num_experts = config.n_routed_experts
        self.weight = nn.Parameter(torch.empty(num_experts, config.hidden_size, device=device, dtype=dtype))
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32, device=device))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states [T, H] -> (topk_ids [T, K] int64 logical ids, topk_weights [T, K] fp32)."""
        scores = torch.sigmoid(F.linear(hidden_states.float(), self.weight.float()))  # [T, E]
        choice = scores + self.e_score_correction_bias  # [T, E] used for selection only
        if self.n_group > 1:
            choice = self._mask_groups(choice)
        topk_ids = torch.topk(choice, self.top_k, dim=-1).indices  # [T, K]
        topk_weights = scores.gather(1, topk_ids)  # [T, K] unbiased
        if self.norm_topk_prob:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_ids, topk_weights * self.routed_scaling_factor

    def _mask_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Keep the ``topk_group`` groups with the largest top-2 sums; the other experts become -inf."""
        num_tokens, num_experts = choice.shape
        grouped = choice.view(num_tokens, self.n_group, num_experts // self.n_group)  # [T, G, E/G]
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        kept = group_scores.topk(self.topk_group, dim=-1).indices  # [T, topk_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)  # [T, G]
        return grouped.masked_fill(~keep[:, :, None], float("-inf")).view(num_tokens, num_experts)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> MoEGate:
        # Module.to(bf16) would cast the bias; selection ties are decided in fp32 (as HF's
        # _keep_in_fp32_modules_strict does). Let fn pick the device, keep the fp32 values.
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        self.e_score_correction_bias = bias.to(self.e_score_correction_bias.device)
        return self


class MoE(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        expert_ids: Sequence[int],
        dispatcher: ExpertDispatcher,
        *,
        device: torch.device | str | None,
        dtype: torch.dtype,
        expert_format: ExpertWeightFormat = "dense",
        layer_id: int = -1,
    ) -> None:
        super().__init__()
        self.dispatcher = dispatcher
        self.gate = MoEGate(config, device=device, dtype=dtype)
        self.experts = LocalExperts(
            config, expert_ids, device=device, dtype=dtype, weight_format=expert_format, layer_id=layer_id
        )
        self.shared_experts: MLP | None = None
        if config.n_shared_experts > 0:
            shared_size = config.moe_intermediate_size * config.n_shared_experts
            self.shared_experts = MLP(config.hidden_size, shared_size, device=device, dtype=dtype)

    def idle(self) -> None:
        """Join this layer's dispatch collective with no tokens (an idle rank of an EP group)."""
        hidden = self.gate.weight.new_empty(0, self.gate.weight.shape[1])  # [0, H]
        ids = torch.empty(0, self.gate.top_k, dtype=torch.int64, device=hidden.device)  # [0, K]
        self.dispatcher.dispatch(hidden, ids, torch.empty(ids.shape, device=hidden.device), self.experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # hidden_states: [T, H] -> [T, H]
        topk_ids, topk_weights = self.gate(hidden_states)
        out = self.dispatcher.dispatch(hidden_states, topk_ids, topk_weights, self.experts)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return out
