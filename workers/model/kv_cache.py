"""The paged MLA latent KV cache: allocation, the per-step write, the gather of a sequence's keys.

Lifecycle: ``allocate_kv_cache`` is called once per worker after the number of blocks is known; the
returned list (one tensor per layer) lives as long as the worker. Each step, every attention layer
writes the rows of its new tokens at ``slot_mapping`` and then gathers the rows of the sequences
it attends over. Blocks are owned and recycled by the block pool, never by the model.

Layout per layer: [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim] in the model dtype
(576 values for K2: the normalized latent ``c_kv`` then the *rotated* ``k_pe``, interleaved pairs).
Invariant: every value in the cache is finite. Padded key positions are read and then masked;
a masked probability is 0 and ``0 * finite`` is 0, but ``0 * NaN`` is not, so the cache starts zeroed.
"""

from __future__ import annotations

import torch

from k2serve.kernels.dispatch import Impl
from k2serve.kernels.kv_cache_write import kv_cache_write
from k2serve.workers.config import ModelConfig


def allocate_kv_cache(
    config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str
) -> list[torch.Tensor]:
    """One zeroed [num_blocks, block_size, kv_cache_dim] tensor per layer."""
    if num_blocks <= 0 or block_size <= 0:
        raise ValueError(f"need num_blocks > 0 and block_size > 0, got {num_blocks} and {block_size}")
    shape = (num_blocks, block_size, config.kv_cache_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]


def write_kv_cache(
    cache: torch.Tensor, slot_mapping: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor, *, impl: Impl = "auto"
) -> None:
    """Store ``[latent | k_pe]`` of each new token at its slot (``kernels.kv_cache_write``: Triton on
    CUDA, torch elsewhere; a slot of -1 is skipped).

    cache [NB, BS, D]; slot_mapping [T]; latent [T, R] normalized c_kv; k_pe [T, Rp] rotated; D = R + Rp.
    """
    kv_cache_write(cache, slot_mapping, torch.cat((latent, k_pe), dim=-1), impl=impl)


def gather_kv_cache(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows at ``slots`` (any shape [...]) -> [..., D]."""
    return cache.view(-1, cache.shape[-1])[slots]
