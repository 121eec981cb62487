"""``AllToAllDispatcher``: expert parallelism's dispatch/combine over the group's all-to-all.

Lifecycle: one per rank, built with the rank's ``ParallelContext`` and the group's
``ExpertPlacement`` before the model, handed to the model constructor (the ``ExpertDispatcher``
seam of ``dispatcher.py``); every MoE layer calls ``dispatch`` once per step, on every rank of the
group, in the same layer order, with T possibly 0 (an idle rank's empty step). ``set_placement``
swaps the placement between steps (EPLB); ``stats`` accumulates what the metrics export.

One call, for the tokens of this rank:
1. route: each (token, k) assignment of logical expert e goes to one of e's replicas, chosen
   round-robin by (token + k) so a hot expert's tokens spread over its replicas; physical slot p
   lives on rank p // S at local index p % S;
2. dispatch: each token goes once to each *rank* that owns at least one of its chosen experts (not
   once per expert), with its K local ids there (-1 for experts elsewhere) and K weights; three
   all-to-alls: per-rank row counts, hidden rows, the (ids, weights) rows;
3. the receiving rank runs its ``LocalExperts`` (grouped GEMM) on everything it received: each row
   comes back as the weighted sum of that token's experts on that rank;
4. combine: one all-to-all sends the partial sums back, and the source rank adds them per token
   (fp32 accumulation, one cast to the model dtype).

Accounting: ``dispatch_bytes`` counts the hidden rows that cross to another rank (tokens × H ×
dtype size, each token counted once per remote destination rank); rows a rank sends to itself
move no data over the wire and are not counted; the id/weight rows are ``metadata_bytes``.

Legend: T = tokens on this rank, K = top_k, H = hidden_size, N = ranks, S = slots per rank,
P = N*S physical slots, R = rows this rank sends (one per token per destination rank),
Q = rows it receives, L = MoE layers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from k2serve.workers.expert_placement import ExpertPlacement
from k2serve.workers.parallel import ParallelContext

if TYPE_CHECKING:
    from k2serve.workers.model.experts import LocalExperts


@dataclass
class DispatchStats:
    """Counters since construction (``load`` since the last ``take_window_load``)."""

    calls: int = 0
    dispatch_seconds: float = 0.0  # counts + hidden + metadata exchange, host clock
    expert_seconds: float = 0.0  # the grouped GEMM on received rows
    combine_seconds: float = 0.0  # results back + per-token sum
    dispatch_bytes: int = 0  # hidden bytes sent to other ranks (see module docstring)
    combine_bytes: int = 0  # hidden bytes received back from other ranks
    metadata_bytes: int = 0  # id + weight bytes sent to other ranks
    tokens_sent: int = 0  # rows sent to other ranks
    window_load: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.int64))  # [L, P]
    total_load: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.int64))  # [L, P]


class AllToAllDispatcher:
    def __init__(self, ctx: ParallelContext, placement: ExpertPlacement) -> None:
        if placement.num_ranks != ctx.size:
            raise ValueError(f"placement: made for {placement.num_ranks} ranks, the group has {ctx.size}")
        self.ctx = ctx
        self.stats = DispatchStats()
        self.placement = placement
        self._routes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.set_placement(placement)
        shape = (len(placement.layers), placement.num_physical)
        self.stats.window_load = torch.zeros(shape, dtype=torch.int64)
        self.stats.total_load = torch.zeros(shape, dtype=torch.int64)

    def set_placement(self, placement: ExpertPlacement) -> None:
        """Route by ``placement`` from the next call on (every rank must switch at the same step)."""
        if (placement.num_ranks, placement.num_physical) != (self.placement.num_ranks, self.placement.num_physical):
            raise ValueError("placement: a new placement must keep the number of ranks and slots")
        self.placement = placement
        self._routes = {
            layer: tuple(t.to(self.ctx.device) for t in placement.replica_table(layer))  # type: ignore[misc]
            for layer in placement.layers
        }

    def take_window_load(self) -> torch.Tensor:
        """This rank's assignments per physical slot [L, P] since the last call; resets the window."""
        load, self.stats.window_load = self.stats.window_load, torch.zeros_like(self.stats.window_load)
        return load

    def dispatch(
        self,
        hidden_states: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        experts: LocalExperts,
    ) -> torch.Tensor:
        ctx, stats, slots_per_rank = self.ctx, self.stats, self.placement.slots_per_rank
        num_tokens, top_k = topk_ids.shape
        hidden = hidden_states.shape[1]
        device = hidden_states.device
        started = time.perf_counter()

        # 1. route every assignment to one replica: physical slot -> (rank, local index)
        replica_slots, replica_counts = self._routes[experts.layer_id]  # [E, R_max], [E]
        spread = torch.arange(num_tokens, device=device)[:, None] + torch.arange(top_k, device=device)[None, :]
        choice = spread % replica_counts[topk_ids]  # [T, K]
        physical = replica_slots[topk_ids, choice]  # [T, K]
        dest = physical // slots_per_rank  # [T, K]
        local = physical % slots_per_rank  # [T, K]
        layer_row = self.placement.layer_index(experts.layer_id)
        counted = torch.bincount(physical.flatten(), minlength=self.placement.num_physical).cpu()  # [P]
        stats.window_load[layer_row] += counted
        stats.total_load[layer_row] += counted

        # 2. one row per (token, destination rank), ordered by destination
        wants = torch.zeros(num_tokens, ctx.size, dtype=torch.bool, device=device)
        wants.scatter_(1, dest, True)  # [T, N]
        send_rank, send_token = wants.t().nonzero(as_tuple=True)  # [R] each, sorted by rank then token
        send_counts = wants.sum(dim=0)  # [N]
        here = dest[send_token] == send_rank[:, None]  # [R, K] the row's experts that live on its rank
        send_ids = torch.where(here, local[send_token], -1)  # [R, K]
        send_weights = torch.where(here, topk_weights[send_token], 0.0)  # [R, K] fp32
        send_meta = torch.cat([send_ids.to(torch.float32), send_weights], dim=1)  # [R, 2K] (ids < 2^24: exact)
        send_hidden = hidden_states[send_token]  # [R, H]

        recv_counts = torch.empty_like(send_counts)
        ctx.all_to_all(recv_counts, send_counts, [1] * ctx.size, [1] * ctx.size)
        send_split, recv_split = send_counts.tolist(), recv_counts.tolist()
        recv_hidden = hidden_states.new_empty(sum(recv_split), hidden)  # [Q, H]
        ctx.all_to_all(recv_hidden, send_hidden, recv_split, send_split)
        recv_meta = send_meta.new_empty(sum(recv_split), 2 * top_k)  # [Q, 2K]
        ctx.all_to_all(recv_meta, send_meta, recv_split, send_split)
        dispatched = time.perf_counter()

        # 3. this rank's experts on what it received: weighted sums per row
        recv_ids = recv_meta[:, :top_k].to(torch.int64)  # [Q, K]
        partial = experts(recv_hidden, recv_ids, recv_meta[:, top_k:].contiguous())  # [Q, H]
        computed = time.perf_counter()

        # 4. send the partial sums back and add them up per token
        returned = partial.new_empty(len(send_token), hidden)  # [R, H]
        ctx.all_to_all(returned, partial, send_split, recv_split)
        out = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=device)  # [T, H]
        out.index_add_(0, send_token, returned.float())
        finished = time.perf_counter()

        remote_sent = sum(n for r, n in enumerate(send_split) if r != ctx.rank)
        remote_back = remote_sent  # every row sent comes back once
        row_bytes = hidden * hidden_states.element_size()
        stats.calls += 1
        stats.tokens_sent += remote_sent
        stats.dispatch_bytes += remote_sent * row_bytes
        stats.combine_bytes += remote_back * row_bytes
        stats.metadata_bytes += remote_sent * 2 * top_k * send_meta.element_size()
        stats.dispatch_seconds += dispatched - started
        stats.expert_seconds += computed - dispatched
        stats.combine_seconds += finished - computed
        return out.to(hidden_states.dtype)
