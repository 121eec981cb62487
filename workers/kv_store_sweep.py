"""``StoreSweep``: deletes the keys of the prefill rank's transfer store that no transfer reads any
more, once their grace has passed (p2p KV transfer, see ``kv_transport_p2p``).

Why: the store lives as long as the rank, and without a sweep it keeps every replaced pair-group
generation's rendezvous keys: its join key and the keys the library's rendezvous wrote
(``kv_pair_group.library_keys``). A rank whose clients often leave mid-handoff would otherwise grow
its store by a few keys each time. (Queues need no sweep: c10d cannot delete one, so the transport
uses one answer queue per receiver lane, whose next transfer drops what an earlier one left.)

Lifecycle: one per ``P2pKvServer``, over the server's own store handle. A sender hands it keys
(``later``) when it starts a new generation: the previous one's (grace: the transfer timeout; no
transfer can still be in that rendezvous, both sides hold the lane). The next sender to end deletes
what is due (``run_due``), on its own thread once its state is reported. Keys whose sender is the
last one stay until another transfer ends; the live generations' keys stay while their groups serve.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterable

import torch.distributed as dist


class StoreSweep:
    """Keys to delete, each once its grace has passed (see the module)."""

    def __init__(self, store: dist.Store, clock: Callable[[], float] = time.monotonic) -> None:
        self._store, self._clock = store, clock
        self._lock = threading.Lock()
        self._due: list[tuple[float, int, str]] = []  # heap of (due, order, key)
        self._order = itertools.count()

    @property
    def pending(self) -> int:
        """Keys waiting for their grace to pass."""
        with self._lock:
            return len(self._due)

    def later(self, keys: Iterable[str], grace_s: float) -> None:
        """Delete ``keys`` after ``grace_s``."""
        due = self._clock() + max(0.0, grace_s)
        with self._lock:
            for key in keys:
                heapq.heappush(self._due, (due, next(self._order), key))

    def run_due(self, now: float | None = None) -> int:
        """Delete every key whose grace has passed (by ``now``, default the clock); the number of them
        the store still had. A store that is gone deletes nothing and keeps nothing waiting."""
        at = self._clock() if now is None else now
        with self._lock:
            due = []
            while self._due and self._due[0][0] <= at:
                due.append(heapq.heappop(self._due)[2])
        deleted = 0
        try:
            for key in due:
                deleted += bool(self._store.delete_key(key))
        except RuntimeError:  # the store is gone: nothing is left to delete
            pass
        return deleted
