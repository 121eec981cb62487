"""Sizing the latent KV cache: bytes per block for K2, budget strings, GPU-fraction budgets, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from k2serve.workers.cache_budget import (
    CacheBudgetError,
    CacheCapacity,
    bytes_per_block,
    bytes_per_token,
    cache_capacity,
    capacity_for_kv_cache_memory,
    capacity_for_memory_fraction,
    dtype_num_bytes,
    num_blocks_for_budget,
    parse_memory_size,
)
from k2serve.workers.config import ModelConfig

K2 = ModelConfig.from_dict(json.loads((Path(__file__).parent / "data" / "kimi_k2_thinking_config.json").read_text()))
GiB = 2**30


def test_k2_in_bf16_costs_70272_bytes_per_token() -> None:
    assert bytes_per_token(K2, dtype_num_bytes(torch.bfloat16)) == 61 * 576 * 2 == 70_272
    assert bytes_per_block(K2, 64, 2) == 64 * 70_272


def test_dtype_sizes_from_torch_dtypes_and_names() -> None:
    assert dtype_num_bytes(torch.float32) == 4 and dtype_num_bytes(torch.float8_e4m3fn) == 1
    assert dtype_num_bytes("bfloat16") == dtype_num_bytes("torch.bfloat16") == dtype_num_bytes("bf16") == 2
    with pytest.raises(CacheBudgetError, match="kv_cache_dtype"):
        dtype_num_bytes("int3")


def test_a_budget_gives_whole_blocks() -> None:
    capacity = cache_capacity(K2, 64, 2, 4 * GiB)
    per_block = 64 * 70_272
    assert capacity == CacheCapacity(num_blocks=954, block_size=64, num_tokens=954 * 64, bytes_per_block=per_block)
    assert capacity.num_bytes <= 4 * GiB < capacity.num_bytes + per_block
    assert num_blocks_for_budget(K2, 64, 2, 4 * GiB) == 954


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4GiB", 4 * GiB),
        ("512MiB", 512 * 2**20),
        ("2GB", 2 * 10**9),
        ("1.5 GiB", 3 * GiB // 2),
        ("8Gi", 8 * GiB),
        ("64k", 64 * 1024),
        ("1048576", 1048576),
        ("100b", 100),
        (123_456, 123_456),
    ],
)
def test_memory_sizes_parse_bytes_and_unit_strings(text: str | int, expected: int) -> None:
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("bad", ["", "lots", "4 GiBs", "-1GiB", "0", "0GiB", 0, -5, True, 1.0e-3, None])
def test_bad_memory_sizes_name_the_kv_cache_memory_field(bad: Any) -> None:
    with pytest.raises(CacheBudgetError, match="kv_cache_memory") as info:
        parse_memory_size(bad)
    assert info.value.field == "kv_cache_memory"


def test_kv_cache_memory_strings_resolve_to_a_capacity() -> None:
    assert capacity_for_kv_cache_memory(K2, 64, 2, "4GiB") == cache_capacity(K2, 64, 2, 4 * GiB)


def test_too_small_a_budget_raises_naming_the_field() -> None:
    per_block = bytes_per_block(K2, 64, 2)
    assert cache_capacity(K2, 64, 2, per_block).num_tokens == 64
    with pytest.raises(CacheBudgetError, match="kv_cache_memory") as info:
        capacity_for_kv_cache_memory(K2, 64, 2, per_block - 1)
    assert info.value.field == "kv_cache_memory"


def test_a_gpu_memory_fraction_budget_subtracts_what_is_already_used() -> None:
    capacity = capacity_for_memory_fraction(K2, 64, 2, total_bytes=80 * GiB, fraction=0.9, already_used_bytes=60 * GiB)
    assert capacity == cache_capacity(K2, 64, 2, int(80 * GiB * 0.9) - 60 * GiB)
    with pytest.raises(CacheBudgetError, match="gpu_memory_fraction"):
        capacity_for_memory_fraction(K2, 64, 2, total_bytes=80 * GiB, fraction=0.5, already_used_bytes=60 * GiB)
    with pytest.raises(CacheBudgetError, match="gpu_memory_fraction"):
        capacity_for_memory_fraction(K2, 64, 2, total_bytes=80 * GiB, fraction=1.5, already_used_bytes=0)
