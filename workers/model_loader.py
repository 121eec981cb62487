"""Build a ``KimiK2ForCausalLM`` from a model folder: config -> empty model -> checkpoint weights.

Lifecycle: called once when a rank starts. Returns a model in eval mode whose parameters are the
checkpoint's (experts dequantized to ``dtype``, or kept packed with ``expert_format="int4"``); the
caller then allocates the KV cache.
"""

from __future__ import annotations

from pathlib import Path

import torch

from k2serve.workers.config import ExpertIds, ModelConfig
from k2serve.workers.dispatcher import ExpertDispatcher
from k2serve.workers.model.experts import ExpertWeightFormat
from k2serve.workers.model.model import KimiK2ForCausalLM
from k2serve.workers.weights import load_weights


def load_model(
    model_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    expert_ids: ExpertIds | None = None,
    max_positions: int | None = None,
    progress: bool | None = None,
    expert_format: ExpertWeightFormat = "dense",
    dispatcher: ExpertDispatcher | None = None,
) -> KimiK2ForCausalLM:
    """``expert_format="int4"`` keeps the routed experts packed for the W4A16 kernels; ``dispatcher``
    (default local) is the rank's expert dispatcher, e.g. all-to-all in an EP group."""
    config = ModelConfig.from_model_dir(model_dir)
    weights = load_weights(
        model_dir,
        config,
        dtype=dtype,
        expert_ids=expert_ids,
        keep_packed=expert_format == "int4",
        device=device,
        progress=progress,
    )
    # Parameters are created uninitialized (torch.empty) and filled once from the checkpoint.
    model = KimiK2ForCausalLM(
        config,
        expert_ids=expert_ids,
        dispatcher=dispatcher,
        dtype=dtype,
        device=device,
        max_positions=max_positions,
        expert_format=expert_format,
    )
    model.load_state_dict(weights, strict=True)
    return model.eval()
