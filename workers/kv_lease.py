"""``KvLeaseTable``: the prefill rank's record of the KV caches it holds for decode ranks.

Lifecycle of a lease:

1. ``grant`` when a prefill finishes: the request's blocks stay pinned (the engine keeps them; this
   table only records them) until ``expires_at`` = now + ``ttl_s``. The lease id goes into the
   ``KvHandle``.
2. ``get`` while a decode rank pulls: an expired lease is no longer handed out.
3. It ends one of four ways. ``release`` happens on ``ReleaseKv`` (success or abort) and returns
   the lease, or None when it is unknown or already past its time. ``expire`` is called from the
   owner's periodic loop and returns every lease past its time. ``release_request`` is for an
   aborted request. ``expire_all`` is for a stopping rank.
   Whichever way, the caller frees the blocks (``engine.release_kv(request_id)``); each lease comes
   back exactly once.

Thread-safe: the gRPC threads and the service loop share one table.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from k2serve.workers.kv_transfer import KvLayout


@dataclass(frozen=True)
class Lease:
    lease_id: str
    request_id: str
    block_ids: tuple[int, ...]
    num_tokens: int
    layout: KvLayout
    granted_at: float  # the table's clock
    expires_at: float

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)


class KvLeaseTable:
    """Leases by id, with the sum of their pinned blocks. ``clock`` is monotonic seconds (injectable)."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s: must be > 0, got {ttl_s}")
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        self._pinned = 0
        self.num_released = 0  # leases ended by release, release_request or expire_all
        self.num_expired = 0  # leases ended by expire

    def grant(self, request_id: str, block_ids: Sequence[int], num_tokens: int, layout: KvLayout) -> Lease:
        if num_tokens != layout.num_tokens:
            raise ValueError(f"num_tokens: {num_tokens} differs from the layout's {layout.num_tokens}")
        now = self._clock()
        lease = Lease(
            lease_id=f"{request_id}-{uuid.uuid4().hex[:16]}",
            request_id=request_id,
            block_ids=tuple(block_ids),
            num_tokens=num_tokens,
            layout=layout,
            granted_at=now,
            expires_at=now + self.ttl_s,
        )
        with self._lock:
            self._leases[lease.lease_id] = lease
            self._pinned += lease.num_blocks
        return lease

    def get(self, lease_id: str) -> Lease | None:
        """The lease while it is live; None when unknown, released or past its time."""
        with self._lock:
            lease = self._leases.get(lease_id)
        return lease if lease is not None and self._clock() < lease.expires_at else None

    def release(self, lease_id: str) -> Lease | None:
        """End a live lease (the decode side is done with it). None: unknown, released or past its time,
        in which case ``expire`` returns it (once)."""
        now = self._clock()
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None or now >= lease.expires_at:
                return None
            return self._remove(lease)

    def expire(self) -> list[Lease]:
        """Remove and return every lease past its time."""
        now = self._clock()
        with self._lock:
            return [
                self._remove(lease, expired=True) for lease in list(self._leases.values()) if now >= lease.expires_at
            ]

    def release_request(self, request_id: str) -> list[Lease]:
        """Remove and return the leases of ``request_id`` (live or expired): the request was aborted."""
        with self._lock:
            return [self._remove(lease) for lease in list(self._leases.values()) if lease.request_id == request_id]

    def expire_all(self) -> list[Lease]:
        """Remove and return every lease (the rank is stopping)."""
        with self._lock:
            return [self._remove(lease) for lease in list(self._leases.values())]

    def _remove(self, lease: Lease, *, expired: bool = False) -> Lease:
        del self._leases[lease.lease_id]
        self._pinned -= lease.num_blocks
        if expired:
            self.num_expired += 1
        else:
            self.num_released += 1
        return lease

    def __len__(self) -> int:
        with self._lock:
            return len(self._leases)

    @property
    def pinned_blocks(self) -> int:
        """Blocks held by the leases still in the table (an expired one counts until ``expire`` takes it)."""
        with self._lock:
            return self._pinned
