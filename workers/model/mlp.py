"""The gated SiLU MLP: the dense MLP of the first layers and the shared expert of MoE layers.

Lifecycle: built by the model, weights filled by ``load_state_dict`` under the checkpoint names
``mlp.{gate,up,down}_proj`` (dense layers) or ``mlp.shared_experts.{gate,up,down}_proj``.
``MLP(x) = down(silu(gate(x)) * up(x))``; the shared expert is this with
``moe_intermediate_size * n_shared_experts`` and is added to the routed output unweighted.

Legend: T = tokens, H = hidden_size, I = intermediate size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from k2serve.workers.model.linear import linear


class MLP(nn.Module):
    def __init__(
        self, hidden_size: int, intermediate_size: int, *, device: torch.device | str | None, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.gate_proj = linear(hidden_size, intermediate_size, device=device, dtype=dtype)
        self.up_proj = linear(hidden_size, intermediate_size, device=device, dtype=dtype)
        self.down_proj = linear(intermediate_size, hidden_size, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, H] -> [T, I] -> [T, H]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
