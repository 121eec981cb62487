"""The rows of one request in the paged KV cache, and the layout of what a KV transfer moves.

``KvLayout``: ``num_layers`` tensors of [num_tokens, row_dim] in one dtype (row_dim = kv_lora_rank +
qk_rope_head_dim, 576 for Kimi K2). ``PagedRows`` are those rows in a paged cache ``kv_cache[layer]``
of [num_blocks, block_size, row_dim], where token t is row ``t % block_size`` of block
``block_ids[t // block_size]``: gathered into or scattered from a contiguous [n, row_dim] tensor
(whole blocks in one ``index_select`` / ``index_copy_`` over the blocks seen as int64 words, memcpy
speed whatever the dtype; rows of a partly covered block as slices), or seen in place, a run of
consecutive blocks at a time (``segment``: what the p2p transport sends from and receives into
without a copy, see ``kv_segments``). ``CacheKvSource`` / ``CacheKvSink`` are a transfer's source and
sink over ``PagedRows``. ``BufferPool`` keeps layer-sized buffers for reuse across transfers;
``raw_bytes`` / ``crc32`` give a tensor's little-endian bytes and their CRC32.

Lifecycle: a source or sink is built per transfer, over blocks that the caller keeps pinned until
the transfer ends; it owns nothing.
"""

from __future__ import annotations

import array
import threading
import zlib
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate
from types import MappingProxyType
from typing import Protocol

import torch

from k2serve.workers.kv_segments import Runs, Segment, run_lengths

# Wire names of the cache dtypes (the KvHandle's ``dtype``) and their codes in the p2p header.
DTYPE_NAMES = MappingProxyType({torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"})
DTYPE_CODES = MappingProxyType({torch.float32: 0, torch.bfloat16: 1, torch.float16: 2})


def dtype_from_name(name: str) -> torch.dtype:
    for dtype, known in DTYPE_NAMES.items():
        if known == name:
            return dtype
    raise ValueError(f"kv dtype: expected one of {sorted(DTYPE_NAMES.values())}, got {name!r}")


@dataclass(frozen=True)
class KvLayout:
    """The shape of what one transfer moves: ``num_layers`` tensors of [num_tokens, row_dim] in ``dtype``."""

    num_layers: int
    num_tokens: int
    row_dim: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_tokens", "row_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"KvLayout.{name}: must be >= 1, got {getattr(self, name)}")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"KvLayout.dtype: expected one of {sorted(DTYPE_NAMES.values())}, got {self.dtype}")

    @property
    def element_size(self) -> int:
        return self.dtype.itemsize

    @property
    def row_nbytes(self) -> int:
        return self.row_dim * self.element_size

    @property
    def layer_nbytes(self) -> int:
        return self.num_tokens * self.row_nbytes

    @property
    def nbytes(self) -> int:
        """row_dim × dtype_size × num_layers × num_tokens."""
        return self.layer_nbytes * self.num_layers

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    def describe(self) -> str:
        return f"{self.num_layers} layers × {self.num_tokens} tokens × {self.row_dim} {self.dtype_name}"


class KvSource(Protocol):
    """Where a sender reads rows. ``layer(i)`` is a contiguous [num_tokens, row_dim] tensor on ``device``,
    a copy the caller may keep while the cache changes: ``out`` (contiguous [num_tokens, row_dim]) when
    given, else a fresh tensor.

    ``ready(layer, timeout_s)`` blocks until the rows of ``layer`` are final and may be read (layer -1:
    until the source's blocks are known): True when ready, False once ``timeout_s`` passed first (the
    caller checks its cancel flag and deadline, and asks again); it raises ``TransferError`` when they
    never will be (the prefill failed). A sender calls ``ready(i)`` before it reads layer i.

    A source may also expose ``pages`` (``PagedRows``, read only after ``ready(-1)``): the p2p transport
    then sends runs of consecutive blocks straight from the cache (``paged_rows``)."""

    @property
    def layout(self) -> KvLayout: ...
    @property
    def device(self) -> torch.device: ...
    def ready(self, layer: int, timeout_s: float) -> bool: ...
    def layer(self, index: int, out: torch.Tensor | None = None) -> torch.Tensor: ...


class KvSink(Protocol):
    """Where a receiver writes rows: ``rows`` [n, row_dim] are tokens [first_token, first_token + n) of ``layer``.
    A sink may also expose ``pages`` (``PagedRows``): the p2p transport then receives runs of consecutive
    blocks straight into the cache, without calling ``write`` for them (``paged_rows``)."""

    @property
    def layout(self) -> KvLayout: ...
    @property
    def device(self) -> torch.device: ...
    def write(self, layer: int, first_token: int, rows: torch.Tensor) -> None: ...


def slot_mapping(block_ids: Sequence[int], num_tokens: int, block_size: int, device: torch.device) -> torch.Tensor:
    """[num_tokens] int64: the cache slot of every token (block_ids[t // block_size] * block_size + t % block_size)."""
    needed = -(-num_tokens // block_size)
    if len(block_ids) < needed:
        raise ValueError(f"block_ids: {num_tokens} tokens need {needed} blocks of {block_size}, got {len(block_ids)}")
    blocks = torch.tensor(list(block_ids[:needed]), dtype=torch.int64)
    tokens = torch.arange(num_tokens, dtype=torch.int64)
    return (blocks[tokens // block_size] * block_size + tokens % block_size).to(device)


def _check_cache(kv_cache: Sequence[torch.Tensor]) -> tuple[int, int, int]:
    """-> (num_blocks, block_size, row_dim); every layer [num_blocks, block_size, row_dim], same dtype/device."""
    if not kv_cache:
        raise ValueError("kv_cache: no layers")
    first = kv_cache[0]
    if first.dim() != 3:
        raise ValueError(f"kv_cache[0]: expected [num_blocks, block_size, row_dim], got {tuple(first.shape)}")
    for i, layer in enumerate(kv_cache):
        if layer.shape != first.shape or layer.dtype != first.dtype or layer.device != first.device:
            raise ValueError(f"kv_cache[{i}]: {tuple(layer.shape)} {layer.dtype} {layer.device} differs from layer 0")
        if not layer.is_contiguous():
            raise ValueError(f"kv_cache[{i}]: must be contiguous")
    num_blocks, block_size, row_dim = first.shape
    return num_blocks, block_size, row_dim


def _packed_ids(block_ids: list[int], num_blocks: int) -> array.array[int]:
    """The ids as int64 words, every one checked to be in range. Plain Python and ``array``: a request's
    source and sink are built for every transfer, and a few torch ops on tiny tensors cost more (0.2-0.4
    ms on a busy 2-core host) than a small transfer's own bytes."""
    try:
        packed = array.array("q", block_ids)
    except (OverflowError, TypeError) as exc:
        raise ValueError(f"block_ids: expected ints in [0, {num_blocks}): {exc}") from exc
    if packed and (min(packed) < 0 or max(packed) >= num_blocks):
        bad = [b for b in block_ids if not 0 <= b < num_blocks]
        raise ValueError(f"block_ids: {bad[:4]} outside [0, {num_blocks})")
    return packed


def _as_words(cache: torch.Tensor, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two [B, block_size, D] tensors as [B, words] each: blocks as int64 words, so index_copy_ /
    index_select move whole blocks at memcpy speed whatever the dtype (bf16 rows one by one are 2-3×
    slower); as [B, block_size × D] in their dtype when the bytes do not allow it."""
    flat_cache, flat_blocks = cache.reshape(cache.shape[0], -1), blocks.reshape(blocks.shape[0], -1)  # views
    try:
        return flat_cache.view(torch.int64), flat_blocks.view(torch.int64)
    except RuntimeError:  # a block's bytes are not a multiple of 8, or a start is not 8-byte aligned
        return flat_cache, flat_blocks


class PagedRows:
    """The rows of one request in the paged cache, tokens [0, num_tokens): whole blocks, then the rows of
    the last, partly filled block. Token t is row t % block_size of block block_ids[t // block_size]."""

    def __init__(self, kv_cache: Sequence[torch.Tensor], block_ids: Sequence[int], num_tokens: int) -> None:
        num_blocks, self.block_size, row_dim = _check_cache(kv_cache)
        self.layout = KvLayout(len(kv_cache), num_tokens, row_dim, kv_cache[0].dtype)
        needed = -(-num_tokens // self.block_size)
        if len(block_ids) < needed:
            raise ValueError(f"block_ids: {num_tokens} tokens need {needed} blocks of {self.block_size}")
        self.kv = list(kv_cache)  # [L] of [num_blocks, block_size, D]
        self.block_ids = list(block_ids[:needed])
        self._packed = _packed_ids(self.block_ids, num_blocks)
        self.runs: Runs = run_lengths(self.block_ids, num_tokens, self.block_size)

    @cached_property
    def blocks(self) -> torch.Tensor:
        """[blocks] int64 on the cache's device: the ids, for a gather or scatter (a direct transfer never
        needs them)."""
        host = torch.frombuffer(self._packed, dtype=torch.int64) if self._packed else torch.empty(0, dtype=torch.int64)
        return host.to(self.device)

    @property
    def device(self) -> torch.device:
        return self.kv[0].device

    def slot(self, token: int) -> int:
        """Token ``token``'s row in ``kv_cache[layer].view(-1, row_dim)``."""
        return self.block_ids[token // self.block_size] * self.block_size + token % self.block_size

    def segment_rows(self, segments: Sequence[Segment]) -> list[int]:
        """The first cache row of every segment; ValueError if one is not inside one run of these blocks."""
        ends = list(accumulate(self.runs))  # token after each run
        rows = []
        for seg in segments:
            run = bisect_right(ends, seg.first)  # the run holding token seg.first
            if not (0 <= seg.first and seg.count > 0 and run < len(ends) and seg.first + seg.count <= ends[run]):
                raise ValueError(f"segment [{seg.first}, {seg.first + seg.count}): not one run of these blocks")
            rows.append(self.slot(seg.first))
        return rows

    def segment(self, layer: int, first_row: int, count: int) -> torch.Tensor:
        """[count, D] rows of ``layer`` from cache row ``first_row`` on: a contiguous view, no copy."""
        cache = self.kv[layer]
        return cache.view(-1, cache.shape[-1])[first_row : first_row + count]

    def gather(self, layer: int, out: torch.Tensor) -> None:
        """out [N, D] <- the request's rows of ``layer``."""
        n, bs, d = self.layout.num_tokens, self.block_size, self.layout.row_dim
        full = n // bs
        cache = self.kv[layer]
        if full:
            cache_words, head_words = _as_words(cache, out[: full * bs].view(full, bs, d))  # [blocks, words]
            torch.index_select(cache_words, 0, self.blocks[:full], out=head_words)
        if n % bs:
            out[full * bs :].copy_(cache[self.block_ids[full], : n % bs])

    def scatter(self, layer: int, first_token: int, rows: torch.Tensor) -> None:
        """The request's rows [first_token, first_token + n) of ``layer`` <- rows [n, D]."""
        bs, d = self.block_size, self.layout.row_dim
        cache = self.kv[layer]
        t, end = first_token, first_token + rows.shape[0]
        while t < end and (t % bs or end - t < bs):  # a partial block at the start (or the only one)
            stop = min(end, (t // bs + 1) * bs)
            cache[self.block_ids[t // bs], t % bs : t % bs + stop - t].copy_(rows[t - first_token : stop - first_token])
            t = stop
        full = (end - t) // bs
        if full:
            ids = self.blocks[t // bs : t // bs + full]
            chunk = rows[t - first_token : t - first_token + full * bs].view(full, bs, d)  # [full, bs, D]
            cache_words, chunk_words = _as_words(cache, chunk)  # [blocks, words]
            cache_words.index_copy_(0, ids, chunk_words)
            t += full * bs
        if t < end:  # a partial block at the end
            cache[self.block_ids[t // bs], : end - t].copy_(rows[t - first_token :])


class _PagedSide:
    """What a source and a sink over one request's ``PagedRows`` share."""

    def __init__(self, kv_cache: Sequence[torch.Tensor], block_ids: Sequence[int], num_tokens: int) -> None:
        self._rows = PagedRows(kv_cache, block_ids, num_tokens)

    @property
    def layout(self) -> KvLayout:
        return self._rows.layout

    @property
    def device(self) -> torch.device:
        return self._rows.device


class CacheKvSource(_PagedSide):
    """Reads a request's rows out of the paged cache, whole blocks at a time; the p2p transport sends runs
    of consecutive blocks straight from ``pages``.

    Every page access goes through the ``pages`` property. A subclass that learns its blocks only later
    (a prefill still running) overrides ``pages`` (read only after ``ready(-1)`` returned True), ``ready``
    (this one is always ready), and ``layout`` / ``device`` (needed before ``ready(-1)``); it need not
    call ``__init__``."""

    @property
    def pages(self) -> PagedRows:
        return self._rows

    def ready(self, layer: int, timeout_s: float) -> bool:
        return True

    def layer(self, index: int, out: torch.Tensor | None = None) -> torch.Tensor:
        n, d = self.layout.num_tokens, self.layout.row_dim
        if out is None:
            out = torch.empty(n, d, dtype=self.layout.dtype, device=self.device)
        elif out.shape != (n, d) or out.dtype != self.layout.dtype or not out.is_contiguous():
            raise ValueError(f"out: expected contiguous [{n}, {d}] {self.layout.dtype}, got {tuple(out.shape)}")
        self.pages.gather(index, out)
        return out  # [N, D]


class CacheKvSink(_PagedSide):
    """Writes rows into a request's blocks of the paged cache, whole blocks at a time where it can."""

    @property
    def pages(self) -> PagedRows | None:
        """What the p2p transport receives runs of consecutive blocks into, without calling ``write``; a
        subclass that must see every row through ``write`` returns None."""
        return self._rows

    def write(self, layer: int, first_token: int, rows: torch.Tensor) -> None:
        layout, n = self.layout, rows.shape[0]
        if rows.dim() != 2 or rows.shape[1] != layout.row_dim or rows.dtype != layout.dtype:
            raise ValueError(
                f"rows: expected [n, {layout.row_dim}] {layout.dtype}, got {tuple(rows.shape)} {rows.dtype}"
            )
        if not 0 <= first_token <= first_token + n <= layout.num_tokens or not 0 <= layer < layout.num_layers:
            raise ValueError(
                f"write: layer {layer} tokens [{first_token}, {first_token + n}) outside {layout.describe()}"
            )
        self._rows.scatter(layer, first_token, rows.to(self.device).contiguous())


def paged_rows(side: object) -> PagedRows | None:
    """The ``PagedRows`` a source or sink exposes as ``pages`` (a wrapper's ``pages`` may be a Cache
    source or sink: its own pages are taken), or None: the side has no pages and is staged."""
    pages = getattr(side, "pages", None)
    if isinstance(pages, (CacheKvSource, CacheKvSink)):
        pages = pages.pages
    return pages if isinstance(pages, PagedRows) else None


class BufferPool:
    """Reusable layer-sized buffers (first-touch page faults of fresh 20-40 MB tensors cost more than the
    copy into them). ``take`` returns a base tensor with at least ``rows`` rows (use ``[:rows]``); ``give``
    returns it once nothing (no pending send or receive) uses it any more. Keeps at most
    ``max_free_bytes`` of free buffers, dropping the largest first."""

    def __init__(self, max_free_bytes: int = 512 * 1024 * 1024) -> None:
        self.max_free_bytes = max_free_bytes
        self._lock = threading.Lock()
        self._free: list[torch.Tensor] = []

    def take(self, rows: int, row_dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        with self._lock:
            fits = [
                i
                for i, t in enumerate(self._free)
                if t.shape[0] >= rows and t.shape[1] == row_dim and t.dtype == dtype and t.device == device
            ]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i].shape[0]))
        capacity = -(-rows // 1024) * 1024  # round up, so nearby prompt lengths share buffers
        return torch.empty(capacity, row_dim, dtype=dtype, device=device)

    def give(self, buffer: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buffer)
            self._free.sort(key=lambda t: t.numel() * t.element_size())
            while sum(t.numel() * t.element_size() for t in self._free) > self.max_free_bytes:
                self._free.pop()

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return sum(t.numel() * t.element_size() for t in self._free)


def raw_bytes(rows: torch.Tensor) -> memoryview:
    """The little-endian bytes of a host tensor, without a copy when it is contiguous (uint8 view: no
    numpy dtype is needed for bfloat16)."""
    host = rows.detach().contiguous().cpu()
    return host.reshape(-1).view(torch.uint8).numpy().data


def crc32(rows: torch.Tensor) -> int:
    return zlib.crc32(raw_bytes(rows))
