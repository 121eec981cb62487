"""Uninitialized bias-free linear layers, the only kind the Kimi K2 / DeepSeek-V3 checkpoint holds.

Lifecycle: built once by the model constructor directly on the target device and dtype with no
initialization (``torch.nn.utils.skip_init``), because every weight is overwritten by
``load_state_dict`` right after; initializing the 1T-parameter model only to throw it away would
cost minutes. Until the weights are loaded the values are whatever the allocator returned.
"""

from __future__ import annotations

import torch
from torch import nn


def linear(in_features: int, out_features: int, *, device: torch.device | str | None, dtype: torch.dtype) -> nn.Linear:
    """``nn.Linear(in_features, out_features, bias=False)`` with an uninitialized ``weight`` [out, in]."""
    return nn.utils.skip_init(nn.Linear, in_features, out_features, bias=False, device=_resolve(device), dtype=dtype)


def embedding(num_embeddings: int, dim: int, *, device: torch.device | str | None, dtype: torch.dtype) -> nn.Embedding:
    """``nn.Embedding(num_embeddings, dim)`` with an uninitialized ``weight`` [num_embeddings, dim]."""
    return nn.utils.skip_init(nn.Embedding, num_embeddings, dim, device=_resolve(device), dtype=dtype)


def _resolve(device: torch.device | str | None) -> torch.device:
    # skip_init builds on "meta" and moves to the given device; None would leave it on meta.
    return torch.device(device) if device is not None else torch.get_default_device()
