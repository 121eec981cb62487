"""What both sides of a p2p KV transfer share: ``P2pTransfer`` (one transfer on a reused thread: joining
a new pair group, bounded waits on gloo/NCCL work; ``cancel()`` lets go of the pair group), the
message tags, the header and the JSON forms of a layout and of runs. The protocol is in
``kv_transport_p2p``.

Lifecycle: ``P2pTransfer`` is one transfer (``KvTransfer``'s lifecycle); the rest are pure helpers.
"""

from __future__ import annotations

import datetime
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from k2serve.workers import kv_segments
from k2serve.workers.kv_pair_group import PairGroup, PairSlot, PointToPointBackend, connect_pair_group, library_keys
from k2serve.workers.kv_receive_fence import SCRATCH_TAG
from k2serve.workers.kv_segments import Plan
from k2serve.workers.kv_transfer import DTYPE_CODES, KvLayout, KvTransfer, TransferError, dtype_from_name
from k2serve.workers.transfer_threads import TransferThreads

ACK_OK, ACK_CHECKSUM, ACK_FAILED = 0, 1, 2  # the acknowledgement's status
SLICE_S = 0.05  # blocking waits (the offer, a source's ready) check cancel() this often
JOIN_OK, JOIN_GONE, JOIN_LEFT = "join", "gone", "left"  # who claimed a new group's join key (see _join)
PUSH_TIMEOUT_S = 5.0  # P2pKvClient.push: reaching the store for one message (a cancel's wake-up)
JOIN_GRACE_S = 5.0  # a sender that is leaving still meets a receiver already in the rendezvous this long
_JOIN_POLL_FIRST_S, _JOIN_POLL_MAX_S = 0.0002, 0.01
_NCCL_POLL_S = 0.0001
# Layers posted ahead of the oldest unfinished one: two while staged (their buffers are reused), every
# layer while direct (pages need no buffer, and on two cores the fewer Python wake-ups while bytes
# flow the better).
STAGED_AHEAD = 2


class TransferRejected(TransferError):
    """The two sides disagree about the data, but the group still works (layout, checksum verdict)."""


def send_to(rank: int, tensor: torch.Tensor, tag: int) -> Callable[[PointToPointBackend], dist.Work]:
    return lambda backend: backend.send([tensor], rank, tag)


def recv_from(rank: int, tensor: torch.Tensor, tag: int) -> Callable[[PointToPointBackend], dist.Work]:
    return lambda backend: backend.recv([tensor], rank, tag)


def header_values(layout: KvLayout, seq: int, plan: Plan) -> list[int]:
    return [layout.num_tokens, layout.num_layers, layout.row_dim, DTYPE_CODES[layout.dtype], seq, len(plan.segments)]


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def layout_json(layout: KvLayout) -> list[Any]:
    return [layout.num_layers, layout.num_tokens, layout.row_dim, layout.dtype_name]


def layout_from_json(value: list[Any]) -> KvLayout:
    return KvLayout(int(value[0]), int(value[1]), int(value[2]), dtype_from_name(str(value[3])))


def join_key(prefix: str) -> str:
    return f"{prefix}/join"


def generation_keys(prefix: str, kind: str) -> tuple[str, ...]:
    """Every store key pair group ``prefix`` leaves: its join key and the library's rendezvous keys."""
    return (join_key(prefix), *library_keys(prefix, kind))


ANSWER_PREFIX = "kv/a/"
_ANSWER_KEY = re.compile(r"kv/a/[0-9a-f]{16}")
TRIM_EVERY = 1024  # pops of one queue between two forget_waiters of it


def new_answer_key() -> str:
    """A receiver lane's own answer queue: its sender answers every offer from that lane there."""
    return ANSWER_PREFIX + secrets.token_hex(8)


def is_answer_key(value: object) -> bool:
    return isinstance(value, str) and _ANSWER_KEY.fullmatch(value) is not None


def forget_waiters(store: dist.Store, queue: str) -> None:
    """Let c10d's store server drop its list of the connections that ever waited on ``queue``.

    The server appends a connection to a queue's waiter list at every blocking pop that has to wait
    and never removes it (it wakes one by counting down), so a long-lived queue's list grows by one
    entry per wait, and a push that finds no one waiting walks all of it. Setting a plain key of the
    same name wakes and drops that whole list; the key is deleted at once. Call it only on a
    connection that is not waiting, for a queue no one else waits on (a waiter would be woken with
    nothing to pop, which the pops here survive)."""
    store.set(queue, "")
    store.delete_key(queue)


def runs_json(runs: kv_segments.Runs | None) -> list[int] | None:
    return list(runs) if runs is not None else None


class Tags:
    """Distinct gloo/NCCL tags (int32) for the messages of one transfer on its group: a fixed stride per
    layout, so transfers with other sequence numbers never share one; ``SCRATCH_TAG`` is above them all."""

    def __init__(self, seq: int, num_layers: int) -> None:
        stride = num_layers * kv_segments.MAX_SEGMENTS + 3
        self.base = (seq % (SCRATCH_TAG // stride)) * stride
        self.header = self.base
        self.checksums = self.base + stride - 2
        self.ack = self.base + stride - 1

    def message(self, layer: int, segment: int) -> int:
        return self.base + 1 + layer * kv_segments.MAX_SEGMENTS + segment


class P2pTransfer(KvTransfer):
    """What both sides share: joining a new group, posting and waiting gloo/NCCL work, cancel."""

    _group: PairGroup | None = None
    _threads: TransferThreads  # the server's or client's
    _started: float  # KvTransfer's; declared again so mypy knows it here

    def start(self) -> KvTransfer:
        """As ``KvTransfer.start`` (once; later calls do nothing), on one of the transport's reused threads."""
        with self._lock:
            if self._started:
                return self
            self._started = time.monotonic()
        self._threads.run(self._main)
        return self

    def _post(self, what: str, start: Callable[[PointToPointBackend], dist.Work]) -> dist.Work:
        group = self._group
        if group is None or group.backend is None:
            raise TransferError(f"{what}: no pair group")
        try:
            return start(group.backend)
        except RuntimeError as exc:  # gloo refuses new work on a closed connection
            raise TransferError(f"{what} failed, the peer is gone: {first_line(exc)}") from exc

    def _wait(self, work: dist.Work, what: str) -> None:
        left = self._remaining(what)
        group = self._group
        try:
            if group is not None and group.kind == "nccl":
                # NCCL's wait(timeout) does not block the host; poll so the deadline and cancel() hold
                while not work.is_completed():
                    left = self._remaining(what)
                    if self._cancelled.wait(min(_NCCL_POLL_S, left)):
                        raise TransferError(self.error or "cancelled")
                work.wait()
                torch.cuda.current_stream().synchronize()
            else:
                work.wait(datetime.timedelta(seconds=left))
        except RuntimeError as exc:
            says_timeout = "timed out" in str(exc).lower()
            raise self._failed_wait(what, says_timeout, f"{what} failed, the peer is gone: {first_line(exc)}") from exc

    def _failed_wait(self, what: str, says_timeout: bool, otherwise: str) -> TransferError:
        """What a wait that raised means: cancelled, out of time (the library said so, or the deadline
        passed), or ``otherwise``."""
        if self._cancelled.is_set():
            return TransferError(self.error or "cancelled")
        if says_timeout or time.monotonic() >= self._deadline():
            return self._timed_out(what)
        return TransferError(otherwise)

    def _exchange(self, what: str, start: Callable[[PointToPointBackend], dist.Work]) -> None:
        self._wait(self._post(what, start), what)

    def _join(self, slot: PairSlot, group: PairGroup, rank: int, interface_host: str) -> None:
        """Connect a new group. gloo's and NCCL's rendezvous cannot be interrupted: a side in it waits for
        its peer until its deadline, holding its lane. So each side enters it only once the other is
        sure to: the receiver (rank 1) claims the group's ``join_key`` on the store with "join" just
        before it connects, the sender (rank 0) connects only after it read "join". A side that ends
        first (``cancel()``, the deadline) claims the key instead ("gone" from the receiver, "left" from
        the sender), so the other never enters; if the receiver's "join" won that race, the leaving
        sender still meets it in the rendezvous and then drops the group, so it fails at once."""
        assert slot.store is not None
        what = f"connecting pair group {group.prefix}"
        try:
            if rank == 0:
                leaving = self._await_join(slot.store, group.prefix)
                timeout = max(self._deadline() - time.monotonic(), JOIN_GRACE_S)  # the receiver is in there
            else:
                leaving = None
                self._announce_join(slot.store, group.prefix)
                timeout = self._remaining(what)
            group.backend = connect_pair_group(slot.store, group.prefix, rank, group.kind, interface_host, timeout)
            if leaving is None and self._cancelled.is_set():
                leaving = TransferError(self.error or "cancelled")
            if leaving is not None:
                raise leaving
        except TransferError:
            slot.drop(group, "connect failed")
            raise
        except (RuntimeError, TimeoutError) as exc:
            slot.drop(group, "connect failed")
            if time.monotonic() >= self._deadline() or "timeout" in str(exc).lower():
                raise self._timed_out(f"{what} (the peer never joined)") from exc
            raise TransferError(f"cannot connect pair group {group.prefix}: {first_line(exc)}") from exc

    def _announce_join(self, store: dist.Store, prefix: str) -> None:
        """Receiver: claim "join" and go on to connect; raise if the sender left first, or claim "gone"
        and raise when this transfer is ending."""
        key = join_key(prefix)
        try:
            self._remaining(f"joining pair group {prefix}")
        except TransferError:
            try:
                store.compare_set(key, "", JOIN_GONE)
            except RuntimeError:
                pass  # the store is gone too: the sender fails on its own
            raise
        if store.compare_set(key, "", JOIN_OK) != JOIN_OK.encode():
            raise TransferError(f"the sender left before the receiver joined pair group {prefix}")

    def _await_join(self, store: dist.Store, prefix: str) -> TransferError | None:
        """Sender: wait (``check`` polls, which c10d does not log, backing off to ``_JOIN_POLL_MAX_S``)
        until the receiver claims the key. None: it said "join". Raises when it said "gone", or when
        ``cancel()`` or the deadline came first and the sender's "left" claimed the key; returns that
        error instead when the receiver's "join" won the race (see ``_join``)."""
        key, pause = join_key(prefix), _JOIN_POLL_FIRST_S
        what = f"waiting for the receiver to join pair group {prefix}"
        try:
            while not store.check([key]):
                self._cancelled.wait(min(pause, self._remaining(what)))
                pause = min(2 * pause, _JOIN_POLL_MAX_S)
        except TransferError as exc:
            if store.compare_set(key, "", JOIN_LEFT) != JOIN_OK.encode():
                raise
            return exc
        if store.get(key) != JOIN_OK.encode():
            raise TransferError(f"the receiver left before joining pair group {prefix}")
        try:
            store.delete_key(key)
        except RuntimeError:
            pass  # a key left behind costs nothing but its bytes
        return None

    def _on_cancel(self) -> None:
        # only a group this transfer still uses: once it let go of the pair (``_let_go``) the group may
        # carry the pair's next transfer, which a late cancel (after a checksum verdict, say) must not break
        with self._lock:
            group = self._group
            if group is not None:
                group.abandon(f"transfer {self.transfer_id} cancelled")

    def _let_go(self) -> None:
        """Before releasing the lane: from now on ``cancel()`` leaves the group alone."""
        with self._lock:
            self._group = None

    def _small(self, values: list[int], device: torch.device) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)
