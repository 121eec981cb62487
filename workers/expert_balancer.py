"""``ExpertBalancer``: EPLB at run time — measure expert load, recompute the placement, move experts.

Lifecycle: one per rank of an EP group, registered as a ``Lockstep`` hook. Every ``window_steps``
group steps (the same step on every rank, since the ranks agree on every step):
1. the ranks sum their per-physical-slot token counts of the window (one all-reduce, [L, P]);
2. each rank computes ``rebalance(...)`` from the summed logical load — deterministic, so every
   rank gets the same placement without sending it;
3. (when ``rebalance`` is on) for the layers whose slots on this rank changed, the rank reads the new experts' weights from
   the checkpoint and copies them into its existing expert stacks, and the dispatcher switches
   to the new routes. The next step routes by the new placement everywhere.
The measured load and imbalance (max/mean of tokens per rank, before and after) stay readable for
the metrics. A window with no tokens changes nothing.

Legend: L = MoE layers, E = logical experts, N = ranks, P = physical slots.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from k2serve.workers.all_to_all_dispatcher import AllToAllDispatcher
from k2serve.workers.expert_placement import ExpertPlacement, imbalance, rebalance
from k2serve.workers.model.model import KimiK2ForCausalLM
from k2serve.workers.weights import load_expert_stacks

logger = logging.getLogger(__name__)


class ExpertBalancer:
    def __init__(
        self,
        model: KimiK2ForCausalLM,
        dispatcher: AllToAllDispatcher,
        model_dir: str | Path,
        *,
        window_steps: int,
        rebalance: bool = True,
    ) -> None:
        if window_steps < 1:
            raise ValueError(f"rebalance_window: must be >= 1 step, got {window_steps}")
        self.model = model
        self.dispatcher = dispatcher
        self.model_dir = Path(model_dir)
        self.window_steps = window_steps
        self.rebalance = rebalance  # False: measure load and imbalance only
        self.rebalances = 0
        self.imbalance_history: list[torch.Tensor] = []  # [L] max/mean tokens per rank, one per window
        self.window_load: torch.Tensor | None = None  # [L, P] group-wide tokens per slot of the last window

    @property
    def placement(self) -> ExpertPlacement:
        return self.dispatcher.placement

    def after_step(self, step_index: int) -> None:
        if step_index % self.window_steps:
            return
        ctx = self.dispatcher.ctx
        load = ctx.all_reduce_sum(self.dispatcher.take_window_load().to(ctx.device)).cpu()  # [L, P] group-wide
        if int(load.sum()) == 0:
            return
        old = self.placement
        self.window_load = load
        self.imbalance_history.append(imbalance(old.rank_load(load)))
        if not self.rebalance:
            return
        new = rebalance(old.logical_load(load), old.num_ranks, old.slots_per_rank, old.layers)
        if new == old:
            return
        self.apply(new)
        logger.info(
            "rank %d: rebalanced experts after step %d (imbalance per layer was %s)",
            ctx.rank,
            step_index,
            [round(float(v), 3) for v in self.imbalance_history[-1]],
        )

    def apply(self, placement: ExpertPlacement) -> None:
        """Load this rank's experts of ``placement`` where they changed, then route by it."""
        rank = self.dispatcher.ctx.rank
        moe_by_layer = {moe.experts.layer_id: moe for moe in self.model.moe_layers()}
        changed = {
            layer: placement.rank_experts(layer, rank)
            for layer in placement.layers
            if placement.rank_experts(layer, rank) != moe_by_layer[layer].experts.expert_ids
        }
        if changed:
            experts = moe_by_layer[next(iter(changed))].experts
            stacks = load_expert_stacks(
                self.model_dir,
                self.model.config,
                changed,
                dtype=self.model.dtype,
                keep_packed=experts.weight_format == "int4",
                device=self.model.device,
            )
            for layer, ids in changed.items():
                moe_by_layer[layer].experts.replace_experts(ids, stacks[layer])
        self.dispatcher.set_placement(placement)
        self.rebalances += 1
