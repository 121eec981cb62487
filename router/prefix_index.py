"""``PrefixIndex``: the router's approximate map of which worker holds which prompt prefix.

Lifecycle: one per ``Dispatcher``. For each request the dispatcher hashes the prompt once
(``block_hashes``), asks ``match_hashes`` how many leading tokens each worker holds, and, once it
has picked a prefill or mixed rank, ``record_hashes`` the prompt against it (at pick time, not at
completion, so a burst of requests sharing a prefix already sees the first one's rank). A worker
that leaves the set (or is replaced at a new address, with an empty cache) is ``forget``-ten.

Granularity: the prompt is cut into blocks of ``block_size`` tokens (a trailing partial block is
not indexed) and block ``i`` is named by a chained hash ``blake2b(hash of block i-1, tokens of block
i)`` whose root is salted with the tenant's ``cache_salt``: equal names mean equal prefixes, and two
tenants never match each other. This mirrors the workers' own block hashes (``block_pool``) without
having to equal them: the router's block size may differ from the workers' and the index is only a
hint (a worker may have evicted what the router remembers; the worker's own cache decides).

Bound: at most ``max_entries`` (block, worker) pairs, evicted least recently recorded first. A
prompt records its blocks last to first, so a prefix's first blocks are the last of it to go (an
entry whose predecessor was evicted can no longer match: matching walks from block 0).
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from collections import OrderedDict
from collections.abc import Sequence

BlockName = bytes  # 16-byte blake2b digest
_ROOT_TAG = b"k2serve/router-prefix/v1"
_DIGEST_SIZE = 16
_TOKEN_TYPE, _TOKEN_BYTES = "q", 8  # tokens as int64 in the machine's byte order (names never leave this process)


def block_hashes(prompt: Sequence[int], cache_salt: str | None, block_size: int) -> tuple[BlockName, ...]:
    """The chained names of the prompt's full blocks (``len(prompt) // block_size`` of them)."""
    salt = (cache_salt or "").encode("utf-8")
    parent = hashlib.blake2b(_ROOT_TAG + struct.pack("<Q", len(salt)) + salt, digest_size=_DIGEST_SIZE).digest()
    num_blocks = len(prompt) // block_size
    data = array(_TOKEN_TYPE, prompt[: num_blocks * block_size]).tobytes()
    step = block_size * _TOKEN_BYTES
    names = []
    for start in range(0, len(data), step):
        parent = hashlib.blake2b(parent + data[start : start + step], digest_size=_DIGEST_SIZE).digest()
        names.append(parent)
    return tuple(names)


class PrefixIndex:
    """Block name -> the workers that were sent it; bounded, least recently recorded evicted first."""

    def __init__(self, block_size: int = 16, max_entries: int = 100_000) -> None:
        if block_size < 1 or max_entries < 1:
            raise ValueError(f"need block_size >= 1 and max_entries >= 1, got {block_size} and {max_entries}")
        self.block_size = block_size
        self.max_entries = max_entries
        self._holders: dict[BlockName, dict[str, None]] = {}  # insertion-ordered sets
        self._recency: OrderedDict[tuple[BlockName, str], None] = OrderedDict()  # front = evicted first

    def __len__(self) -> int:
        """(block, worker) pairs held."""
        return len(self._recency)

    def hashes(self, prompt: Sequence[int], cache_salt: str | None) -> tuple[BlockName, ...]:
        return block_hashes(prompt, cache_salt, self.block_size)

    # ---- lookups --------------------------------------------------------------------------------------

    def match(self, prompt: Sequence[int], cache_salt: str | None) -> dict[str, int]:
        return self.match_hashes(self.hashes(prompt, cache_salt))

    def match_hashes(self, names: Sequence[BlockName]) -> dict[str, int]:
        """Worker id -> leading tokens of the prompt it holds (workers holding none are left out)."""
        matched: dict[str, int] = {}
        alive: set[str] | None = None
        for i, name in enumerate(names):
            holders = self._holders.get(name)
            if not holders:
                break
            alive = set(holders) if alive is None else alive.intersection(holders)
            if not alive:
                break
            for worker_id in alive:
                matched[worker_id] = (i + 1) * self.block_size
        return matched

    # ---- updates --------------------------------------------------------------------------------------

    def record(self, prompt: Sequence[int], cache_salt: str | None, worker_id: str) -> None:
        self.record_hashes(self.hashes(prompt, cache_salt), worker_id)

    def record_hashes(self, names: Sequence[BlockName], worker_id: str) -> None:
        """``worker_id`` now holds these blocks; the first block becomes the most recently recorded."""
        for name in reversed(names):
            key = (name, worker_id)
            if key in self._recency:
                self._recency.move_to_end(key)
                continue
            self._recency[key] = None
            self._holders.setdefault(name, {})[worker_id] = None
        while len(self._recency) > self.max_entries:
            (name, evicted), _ = self._recency.popitem(last=False)
            self._drop(name, evicted)

    def forget(self, worker_id: str) -> None:
        """Drop everything recorded for ``worker_id`` (O(entries): workers leave rarely)."""
        keys = [key for key in self._recency if key[1] == worker_id]
        for key in keys:
            del self._recency[key]
            self._drop(key[0], worker_id)

    def _drop(self, name: BlockName, worker_id: str) -> None:
        holders = self._holders.get(name)
        if holders is None:
            return
        holders.pop(worker_id, None)
        if not holders:
            del self._holders[name]
