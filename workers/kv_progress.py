"""Layer-by-layer progress of one prefill, so its KV transfer can start before the prefill ends.

A prefill rank that pushes a request's KV to a decode rank (``PrefillRequest.push_to``) sends layer
i as soon as the prefill's last forward has written layer i's latent rows, while layers i+1.. are
still being computed: the transfer overlaps compute (DESIGN.md §2; Splitwise's and Mooncake's
layer-wise transfer). ``LayerProgress`` is the hand-off point between the engine thread (writer)
and the transfer's thread (reader); ``ProgressKvSource`` is the ``KvSource`` over it.

Lifecycle of one ``LayerProgress`` (one request):

1. created by the service, handed to the engine with the request (``Engine.add_request(...,
   kv_progress=...)``) and to the sender (through a ``ProgressKvSource``);
2. ``begin(block_ids)``: the engine is about to run the forward that computes the prompt's last
   tokens (the final chunk); from now on the prompt's blocks are fixed (the request ends in that
   step: it cannot be preempted any more). Earlier chunks are not announced: a preempted request
   recomputes them into other blocks. ``on_begin`` (if set) runs then, on the engine's thread;
3. ``layer_done(i)`` after each layer of that forward, in order. On CUDA it records an event on the
   current stream: a reader makes its own stream wait on it, so it never reads rows the device has
   not written yet;
4. ``fail(reason)`` when the request ends any other way (aborted, its step failed, the group
   failed): every waiter raises ``TransferError`` with the reason. ``fail`` after the last layer is
   a no-op: the rows are complete and pinned.

Readers call ``wait(layer, timeout_s)`` (layer -1: until ``begin``): True once ready, False when
``timeout_s`` passed first (the caller checks its own deadline and cancel flag and waits again).
Timestamps (``done_at``) are kept for tests and metrics.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import torch

from k2serve.workers.kv_pages import CacheKvSource, KvLayout
from k2serve.workers.kv_transfer import TransferError


class LayerProgress:
    """Which layers of one prefill's final forward have written their rows (see the module docstring)."""

    def __init__(self, num_layers: int) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers: must be >= 1, got {num_layers}")
        self.num_layers = num_layers
        self._cond = threading.Condition()
        self._block_ids: tuple[int, ...] | None = None
        self._done = 0  # layers [0, _done) are written
        self._events: list[torch.cuda.Event] = []  # CUDA: one per written layer
        self._failure: str | None = None
        self.begun_at: float | None = None
        self.done_at: list[float] = []  # monotonic time each layer was written (host side)
        self.on_begin: Callable[[], object] | None = None  # called once on begin, on the engine's thread

    # ---- the engine's side ------------------------------------------------------------------------------

    def begin(self, block_ids: Sequence[int]) -> None:
        with self._cond:
            if self._block_ids is not None or self._failure is not None:
                return
            self._block_ids = tuple(block_ids)
            self.begun_at = time.monotonic()
            self._cond.notify_all()
        if self.on_begin is not None:
            self.on_begin()

    def layer_done(self, layer: int) -> None:
        event = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            event = torch.cuda.Event()
            event.record()  # on the engine's current stream, after the layer's cache write was queued
        with self._cond:
            if self._block_ids is None or self._failure is not None or layer != self._done:
                return  # not announced, failed, or out of order (a forward that did not begin): ignore
            if event is not None:
                self._events.append(event)
            self._done += 1
            self.done_at.append(time.monotonic())
            self._cond.notify_all()

    def fail(self, reason: str) -> None:
        with self._cond:
            if self._done < self.num_layers and self._failure is None:
                self._failure = reason
                self._cond.notify_all()

    # ---- the reader's side ------------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        with self._cond:
            return self._done == self.num_layers

    @property
    def block_ids(self) -> tuple[int, ...]:
        with self._cond:
            if self._block_ids is None:
                raise RuntimeError("block_ids: the prefill has not begun its last forward")
            return self._block_ids

    def wait(self, layer: int, timeout_s: float) -> bool:
        """True once ``layer`` is written (-1: once the blocks are known); False after ``timeout_s``;
        raises ``TransferError`` when the prefill failed first."""
        if not -1 <= layer < self.num_layers:
            raise ValueError(f"layer: expected -1..{self.num_layers - 1}, got {layer}")
        with self._cond:
            ready = self._cond.wait_for(lambda: self._failure is not None or self._ready(layer), max(0.0, timeout_s))
            if self._failure is not None and not self._ready(layer):
                raise TransferError(f"the prefill failed: {self._failure}")
            event = self._events[layer] if layer >= 0 and self._events else None
        if ready and event is not None:
            torch.cuda.current_stream().wait_event(event)
        return ready

    def _ready(self, layer: int) -> bool:
        return self._block_ids is not None if layer < 0 else self._done > layer


class ProgressKvSource:
    """A ``KvSource`` over a prefill still in progress: ``ready`` waits on its ``LayerProgress``; the
    rows are read from the paged cache once the blocks are known (``CacheKvSource``)."""

    def __init__(self, progress: LayerProgress, kv_cache: Sequence[torch.Tensor], num_tokens: int) -> None:
        if len(kv_cache) != progress.num_layers:
            raise ValueError(f"kv_cache: {len(kv_cache)} layers, the progress tracks {progress.num_layers}")
        first = kv_cache[0]
        self._progress = progress
        self._kv_cache = list(kv_cache)
        self._layout = KvLayout(len(kv_cache), num_tokens, first.shape[-1], first.dtype)
        self._pages: CacheKvSource | None = None

    @property
    def layout(self) -> KvLayout:
        return self._layout

    @property
    def device(self) -> torch.device:
        return self._kv_cache[0].device

    @property
    def progress(self) -> LayerProgress:
        return self._progress

    def ready(self, layer: int, timeout_s: float) -> bool:
        if not self._progress.wait(layer, timeout_s):
            return False
        if self._pages is None:
            self._pages = CacheKvSource(self._kv_cache, self._progress.block_ids, self._layout.num_tokens)
        return True

    @property
    def pages(self) -> CacheKvSource:
        if self._pages is None:
            raise RuntimeError("pages: call ready(-1) first")
        return self._pages

    def layer(self, index: int, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.pages.layer(index, out)
