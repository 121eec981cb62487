"""RMSNorm as Kimi K2 / DeepSeek-V3 uses it at five sites (input, post-attention, q latent, kv latent, final).

Lifecycle: a parameter-only module built by the model constructor; ``weight`` is overwritten by
``load_state_dict``. ``y = x / sqrt(mean(x²) + eps) * weight``: the statistics and the scaling run
in fp32, the result is cast back to the input dtype and then multiplied by the weight, exactly as
Hugging Face's ``DeepseekV3RMSNorm`` and vLLM's native ``RMSNorm`` do.

The ``eps`` of the q/kv latent norms: Hugging Face and the remote DeepSeek code build
``q_a_layernorm``/``kv_a_layernorm`` with the default 1e-6 whatever ``rms_norm_eps`` says; vLLM
and SGLang pass ``rms_norm_eps``. We pass ``rms_norm_eps`` (the tiny presets use 1e-6, where the two
agree; reference kimi-k2.md §3.4).
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, *, device: torch.device | str | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., dim] in the model dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
