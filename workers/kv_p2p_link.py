"""What both sides of a p2p KV transfer share: ``P2pTransfer`` (one transfer on a reused thread, with
bounded waits for the answer on the store and on gloo/NCCL work; ``cancel()`` lets go of the pair
group), the message tags, the header and the JSON forms of a layout and of runs. The protocol is in
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
SLICE_S = 0.05  # blocking waits (the offer, the answer, a source's ready) check cancel() this often
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
    """What both sides share: bounded store waits, posting and waiting gloo/NCCL work, cancel."""

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

    def _await_answer(self, store: dist.Store, key: str, what: str) -> bytes:
        """Pop queue ``key`` (the receiver's lane connection is its own while it holds the lane) in
        short slices, so that ``cancel()`` releases the lane at once: a cancelled receiver blocked
        here for its whole timeout would stall the lane's next transfer that long."""
        try:
            while True:
                left = self._remaining(what)
                store.set_timeout(datetime.timedelta(seconds=min(SLICE_S, left)))
                try:
                    return store.queue_pop(key, block=True)
                except RuntimeError as exc:
                    if "timeout" not in str(exc).lower() or time.monotonic() >= self._deadline():
                        raise
                if self._cancelled.is_set():
                    raise TransferError(self.error or "cancelled")
        except RuntimeError as exc:
            if self._cancelled.is_set():
                raise TransferError(self.error or "cancelled") from exc
            if "timeout" in str(exc).lower() or time.monotonic() >= self._deadline():
                raise self._timed_out(what) from exc
            raise TransferError(f"store unreachable while {what}: {first_line(exc)}") from exc

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
        assert slot.store is not None
        left = self._remaining(f"connecting pair group {group.prefix}")
        try:
            group.backend = connect_pair_group(slot.store, group.prefix, rank, group.kind, interface_host, left)
        except (RuntimeError, TimeoutError) as exc:
            slot.drop(group, "connect failed")
            if time.monotonic() >= self._deadline() or "timeout" in str(exc).lower():
                raise self._timed_out(f"connecting pair group {group.prefix} (the peer never joined)") from exc
            raise TransferError(f"cannot connect pair group {group.prefix}: {first_line(exc)}") from exc

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
