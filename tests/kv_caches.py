"""Paged latent caches for the KV transfer tests: the tiny preset's row (3 layers × 96 values) in
48 blocks of 16 tokens, random (seeded) or zeroed. Shared by test_kv_transfer and test_kv_direct."""

from __future__ import annotations

import torch

NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, ROW_DIM = 3, 48, 16, 96  # the tiny preset's 32 + 64 latent row


def paged_cache(dtype: torch.dtype, seed: int, *, zero: bool = False) -> list[torch.Tensor]:
    """[NUM_LAYERS] of [NUM_BLOCKS, BLOCK_SIZE, ROW_DIM]."""
    gen = torch.Generator().manual_seed(seed)
    shape = (NUM_BLOCKS, BLOCK_SIZE, ROW_DIM)
    return [
        torch.zeros(shape, dtype=dtype) if zero else torch.randn(shape, generator=gen).to(dtype)
        for _ in range(NUM_LAYERS)
    ]
