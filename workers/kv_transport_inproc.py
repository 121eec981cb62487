"""``InProcessTransport``: both sides of a KV transfer in one process, over queues (unit tests of the
transfer state machine and of the code that drives it; no serving path uses it).

Lifecycle: ``start_send`` / ``start_receive`` with the same transfer id, in either order, meet on one
``_Channel``: the sender puts its layout and checksum setting, then every layer's rows (copied out
of its source), and waits for the receiver's verdict; the receiver checks the layout, writes each
layer into its sink (verifying the CRC when asked) and answers. A side that ends early sets ``gone``;
every blocked put and get looks at it and at the transfer's deadline every ``_TICK_S``.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import TypeVar

import torch

from k2serve.workers.kv_transfer import (
    DEFAULT_TIMEOUT_S,
    NO_FAULT,
    KvLayout,
    KvReceiver,
    KvSender,
    KvSink,
    KvSource,
    KvTransfer,
    SendFault,
    TransferError,
    WireTap,
    check_layouts,
    crc32,
)

_T = TypeVar("_T")
_TICK_S = 0.02  # how often a blocked in-process side looks at the cancel and peer-gone flags


@dataclass
class _Channel:
    """What the two sides of one in-process transfer share."""

    hello: queue.Queue[tuple[KvLayout, bool]]  # the sender's layout and checksum setting
    layers: queue.Queue[tuple[int, torch.Tensor, int | None]]  # (layer, rows [N, D], crc | None)
    verdict: queue.Queue[str | None]  # the receiver's last word: None = all written and verified
    gone: threading.Event  # either side ended early


def _put(transfer: KvTransfer, q: queue.Queue[_T], item: _T, gone: threading.Event, what: str) -> None:
    while True:
        left = transfer._remaining(what)
        if gone.is_set():
            raise TransferError(f"the peer ended the transfer ({what})")
        try:
            q.put(item, timeout=min(left, _TICK_S))
            return
        except queue.Full:
            continue


def _get(transfer: KvTransfer, q: queue.Queue[_T], gone: threading.Event, what: str) -> _T:
    while True:
        left = transfer._remaining(what)
        try:
            return q.get(timeout=min(left, _TICK_S))
        except queue.Empty:
            if gone.is_set():
                raise TransferError(f"the peer ended the transfer ({what})") from None


class _InProcessSender(KvSender):
    def __init__(
        self,
        transfer_id: str,
        source: KvSource,
        channel: _Channel,
        checksum: bool,
        timeout_s: float,
        fault: SendFault = NO_FAULT,
    ) -> None:
        super().__init__("sender", transfer_id, source.layout, timeout_s)
        self._source, self._channel, self._checksum, self._fault = source, channel, checksum, fault

    def _run(self) -> None:
        ch = self._channel
        try:
            self._fault.wait(self)
            ch.hello.put((self.layout, self._checksum))
            self._begin_transferring()
            for i in range(self.layout.num_layers):
                self._fault.maybe_drop(i, self.layout)
                while not self._source.ready(i, min(_TICK_S, self._remaining(f"waiting for layer {i}"))):
                    pass  # a prefill still computing it; _remaining fails past the deadline or on cancel
                with self._data():
                    rows = self._source.layer(i)  # [N, D]: the one copy of this layer
                crc = crc32(rows) if self._checksum else None
                self._fault.tamper(i, rows)
                _put(self, ch.layers, (i, rows, crc), ch.gone, f"handing layer {i} to the receiver")
                self._add_bytes(self.layout.layer_nbytes)
            verdict = _get(self, ch.verdict, ch.gone, "waiting for the receiver's acknowledgement")
            if verdict is not None:
                raise TransferError(f"receiver failed: {verdict}")
        except TransferError:
            ch.gone.set()
            raise

    def _on_cancel(self) -> None:
        self._channel.gone.set()


class _InProcessReceiver(KvReceiver):
    def __init__(
        self,
        transfer_id: str,
        sink: KvSink,
        channel: _Channel,
        checksum: bool,
        timeout_s: float,
        on_wire: WireTap | None,
    ) -> None:
        super().__init__("receiver", transfer_id, sink.layout, timeout_s)
        self._sink, self._channel, self._checksum, self._on_wire = sink, channel, checksum, on_wire

    def _run(self) -> None:
        ch = self._channel
        try:
            layout, checksum = _get(self, ch.hello, ch.gone, "waiting for the sender")
            check_layouts(layout, self.layout)
            if checksum != self._checksum:
                raise TransferError(f"checksum setting differs: sender {checksum}, receiver {self._checksum}")
            self._begin_transferring()
            for expected in range(self.layout.num_layers):
                layer, rows, crc = _get(self, ch.layers, ch.gone, f"waiting for layer {expected}")
                if layer != expected:
                    raise TransferError(f"got layer {layer}, expected {expected}")
                if self._on_wire is not None:
                    self._on_wire(layer, rows)
                if crc is not None and crc != crc32(rows):
                    raise TransferError(f"checksum mismatch in layer {layer}")
                with self._data():
                    self._sink.write(layer, 0, rows)
                self._add_bytes(self.layout.layer_nbytes)
        except TransferError as exc:
            ch.verdict.put(str(exc))
            ch.gone.set()
            raise
        ch.verdict.put(None)

    def _on_cancel(self) -> None:
        self._channel.gone.set()


class InProcessTransport:
    """Sender and receiver in one process, matched by ``transfer_id`` (either may start first). Each
    layer's gathered tensor is handed over a bounded queue: no copy besides the gather."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._waiting: dict[str, _Channel] = {}  # transfers one side has joined

    def _join(self, transfer_id: str) -> _Channel:
        with self._lock:
            channel = self._waiting.pop(transfer_id, None)  # the second side takes it out
            if channel is None:
                channel = _Channel(queue.Queue(1), queue.Queue(2), queue.Queue(1), threading.Event())
                self._waiting[transfer_id] = channel
            return channel

    def _forget(self, transfer_id: str, channel: _Channel) -> None:
        with self._lock:
            if self._waiting.get(transfer_id) is channel:  # nobody joined it: drop it
                del self._waiting[transfer_id]

    def start_send(
        self,
        transfer_id: str,
        source: KvSource,
        *,
        checksum: bool = False,
        timeout_s: float | None = None,
        fault: SendFault = NO_FAULT,
    ) -> KvSender:
        channel = self._join(transfer_id)
        sender = _InProcessSender(transfer_id, source, channel, checksum, timeout_s or self.timeout_s, fault)
        sender.add_done_callback(lambda _: self._forget(transfer_id, channel))
        sender.start()
        return sender

    def start_receive(
        self,
        transfer_id: str,
        sink: KvSink,
        *,
        checksum: bool = False,
        timeout_s: float | None = None,
        on_wire: WireTap | None = None,
    ) -> KvReceiver:
        channel = self._join(transfer_id)
        receiver = _InProcessReceiver(transfer_id, sink, channel, checksum, timeout_s or self.timeout_s, on_wire)
        receiver.add_done_callback(lambda _: self._forget(transfer_id, channel))
        receiver.start()
        return receiver
