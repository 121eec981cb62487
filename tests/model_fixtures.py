"""Test helpers for the model: random weights in the real format, the Hugging Face twin, batched greedy.

Lifecycle: imported by the model tests only. ``random_state_dict(config, seed)`` writes a random
checkpoint in Kimi K2's layout and loads it back, so every model test runs on weights that went
through INT4 packing and the safetensors loader.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence

import torch

from k2serve.hf_reference import build_hf_model, hf_config
from k2serve.workers.checkpoint_writer import write_random_checkpoint
from k2serve.workers.config import ModelConfig
from k2serve.workers.model.forward_batch import contiguous_block_tables, make_forward_batch
from k2serve.workers.model.kv_cache import allocate_kv_cache
from k2serve.workers.model.model import KimiK2ForCausalLM
from k2serve.workers.weights import load_weights


def random_state_dict(
    config: ModelConfig, seed: int, *, expert_ids: Sequence[int] | None = None, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random weights through the real format: ``write_random_checkpoint`` (INT4 pack-quantized
    experts, bf16 rest, fp32 non-zero gate bias) then ``load_weights`` (experts dequantized).

    The names are the model contract, which transformers 5.x ``DeepseekV3ForCausalLM`` shares, so
    the same dict loads strictly into both models. A subset of ``expert_ids`` holds exactly the
    rows of the full dict.
    """
    with tempfile.TemporaryDirectory(prefix="k2-weights-") as folder:
        write_random_checkpoint(config, folder, seed=seed)
        return load_weights(folder, config, dtype=dtype, expert_ids=expert_ids, progress=False)


def build_model(
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype = torch.float32,
    expert_ids: Sequence[int] | None = None,
    max_positions: int = 4096,
) -> KimiK2ForCausalLM:
    model = KimiK2ForCausalLM(config, expert_ids=expert_ids, dtype=dtype, device="cpu", max_positions=max_positions)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def batched_greedy(
    model: KimiK2ForCausalLM,
    prompts: Sequence[Sequence[int]],
    num_new_tokens: int,
    *,
    block_size: int = 4,
    block_tables: Sequence[Sequence[int]] | None = None,
) -> list[list[int]]:
    """Prefill all prompts as one batch, then decode all sequences together one token per step."""
    capacities = [len(p) + num_new_tokens for p in prompts]
    tables = (
        [list(t) for t in block_tables] if block_tables is not None else contiguous_block_tables(capacities, block_size)
    )
    num_blocks = max(max(t) for t in tables) + 1
    cache = allocate_kv_cache(model.config, num_blocks, block_size, model.dtype, model.device)
    batch = make_forward_batch(prompts, block_size=block_size, block_tables=tables, logits="last", device=model.device)
    generated = [[t] for t in model(batch, cache).argmax(-1).tolist()]
    for step in range(num_new_tokens - 1):
        batch = make_forward_batch(
            [[g[-1]] for g in generated],
            block_size=block_size,
            context_lens=[len(p) + step for p in prompts],
            block_tables=tables,
            logits="last",
            device=model.device,
        )
        for g, t in zip(generated, model(batch, cache).argmax(-1).tolist(), strict=True):
            g.append(t)
    return generated


__all__ = ["batched_greedy", "build_hf_model", "build_model", "hf_config", "random_state_dict"]
