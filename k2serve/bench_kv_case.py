"""What both processes of ``k2serve bench kv-transfer`` share: a ``Case`` (model row, prompt length,
page layout, requests in flight), its ``Result``, the seeded paged cache each side builds for a case,
the CRC32 of a request's rows, ``ReadyRows`` (the no-copy source and sink) and ``await_transferring``
(a push's handshake done).

Lifecycle: pure values and helpers; the driver is ``bench_kv_transfer``, the decode-side process
``bench_kv_peer``.
"""

from __future__ import annotations

import statistics
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from k2serve.workers.block_pool import BlockPool
from k2serve.workers.kv_transfer import (
    CacheKvSource,
    KvLayout,
    KvTransfer,
    TransferState,
    dtype_from_name,
    raw_bytes,
)

HOST = "127.0.0.1"
SENDER, RECEIVER = "bench-prefill", "bench-decode"
PAGES = ("contiguous", "shuffled")


@dataclass(frozen=True)
class Case:
    model: str
    num_layers: int
    row_dim: int
    num_tokens: int
    dtype: str
    block_size: int
    pages: str = "shuffled"  # one of PAGES
    in_flight: int = 1  # requests handed over at once

    @property
    def layout(self) -> KvLayout:
        """One request's rows."""
        return KvLayout(self.num_layers, self.num_tokens, self.row_dim, dtype_from_name(self.dtype))

    @property
    def nbytes(self) -> int:
        """What one repetition moves: every request in flight."""
        return self.layout.nbytes * self.in_flight

    @property
    def blocks_per_request(self) -> int:
        return -(-self.num_tokens // self.block_size)

    @property
    def num_blocks(self) -> int:
        return self.blocks_per_request * self.in_flight + 16  # spare blocks, so ids are not simply 0..n


@dataclass(frozen=True)
class Result:
    case: Case
    seconds: dict[str, list[float]]  # method -> timed repetitions

    def gbs(self, method: str) -> float:
        return self.case.nbytes / statistics.median(self.seconds[method]) / 1e9


def paged_cache(case: Case, seed: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    """A random cache [L] × [num_blocks, block_size, row_dim] and each in-flight request's block ids: those a
    fresh ``BlockPool`` allocates (contiguous) or a random permutation of the blocks (shuffled)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (case.num_blocks, case.block_size, case.row_dim)
    cache = [torch.randn(shape, generator=gen).to(case.layout.dtype) for _ in range(case.num_layers)]
    needed = case.blocks_per_request
    if case.pages == "contiguous":
        pool = BlockPool(case.num_blocks, case.block_size)
        return cache, [pool.allocate(needed) for _ in range(case.in_flight)]
    ids = torch.randperm(case.num_blocks, generator=gen)[: needed * case.in_flight].tolist()
    return cache, [ids[k * needed : (k + 1) * needed] for k in range(case.in_flight)]


def rows_crc(cache: list[torch.Tensor], blocks: list[int], num_tokens: int) -> int:
    source = CacheKvSource(cache, blocks, num_tokens)
    crc = 0
    for layer in range(source.layout.num_layers):
        crc = zlib.crc32(raw_bytes(source.layer(layer)), crc)
    return crc


class ReadyRows:
    """A ``KvSource`` / ``KvSink`` without paging: layers are handed out as they are, writes dropped."""

    def __init__(self, layout: KvLayout) -> None:
        self.layout = layout
        self.device = torch.device("cpu")
        self._rows = torch.zeros(layout.num_tokens, layout.row_dim, dtype=layout.dtype)  # [N, D]

    def ready(self, layer: int, timeout_s: float) -> bool:
        return True

    def layer(self, index: int, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._rows

    def write(self, layer: int, first_token: int, rows: torch.Tensor) -> None:
        pass


def await_transferring(transfers: Sequence[KvTransfer], timeout_s: float) -> None:
    """Until every transfer of a push is past its handshake (the sender: answer, group and header out; the
    receiver: every receive posted and the header in), polling, bounded by ``timeout_s``. A serving
    push is there long before the prefill's last layer is written; the push is timed from there."""
    deadline = time.monotonic() + timeout_s
    for transfer in transfers:
        while (state := transfer.poll()) is TransferState.BOOTSTRAPPING:
            if time.monotonic() > deadline:
                raise RuntimeError(f"push: no handshake within {timeout_s:g}s")
            time.sleep(0.0005)
        if state is TransferState.FAILED:
            raise RuntimeError(f"push {transfer.role} failed before the rows were ready: {transfer.error}")
