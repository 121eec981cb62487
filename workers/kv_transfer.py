"""KV transfer, the transport-independent part: one transfer's state machine (``KvSender`` /
``KvReceiver``); the transports are ``kv_transport_p2p``, ``kv_transport_grpc`` and, for tests,
``kv_transport_inproc``. What moves (``KvLayout``) and where it is read
and written (``KvSource`` / ``KvSink``, ``CacheKvSource`` / ``CacheKvSink`` over the paged cache) live
in ``kv_pages`` and are re-exported here.

What moves: for every layer, the MLA latent rows of a request's first ``num_tokens`` tokens, i.e.
``row_dim × dtype_size × num_layers × num_tokens`` bytes (``row_dim`` = kv_lora_rank +
qk_rope_head_dim = 576 for Kimi K2). Token t lives at slot
``block_ids[t // block_size] * block_size + t % block_size`` of ``kv_cache[layer].view(-1, row_dim)``.

Lifecycle of one transfer (either side):

1. A transport's ``start_send`` / ``start_receive`` builds the transfer and starts its daemon thread;
   the state is ``BOOTSTRAPPING`` while the two sides find each other.
2. ``TRANSFERRING`` once the data path is up; rows move layer by layer.
3. ``SUCCESS`` (the receiver has written and, if asked, verified every row, and reports it before it
   sends its acknowledgement; the sender has the acknowledgement) or ``FAILED`` with ``error`` saying
   why (peer gone, timed out waiting for X, checksum mismatch in layer L, cancelled).

The owner calls ``poll()`` from its loop: it never blocks, it only reads the state (and turns a
transfer whose thread overran its deadline into ``FAILED``). A thread blocks in ``wait()``; an event
loop awaits ``settled()``, which an ``on_done`` hook wakes the moment the transfer ends. ``cancel()``
makes a transfer ``FAILED`` at once (one that has succeeded stays so). After it returns, the transfer
never touches its source or sink again, so the caller may free the blocks. Its thread may still wait
out the call it is in, until the deadline at most. Every blocking call inside a transfer waits at
most until the transfer's deadline (``timeout_s`` after it started).

Checksums (optional): a CRC32 (``zlib.crc32``) of each layer's raw bytes, computed by the sender on
what it sends and by the receiver on what it received; a mismatch fails the transfer with
"checksum mismatch in layer L". Receivers accept an ``on_wire`` hook that sees each message's rows as
received (a layer, or with p2p one segment of it), before they are checked and written: the seam
tests use to corrupt bytes in flight. A p2p receive straight into the pages has written them already.

Injected faults (test-only, ``workers.fault_plan``): a sender takes a ``SendFault``: wait before
sending, fail after the handshake ("injected fault: dropped"), or flip one byte of layer 0 on the
wire after its checksum was computed (so a receiver with checksums on fails it).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from k2serve.workers.kv_pages import (
    DTYPE_CODES,
    DTYPE_NAMES,
    BufferPool,
    CacheKvSink,
    CacheKvSource,
    KvLayout,
    KvSink,
    KvSource,
    crc32,
    dtype_from_name,
    raw_bytes,
    slot_mapping,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DROPPED",
    "DTYPE_CODES",
    "DTYPE_NAMES",
    "NO_FAULT",
    "BufferPool",
    "CacheKvSink",
    "CacheKvSource",
    "KvLayout",
    "KvReceiver",
    "KvSender",
    "KvSink",
    "KvSource",
    "KvTransfer",
    "SendFault",
    "TransferError",
    "TransferState",
    "WireTap",
    "crc32",
    "dtype_from_name",
    "flip_one_byte",
    "raw_bytes",
    "slot_mapping",
]

logger = logging.getLogger(__name__)
DEFAULT_TIMEOUT_S = 30.0
# poll() fails a transfer whose thread is still running this long after its deadline (a call that
# ignored its bound); the thread itself normally fails first.
_OVERRUN_GRACE_S = 2.0


class TransferState(enum.Enum):
    BOOTSTRAPPING = "bootstrapping"
    TRANSFERRING = "transferring"
    SUCCESS = "success"
    FAILED = "failed"

    @property
    def done(self) -> bool:
        return self in (TransferState.SUCCESS, TransferState.FAILED)


class TransferError(RuntimeError):
    """Raised inside a transfer's thread; its message becomes the transfer's ``error``."""


WireTap = Callable[[int, torch.Tensor], None]  # (layer, rows as received) -> None; may modify rows in place
DROPPED = "injected fault: dropped"


@dataclass(frozen=True)
class SendFault:
    """The injected faults of one sender (all off by default; ``FaultInjector.next_kv_send``)."""

    delay_s: float = 0.0  # wait this long (cancellable, within the deadline) before sending
    drop: bool = False  # fail the transfer after the handshake, mid-data
    corrupt: bool = False  # flip one byte of layer 0 after its checksum, before it goes on the wire

    def wait(self, transfer: KvTransfer) -> None:
        """The delay, on the transfer's thread: bounded by its deadline, ended early by ``cancel()``."""
        if self.delay_s > 0:
            left = transfer._remaining("waiting out an injected send delay")
            if transfer._cancelled.wait(min(self.delay_s, left)):
                raise TransferError(transfer.error or "cancelled")

    def maybe_drop(self, layer: int, layout: KvLayout) -> None:
        """Fail mid-data: before the middle layer (the only one of a one-layer layout)."""
        if self.drop and layer == layout.num_layers // 2:
            raise TransferError(DROPPED)

    def tamper(self, layer: int, rows: torch.Tensor) -> None:
        """Flip the high byte of the first value of layer 0 (in place: ``rows`` is the sender's copy)."""
        if self.corrupt and layer == 0:
            flip_one_byte(rows)


NO_FAULT = SendFault()


def flip_one_byte(rows: torch.Tensor) -> None:
    """XOR the last byte of the first element of a contiguous tensor (the sign/exponent byte of a
    little-endian float): a change no model output survives unnoticed."""
    flat = rows.reshape(-1).view(torch.uint8)  # a view: rows is contiguous
    last = rows.element_size() - 1
    flat[last : last + 1].bitwise_xor_(0xFF)


class KvTransfer:
    """One transfer, run on its own daemon thread (``_run``, provided by the transport).

    The thread raises ``TransferError`` to fail; it calls ``_remaining(what)`` before every blocking
    call (which fails with "timed out after Ns <what>" past the deadline), ``_begin_transferring()``
    when the data path is up, ``_add_bytes(n)`` per layer moved, and touches the source or sink only
    inside ``with self._data():`` (which fails once cancelled).
    """

    def __init__(self, role: str, transfer_id: str, layout: KvLayout, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s: must be > 0, got {timeout_s}")
        self.role = role
        self.transfer_id = transfer_id
        self.layout = layout
        self.timeout_s = timeout_s
        self._lock = threading.Lock()  # guards the fields below
        self._data_lock = threading.Lock()  # held while the source/sink is touched; cancel() takes it
        self._done = threading.Event()
        self._cancelled = threading.Event()
        self._state = TransferState.BOOTSTRAPPING
        self._error: str | None = None
        self._bytes = 0
        self._phase = "starting"
        self._started = 0.0
        self._ended: float | None = None
        self._thread: threading.Thread | None = None
        self._callbacks: list[Callable[[KvTransfer], None]] = []
        self._done_hooks: list[Callable[[], None]] = []  # guarded by _lock; each called once, when _done is set

    # ---- owner side -----------------------------------------------------------------------------------

    def start(self) -> KvTransfer:
        """Start the thread (once; later calls do nothing)."""
        if self._thread is not None:
            return self
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._main, name=f"kv-{self.role}-{self.transfer_id}", daemon=True)
        self._thread.start()
        return self

    def add_done_callback(self, callback: Callable[[KvTransfer], None]) -> None:
        """Call ``callback(self)`` on the transfer's thread when it exits (set before ``start``)."""
        self._callbacks.append(callback)

    def on_done(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` once the transfer has ended (at once if it has), on whichever thread ends it (its
        own, or a ``cancel()`` or ``poll()`` caller's) and under its lock: ``hook`` must be quick and must
        not call back into the transfer."""
        with self._lock:
            if not self._done.is_set():
                self._done_hooks.append(hook)
                return
        hook()

    async def settled(self, timeout_s: float) -> TransferState:
        """``wait`` for an event loop: resumes as soon as the transfer ends (no polling) or after
        ``timeout_s``, and returns ``poll()`` (not done when the time ran out first)."""
        loop = asyncio.get_running_loop()
        ended = asyncio.Event()

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(ended.set)
            except RuntimeError:
                pass  # the loop is closed: nobody waits any more

        self.on_done(wake)
        try:
            async with asyncio.timeout(max(0.0, timeout_s)):
                await ended.wait()
        except TimeoutError:
            pass
        return self.poll()

    def poll(self) -> TransferState:
        """The current state; never blocks. A thread past its deadline (+ grace) is declared FAILED here
        and may not touch the source or sink again (``cancel()`` also waits out a write in progress)."""
        with self._lock:
            if not self._state.done and self._started and time.monotonic() > self._deadline() + _OVERRUN_GRACE_S:
                self._cancelled.set()
                self._fail_locked(f"timed out after {self.timeout_s:g}s {self._phase}")
            return self._state

    def wait(self, timeout_s: float | None = None) -> TransferState:
        """Block until the transfer ends or ``timeout_s`` passes (default: its own deadline + grace)."""
        limit = timeout_s if timeout_s is not None else self.timeout_s + _OVERRUN_GRACE_S
        self._done.wait(limit)
        return self.poll()

    def cancel(self, reason: str = "cancelled") -> None:
        """Fail now; when this returns the transfer no longer reads its source or writes its sink. A
        transfer that already succeeded is left alone (it touches neither any more; a receiver may
        still be sending its acknowledgement, which a cancel must not cut)."""
        with self._lock:
            if self._state is TransferState.SUCCESS:
                return
            self._cancelled.set()
            if not self._state.done:
                self._fail_locked(reason)
        self._on_cancel()
        with self._data_lock:
            pass  # a write in progress has finished; later ones see _cancelled

    @property
    def error(self) -> str | None:
        with self._lock:
            return self._error

    @property
    def bytes_moved(self) -> int:
        """Row bytes moved so far (headers and checksums not counted; a p2p receive straight into the
        pages with no checksum counts its layers when the last one lands)."""
        with self._lock:
            return self._bytes

    @property
    def seconds(self) -> float:
        """Start to end (or to now while running)."""
        with self._lock:
            if not self._started:
                return 0.0
            return (self._ended if self._ended is not None else time.monotonic()) - self._started

    # ---- thread side ----------------------------------------------------------------------------------

    def _run(self) -> None:
        raise NotImplementedError

    def _on_cancel(self) -> None:
        """Transport hook: let go of the connection, so the peer fails as soon as the transport allows."""

    def _main(self) -> None:
        try:
            self._run()
        except TransferError as exc:
            self._finish(str(exc))
        except Exception as exc:  # a bug or an unexpected library error: still end FAILED, with the reason
            self._finish(f"{type(exc).__name__}: {exc}")
        else:
            self._finish(None)
        for callback in self._callbacks:
            callback(self)

    def _succeed(self) -> None:
        """From the thread, before its last steps: the transfer's outcome is SUCCESS now (a receiver whose
        rows are all in, before it acknowledges them), unless it has failed already."""
        self._finish(None)

    def _finish(self, error: str | None) -> None:
        with self._lock:
            if self._state is TransferState.SUCCESS and error is not None:
                logger.warning("transfer %s: after it succeeded: %s", self.transfer_id, error)
            if not self._state.done:
                if error is None:
                    self._state = TransferState.SUCCESS
                    self._ended = time.monotonic()
                else:
                    self._fail_locked(error)
            self._set_done_locked()

    def _fail_locked(self, error: str) -> None:
        self._state = TransferState.FAILED
        self._error = error
        self._ended = time.monotonic()
        self._set_done_locked()

    def _set_done_locked(self) -> None:
        self._done.set()
        hooks, self._done_hooks = self._done_hooks, []
        for hook in hooks:
            hook()

    def _deadline(self) -> float:
        return self._started + self.timeout_s

    def _remaining(self, what: str) -> float:
        """Seconds left before the deadline (> 0); records ``what`` as the current phase."""
        if self._cancelled.is_set():
            raise TransferError(self.error or "cancelled")
        with self._lock:
            self._phase = what
        left = self._deadline() - time.monotonic()
        if left <= 0:
            raise TransferError(f"timed out after {self.timeout_s:g}s {what}")
        return left

    def _timed_out(self, what: str) -> TransferError:
        return TransferError(f"timed out after {self.timeout_s:g}s {what}")

    def _begin_transferring(self) -> None:
        with self._lock:
            if self._state is TransferState.BOOTSTRAPPING:
                self._state = TransferState.TRANSFERRING

    def _add_bytes(self, n: int) -> None:
        with self._lock:
            self._bytes += n

    @contextmanager
    def _data(self) -> Iterator[None]:
        with self._data_lock:
            if self._cancelled.is_set():
                raise TransferError(self.error or "cancelled")
            yield


class KvSender(KvTransfer):
    """The side that reads a ``KvSource`` (the prefill rank). SUCCESS = the receiver acknowledged every row."""


class KvReceiver(KvTransfer):
    """The side that writes a ``KvSink`` (the decode rank). SUCCESS = every row written (and verified)."""


def check_layouts(sender: KvLayout, receiver: KvLayout) -> None:
    if sender != receiver:
        raise TransferError(f"layout mismatch: sender has {sender.describe()}, receiver expects {receiver.describe()}")
