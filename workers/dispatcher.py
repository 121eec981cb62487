"""The expert-dispatch seam of MoE layers: send routed tokens to their experts, combine the results.

Lifecycle: one dispatcher per rank, built before the model and handed to its constructor; every
MoE layer calls it once per step with that layer's ``LocalExperts``. ``LocalDispatcher`` (here)
runs the experts this rank holds and is also the fake for tests. The all-to-all dispatcher of
expert parallelism (a later issue) implements the same Protocol: it sends each (token, expert)
assignment to the rank that owns the expert, runs ``experts(...)`` there on what it received, and
sends the weighted results back.

Legend: T = tokens on this rank (0 is allowed: an idle rank still joins the collective step),
K = experts per token (top_k), H = hidden_size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:  # the seam depends on the experts' interface only, not on importing the model
    from k2serve.workers.model.experts import LocalExperts


class ExpertDispatcher(Protocol):
    """Contract of ``dispatch``.

    Inputs:
    - ``hidden_states`` [T, H] in the model dtype: the post-attention-normalized tokens of this rank;
    - ``topk_ids`` [T, K] int64 *logical* expert ids in ``[0, n_routed_experts)``, as the gate chose
      them (bias-corrected group-limited top-k);
    - ``topk_weights`` [T, K] fp32: the final combine weights (normalized and already multiplied by
      ``routed_scaling_factor``); the dispatcher applies them as given;
    - ``experts``: this rank's ``LocalExperts`` of the calling layer (its ``to_local`` maps logical
      ids to local indices, ``forward`` runs local experts on local indices).

    Output: [T, H] in the model dtype, row t = Σ_k topk_weights[t, k] · Expert_{topk_ids[t, k]}(x_t),
    in this rank's token order. The shared expert and the gate are not the dispatcher's business.

    Rules: inputs are not modified; the call is synchronous. A distributed implementation is a
    collective: every rank of the expert-parallel group calls it for every MoE layer in the same
    order, with T possibly 0. The local implementation skips assignments to experts it does not
    hold (they contribute 0), so partial outputs of ranks holding disjoint experts sum to the full one.
    """

    def dispatch(
        self,
        hidden_states: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        experts: LocalExperts,
    ) -> torch.Tensor: ...


class LocalDispatcher:
    """Every routed token stays on this rank; experts not held here contribute nothing."""

    def dispatch(
        self,
        hidden_states: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        experts: LocalExperts,
    ) -> torch.Tensor:
        return experts(hidden_states, experts.to_local(topk_ids), topk_weights)
