"""``OfferInbox``: the prefill rank's one reader of the receivers' offers (p2p KV transfer, see
``kv_transport_p2p``).

Every receiver pushes its offer (JSON with a ``transfer`` field) onto one server-wide store queue,
``kv/offers``. One thread here pops that queue, blocking on a store connection of its own, and files each
offer under its transfer id; a sender waits on ``take`` for its own. So an offer wakes its sender as soon
as it is pushed, and a sender that waits for a receiver (a pull that comes late: the decode rank pulls
when it gets to the request) costs no store round trips and no CPU: the alternative, each sender polling
a queue of its own, cost a store round trip every 0.1 ms per waiting sender, which on a busy prefill
rank competes with the model for the cores.

A receiver that gives up pushes ``{"withdraw": <transfer id>}``, which drops its offer if no sender took
it; an offer nobody takes is dropped after ``ttl_s`` in any case, and at most ``max_pending`` are kept
(the oldest go first; pruned as offers arrive), so a receiver whose sender never comes leaves nothing
behind for long.

Lifecycle: built by ``P2pKvServer``; the reader thread starts with the first ``take`` and ends on
``close`` (which pushes a wake-up onto the queue) or when the store goes away.
"""

from __future__ import annotations

import datetime
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import torch.distributed as dist

from k2serve.workers.kv_p2p_link import TRIM_EVERY, first_line, forget_waiters

OFFERS_KEY = "kv/offers"
# The reader's blocking pop: close() wakes it with a message, and pruning happens as offers arrive, so it
# need not return on its own (c10d logs a warning at every pop that times out).
_POP_TIMEOUT = datetime.timedelta(days=1)
_CLOSE = b'{"close": true}'


class OfferInbox:
    """Offers by transfer id, read from the store queue ``OFFERS_KEY`` by one thread (see the module)."""

    def __init__(
        self,
        connect: Callable[[float], dist.Store],
        wake: Callable[[bytes], None],
        *,
        ttl_s: float,
        max_pending: int = 4096,
        name: str = "kv-offers",
    ) -> None:
        self._connect, self._wake = connect, wake  # a store connection of the reader's own; a push onto the queue
        self.ttl_s, self.max_pending, self._name = ttl_s, max_pending, name
        self._cond = threading.Condition()
        self._pending: OrderedDict[str, list[tuple[float, bytes]]] = OrderedDict()  # arrival order
        self._thread: threading.Thread | None = None
        self._closed = False
        self._broken: str | None = None

    def take(self, transfer_id: str, timeout_s: float) -> bytes | None:
        """The first offer for ``transfer_id`` (removed), or None if none came within ``timeout_s``.
        Raises ``RuntimeError`` once the reader has stopped (closed, or the store failed)."""
        self._ensure_reader()
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._cond:
            while True:
                offers = self._pending.get(transfer_id)
                if offers:
                    _, text = offers.pop(0)
                    if not offers:
                        del self._pending[transfer_id]
                    return text
                if self._broken is not None:
                    raise RuntimeError(self._broken)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    @property
    def pending(self) -> int:
        """Offers filed and not yet taken."""
        with self._cond:
            return sum(len(offers) for offers in self._pending.values())

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._broken = "the transfer server is closed"
            started = self._thread is not None
            self._cond.notify_all()
        if started:
            try:
                self._wake(_CLOSE)  # ends the reader's blocking pop
            except RuntimeError:
                pass  # the store is gone: the reader fails its pop on its own

    def _ensure_reader(self) -> None:
        with self._cond:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(target=self._read, name=self._name, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            store = self._connect(10.0)
            store.set_timeout(_POP_TIMEOUT)
        except (RuntimeError, TimeoutError) as exc:
            self._stop(f"cannot read offers: {exc}")
            return
        popped = 0
        while True:
            with self._cond:
                if self._closed:
                    return
            try:
                if popped >= TRIM_EVERY:  # the reader is the queue's only waiter, and not waiting now
                    popped = 0
                    forget_waiters(store, OFFERS_KEY)
                text = store.queue_pop(OFFERS_KEY, block=True)
            except dist.QueueEmptyError:
                continue  # a wake-up with nothing to pop (see P2pKvReceiver._await_answer): wait again
            except RuntimeError as exc:
                if "timeout" in str(exc).lower():
                    self._prune(time.monotonic())
                    continue
                self._stop(f"the offer queue failed: {first_line(exc)}")
                return
            popped += 1
            self._file(text)

    def _file(self, text: bytes) -> None:
        now = time.monotonic()
        try:
            message = json.loads(text)
            withdrawn = message.get("withdraw")
            transfer_id = message.get("transfer") if withdrawn is None else None
        except (ValueError, AttributeError):
            return  # not an offer: a sender cannot match it to anything
        with self._cond:
            if isinstance(withdrawn, str):
                self._pending.pop(withdrawn, None)
            elif isinstance(transfer_id, str):
                self._pending.setdefault(transfer_id, []).append((now, text))
                self._pending.move_to_end(transfer_id)
                self._cond.notify_all()
        self._prune(now)

    def _prune(self, now: float) -> None:
        with self._cond:
            while self._pending:
                oldest_id, offers = next(iter(self._pending.items()))
                if now - offers[-1][0] <= self.ttl_s and len(self._pending) <= self.max_pending:
                    break
                del self._pending[oldest_id]

    def _stop(self, reason: str) -> None:
        with self._cond:
            if self._broken is None:
                self._broken = reason
            self._cond.notify_all()
