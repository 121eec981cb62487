"""KvCacheManager: per-request block tables, prefix-cache hits, all-or-nothing growth, fork and free."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from k2serve.workers.block_pool import BlockPool
from k2serve.workers.kv_cache_manager import (
    KvCacheManager,
    KvCacheManagerError,
    RequestHasBlocksError,
    UnknownRequestError,
)

BS = 4


def _manager(num_blocks: int = 16, *, enable_prefix_caching: bool = True) -> KvCacheManager:
    return KvCacheManager(BlockPool(num_blocks, BS, enable_prefix_caching=enable_prefix_caching))


def _prefill(manager: KvCacheManager, request_id: str, tokens: list[int], cache_salt: str | None = None) -> int:
    """lookup + allocate + one step computing the whole prompt + commit; returns the cached tokens."""
    cached = manager.lookup_prefix(request_id, tokens, cache_salt)
    assert manager.allocate(request_id, len(tokens))
    manager.commit(request_id, tokens, len(tokens), cache_salt)
    return cached


PROMPT = list(range(100, 114))  # 14 tokens: 3 full blocks and a partial one


def test_a_later_identical_prefix_hits_the_three_full_blocks() -> None:
    manager = _manager()
    assert _prefill(manager, "a", PROMPT) == 0
    first_blocks = manager.block_table("a")
    manager.free("a")
    assert _prefill(manager, "b", [*PROMPT, 999]) == 3 * BS
    assert manager.block_table("b")[:3] == first_blocks[:3]
    stats = manager.stats()
    assert stats.prefix_cache_hits == 3 * BS and stats.prefix_cache_queries == 14 + 15
    manager.check_invariants()


def test_a_hit_is_shared_with_a_running_request_and_referenced() -> None:
    manager = _manager()
    _prefill(manager, "a", PROMPT)
    assert manager.lookup_prefix("b", PROMPT) == 3 * BS
    shared = manager.block_table("b")
    assert shared == manager.block_table("a")[:3]
    assert all(manager.pool.ref_count(block) == 2 for block in shared)
    manager.check_invariants()


def test_the_partial_last_block_is_never_cached() -> None:
    manager = _manager()
    _prefill(manager, "a", PROMPT)
    assert manager.pool.num_cached_blocks == 3
    assert manager.pool.block_hash(manager.block_table("a")[3]) is None


def test_a_fully_cached_prompt_still_leaves_one_token_to_compute() -> None:
    manager = _manager()
    prompt = PROMPT[:12]  # exactly 3 blocks
    _prefill(manager, "a", prompt)
    manager.free("a")
    cached = manager.lookup_prefix("b", prompt)
    assert cached == 2 * BS and cached < len(prompt)
    assert manager.lookup_prefix("c", prompt[:1]) == 0
    assert manager.lookup_prefix("d", []) == 0


def test_the_recomputed_last_block_stays_unhashed_and_the_first_mapping_wins() -> None:
    manager = _manager()
    prompt = PROMPT[:12]
    _prefill(manager, "a", prompt)
    original = manager.block_table("a")
    assert _prefill(manager, "b", prompt) == 2 * BS
    recomputed = manager.block_table("b")[2]
    assert recomputed != original[2] and manager.pool.block_hash(recomputed) is None
    manager.free("a")
    manager.free("b")
    assert manager.lookup_prefix("c", [*prompt, 1]) == 3 * BS
    assert manager.block_table("c") == original
    manager.check_invariants()


def test_two_requests_computing_the_same_prefix_at_once_keep_the_first_mapping() -> None:
    manager = _manager()
    for request_id in ("a", "b"):
        assert manager.lookup_prefix(request_id, PROMPT) == 0
        assert manager.allocate(request_id, len(PROMPT))
    manager.commit("a", PROMPT, len(PROMPT))
    manager.commit("b", PROMPT, len(PROMPT))
    a_blocks, b_blocks = manager.block_table("a"), manager.block_table("b")
    assert all(manager.pool.block_hash(b) is not None for b in a_blocks[:3])
    assert all(manager.pool.block_hash(b) is None for b in b_blocks)
    manager.free("a")
    manager.free("b")
    assert manager.pool.num_free_blocks == manager.pool.num_blocks
    manager.check_invariants()


def test_different_cache_salts_never_share_and_the_same_salt_does() -> None:
    manager = _manager(32)
    _prefill(manager, "a", PROMPT, cache_salt="tenant-1")
    assert manager.lookup_prefix("other-salt", PROMPT, "tenant-2") == 0
    assert manager.lookup_prefix("no-salt", PROMPT, None) == 0
    assert manager.lookup_prefix("same-salt", PROMPT, "tenant-1") == 3 * BS
    _prefill(manager, "b", PROMPT, cache_salt=None)
    assert manager.lookup_prefix("no-salt-2", PROMPT, None) == 3 * BS
    assert manager.lookup_prefix("salted", PROMPT, "tenant-1") == 3 * BS
    assert manager.block_table("no-salt-2") != manager.block_table("salted")


def test_commit_is_incremental_over_chunks_and_decode_steps() -> None:
    manager = _manager()
    tokens = PROMPT[:6]
    manager.lookup_prefix("a", tokens)
    assert manager.allocate("a", 3)
    manager.commit("a", tokens, 3)  # chunk 1: no block full yet
    assert manager.pool.num_cached_blocks == 0
    assert manager.allocate("a", 6)
    manager.commit("a", tokens, 6)  # chunk 2: block 0 full
    assert manager.pool.num_cached_blocks == 1
    for token in (7, 8):  # decode steps write one token each
        tokens.append(token)
        assert manager.allocate("a", len(tokens))
        manager.commit("a", tokens, len(tokens))
    assert manager.pool.num_cached_blocks == 2
    manager.free("a")
    assert _prefill(manager, "b", [*tokens, 9]) == 2 * BS


def test_an_evicted_block_loses_its_hash_and_a_later_lookup_misses() -> None:
    manager = _manager(4)
    _prefill(manager, "a", PROMPT[:8])  # 2 cached blocks
    manager.free("a")
    assert manager.allocate("filler", 3 * BS)  # 2 uncached free blocks, then evicts 1 cached block
    assert manager.stats().evictions == 1
    # The tail block was freed first, so it was evicted first; the first block still hits.
    assert manager.lookup_prefix("b", [*PROMPT[:8], 1]) == BS
    manager.free("filler")
    assert manager.allocate("filler", 4 * BS - BS)
    assert manager.lookup_prefix("c", [*PROMPT[:8], 1]) == BS  # b still holds block 0 of the prefix
    manager.free("b")
    manager.free("c")
    assert manager.allocate("big", 4 * BS - 3 * BS)  # the 1 free block is the cached prefix block
    assert manager.lookup_prefix("d", [*PROMPT[:8], 1]) == 0
    manager.check_invariants()


def test_allocate_is_all_or_nothing_when_short() -> None:
    manager = _manager(4)
    assert manager.allocate("a", 2 * BS)
    assert manager.num_blocks_needed("b", 3 * BS) == 3 and not manager.can_allocate(3)
    assert not manager.allocate("b", 3 * BS)
    assert "b" not in manager and manager.pool.num_free_blocks == 2
    assert not manager.allocate("a", 5 * BS)
    assert len(manager.block_table("a")) == 2
    assert manager.allocate("a", 4 * BS) and manager.pool.num_free_blocks == 0
    assert manager.allocate("a", 3 * BS)  # already covered: no change
    manager.check_invariants()


def test_num_blocks_needed_counts_only_the_missing_tail() -> None:
    manager = _manager()
    assert manager.num_blocks_needed("new", 0) == 0 and manager.num_blocks_needed("new", 9) == 3
    assert manager.allocate("a", 5)
    assert manager.num_blocks_needed("a", 8) == 0 and manager.num_blocks_needed("a", 9) == 1


def test_free_is_idempotent_and_returns_the_pool_to_all_free() -> None:
    manager = _manager()
    _prefill(manager, "a", PROMPT)
    _prefill(manager, "b", PROMPT)
    for request_id in ("a", "a", "b", "never-seen"):
        manager.free(request_id)
    assert manager.pool.num_free_blocks == manager.pool.num_blocks and manager.stats().usage == 0.0
    assert manager.stats().num_requests == 0
    manager.check_invariants()


def test_fork_shares_full_blocks_and_freeing_parent_then_child_returns_everything() -> None:
    manager = _manager()
    _prefill(manager, "parent", PROMPT)
    shared = manager.fork("parent", "child", len(PROMPT))
    assert shared == 3 * BS
    assert manager.block_table("child") == manager.block_table("parent")[:3]
    assert all(manager.pool.ref_count(b) == 2 for b in manager.block_table("child"))
    assert manager.allocate("child", len(PROMPT) + 1)
    assert manager.block_table("child")[3] != manager.block_table("parent")[3]
    manager.commit("child", [*PROMPT, 5], len(PROMPT) + 1)
    manager.check_invariants()
    manager.free("parent")
    assert all(manager.pool.ref_count(b) == 1 for b in manager.block_table("child"))
    manager.free("child")
    assert manager.pool.num_free_blocks == manager.pool.num_blocks
    manager.check_invariants()


def test_misuse_raises_typed_errors() -> None:
    manager = _manager()
    _prefill(manager, "a", PROMPT)
    with pytest.raises(RequestHasBlocksError):
        manager.lookup_prefix("a", PROMPT)
    with pytest.raises(RequestHasBlocksError):
        manager.fork("a", "a", BS)
    assert manager.block_table("missing") == []
    with pytest.raises(UnknownRequestError):
        manager.fork("missing", "child", BS)
    with pytest.raises(UnknownRequestError):
        manager.commit("missing", PROMPT, 4)
    with pytest.raises(KvCacheManagerError, match="exceed"):
        manager.commit("a", [*PROMPT, *PROMPT], 20)
    with pytest.raises(KvCacheManagerError, match="cache_salt"):
        manager.commit("a", PROMPT, len(PROMPT), cache_salt="other")


def test_disabled_prefix_caching_never_hits() -> None:
    manager = _manager(enable_prefix_caching=False)
    _prefill(manager, "a", PROMPT)
    manager.free("a")
    assert _prefill(manager, "b", PROMPT) == 0
    assert manager.pool.num_cached_blocks == 0
    manager.check_invariants()


@dataclass
class _Sim:
    tokens: list[int]
    num_computed: int
    cache_salt: str | None
    written: dict[int, int] = field(default_factory=dict)


def _assert_reads_back(manager: KvCacheManager, content: dict[int, int], request_id: str, sim: _Sim) -> None:
    table = manager.block_table(request_id)
    for k in range(sim.num_computed):
        assert content[table[k // BS] * BS + k % BS] == sim.tokens[k], (request_id, k)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_operation_sequences_keep_invariants_and_cache_contents(seed: int) -> None:
    """A fake cache records the token written at each slot; every computed token must read back."""
    rng = random.Random(seed)
    manager = _manager(24)
    content: dict[int, int] = {}  # slot -> token id whose KV was written there
    prefixes = [[rng.randrange(20) for _ in range(12)] for _ in range(3)]
    live: dict[str, _Sim] = {}
    for op in range(3000):
        choice = rng.random()
        if choice < 0.3 and len(live) < 8:
            request_id = f"r{op}"
            salt = rng.choice([None, None, "t"])
            tokens = rng.choice(prefixes)[: rng.randint(0, 12)] + [rng.randrange(20) for _ in range(rng.randint(1, 6))]
            cached = manager.lookup_prefix(request_id, tokens, salt)
            assert cached % BS == 0 and cached < len(tokens)
            sim = _Sim(tokens, cached, salt)
            _assert_reads_back(manager, content, request_id, sim)
            if manager.allocate(request_id, len(tokens)):
                live[request_id] = sim
            else:
                manager.free(request_id)
        elif choice < 0.8 and live:
            request_id = rng.choice(sorted(live))
            sim = live[request_id]
            if sim.num_computed == len(sim.tokens):
                sim.tokens.append(rng.randrange(20))  # the token sampled by the previous step
            target = min(sim.num_computed + rng.randint(1, 6), len(sim.tokens))
            if len(sim.tokens) > 40:
                manager.free(request_id)  # finished
                del live[request_id]
            elif manager.allocate(request_id, target):
                table = manager.block_table(request_id)
                for k in range(sim.num_computed, target):
                    content[table[k // BS] * BS + k % BS] = sim.tokens[k]
                sim.num_computed = target
                manager.commit(request_id, sim.tokens, target, sim.cache_salt)
            else:
                manager.free(request_id)  # preempted by recompute
                del live[request_id]
        elif choice < 0.9 and live and len(live) < 8:
            parent_id = rng.choice(sorted(live))
            parent = live[parent_id]
            shared = manager.fork(parent_id, f"f{op}", parent.num_computed)
            live[f"f{op}"] = _Sim(list(parent.tokens), shared, parent.cache_salt)
        else:
            manager.free(rng.choice([*sorted(live), "unknown"]))
            live = {k: v for k, v in live.items() if k in manager}
        manager.check_invariants()
        for request_id, sim in live.items():
            _assert_reads_back(manager, content, request_id, sim)
    stats = manager.stats()
    assert stats.prefix_cache_hits > 0 and stats.evictions > 0
    for request_id in list(live):
        manager.free(request_id)
    assert manager.pool.num_free_blocks == manager.pool.num_blocks
    manager.check_invariants()
