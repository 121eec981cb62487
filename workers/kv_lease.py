"""``KvLeaseTable``: the prefill rank's record of the KV caches it holds for decode ranks.

Lifecycle of a lease:

1. ``grant`` when a prefill finishes: the request's blocks stay pinned (the engine keeps them; this
   table only records them) until ``expires_at`` = now + ``ttl_s``. The lease id goes into the
   ``KvHandle``.
2. ``renew`` on each heartbeat of the decode rank that holds the handle (``RenewKv``, every
   ``ttl_s / 3`` while its ``Decode`` waits for blocks or pulls): ``expires_at`` moves to now +
   ``ttl_s``. A decode rank that dies or hangs stops beating, so its lease ends at most ``ttl_s``
   after the last beat (plus the owner's expiry period); a live but slow one keeps it as long as
   it beats. An unknown, released or expired lease is not renewed (None: the caller answers
   NOT_FOUND and the decode side fails over as after a failed pull).
3. ``get`` while a decode rank pulls: an expired lease is no longer handed out.
4. It ends one of four ways. ``release`` happens on ``ReleaseKv`` (success or abort) and returns
   the lease, or None when it is unknown or already past its time. ``expire`` is called from the
   owner's periodic loop and returns every lease past its time. ``release_request`` is for an
   aborted request. ``expire_all`` is for a stopping rank.
   Whichever way, the caller frees the blocks (``engine.release_kv(request_id)``); each lease comes
   back exactly once.

Thread-safe: the gRPC threads and the service loop share one table.
"""

from __future__ import annotations

import dataclasses
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
    expires_at: float  # granted_at + ttl, then last renewal + ttl
    renewals: int = 0

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)


def new_lease_id(request_id: str) -> str:
    return f"{request_id}-{uuid.uuid4().hex[:16]}"


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
        self.num_renewed = 0  # successful renewals (heartbeats of decode ranks)

    def grant(
        self, request_id: str, block_ids: Sequence[int], num_tokens: int, layout: KvLayout, lease_id: str | None = None
    ) -> Lease:
        """A new lease; ``lease_id`` (from ``new_lease_id``) when the id was handed out before the grant
        (a pushed KV names its lease while the prefill still runs)."""
        if num_tokens != layout.num_tokens:
            raise ValueError(f"num_tokens: {num_tokens} differs from the layout's {layout.num_tokens}")
        now = self._clock()
        lease = Lease(
            lease_id=lease_id or new_lease_id(request_id),
            request_id=request_id,
            block_ids=tuple(block_ids),
            num_tokens=num_tokens,
            layout=layout,
            granted_at=now,
            expires_at=now + self.ttl_s,
        )
        with self._lock:
            if lease.lease_id in self._leases:
                raise ValueError(f"lease_id: {lease.lease_id!r} is already granted")
            self._leases[lease.lease_id] = lease
            self._pinned += lease.num_blocks
        return lease

    def get(self, lease_id: str) -> Lease | None:
        """The lease while it is live; None when unknown, released or past its time."""
        with self._lock:
            lease = self._leases.get(lease_id)
        return lease if lease is not None and self._clock() < lease.expires_at else None

    def renew(self, lease_id: str) -> Lease | None:
        """Extend a live lease to now + ``ttl_s`` and return it; None when unknown, released or past its
        time (an expired lease is never revived: ``expire`` may already be freeing its blocks)."""
        now = self._clock()
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None or now >= lease.expires_at:
                return None
            renewed = dataclasses.replace(lease, expires_at=now + self.ttl_s, renewals=lease.renewals + 1)
            self._leases[lease_id] = renewed
            self.num_renewed += 1
            return renewed

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

    def leases(self) -> list[Lease]:
        """A snapshot of the leases in the table (an expired one counts until ``expire`` takes it)."""
        with self._lock:
            return list(self._leases.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._leases)

    @property
    def pinned_blocks(self) -> int:
        """Blocks held by the leases still in the table (an expired one counts until ``expire`` takes it)."""
        with self._lock:
            return self._pinned
