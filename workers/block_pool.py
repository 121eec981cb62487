"""``BlockPool``: the fixed set of paged latent-KV blocks, their reference counts and the prefix cache.

A block holds ``block_size`` token slots of the latent cache; block id ``b`` in ``[0, num_blocks)``
addresses the same block in every layer's ``[num_blocks, block_size, kv_cache_dim]`` tensor. No block
is reserved: ``ForwardBatch`` ignores block-table entries past a sequence's blocks (its padding 0 is
never dereferenced for a write, and padded reads are masked), so every block is usable and an idle
pool has ``num_free_blocks == num_blocks``. A CUDA-graph path that pads slot mappings would need a
reserved scratch block; add it here then.

Lifecycle of a block: *free, uncached* -> ``allocate`` -> *in use* (ref count >= 1, shared by
``touch``/``incref``) -> ``cache_block`` once it is full of computed tokens (gets a hash) ->
``free`` until the count reaches 0 -> *free, cached* (evictable, still found by ``get_cached_block``)
-> either ``touch``ed back into use by a prefix hit, or evicted by ``allocate`` (loses its hash) and
handed out as a fresh block. A block freed without a hash goes straight back to *free, uncached*.

Invariants (``check_invariants``): every block is exactly one of in use (ref > 0), free
uncached, or free cached; a block has a hash iff the hash map points at it; a cached free block is in
the LRU queue in the order it was freed (least recently freed first, evicted first). Every operation
costs O(1) per block it touches; nothing scans the pool except ``check_invariants``.

Block hashes form a chain ``sha256(parent_hash, block token ids, cache_salt)`` over a canonical byte
encoding, so they are stable across processes and runs (Python's ``hash()`` is randomized) and two
tenants with different salts never share a block.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

BlockHash = bytes  # 32-byte sha256 digest

_HASH_DOMAIN = b"k2serve/kv-block/v1"


class BlockPoolError(RuntimeError):
    """The pool was misused (double free, unknown block) or an invariant does not hold."""


class NoFreeBlocksError(BlockPoolError):
    """``allocate`` asked for more blocks than are free (cached free blocks included)."""


def hash_block_tokens(parent_hash: BlockHash | None, token_ids: Sequence[int], cache_salt: str | None) -> BlockHash:
    """Hash of one full block given the hash of the block before it (None for the first block).

    Encoding: domain tag, parent (flag + digest), salt (flag + length + UTF-8), token count, tokens as
    little-endian int64. Every field is length-delimited, so distinct inputs never share an encoding.
    """
    h = hashlib.sha256(_HASH_DOMAIN)
    h.update(b"\x00" if parent_hash is None else b"\x01" + parent_hash)
    if cache_salt is None:
        h.update(b"\x00")
    else:
        salt = cache_salt.encode("utf-8")
        h.update(b"\x01" + struct.pack("<Q", len(salt)) + salt)
    h.update(struct.pack(f"<Q{len(token_ids)}q", len(token_ids), *token_ids))
    return h.digest()


@dataclass(frozen=True)
class BlockPoolStats:
    """Counters since the pool was built. Queries and hits count tokens; evictions count blocks."""

    prefix_cache_queries: int
    prefix_cache_hits: int
    evictions: int


class BlockPool:
    """Fixed-size blocks with reference counts, a free queue and an LRU prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise BlockPoolError(f"need num_blocks > 0, got {num_blocks}")
        if block_size <= 0:
            raise BlockPoolError(f"need block_size > 0, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._block_hashes: list[BlockHash | None] = [None] * num_blocks
        self._hash_to_block: dict[BlockHash, int] = {}
        self._free_uncached: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, ref 0; front = least recently freed
        self._queries = 0
        self._hits = 0
        self._evictions = 0

    # ---- sizes -----------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks ``allocate`` can hand out now: free uncached plus evictable cached ones."""
        return len(self._free_uncached) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks that carry a hash, in use or evictable."""
        return len(self._hash_to_block)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (evictable cached blocks count as free)."""
        return self.num_used_blocks / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> BlockHash | None:
        return self._block_hashes[block_id]

    # ---- allocation ------------------------------------------------------------------------------

    def allocate(self, num_blocks: int) -> list[int]:
        """``num_blocks`` fresh blocks with ref count 1: uncached free blocks first, then LRU evictions.

        Returned in ascending id order (the set does not depend on it): a fresh or recently freed pool
        then gives a request consecutive ids, i.e. contiguous pages, which a KV transfer moves without
        a copy (``kv_segments``); block tables are freed tail first, so they come back descending."""
        if num_blocks < 0:
            raise BlockPoolError(f"cannot allocate {num_blocks} blocks")
        if num_blocks > self.num_free_blocks:
            raise NoFreeBlocksError(f"asked for {num_blocks} blocks, {self.num_free_blocks} free")
        blocks = []
        for _ in range(num_blocks):
            block = self._free_uncached.popleft() if self._free_uncached else self._evict_oldest()
            self._ref_counts[block] = 1
            blocks.append(block)
        blocks.sort()
        return blocks

    def incref(self, block_ids: Iterable[int]) -> None:
        """One more reference on blocks already in use (a forked request sharing them)."""
        for block in block_ids:
            self._check_block_id(block)
            if self._ref_counts[block] == 0:
                raise BlockPoolError(f"block {block} is free; incref needs a block in use")
            self._ref_counts[block] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference per block, in the given order; a block reaching 0 becomes free.

        Cached blocks join the back of the LRU queue, so of the blocks freed in one call the first
        ones are evicted first: free a block table tail first to keep its shared prefix longest.
        """
        for block in block_ids:
            self._check_block_id(block)
            if self._ref_counts[block] == 0:
                raise BlockPoolError(f"block {block} freed twice")
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                if self._block_hashes[block] is None:
                    self._free_uncached.append(block)
                else:
                    self._evictable[block] = None

    # ---- prefix cache ----------------------------------------------------------------------------

    def get_cached_block(self, block_hash: BlockHash) -> int | None:
        """The block holding ``block_hash`` (in use or evictable), or None. Takes no reference."""
        if not self.enable_prefix_caching:
            return None
        return self._hash_to_block.get(block_hash)

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference on prefix-hit blocks, pulling evictable ones out of the LRU queue."""
        for block in block_ids:
            self._check_block_id(block)
            if self._ref_counts[block] == 0:
                if block not in self._evictable:
                    raise BlockPoolError(f"block {block} is free and uncached; touch needs a cached block")
                del self._evictable[block]
            self._ref_counts[block] += 1

    def cache_block(self, block_id: int, block_hash: BlockHash) -> bool:
        """Register a full, computed block in use under ``block_hash``; True if it now holds that hash.

        False (and nothing changes) when caching is off or another block already holds the hash: the
        first mapping is kept and this block stays unhashed, freed as an ordinary block later.
        """
        self._check_block_id(block_id)
        if self._ref_counts[block_id] == 0:
            raise BlockPoolError(f"block {block_id} is free; only a block in use can be cached")
        current = self._block_hashes[block_id]
        if current is not None:
            if current != block_hash:
                raise BlockPoolError(f"block {block_id} is already cached under a different hash")
            return True
        if not self.enable_prefix_caching or block_hash in self._hash_to_block:
            return False
        self._block_hashes[block_id] = block_hash
        self._hash_to_block[block_hash] = block_id
        return True

    def record_prefix_lookup(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        self._queries += num_queried_tokens
        self._hits += num_hit_tokens

    def stats(self) -> BlockPoolStats:
        return BlockPoolStats(self._queries, self._hits, self._evictions)

    # ---- internals -------------------------------------------------------------------------------

    def _evict_oldest(self) -> int:
        block, _ = self._evictable.popitem(last=False)
        block_hash = self._block_hashes[block]
        if block_hash is None:
            raise BlockPoolError(f"evictable block {block} has no hash")  # only hashed blocks enter the queue
        del self._hash_to_block[block_hash]
        self._block_hashes[block] = None
        self._evictions += 1
        return block

    def _check_block_id(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise BlockPoolError(f"block {block_id} is not a block id (0..{self.num_blocks - 1})")

    def check_invariants(self) -> None:
        """Raise ``BlockPoolError`` if the bookkeeping is inconsistent. O(num_blocks): tests only."""
        free_uncached = set(self._free_uncached)
        if len(free_uncached) != len(self._free_uncached):
            raise BlockPoolError("a block appears twice in the free queue")
        if free_uncached & self._evictable.keys():
            raise BlockPoolError("a block is both free uncached and evictable")
        for block in range(self.num_blocks):
            ref, block_hash = self._ref_counts[block], self._block_hashes[block]
            if ref < 0:
                raise BlockPoolError(f"block {block} has ref count {ref}")
            states = (ref > 0) + (block in free_uncached) + (block in self._evictable)
            if states != 1:
                raise BlockPoolError(f"block {block} is in {states} of (in use, free, evictable)")
            if block in free_uncached and block_hash is not None:
                raise BlockPoolError(f"free uncached block {block} has a hash")
            if block in self._evictable and block_hash is None:
                raise BlockPoolError(f"evictable block {block} has no hash")
            if block_hash is not None and self._hash_to_block.get(block_hash) != block:
                raise BlockPoolError(f"block {block}'s hash maps elsewhere")
        for block_hash, block in self._hash_to_block.items():
            if self._block_hashes[block] != block_hash:
                raise BlockPoolError(f"hash map entry for block {block} is stale")
