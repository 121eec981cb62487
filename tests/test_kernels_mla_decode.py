"""``mla_decode``: the split-K Triton kernels equal the torch reference, and the reference equals a
per-sequence loop over contiguous keys.

Paging edge cases: blocks in random order, unused cache blocks filled with NaN, block-table
entries past a sequence's blocks set to -1, lengths that are not multiples of the block size, a
sequence crossing many blocks, more splits than keys. Runs under the Triton interpreter on CPU
(conftest.py) or on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from kernel_fixtures import TOLERANCE, kernel_device, relative_error

from k2serve.kernels.mla_decode import (
    _mla_decode_split_kernel,
    default_block_h,
    default_num_kv_splits,
    mla_decode,
    mla_decode_reference,
)

DEVICE = kernel_device(_mla_decode_split_kernel)
SCALE = 0.1446796  # K2 Thinking's YaRN softmax scale (reference kimi-k2.md §3.2)


@dataclass(frozen=True)
class Case:
    q_latent: torch.Tensor  # [B, NH, R]
    q_pe: torch.Tensor  # [B, NH, Rp]
    cache: torch.Tensor  # [NB, BS, R+Rp]
    block_tables: torch.Tensor  # [B, MB] int32, -1 past each sequence's blocks
    seq_lens: torch.Tensor  # [B] int32


def _case(
    seq_lens: list[int],
    *,
    num_heads: int = 4,
    rank: int = 32,
    rope: int = 64,
    block_size: int = 4,
    spare_blocks: int = 3,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Case:
    """Random queries and cache; each sequence's blocks are a random subset of the cache in random
    order, and every block nobody uses is NaN."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(needed) + spare_blocks
    width = max(needed) + 2  # every row has unused (-1) entries
    cache = torch.full((num_blocks, block_size, rank + rope), float("nan"))
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.full((len(seq_lens), width), -1, dtype=torch.int32)
    for s, n in enumerate(needed):
        blocks, order = order[:n], order[n:]
        tables[s, :n] = torch.tensor(blocks, dtype=torch.int32)
        cache[blocks] = torch.randn(n, block_size, rank + rope, generator=gen)
    num_seqs = len(seq_lens)
    q_latent = torch.randn(num_seqs, num_heads, rank, generator=gen)
    q_pe = torch.randn(num_seqs, num_heads, rope, generator=gen)
    return Case(
        *(t.to(dtype).to(DEVICE) for t in (q_latent, q_pe, cache)),
        tables.to(DEVICE),
        torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
    )


def _assert_matches(case: Case, num_kv_splits: int | None, block_n: int = 32) -> None:
    args = (case.q_latent, case.q_pe, case.cache, case.block_tables, case.seq_lens, SCALE)
    ours = mla_decode(*args, num_kv_splits=num_kv_splits, impl="triton", block_n=block_n)
    ref = mla_decode_reference(*args)
    assert ours.shape == case.q_latent.shape and ours.dtype == case.q_latent.dtype
    assert relative_error(ours, ref) <= TOLERANCE[case.q_latent.dtype]


@pytest.mark.parametrize("num_kv_splits", [1, 3])
def test_lengths_not_multiple_of_block_size(poison_allocations: None, num_kv_splits: int) -> None:
    _assert_matches(_case([1, 7, 13, 4], seed=1), num_kv_splits)


def test_sequence_crossing_many_blocks_with_many_splits(poison_allocations: None) -> None:
    _assert_matches(_case([150, 9], block_size=4, seed=2), num_kv_splits=5, block_n=16)


def test_more_splits_than_keys_leaves_empty_splits(poison_allocations: None) -> None:
    _assert_matches(_case([1, 2, 3], seed=3), num_kv_splits=8, block_n=16)


def test_fp16_and_uneven_widths(poison_allocations: None) -> None:
    # rank and heads not powers of two, more heads than one head group of 16
    _assert_matches(_case([40, 17], num_heads=20, rank=48, rope=16, block_size=8, dtype=torch.float16, seed=4), 2)


def test_default_splits(poison_allocations: None) -> None:
    _assert_matches(_case([33, 5], seed=5), None)


def test_reference_equals_a_per_sequence_loop() -> None:
    case = _case([1, 6, 11], rank=32, rope=64, seed=6)
    ref = mla_decode_reference(case.q_latent, case.q_pe, case.cache, case.block_tables, case.seq_lens, SCALE)
    block_size = case.cache.shape[1]
    for s, n in enumerate(case.seq_lens.tolist()):
        slots = [int(case.block_tables[s, k // block_size]) * block_size + k % block_size for k in range(n)]
        keys = case.cache.reshape(-1, case.cache.shape[-1])[slots].cpu()  # [n, D]
        q = torch.cat((case.q_latent[s], case.q_pe[s]), dim=-1).cpu()  # [NH, D]
        probs = torch.softmax(q @ keys.T * SCALE, dim=-1)
        assert relative_error(ref[s].cpu(), probs @ keys[:, :32]) <= 1e-5


def test_zero_length_sequence_gives_zeros() -> None:
    case = _case([5, 3], seed=7)
    seq_lens = torch.tensor([0, 3], dtype=torch.int32, device=DEVICE)
    args = (case.q_latent, case.q_pe, case.cache, case.block_tables, seq_lens, SCALE)
    for out in (mla_decode(*args, impl="triton", num_kv_splits=2), mla_decode_reference(*args)):
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert bool(torch.isfinite(out[1]).all())


def test_default_split_count_is_bounded() -> None:
    assert default_block_h(64) == 64 and default_block_h(8) == 16 and default_block_h(128) == 64
    assert default_num_kv_splits(1, 64, 4096) == 16  # one group of 64 heads: 264 splits, capped by 4096 / 256
    assert default_num_kv_splits(128, 64, 4096) == 3  # 264 / 128 programs, rounded up
    assert default_num_kv_splits(1, 64, 4096, block_h=16) == 16  # 4 head groups: 264 / 4 -> 66, capped
    assert 1 <= default_num_kv_splits(1, 64, 131072) <= 64
    assert default_num_kv_splits(1, 64, 10) == 1


def test_mismatched_dtypes_are_rejected() -> None:
    case = _case([3], seed=8)
    with pytest.raises(ValueError, match="one float dtype"):
        mla_decode(case.q_latent.half(), case.q_pe, case.cache, case.block_tables, case.seq_lens, SCALE)


@pytest.mark.gpu
def test_bf16_on_gpu_at_k2_shapes() -> None:
    case = _case([4096, 1000, 1], num_heads=64, rank=512, rope=64, block_size=64, dtype=torch.bfloat16, seed=9)
    _assert_matches(case, num_kv_splits=None)
