"""The default KV transport: torch.distributed point-to-point between the prefill rank and the decode rank.

Who owns what: the prefill rank runs one ``P2pKvServer``. It hosts a ``TCPStore`` on its configured
interface (port chosen by the OS; the address goes into ``KvHandle.transfer_rendezvous``). The
decode rank runs one ``P2pKvClient``. Each (sender, receiver) pair shares a 2-rank pair group (rank
0 = sender, rank 1 = receiver) built from that store under its own prefix
(``kvpair/<server nonce>/<sender>/<receiver>/<backend>/g<generation>``): gloo on CPU tensors, NCCL on
CUDA tensors. Each side caches the group for the next transfer, and drops it when it breaks. The
next transfer then builds a new group under the next generation.

Lifecycle of one transfer (``transfer_id`` unique per server). Either side may start first, and
each has ``timeout_s`` to meet the other:

1. Receiver: takes its pair lock (one transfer at a time per pair), then publishes an offer in the
   store under ``kv/x/<transfer_id>/offer``: its worker id, its cached group prefix (or ""), its
   layout and checksum setting.
2. Sender: waits for that offer (polling ``check``: a blocking ``wait`` would hold the shared store
   connection) and checks it against its own layout, then takes its pair lock. It reuses its cached
   group if the receiver has the same one, otherwise starts generation g+1. It answers under
   ``kv/x/<transfer_id>/answer``: the prefix and the transfer's sequence number on that group (or an
   error, which fails both sides).
3. Both sides join the group if it is new (a blocking connect, bounded by the time left).
4. Data: sender -> header [5] int64 (num_tokens, num_layers, row_dim, dtype code, seq), which the
   receiver checks; then one ``send`` per layer, [num_tokens, row_dim] (gathered from the paged
   cache while the previous layer is in flight; the receiver scatters layer i into its cache while
   layer i+1 arrives); then, with checksums, the per-layer CRC32s as [num_layers] int64. Receiver ->
   acknowledgement [2] int64 (status, layer). The sender is SUCCESS only once the receiver has
   written and verified everything.
5. Failure: a dead peer (gloo reports "connection closed") or the deadline makes the side FAILED and
   drops (aborts) the group. The peer then fails at once. A checksum mismatch fails both sides but
   keeps the group. Every tag is distinct per transfer and layer
   (``(seq mod 2^20) × (num_layers + 3) + k``).

Injected faults (``SendFault``, tests only): the sender waits out its delay before it looks for the
offer, drops the transfer (and the group) before the middle layer, or flips a byte of layer 0 after
its checksum.

Transfers between one pair run one after the other, in the order the receiver took them. Store
connections are few and long-lived: the sender polls offers on the server's own store handle, and
each pair holds one connection for its group's rendezvous and, on the receiver side, its offers.
"""

from __future__ import annotations

import datetime
import json
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from k2serve.workers.kv_pair_group import (
    PairGroup,
    PairSlot,
    PairSlots,
    PointToPointBackend,
    backend_kind,
    connect_pair_group,
    route_to,
)
from k2serve.workers.kv_transfer import (
    DEFAULT_TIMEOUT_S,
    DTYPE_CODES,
    NO_FAULT,
    BufferPool,
    KvLayout,
    KvReceiver,
    KvSender,
    KvSink,
    KvSource,
    KvTransfer,
    SendFault,
    TransferError,
    WireTap,
    crc32,
    dtype_from_name,
)
from k2serve.workers.parallel import Rendezvous, host_store

ACK_OK, ACK_CHECKSUM, ACK_FAILED = 0, 1, 2
# The sender polls for the receiver's offer: every 0.2 ms while a peer starting at about the same
# time is likely, every 2 ms after that. (The decode rank publishes its offer before it asks for the
# send, so a real sender normally finds it at once.)
_POLL_FAST_S, _POLL_FAST_FOR_S, _POLL_SLOW_S = 0.0002, 0.05, 0.002
_ANSWER_SLICE_S = 0.05  # the receiver's wait for the sender's answer checks cancel() this often
_NCCL_POLL_S = 0.0001
_SENDS_IN_FLIGHT = 2  # layers gathered and posted ahead of the oldest unfinished send


class TransferRejected(TransferError):
    """The two sides disagree about the data, but the group still works (layout, checksum verdict)."""


def _send_to(rank: int, tensor: torch.Tensor, tag: int) -> Callable[[PointToPointBackend], dist.Work]:
    return lambda backend: backend.send([tensor], rank, tag)


def _recv_from(rank: int, tensor: torch.Tensor, tag: int) -> Callable[[PointToPointBackend], dist.Work]:
    return lambda backend: backend.recv([tensor], rank, tag)


def _header_values(layout: KvLayout, seq: int) -> list[int]:
    return [layout.num_tokens, layout.num_layers, layout.row_dim, DTYPE_CODES[layout.dtype], seq]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _layout_json(layout: KvLayout) -> list[Any]:
    return [layout.num_layers, layout.num_tokens, layout.row_dim, layout.dtype_name]


def _layout_from_json(value: list[Any]) -> KvLayout:
    return KvLayout(int(value[0]), int(value[1]), int(value[2]), dtype_from_name(str(value[3])))


class _Tags:
    """Distinct gloo/NCCL tags for the messages of one transfer on its group."""

    def __init__(self, seq: int, num_layers: int) -> None:
        self.base = (seq % (1 << 20)) * (num_layers + 3)
        self.header = self.base
        self.checksums = self.base + num_layers + 1
        self.ack = self.base + num_layers + 2

    def layer(self, index: int) -> int:
        return self.base + 1 + index


class _P2pTransfer(KvTransfer):
    """What both sides share: bounded store waits, posting and waiting gloo/NCCL work, cancel."""

    _group: PairGroup | None = None

    def _await_key(self, store: dist.Store, key: str, what: str) -> bytes:
        """The value of ``key`` once some other party sets it (polled, so the connection is never held)."""
        started = time.monotonic()
        while True:
            left = self._remaining(what)
            try:
                if store.check([key]):
                    value = store.get(key)
                    store.delete_key(key)
                    return value
            except RuntimeError as exc:
                raise TransferError(f"store unreachable while {what}: {_first_line(exc)}") from exc
            waited = time.monotonic() - started
            delay = _POLL_FAST_S if waited < _POLL_FAST_FOR_S else _POLL_SLOW_S
            if self._cancelled.wait(min(delay, left)):
                raise TransferError(self.error or "cancelled")

    def _await_answer(self, store: dist.Store, key: str, what: str) -> bytes:
        """Wait on ``key`` (the receiver's pair connection is its own while it holds the pair lock) in
        short slices, so that ``cancel()`` releases the pair lock at once: a cancelled receiver blocked
        here for its whole timeout would stall the pair's next transfer that long."""
        try:
            while True:
                left = self._remaining(what)
                try:
                    store.wait([key], datetime.timedelta(seconds=min(_ANSWER_SLICE_S, left)))
                    break
                except RuntimeError as exc:
                    if "timeout" not in str(exc).lower() or time.monotonic() >= self._deadline():
                        raise
                if self._cancelled.is_set():
                    raise TransferError(self.error or "cancelled")
            value = store.get(key)
            store.delete_key(key)
            return value
        except RuntimeError as exc:
            if self._cancelled.is_set():
                raise TransferError(self.error or "cancelled") from exc
            if "timeout" in str(exc).lower() or time.monotonic() >= self._deadline():
                raise self._timed_out(what) from exc
            raise TransferError(f"store unreachable while {what}: {_first_line(exc)}") from exc

    def _post(self, what: str, start: Callable[[PointToPointBackend], dist.Work]) -> dist.Work:
        group = self._group
        if group is None or group.backend is None:
            raise TransferError(f"{what}: no pair group")
        try:
            return start(group.backend)
        except RuntimeError as exc:  # gloo refuses new work on a closed connection
            raise TransferError(f"{what} failed, the peer is gone: {_first_line(exc)}") from exc

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
            raise TransferError(f"{what} failed, the peer is gone: {_first_line(exc)}") from exc

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
            raise TransferError(f"cannot connect pair group {group.prefix}: {_first_line(exc)}") from exc

    def _on_cancel(self) -> None:
        # only a group this transfer still uses: once it let go of the pair (``_let_go``) the group may
        # carry the pair's next transfer, which a late cancel (after a checksum verdict, say) must not break
        with self._lock:
            group = self._group
            if group is not None:
                group.abandon(f"transfer {self.transfer_id} cancelled")

    def _let_go(self) -> None:
        """Before releasing the pair lock: from now on ``cancel()`` leaves the group alone."""
        with self._lock:
            self._group = None

    def _small(self, values: list[int], device: torch.device) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)


class P2pKvSender(_P2pTransfer, KvSender):
    def __init__(
        self,
        server: P2pKvServer,
        transfer_id: str,
        receiver_id: str,
        source: KvSource,
        checksum: bool,
        timeout_s: float,
        fault: SendFault = NO_FAULT,
    ) -> None:
        super().__init__("sender", transfer_id, source.layout, timeout_s)
        self._server, self._receiver_id, self._source, self._checksum = server, receiver_id, source, checksum
        self._fault = fault

    def _run(self) -> None:
        self._fault.wait(self)
        server, rid = self._server, self._receiver_id
        keys = f"kv/x/{self.transfer_id}"
        kind = backend_kind(self._source.device)
        offer = json.loads(
            self._await_key(server.store, f"{keys}/offer", f"waiting for receiver {rid} to join the transfer")
        )
        problem = self._check_offer(offer)
        if problem is not None:
            server.store.set(f"{keys}/answer", json.dumps({"error": problem}))
            raise TransferRejected(problem)
        slot = server.slot(rid, kind)
        if not slot.lock.acquire(timeout=self._remaining(f"waiting for the previous transfer to {rid}")):
            raise self._timed_out(f"waiting for the previous transfer to {rid}")
        try:
            group = slot.usable()
            fresh = group is None or group.prefix != offer["cached"]
            if fresh:
                if slot.group is not None:
                    slot.drop(slot.group, "replaced")
                slot.generation += 1
                group = PairGroup(server.pair_prefix(rid, kind, slot.generation), kind)
                slot.group = group
            assert group is not None
            seq = group.next_seq
            group.next_seq += 1
            server.store.set(f"{keys}/answer", json.dumps({"prefix": group.prefix, "seq": seq}))
            self._group = group
            if fresh:
                if slot.store is None:
                    slot.store = server.connect_store(self._remaining("connecting to the transfer store"))
                self._join(slot, group, 0, server.host)
            try:
                self._send(seq)
            except TransferRejected:
                raise  # both sides finished the protocol: the group is fine
            except Exception as exc:  # the peer may still be mid-protocol: this group cannot be trusted
                slot.drop(group, str(exc))
                raise
        finally:
            self._let_go()
            slot.lock.release()

    def _check_offer(self, offer: dict[str, Any]) -> str | None:
        if offer.get("receiver") != self._receiver_id:
            return f"transfer {self.transfer_id} is for {self._receiver_id}, not {offer.get('receiver')!r}"
        theirs = _layout_from_json(offer["layout"])
        if theirs != self.layout:
            return f"layout mismatch: sender has {self.layout.describe()}, receiver expects {theirs.describe()}"
        if bool(offer["checksum"]) != self._checksum:
            return f"checksum setting differs: sender {self._checksum}, receiver {bool(offer['checksum'])}"
        return None

    def _send(self, seq: int) -> None:
        layout, device = self.layout, self._source.device
        tags = _Tags(seq, layout.num_layers)
        header = self._small(_header_values(layout, seq), device)  # [5]
        ack = self._small([ACK_FAILED, -1], device)  # [status, layer]
        ack_work = self._post("posting the acknowledgement receive", _recv_from(1, ack, tags.ack))
        in_flight: deque[tuple[dist.Work, str, int, torch.Tensor | None]] = deque()  # (work, what, bytes, buffer)
        header_work = self._post("sending the header", _send_to(1, header, tags.header))
        in_flight.append((header_work, "sending the header", 0, None))
        self._begin_transferring()
        crcs: list[int] = []
        pool = self._server.buffers
        for i in range(layout.num_layers):
            self._fault.maybe_drop(i, layout)  # the group is dropped with it: the receiver fails at once
            buffer = pool.take(layout.num_tokens, layout.row_dim, layout.dtype, device)  # [>= N, D]
            with self._data():
                rows = self._source.layer(i, out=buffer[: layout.num_tokens])  # [N, D], while layer i-1 is sent
            if self._checksum:
                crcs.append(crc32(rows))
            self._fault.tamper(i, rows)  # after its checksum: what a bad link would do
            work = self._post(f"sending layer {i}", _send_to(1, rows, tags.layer(i)))
            in_flight.append((work, f"sending layer {i}", layout.layer_nbytes, buffer))
            while len(in_flight) > _SENDS_IN_FLIGHT:
                self._retire(in_flight.popleft())
        while in_flight:
            self._retire(in_flight.popleft())
        if self._checksum:
            sums = self._small(crcs, device)  # [L]
            self._exchange("sending checksums", _send_to(1, sums, tags.checksums))
        self._wait(ack_work, "waiting for the receiver's acknowledgement")
        status, layer = (int(v) for v in ack.tolist())
        if status == ACK_CHECKSUM:
            raise TransferRejected(f"receiver reported checksum mismatch in layer {layer}")
        if status != ACK_OK:
            raise TransferError(f"receiver reported failure (status {status})")

    def _retire(self, entry: tuple[dist.Work, str, int, torch.Tensor | None]) -> None:
        work, what, nbytes, buffer = entry
        self._wait(work, what)
        self._add_bytes(nbytes)
        if buffer is not None:  # only a finished send gives its buffer back; a failed one may still read it
            self._server.buffers.give(buffer)


class P2pKvReceiver(_P2pTransfer, KvReceiver):
    def __init__(
        self,
        client: P2pKvClient,
        transfer_id: str,
        sender_id: str,
        rendezvous: Rendezvous,
        sink: KvSink,
        checksum: bool,
        timeout_s: float,
        on_wire: WireTap | None,
    ) -> None:
        super().__init__("receiver", transfer_id, sink.layout, timeout_s)
        self._client, self._sender_id, self._rendezvous = client, sender_id, rendezvous
        self._sink, self._checksum, self._on_wire = sink, checksum, on_wire

    def _run(self) -> None:
        sid, keys = self._sender_id, f"kv/x/{self.transfer_id}"
        kind = backend_kind(self._sink.device)
        slot = self._client.slot(self._rendezvous, sid, kind)
        if not slot.lock.acquire(timeout=self._remaining(f"waiting for the previous transfer from {sid}")):
            raise self._timed_out(f"waiting for the previous transfer from {sid}")
        try:
            if slot.store is None:
                left = self._remaining(f"reaching the transfer store at {self._rendezvous}")
                slot.store = self._client.connect_store(self._rendezvous, left)
            cached = slot.usable()
            offer = {
                "receiver": self._client.worker_id,
                "cached": cached.prefix if cached is not None else "",
                "layout": _layout_json(self.layout),
                "checksum": self._checksum,
            }
            slot.store.set(f"{keys}/offer", json.dumps(offer))
            try:
                reply = self._await_answer(slot.store, f"{keys}/answer", f"waiting for sender {sid} to answer")
                answer = json.loads(reply)
            except TransferError:
                _forget(slot.store, f"{keys}/offer")
                raise
            if "error" in answer:
                raise TransferRejected(str(answer["error"]))
            group = cached if cached is not None and cached.prefix == answer["prefix"] else None
            if group is None:
                if slot.group is not None:
                    slot.drop(slot.group, "replaced")
                group = PairGroup(str(answer["prefix"]), kind)
                slot.group = group
                self._group = group
                self._join(slot, group, 1, self._client.interface_host(self._rendezvous))
            self._group = group
            try:
                self._receive(int(answer["seq"]))
            except TransferRejected:
                raise  # both sides finished the protocol: the group is fine
            except Exception as exc:  # e.g. the sink raised: the sender is still mid-protocol
                slot.drop(group, str(exc))
                raise
        finally:
            self._let_go()
            slot.lock.release()

    def _receive(self, seq: int) -> None:
        layout, device = self.layout, self._sink.device
        tags = _Tags(seq, layout.num_layers)
        header = self._small([0] * 5, device)
        header_work = self._post("receiving the header", _recv_from(0, header, tags.header))
        pool, n = self._client.buffers, layout.num_tokens
        bases = [pool.take(n, layout.row_dim, layout.dtype, device) for _ in range(2)]  # 2 × [>= N, D]
        buffers = [base[:n] for base in bases]  # 2 × [N, D]: layer i arrives in buffers[i % 2]
        pending = self._post("receiving layer 0", _recv_from(0, buffers[0], tags.layer(0)))  # with the header
        self._wait(header_work, "waiting for the header")
        expected = _header_values(layout, seq)
        if header.tolist() != expected:
            raise TransferError(f"header mismatch: got {header.tolist()}, expected {expected}")  # breaks the group
        self._begin_transferring()
        crcs: list[int] = []
        for i in range(layout.num_layers):
            work = pending
            if i + 1 < layout.num_layers:  # buffers[(i + 1) % 2] held layer i - 1, already written
                nxt = buffers[(i + 1) % 2]
                pending = self._post(f"receiving layer {i + 1}", _recv_from(0, nxt, tags.layer(i + 1)))
            self._wait(work, f"receiving layer {i}")
            rows = buffers[i % 2]  # [N, D]
            if self._on_wire is not None:
                self._on_wire(i, rows)
            if self._checksum:
                crcs.append(crc32(rows))
            with self._data():
                self._sink.write(i, 0, rows)
            self._add_bytes(layout.layer_nbytes)
        for base in bases:  # every receive has finished: nothing writes into them any more
            pool.give(base)
        verdict = [ACK_OK, -1]
        if self._checksum:
            sums = self._small([0] * layout.num_layers, device)
            self._exchange("receiving checksums", _recv_from(0, sums, tags.checksums))
            bad = [i for i, (want, got) in enumerate(zip(sums.tolist(), crcs, strict=True)) if want != got]
            if bad:
                verdict = [ACK_CHECKSUM, bad[0]]
        ack = self._small(verdict, device)
        self._exchange("sending the acknowledgement", _send_to(0, ack, tags.ack))
        if verdict[0] == ACK_CHECKSUM:
            raise TransferRejected(f"checksum mismatch in layer {verdict[1]}")


def _forget(store: dist.Store, key: str) -> None:
    try:
        store.delete_key(key)
    except RuntimeError:
        pass  # the store is gone too


class P2pKvServer:
    """The prefill rank's side: hosts the transfer store and starts senders.

    The store listens on ``host`` only (an interface address; every interface only if the caller names
    0.0.0.0), on a port the OS picks unless ``port`` is given; ``rendezvous`` ("host:port") goes into
    the ``KvHandle``.
    """

    def __init__(self, worker_id: str, host: str, timeout_s: float = DEFAULT_TIMEOUT_S, *, port: int = 0) -> None:
        self.worker_id = worker_id
        self.host = host
        self.timeout_s = timeout_s
        self.store = host_store(host, port=port, timeout_s=timeout_s)
        self.buffers = BufferPool()  # the layers being sent
        self._nonce = secrets.token_hex(4)  # a restarted server never reuses a prefix a client has cached
        self._slots = PairSlots()

    @property
    def rendezvous(self) -> str:
        return str(Rendezvous(self.host, self.store.port))

    def slot(self, receiver_id: str, kind: str) -> PairSlot:
        return self._slots.get((receiver_id, kind))

    def pair_prefix(self, receiver_id: str, kind: str, generation: int) -> str:
        return f"kvpair/{self._nonce}/{self.worker_id}/{receiver_id}/{kind}/g{generation}"

    def connect_store(self, timeout_s: float) -> dist.TCPStore:
        """A further connection to this server's own store (one per pair: a group's rendezvous blocks it)."""
        return dist.TCPStore(self.host, self.store.port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))

    def start_send(
        self,
        transfer_id: str,
        receiver_id: str,
        source: KvSource,
        checksum: bool = False,
        *,
        timeout_s: float | None = None,
        fault: SendFault = NO_FAULT,
    ) -> KvSender:
        """Send ``source`` to ``receiver_id`` once it calls ``start_receive`` with the same ``transfer_id``
        (``fault``: injected faults, tests only)."""
        sender = P2pKvSender(self, transfer_id, receiver_id, source, checksum, timeout_s or self.timeout_s, fault)
        sender.start()
        return sender

    def close(self) -> None:
        """Let go of every pair group; the store stops with the last reference to this server."""
        self._slots.close()


class P2pKvClient:
    """The decode rank's side: one store connection and one cached group per prefill rank.

    ``interface_host``: the address gloo binds on this side (default: the local address that routes to
    the rendezvous host, so a loopback rendezvous stays on loopback).
    """

    def __init__(
        self, worker_id: str, timeout_s: float = DEFAULT_TIMEOUT_S, *, interface_host: str | None = None
    ) -> None:
        self.worker_id = worker_id
        self.timeout_s = timeout_s
        self._interface_host = interface_host
        self.buffers = BufferPool()  # the layers being received
        self._slots = PairSlots()

    def slot(self, rendezvous: Rendezvous, sender_id: str, kind: str) -> PairSlot:
        return self._slots.get((str(rendezvous), sender_id, kind))

    def interface_host(self, rendezvous: Rendezvous) -> str:
        return self._interface_host or route_to(rendezvous.host)

    def connect_store(self, rendezvous: Rendezvous, timeout_s: float) -> dist.TCPStore:
        try:
            return dist.TCPStore(
                rendezvous.host, rendezvous.port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s)
            )
        except (RuntimeError, TimeoutError) as exc:
            raise TransferError(f"cannot reach the transfer store at {rendezvous}: {_first_line(exc)}") from exc

    def start_receive(
        self,
        transfer_id: str,
        sender_id: str,
        rendezvous: Rendezvous | str,
        sink: KvSink,
        checksum: bool = False,
        *,
        timeout_s: float | None = None,
        on_wire: WireTap | None = None,
    ) -> KvReceiver:
        """Receive into ``sink`` what ``sender_id`` (whose server listens at ``rendezvous``) sends."""
        where = Rendezvous.parse(rendezvous) if isinstance(rendezvous, str) else rendezvous
        receiver = P2pKvReceiver(
            self, transfer_id, sender_id, where, sink, checksum, timeout_s or self.timeout_s, on_wire
        )
        receiver.start()
        return receiver

    def close(self) -> None:
        self._slots.close()
