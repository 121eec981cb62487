"""What both sides of a p2p KV transfer share: ``P2pTransfer`` (one transfer on a reused thread: joining
a new pair group, bounded waits on gloo/NCCL work; ``cancel()`` lets go of the pair group), the
message tags, the header and the JSON forms of a layout and of runs. The protocol is in
``kv_transport_p2p``.

Lifecycle: ``P2pTransfer`` is one transfer (``KvTransfer``'s lifecycle); the rest are pure helpers.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from k2serve.workers import kv_segments
from k2serve.workers.kv_pair_group import PairGroup, PairSlot, PointToPointBackend, connect_pair_group
from k2serve.workers.kv_receive_fence import SCRATCH_TAG
from k2serve.workers.kv_segments import Plan
from k2serve.workers.kv_transfer import DTYPE_CODES, KvLayout, KvTransfer, TransferError, dtype_from_name
from k2serve.workers.transfer_threads import TransferThreads

ACK_OK, ACK_CHECKSUM, ACK_FAILED = 0, 1, 2  # the acknowledgement's status
SLICE_S = 0.05  # blocking waits (the offer, a source's ready) check cancel() this often
JOIN_OK, JOIN_GONE = "join", "gone"  # the receiver's announcement before it connects a new group
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
            if self._cancelled.is_set():
                raise TransferError(self.error or "cancelled") from exc
            if "timed out" in str(exc).lower() or time.monotonic() >= self._deadline():
                raise self._timed_out(what) from exc
            raise TransferError(f"{what} failed, the peer is gone: {first_line(exc)}") from exc

    def _exchange(self, what: str, start: Callable[[PointToPointBackend], dist.Work]) -> None:
        self._wait(self._post(what, start), what)

    def _join(self, slot: PairSlot, group: PairGroup, rank: int, interface_host: str) -> None:
        """Connect a new group. gloo's and NCCL's rendezvous cannot be interrupted, and a side that enters
        it waits there for its peer until its deadline, holding its lane; so the receiver (rank 1)
        announces on the store that it is about to connect (``join_key``: "join", or "gone" when it was
        cancelled or ran out of time after the answer), and the sender (rank 0) enters the rendezvous
        only after that announcement: a sender whose receiver left lets go of its lane at once, on
        "gone" or on its own ``cancel()``, instead of at its deadline."""
        assert slot.store is not None
        what = f"connecting pair group {group.prefix}"
        try:
            if rank == 0:
                self._await_join(slot.store, group.prefix)
            else:
                self._announce_join(slot.store, group.prefix)
            group.backend = connect_pair_group(
                slot.store, group.prefix, rank, group.kind, interface_host, self._remaining(what)
            )
        except TransferError:
            slot.drop(group, "connect failed")
            raise
        except (RuntimeError, TimeoutError) as exc:
            slot.drop(group, "connect failed")
            if time.monotonic() >= self._deadline() or "timeout" in str(exc).lower():
                raise self._timed_out(f"{what} (the peer never joined)") from exc
            raise TransferError(f"cannot connect pair group {group.prefix}: {first_line(exc)}") from exc

    def _announce_join(self, store: dist.Store, prefix: str) -> None:
        """Receiver: "join" and go on to connect, or "gone" and raise when this transfer is ending."""
        try:
            self._remaining(f"joining pair group {prefix}")
        except TransferError:
            try:
                store.set(join_key(prefix), JOIN_GONE)
            except RuntimeError:
                pass  # the store is gone too: the sender fails on its own
            raise
        store.set(join_key(prefix), JOIN_OK)

    def _await_join(self, store: dist.Store, prefix: str) -> None:
        """Sender: wait (``check`` polls, which c10d does not log, backing off to ``_JOIN_POLL_MAX_S``)
        until the receiver announced; ``cancel()`` and the deadline end the wait at once."""
        key, pause = join_key(prefix), _JOIN_POLL_FIRST_S
        what = f"waiting for the receiver to join pair group {prefix}"
        while not store.check([key]):
            self._cancelled.wait(min(pause, self._remaining(what)))
            pause = min(2 * pause, _JOIN_POLL_MAX_S)
        self._remaining(what)
        if store.get(key) != JOIN_OK.encode():
            raise TransferError(f"the receiver left before joining pair group {prefix}")
        try:
            store.delete_key(key)
        except RuntimeError:
            pass  # a key left behind costs nothing but its bytes

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
