"""BlockPool: reference counts, the free queue, the hash-keyed prefix cache and its LRU eviction."""

from __future__ import annotations

import pytest

from k2serve.workers.block_pool import (
    BlockPool,
    BlockPoolError,
    NoFreeBlocksError,
    hash_block_tokens,
)


def _h(tag: int) -> bytes:
    return hash_block_tokens(None, [tag], None)


def test_every_block_is_handed_out_exactly_once() -> None:
    pool = BlockPool(4, 4)
    assert pool.num_free_blocks == 4 and pool.num_used_blocks == 0
    assert sorted(pool.allocate(4)) == [0, 1, 2, 3]
    assert pool.num_free_blocks == 0 and pool.usage == 1.0
    pool.check_invariants()


def test_allocation_is_ascending_so_a_freed_table_comes_back_as_one_run() -> None:
    pool = BlockPool(8, 4)
    assert pool.allocate(3) == [0, 1, 2]
    table = pool.allocate(5)
    assert table == [3, 4, 5, 6, 7]
    pool.free(reversed(table))  # a table is freed tail first: the free queue holds 7, 6, 5, 4, 3
    assert pool.allocate(5) == [3, 4, 5, 6, 7]  # consecutive ids: contiguous pages, a zero-copy KV transfer
    pool.check_invariants()


def test_allocate_and_free_track_reference_counts() -> None:
    pool = BlockPool(8, 4)
    a, b = pool.allocate(2)
    assert pool.ref_count(a) == pool.ref_count(b) == 1
    pool.incref([a])
    assert pool.ref_count(a) == 2 and pool.num_used_blocks == 2
    pool.free([a, b])
    assert pool.ref_count(a) == 1 and pool.ref_count(b) == 0 and pool.num_used_blocks == 1
    pool.free([a])
    assert pool.num_free_blocks == 8 and pool.usage == 0.0
    pool.check_invariants()


def test_usage_is_the_fraction_of_blocks_in_use() -> None:
    pool = BlockPool(4, 4)
    pool.allocate(1)
    assert pool.usage == pytest.approx(0.25)


def test_double_free_and_bad_ids_raise() -> None:
    pool = BlockPool(4, 2)
    (block,) = pool.allocate(1)
    pool.free([block])
    with pytest.raises(BlockPoolError, match="twice"):
        pool.free([block])
    with pytest.raises(BlockPoolError, match="not a block id"):
        pool.free([-1])
    with pytest.raises(BlockPoolError, match="not a block id"):
        pool.incref([4])
    with pytest.raises(BlockPoolError, match="free"):
        pool.incref([block])


def test_allocating_more_than_free_raises_and_changes_nothing() -> None:
    pool = BlockPool(3, 2)
    pool.allocate(2)
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(2)
    assert pool.num_free_blocks == 1
    pool.check_invariants()


def test_freed_cached_block_stays_findable_and_counts_as_free() -> None:
    pool = BlockPool(3, 2)
    (block,) = pool.allocate(1)
    assert pool.cache_block(block, _h(1))
    pool.free([block])
    assert pool.num_free_blocks == 3 and pool.num_cached_blocks == 1
    assert pool.get_cached_block(_h(1)) == block
    pool.touch([block])
    assert pool.ref_count(block) == 1 and pool.num_free_blocks == 2
    pool.check_invariants()


def test_uncached_free_blocks_are_handed_out_before_any_eviction() -> None:
    pool = BlockPool(3, 2)
    (cached,) = pool.allocate(1)
    pool.cache_block(cached, _h(1))
    pool.free([cached])
    assert cached not in pool.allocate(2)
    assert pool.get_cached_block(_h(1)) == cached and pool.stats().evictions == 0
    pool.check_invariants()


def test_eviction_is_least_recently_freed_first() -> None:
    pool = BlockPool(3, 2)
    a, b, c = pool.allocate(3)
    for i, block in enumerate((a, b, c)):
        pool.cache_block(block, _h(i))
    pool.free([b])
    pool.free([c, a])  # freed order: b, c, a
    assert pool.allocate(1) == [b]
    assert pool.get_cached_block(_h(1)) is None and pool.block_hash(b) is None
    pool.touch([c])  # a hit takes c out of the queue; a is now the oldest
    assert pool.allocate(1) == [a]
    assert pool.get_cached_block(_h(2)) == c
    assert pool.stats().evictions == 2
    pool.check_invariants()


def test_a_hash_already_held_keeps_its_first_block() -> None:
    pool = BlockPool(4, 2)
    a, b = pool.allocate(2)
    assert pool.cache_block(a, _h(7))
    assert not pool.cache_block(b, _h(7))
    assert pool.get_cached_block(_h(7)) == a and pool.block_hash(b) is None
    assert pool.cache_block(a, _h(7))  # re-registering the same hash is a no-op
    with pytest.raises(BlockPoolError, match="different hash"):
        pool.cache_block(a, _h(8))
    pool.free([a, b])
    pool.check_invariants()


def test_disabled_prefix_caching_never_caches() -> None:
    pool = BlockPool(4, 2, enable_prefix_caching=False)
    (block,) = pool.allocate(1)
    assert not pool.cache_block(block, _h(1))
    assert pool.get_cached_block(_h(1)) is None
    pool.free([block])
    pool.check_invariants()


def test_block_hash_is_a_stable_chain_over_parent_tokens_and_salt() -> None:
    first = hash_block_tokens(None, [1, 2, 3, 4], None)
    assert first == hash_block_tokens(None, [1, 2, 3, 4], None)
    assert len(first) == 32
    # Pinned: sha256 over the canonical encoding is the same in every process and every run.
    assert first.hex() == "9a3b47c23229af9e3484c225126a83d951b3e05d3af933749d35e3e54f0f30b7"
    distinct = {
        first,
        hash_block_tokens(first, [1, 2, 3, 4], None),
        hash_block_tokens(None, [1, 2, 3, 5], None),
        hash_block_tokens(None, [1, 2, 3, 4], "tenant-a"),
        hash_block_tokens(None, [1, 2, 3, 4], "tenant-b"),
        hash_block_tokens(None, [1, 2, 3, 4], ""),
        hash_block_tokens(None, [1, 2, 3], None),
    }
    assert len(distinct) == 7
