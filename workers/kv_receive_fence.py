"""The receives a p2p KV receiver has posted, and how it makes sure none of them writes after the transfer
ended: what makes ``cancel()`` safe when gloo or NCCL receive straight into the decode rank's pages.

The contract (``kv_transfer``): once ``cancel()`` returns, or once the owner sees FAILED, the transfer no
longer writes its sink, so the decode rank may free and reuse the blocks. A posted receive is a write
in progress: gloo's device thread reads the socket straight into the target tensor whenever the
sender's bytes come, whatever the Python side does.

What gloo does (torch 2.13, measured): ``ProcessGroupGloo.abort()`` does nothing to pending receives
(they still complete, and write, when the data comes). A ``wait(timeout)`` that times out makes gloo
close every pair of the group (``Application timeout caused pair closure``: the socket is closed under
the pair's lock, which every socket read holds), so after that wait returns, no receive of the group
writes again: the pending ones fail at once, and one whose bytes were arriving stops mid-message
(its own waiter is not woken: it sees its timeout). A completed receive wrote everything it will.
``Work.is_completed()`` only turns true inside ``wait``, and a second ``wait`` on a receive another
waiter completed blocks until its timeout: gloo work cannot be polled, and each has one waiter.

So (gloo): every receive is posted through ``post`` and counted until ``done``; the transfer's thread
is its only waiter. On a failure the thread calls ``settle`` before it returns: a 1 ms wait on each
outstanding receive, so the first one not complete closes the group (its waiter being the thread
itself, nothing is left blocked). ``cancel()`` runs on another thread and calls ``drain``: no new
receive may be posted, and it gives the thread ``DRAIN_S`` to notice and settle (it notices when its
current wait returns: a message whose bytes are flowing finishes within that time). Then it closes
the group itself, with a throwaway receive that times out after 1 ms: that wakes a thread waiting for
a message that has not started; one waiting for a message cut mid-way (a sender stalled mid-message)
waits out its own deadline, holding the pair, but writes nothing more. ``close`` does the closing at
once (``poll()`` of a transfer the owner already sees FAILED). ``cancel()`` so takes ``DRAIN_S`` at
most plus ~1 ms, and as long as the current message takes at worst.

NCCL (not testable here): ``abort()`` aborts the communicator and its kernels (``ncclCommAbort``), so
closing is ``abort()``; ``settle`` aborts if any posted receive is not complete.

Lifecycle: one per receiver transfer, used from its thread (post, done, settle) and from ``cancel()`` /
``poll()`` (drain, close); it holds references to the group's backend and the posted work.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable

import torch
import torch.distributed as dist

from k2serve.workers.kv_pair_group import PointToPointBackend

DRAIN_S = 0.05
SCRATCH_TAG = 2**31 - 1  # gloo tags are int32; no message of a transfer uses this one (``Tags``)
_PROBE = datetime.timedelta(milliseconds=1)


class FenceClosed(RuntimeError):
    """``post`` after ``drain`` or ``close`` began: the transfer is ending."""


class ReceiveFence:
    """The posted receives of one transfer that may still write their targets (see the module docstring)."""

    def __init__(self, kind: str, peer_rank: int) -> None:
        self.kind = kind  # "gloo" | "nccl"
        self.peer_rank = peer_rank
        self._cond = threading.Condition()
        self._outstanding: list[dist.Work] = []
        self._backend: PointToPointBackend | None = None
        self._closing = False  # no new receive may be posted
        self._closed = False  # the group is closed: no posted receive writes any more

    @property
    def outstanding(self) -> int:
        with self._cond:
            return len(self._outstanding)

    def post(self, backend: PointToPointBackend, start: Callable[[], dist.Work]) -> dist.Work:
        """Post a receive (``start``) on ``backend`` and count it; FenceClosed once the transfer is ending."""
        with self._cond:
            if self._closing:
                raise FenceClosed("the transfer is ending")
            work = start()
            self._backend = backend
            self._outstanding.append(work)
            return work

    def done(self, work: dist.Work) -> None:
        """``work`` completed (its waiter returned normally): it writes nothing more."""
        with self._cond:
            self._outstanding = [w for w in self._outstanding if w is not work]
            self._cond.notify_all()

    def all_done(self) -> None:
        """Every posted receive completed (its last message is in, and one connection delivers in order)."""
        with self._cond:
            self._outstanding.clear()
            self._cond.notify_all()

    def settle(self) -> None:
        """On the transfer's thread, before it ends FAILED: every outstanding receive completes or stops."""
        with self._cond:
            self._closing = True
            works = list(self._outstanding)
        if self.kind == "nccl":
            if any(not w.is_completed() for w in works):
                self.close()
        else:
            for work in works:
                try:  # complete: returns; else times out and closes the group; closed: raises at once
                    work.wait(_PROBE)
                except RuntimeError:
                    pass
        with self._cond:
            self._outstanding.clear()
            self._cond.notify_all()

    def drain(self) -> None:
        """From ``cancel()``: let the thread settle (``DRAIN_S`` at most), else close the group."""
        with self._cond:
            self._closing = True
            self._cond.wait_for(lambda: not self._outstanding or self._closed, DRAIN_S)
            if not self._outstanding:
                return
        self.close()

    def close(self) -> None:
        """Close the group now if a receive may still write; when this returns none writes any more."""
        with self._cond:
            self._closing = True
            if self._closed or not self._outstanding or self._backend is None:
                return
            backend = self._backend
            if self.kind == "nccl":
                try:
                    backend.abort()
                except RuntimeError:
                    pass  # torn down already
            else:
                scratch = torch.empty(1, dtype=torch.uint8)
                try:  # times out after 1 ms: gloo then closes every pair of the group
                    backend.recv([scratch], self.peer_rank, SCRATCH_TAG).wait(_PROBE)
                except RuntimeError:
                    pass  # timed out (closed now), or the pair had failed and closed already
            self._closed = True
            self._cond.notify_all()
