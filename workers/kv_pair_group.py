"""A 2-rank point-to-point group between one prefill rank (rank 0, the sender) and one decode rank (rank
1, the receiver), built straight from a ``TCPStore`` (no ``init_process_group``), so a process can
hold many such groups next to its expert-parallel group.

Lifecycle: a pair has up to ``lanes`` lanes, so that that many of its transfers run at once (a
prefill batch ends several requests at once, and their handoffs to one decode rank should overlap,
not queue). A ``PairSlot`` per lane on each side holds the lane's current ``PairGroup`` (one
generation, prefix ``.../l<lane>/g<generation>``), the store connection its rendezvous uses, and the
lock that serializes the lane's transfers. The receiver picks the lane (``PairLanes.acquire``: the
lowest free one with a working group, else the lowest free one, so serial traffic reuses its groups)
and names it in its offer.
A group is created on demand (``connect_pair_group``: gloo for CPU tensors, NCCL for CUDA tensors; it
blocks until the peer joins), reused while it works, and dropped (``PairSlot.drop``) when a transfer
on it fails; the lane's next transfer builds the next generation. A failure or a cancel drops only
its own lane's group: transfers on the other lanes go on.

Also here: ``route_to``, the local address that reaches a peer (the store server itself is
``parallel.host_store``, bound to one interface).
"""

from __future__ import annotations

import datetime
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, cast

import torch
import torch.distributed as dist


class PointToPointBackend(Protocol):
    """The methods of ``ProcessGroupGloo`` / ``ProcessGroupNCCL`` used here (torch's stubs omit them)."""

    def send(self, tensors: list[torch.Tensor], dstRank: int, tag: int) -> dist.Work: ...
    def recv(self, tensors: list[torch.Tensor], srcRank: int, tag: int) -> dist.Work: ...
    def abort(self) -> None: ...


@dataclass
class PairGroup:
    """One generation of a pair's 2-rank group. ``backend`` is None until both sides have connected."""

    prefix: str
    kind: str  # "gloo" | "nccl"
    backend: PointToPointBackend | None = None
    next_seq: int = 0
    broken: str | None = None

    def abandon(self, reason: str) -> None:
        """Mark it unusable and let go of it. gloo closes the sockets once the last reference to the
        group and to its pending work is gone; only then does the peer's pending operation fail. (A
        process that dies closes them at once. A thread still waiting here holds them until its
        deadline.)"""
        if self.broken is None:
            self.broken = reason
        backend, self.backend = self.backend, None
        if backend is not None:
            try:
                backend.abort()
            except RuntimeError:
                pass  # already torn down by the failure itself


@dataclass
class PairSlot:
    """One peer's state on this side. ``lock`` serializes the transfers of the pair."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    store: dist.Store | None = None  # this pair's own store connection (group rendezvous, receiver offers)
    answers: dist.Store | None = None  # receiver side: the connection it waits for answers on, and only that
    answer_key: str = ""  # receiver side: the lane's answer queue (with ``answers``)
    answers_popped: int = 0  # receiver side: messages popped there since its waiters were last forgotten
    group: PairGroup | None = None
    generation: int = 0
    avoid_until: float = 0.0  # receiver side: a failed transfer's sender may hold this lane until then
    acknowledging: bool = False  # receiver side: its transfer has succeeded and is sending its acknowledgement

    def usable(self) -> PairGroup | None:
        group = self.group
        return group if group is not None and group.broken is None and group.backend is not None else None

    def drop(self, group: PairGroup, reason: str) -> None:
        group.abandon(reason)
        if self.group is group:
            self.group = None


DEFAULT_LANES = 4  # a receiver's concurrent transfers per sender
ACK_WAIT_S = 0.05  # how long acquire waits for an acknowledging lane's working group instead of a new group
MAX_LANES = 16  # the most a sender accepts per receiver (each lane is a group: sockets and threads on both sides)


def _check_lanes(count: int) -> None:
    if not 1 <= count <= MAX_LANES:
        raise ValueError(f"lanes: expected 1..{MAX_LANES}, got {count}")


class PairLanes:
    """One pair's lanes on this side. A receiver takes them with ``acquire`` (the lowest free lane, its
    slot locked) and gives them back with ``release``: at most ``count`` are held, and a waiter waits
    for any of them. A sender locks the slot of the lane the receiver's offer names."""

    def __init__(self, count: int) -> None:
        _check_lanes(count)
        self.slots = [PairSlot() for _ in range(count)]
        self._free = threading.Semaphore(count)

    def acquire(self, timeout_s: float) -> tuple[int, PairSlot] | None:
        """(lane, its slot, locked), or None when none came free within ``timeout_s``. In this order: the
        lowest free lane with a working group; a lane whose transfer is acknowledging, waited for up to
        ``ACK_WAIT_S`` (a receiver reports SUCCESS just before it acknowledges, so the pair's next
        transfer may start while that lane is still taken, and a new group costs a rendezvous); the
        lowest free lane. A lane whose last transfer failed is taken only when no other is free until
        its ``avoid_until``: that transfer's sender may still hold its side of the lane (waiting out its
        own deadline), and a transfer offered on it would wait behind that."""
        if not self._free.acquire(timeout=max(0.0, timeout_s)):
            return None
        # a permit holder holds at most one lane lock, and every lane lock is held by one: one is free
        now = time.monotonic()
        taken = (
            self._take(lambda slot: slot.avoid_until <= now and slot.usable() is not None)
            or self._take_acknowledging(min(ACK_WAIT_S, max(0.0, timeout_s)))
            or self._take(lambda slot: slot.avoid_until <= now)
            or self._take(lambda slot: True)
        )
        if taken is None:
            self._free.release()
            raise RuntimeError("no free lane although a permit was granted")
        return taken

    def _take(self, eligible: Callable[[PairSlot], bool]) -> tuple[int, PairSlot] | None:
        for lane, slot in enumerate(self.slots):
            if eligible(slot) and slot.lock.acquire(blocking=False):
                return lane, slot
        return None

    def _take_acknowledging(self, wait_s: float) -> tuple[int, PairSlot] | None:
        for lane, slot in enumerate(self.slots):
            if slot.acknowledging and slot.usable() is not None and slot.lock.acquire(timeout=wait_s):
                return lane, slot
        return None

    def release(self, slot: PairSlot) -> None:
        slot.lock.release()
        self._free.release()

    def close(self) -> None:
        for slot in self.slots:
            if slot.group is not None:
                slot.drop(slot.group, "closed")


class LaneSets:
    """Every peer's lanes on this side, created on first use; ``close`` drops every group."""

    def __init__(self, count: int) -> None:
        _check_lanes(count)
        self.count = count
        self._lock = threading.Lock()
        self._lanes: dict[tuple[str, ...], PairLanes] = {}

    def get(self, key: tuple[str, ...]) -> PairLanes:
        with self._lock:
            lanes = self._lanes.get(key)
            if lanes is None:
                lanes = self._lanes[key] = PairLanes(self.count)
            return lanes

    def close(self) -> None:
        with self._lock:
            every, self._lanes = list(self._lanes.values()), {}
        for lanes in every:
            lanes.close()


def backend_kind(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def route_to(host: str) -> str:
    """The local address this machine uses to reach ``host`` (no packet is sent)."""
    family, _, _, _, address = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(address)
        return str(probe.getsockname()[0])


def _scope(prefix: str) -> str:
    return prefix + "/"  # the group's keys: PrefixStore adds a "/" of its own


def library_keys(prefix: str, kind: str) -> tuple[str, ...]:
    """The store keys the library's rendezvous of group ``prefix`` writes, to delete once the group is
    gone: for gloo, each rank's address under torch's per-device prefix "0" (one device). NCCL's are
    not listed (not observable on this project's CPU machines), so they stay."""
    if kind != "gloo":
        return ()
    return tuple(f"{_scope(prefix)}/0/{rank}" for rank in (0, 1))


def connect_pair_group(
    store: dist.Store, prefix: str, rank: int, kind: str, interface_host: str, timeout_s: float
) -> PointToPointBackend:
    """Join the 2-rank group ``prefix`` as ``rank`` (blocks until the peer joins or ``timeout_s``)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if isinstance(store, dist.TCPStore):
        store.set_timeout(timeout)  # gloo's rendezvous waits on the store with the store's timeout
    scoped = dist.PrefixStore(_scope(prefix), store)
    if kind == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return cast(PointToPointBackend, dist.ProcessGroupNCCL(scoped, rank, 2, options))
    gloo_options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    gloo_options._timeout = timeout
    gloo_options._devices = [dist.ProcessGroupGloo.create_device(hostname=interface_host)]
    return cast(PointToPointBackend, dist.ProcessGroupGloo(scoped, rank, 2, gloo_options))
