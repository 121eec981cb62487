"""``KvCacheManager``: the block table of every running request, over one ``BlockPool``.

Lifecycle of a request (ids are strings, the scheduler's request ids):

1. ``lookup_prefix`` (optional, only while the request holds no blocks) takes a reference on the
   longest run of cached full blocks matching the start of its tokens and makes them the start of
   its block table; it returns how many tokens are already computed. At least one token is always
   left to compute, so the step that follows produces logits.
2. ``allocate(num_tokens)`` grows the table to cover ``num_tokens`` slots, all or nothing; the
   scheduler calls it before every step with the total the step will reach. If it fails right after
   ``lookup_prefix``, the hit blocks are still held: ``free`` gives them back (look up again later).
3. ``commit`` after each step registers, in the prefix cache, the blocks that have become full of
   computed tokens. The hash chain is kept per request, so each block is hashed once.
4. ``free`` when the request finishes, is aborted or is preempted (recompute restarts at step 1).

``fork`` starts a sibling (``n > 1``) that shares the parent's full blocks. Block ``i`` of a table
holds tokens ``[i * block_size, (i + 1) * block_size)``; a shared block is only ever a full one, so
no request writes into a block another request reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from k2serve.workers.block_pool import BlockHash, BlockPool, BlockPoolError, hash_block_tokens


class KvCacheManagerError(RuntimeError):
    """The manager was called out of order (see the lifecycle above) or with inconsistent arguments."""


class UnknownRequestError(KvCacheManagerError):
    """The request id has no block table (never allocated, or already freed)."""


class RequestHasBlocksError(KvCacheManagerError):
    """``lookup_prefix`` or ``fork`` targeted a request that already holds blocks."""


@dataclass(frozen=True)
class KvCacheStats:
    """A snapshot for metrics. Prefix-cache queries and hits count tokens; evictions count blocks."""

    prefix_cache_queries: int
    prefix_cache_hits: int
    evictions: int
    num_blocks_total: int
    num_blocks_free: int
    num_blocks_used: int
    num_blocks_cached: int
    num_requests: int
    usage: float

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


@dataclass
class _RequestBlocks:
    """Mutable per-request state, private to the manager."""

    block_ids: list[int] = field(default_factory=list)
    # Hash chain of the first len(block_hashes) blocks: those known full of computed tokens. A block
    # whose hash another block already held stays unregistered in the pool, but its hash is kept here
    # because the chain depends on tokens only.
    block_hashes: list[BlockHash] = field(default_factory=list)
    cache_salt: str | None = None  # fixed once block_hashes is non-empty


class KvCacheManager:
    """Per-request block tables with prefix caching; every block operation goes through ``pool``."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self._requests: dict[str, _RequestBlocks] = {}

    # ---- queries -----------------------------------------------------------------------------------

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._requests

    def block_table(self, request_id: str) -> list[int]:
        """A copy of the request's block ids, in token order; empty for a request holding none."""
        state = self._requests.get(request_id)
        return list(state.block_ids) if state is not None else []

    def num_blocks_needed(self, request_id: str, num_tokens: int) -> int:
        """New blocks ``allocate(request_id, num_tokens)`` would take (an unknown request holds none)."""
        state = self._requests.get(request_id)
        held = len(state.block_ids) if state is not None else 0
        return max(0, _cdiv(num_tokens, self.block_size) - held)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.pool.num_free_blocks

    # ---- lifecycle -----------------------------------------------------------------------------------

    def lookup_prefix(self, request_id: str, token_ids: Sequence[int], cache_salt: str | None = None) -> int:
        """Reuse cached full blocks matching the start of ``token_ids``; returns the cached token count.

        Capped at ``(len(token_ids) - 1) // block_size`` blocks so at least one token is computed.
        The hit blocks are referenced and start the request's table; they stay held until ``free``.
        """
        state = self._requests.get(request_id)
        if state is not None and state.block_ids:
            raise RequestHasBlocksError(f"request {request_id!r} already holds {len(state.block_ids)} blocks")
        state = self._requests.setdefault(request_id, _RequestBlocks())
        if not self.pool.enable_prefix_caching:
            return 0
        bs = self.block_size
        max_blocks = max(0, (len(token_ids) - 1) // bs)
        hits: list[int] = []
        hashes: list[BlockHash] = []
        parent: BlockHash | None = None
        for i in range(max_blocks):
            block_hash = hash_block_tokens(parent, token_ids[i * bs : (i + 1) * bs], cache_salt)
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
            hashes.append(block_hash)
            parent = block_hash
        self.pool.touch(hits)
        state.block_ids, state.block_hashes, state.cache_salt = hits, hashes, cache_salt
        num_cached_tokens = len(hits) * bs
        self.pool.record_prefix_lookup(len(token_ids), num_cached_tokens)
        return num_cached_tokens

    def allocate(self, request_id: str, num_tokens: int) -> bool:
        """Grow the table to cover ``num_tokens`` slots in total. False, with nothing changed, if short."""
        state = self._requests.get(request_id)
        needed = self.num_blocks_needed(request_id, num_tokens)
        if needed > self.pool.num_free_blocks:
            return False
        if state is None:
            state = self._requests[request_id] = _RequestBlocks()
        state.block_ids.extend(self.pool.allocate(needed))
        return True

    def commit(
        self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int, cache_salt: str | None = None
    ) -> None:
        """Register the blocks now full of computed tokens (KV written up to ``num_computed_tokens``).

        ``token_ids`` are the request's tokens from position 0 (prompt, then outputs); only the first
        ``num_computed_tokens`` are read. Incremental: blocks registered earlier are not hashed again.
        """
        state = self._state(request_id)
        if num_computed_tokens > len(token_ids):
            raise KvCacheManagerError(f"{num_computed_tokens} computed tokens but only {len(token_ids)} token ids")
        if num_computed_tokens > len(state.block_ids) * self.block_size:
            raise KvCacheManagerError(
                f"{num_computed_tokens} computed tokens exceed the {len(state.block_ids)} blocks of {request_id!r}"
            )
        if not self.pool.enable_prefix_caching:
            return
        if state.block_hashes and cache_salt != state.cache_salt:
            raise KvCacheManagerError(f"cache_salt of {request_id!r} changed between calls")
        state.cache_salt = cache_salt
        bs = self.block_size
        for i in range(len(state.block_hashes), num_computed_tokens // bs):
            parent = state.block_hashes[-1] if state.block_hashes else None
            block_hash = hash_block_tokens(parent, token_ids[i * bs : (i + 1) * bs], cache_salt)
            state.block_hashes.append(block_hash)
            self.pool.cache_block(state.block_ids[i], block_hash)

    def free(self, request_id: str) -> None:
        """Release every block of the request, tail first. Unknown or already freed ids are ignored."""
        state = self._requests.pop(request_id, None)
        if state is not None:
            self.pool.free(reversed(state.block_ids))

    def fork(self, parent_id: str, child_id: str, num_tokens: int) -> int:
        """Give ``child_id`` the parent's full blocks covering its first ``num_tokens`` tokens.

        Returns the shared token count (``num_tokens`` rounded down to whole blocks): the child's
        computed tokens, provided the parent has computed at least ``num_tokens``.
        """
        parent = self._state(parent_id)
        child = self._requests.get(child_id)
        if child is not None and child.block_ids:
            raise RequestHasBlocksError(f"fork target {child_id!r} already holds {len(child.block_ids)} blocks")
        if num_tokens > len(parent.block_ids) * self.block_size:
            raise KvCacheManagerError(f"{parent_id!r} holds fewer than {num_tokens} token slots")
        num_shared = num_tokens // self.block_size
        shared = parent.block_ids[:num_shared]
        self.pool.incref(shared)
        self._requests[child_id] = _RequestBlocks(
            block_ids=list(shared), block_hashes=parent.block_hashes[:num_shared], cache_salt=parent.cache_salt
        )
        return num_shared * self.block_size

    # ---- metrics and checks ------------------------------------------------------------------------

    def stats(self) -> KvCacheStats:
        pool = self.pool
        pool_stats = pool.stats()
        return KvCacheStats(
            prefix_cache_queries=pool_stats.prefix_cache_queries,
            prefix_cache_hits=pool_stats.prefix_cache_hits,
            evictions=pool_stats.evictions,
            num_blocks_total=pool.num_blocks,
            num_blocks_free=pool.num_free_blocks,
            num_blocks_used=pool.num_used_blocks,
            num_blocks_cached=pool.num_cached_blocks,
            num_requests=len(self._requests),
            usage=pool.usage,
        )

    def check_invariants(self) -> None:
        """The pool's invariants, plus: each block's ref count equals the tables holding it. Tests only."""
        self.pool.check_invariants()
        holders = [0] * self.pool.num_blocks
        for request_id, state in self._requests.items():
            if len(state.block_hashes) > len(state.block_ids):
                raise KvCacheManagerError(f"{request_id!r} has more hashes than blocks")
            for block, block_hash in zip(state.block_ids, state.block_hashes, strict=False):
                pool_hash = self.pool.block_hash(block)
                if pool_hash is not None and pool_hash != block_hash:
                    raise KvCacheManagerError(f"{request_id!r}: block {block} cached under another hash")
            for block in state.block_ids:
                holders[block] += 1
        for block, count in enumerate(holders):
            if self.pool.ref_count(block) != count:
                raise BlockPoolError(f"block {block}: ref count {self.pool.ref_count(block)}, held by {count} tables")

    def _state(self, request_id: str) -> _RequestBlocks:
        state = self._requests.get(request_id)
        if state is None:
            raise UnknownRequestError(f"request {request_id!r} has no block table")
        return state


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
