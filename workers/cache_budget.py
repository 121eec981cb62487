"""Sizing the paged latent KV cache from a memory budget.

Lifecycle: a worker resolves its budget once at start-up, either ``--kv-cache-memory`` (bytes, or a
string such as "4GiB", "512MiB", "2GB") or a fraction of GPU memory minus what the weights already
use, and turns it into a ``CacheCapacity``: the ``num_blocks`` to pass to ``allocate_kv_cache`` and
``BlockPool``. The capacity is a new value object; nothing is written back into a config.

One block costs ``num_hidden_layers * block_size * kv_cache_dim * dtype_bytes`` (every layer caches
the same ``kv_lora_rank + qk_rope_head_dim`` values per token): 61 * 576 * 2 = 70,272 bytes per
token for Kimi K2 in bf16. A budget must hold at least one block.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from k2serve.workers.config import ModelConfig

if TYPE_CHECKING:
    import torch

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "k": 2**10,
    "ki": 2**10,
    "kib": 2**10,
    "m": 2**20,
    "mi": 2**20,
    "mib": 2**20,
    "g": 2**30,
    "gi": 2**30,
    "gib": 2**30,
    "t": 2**40,
    "ti": 2**40,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_DTYPE_BYTES = {
    "float32": 4,
    "fp32": 4,
    "bfloat16": 2,
    "bf16": 2,
    "float16": 2,
    "fp16": 2,
    "half": 2,
    "float8_e4m3fn": 1,
    "fp8": 1,
    "fp8_e4m3": 1,
}


class CacheBudgetError(ValueError):
    """A memory budget is malformed or too small. ``field`` names the setting, e.g. ``kv_cache_memory``."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class CacheCapacity:
    """``num_blocks`` to allocate and pass to ``BlockPool``; ``num_tokens`` = ``num_blocks * block_size``."""

    num_blocks: int
    block_size: int
    num_tokens: int
    bytes_per_block: int

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block


def dtype_num_bytes(dtype: torch.dtype | str) -> int:
    """Bytes per cache element for a torch dtype or its name ("bfloat16", "bf16", "fp8", ...)."""
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.").lower()
        if name not in _DTYPE_BYTES:
            raise CacheBudgetError("kv_cache_dtype", f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPE_BYTES)}")
        return _DTYPE_BYTES[name]
    return int(dtype.itemsize)


def bytes_per_token(config: ModelConfig, dtype_bytes: int) -> int:
    """Cache bytes one token occupies across all layers (70,272 for K2 in bf16)."""
    return config.num_hidden_layers * config.kv_cache_dim * dtype_bytes


def bytes_per_block(config: ModelConfig, block_size: int, dtype_bytes: int) -> int:
    return block_size * bytes_per_token(config, dtype_bytes)


def parse_memory_size(value: int | float | str, field_name: str = "kv_cache_memory") -> int:
    """Bytes from an int or a string like "4GiB", "512MiB", "2GB", "1.5 GiB", "8Gi" or "1048576".

    Decimal units (KB, MB, GB, TB) are powers of 1000; binary ones (KiB/Ki/K, MiB/Mi/M, ...) of 1024.
    Units are case-insensitive; a fractional result is rounded down.
    """
    if isinstance(value, bool):
        raise CacheBudgetError(field_name, f"expected a size in bytes or a string like '4GiB', got {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or int(value) <= 0:
            raise CacheBudgetError(field_name, f"must be > 0 bytes, got {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise CacheBudgetError(field_name, f"expected a size in bytes or a string like '4GiB', got {value!r}")
    match = _SIZE.match(value)
    if match is None or match.group(2).lower() not in _UNITS:
        raise CacheBudgetError(field_name, f"cannot parse {value!r}; use bytes or a size like '4GiB', '512MiB', '2GB'")
    num_bytes = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if num_bytes <= 0:
        raise CacheBudgetError(field_name, f"must be > 0 bytes, got {value!r}")
    return num_bytes


def cache_capacity(
    config: ModelConfig, block_size: int, dtype_bytes: int, budget_bytes: int, field_name: str = "kv_cache_memory"
) -> CacheCapacity:
    """As many whole blocks as fit in ``budget_bytes``; raises ``CacheBudgetError`` if not even one."""
    if block_size <= 0:
        raise CacheBudgetError("block_size", f"must be > 0, got {block_size}")
    if dtype_bytes <= 0:
        raise CacheBudgetError("kv_cache_dtype", f"element size must be > 0 bytes, got {dtype_bytes}")
    per_block = bytes_per_block(config, block_size, dtype_bytes)
    num_blocks = max(0, budget_bytes) // per_block
    if num_blocks < 1:
        raise CacheBudgetError(
            field_name, f"{budget_bytes} bytes do not hold one KV block of {per_block} bytes (block_size {block_size})"
        )
    return CacheCapacity(
        num_blocks=num_blocks, block_size=block_size, num_tokens=num_blocks * block_size, bytes_per_block=per_block
    )


def num_blocks_for_budget(config: ModelConfig, block_size: int, dtype_bytes: int, budget_bytes: int) -> int:
    """Whole blocks that fit in ``budget_bytes``; raises ``CacheBudgetError`` below one."""
    return cache_capacity(config, block_size, dtype_bytes, budget_bytes).num_blocks


def capacity_for_kv_cache_memory(
    config: ModelConfig, block_size: int, dtype_bytes: int, kv_cache_memory: int | float | str
) -> CacheCapacity:
    """Capacity for ``--kv-cache-memory`` given as bytes or a size string."""
    return cache_capacity(config, block_size, dtype_bytes, parse_memory_size(kv_cache_memory))


def capacity_for_memory_fraction(
    config: ModelConfig,
    block_size: int,
    dtype_bytes: int,
    *,
    total_bytes: int,
    fraction: float,
    already_used_bytes: int,
) -> CacheCapacity:
    """Capacity for the part of ``fraction * total_bytes`` not already used (weights, activations)."""
    if not 0.0 < fraction <= 1.0:
        raise CacheBudgetError("gpu_memory_fraction", f"must be in (0, 1], got {fraction}")
    if total_bytes <= 0 or already_used_bytes < 0:
        raise CacheBudgetError(
            "gpu_memory_fraction", f"need total > 0 and used >= 0 bytes, got {total_bytes} and {already_used_bytes}"
        )
    budget = int(total_bytes * fraction) - already_used_bytes
    return cache_capacity(config, block_size, dtype_bytes, budget, field_name="gpu_memory_fraction")
