"""The fallback KV transport: the gRPC ``Worker.PullKv`` server stream (no torch.distributed needed).

Lifecycle: the decode rank's ``GrpcKvReceiver`` calls ``PullKv(lease_id)`` on the prefill rank, with
the transfer's deadline as the call's deadline. The prefill rank's servicer answers with
``kv_chunks(source)``: layer by layer, each layer's [num_tokens, row_dim] rows cut into chunks of at
most ``max_chunk_bytes``. ``KvChunk.data`` is the rows' raw little-endian bytes in the cache dtype
(bfloat16 included: the bytes come from a uint8 view of the tensor, never from a numpy bf16 array),
and ``crc32`` is the CRC32 of ``data`` when checksums are on. The receiver writes every chunk into its
sink as it arrives. Chunks must come in order: layer 0 rows 0.. to the last layer's last row,
without gaps or overlaps. Anything else (a gap, a repeat, an extra chunk, a stream that ends early)
fails the transfer, and so does a checksum mismatch or a gRPC error. The servicer releases the
lease when the receiver calls ``ReleaseKv``; that is not this module's job.

The default chunk stays below gRPC's default 4 MiB message limit, so peers need no channel options.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import torch

from k2serve.proto import worker_pb2, worker_pb2_grpc
from k2serve.proto.cluster_token import authorized
from k2serve.workers.kv_transfer import (
    DEFAULT_TIMEOUT_S,
    NO_FAULT,
    KvReceiver,
    KvSink,
    KvSource,
    SendFault,
    TransferError,
    WireTap,
    raw_bytes,
)

# Data of one chunk: under gRPC's default 4 MiB receive limit, leaving room for the other fields.
DEFAULT_MAX_CHUNK_BYTES = 4 * 1024 * 1024 - 4096
_CHANNEL_MAX_MESSAGE = 64 * 1024 * 1024  # the receiver's own channel accepts senders with larger chunks

StubFactory = Callable[[], Any]  # () -> worker_pb2_grpc.WorkerStub (generated code is untyped)


def _require_little_endian() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("KvChunk.data is little-endian; this host is big-endian")


def kv_chunks(
    source: KvSource,
    *,
    checksum: bool = False,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    fault: SendFault = NO_FAULT,
) -> Iterator[worker_pb2.KvChunk]:
    """The chunks of ``source``, layer by layer; a layer is gathered once, then cut into chunks.
    ``fault`` (tests only): ``drop`` raises ``TransferError`` before the middle layer, ``corrupt`` flips a
    byte of layer 0's first chunk after its CRC; its delay is the caller's to wait (it owns the event loop)."""
    _require_little_endian()
    layout = source.layout
    rows_per_chunk = max(1, max_chunk_bytes // layout.row_nbytes)
    for layer in range(layout.num_layers):
        fault.maybe_drop(layer, layout)
        rows = source.layer(layer).cpu()  # [N, D] contiguous (no copy on a CPU cache)
        for first in range(0, layout.num_tokens, rows_per_chunk):
            n = min(rows_per_chunk, layout.num_tokens - first)
            piece = rows[first : first + n]  # [n, D]
            data = bytes(raw_bytes(piece))  # n × row_nbytes bytes
            crc = zlib.crc32(data) if checksum else 0
            if fault.corrupt and first == 0:
                piece = piece.clone()
                fault.tamper(layer, piece)  # after the CRC: what a bad link would do
                data = bytes(raw_bytes(piece))
            yield worker_pb2.KvChunk(layer=layer, first_token=first, rows=n, data=data, crc32=crc)


class GrpcKvReceiver(KvReceiver):
    """Pulls lease ``lease_id`` from ``target`` (a ``host:port`` of the prefill rank's Worker service, or
    a factory returning a ``WorkerStub`` on a channel the caller owns) into ``sink``.

    Runs on its own thread from construction (``autostart=False`` leaves that to ``start()``).
    ``on_wire`` sees each chunk's rows before they are checked and written (tests corrupt bytes there).
    """

    def __init__(
        self,
        target: str | StubFactory,
        lease_id: str,
        sink: KvSink,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        checksum: bool = False,
        *,
        on_wire: WireTap | None = None,
        autostart: bool = True,
        cluster_token: str | None = None,
    ) -> None:
        super().__init__("grpc-receiver", lease_id, sink.layout, timeout_s)
        self._target, self._lease_id, self._sink = target, lease_id, sink
        self._checksum, self._on_wire = checksum, on_wire
        self._cluster_token = cluster_token  # for a channel of its own (a ``host:port`` target)
        self._call: Any = None  # the PullKv call, for cancel()
        if autostart:
            self.start()

    def _run(self) -> None:
        _require_little_endian()
        channel: grpc.Channel | None = None
        if isinstance(self._target, str):
            options = [("grpc.max_receive_message_length", _CHANNEL_MAX_MESSAGE)]
            channel = grpc.insecure_channel(self._target, options=options)
            stub: Any = authorized(worker_pb2_grpc.WorkerStub(channel), self._cluster_token)
        else:
            stub = self._target()
        where = "opening PullKv"
        try:
            self._call = stub.PullKv(worker_pb2.PullKvRequest(lease_id=self._lease_id), timeout=self._remaining(where))
            if self._cancelled.is_set():
                self._call.cancel()
            cursor = _Cursor(self)
            for chunk in self._call:
                where = cursor.receive(chunk)
            cursor.finish()
        except grpc.RpcError as exc:
            raise self._rpc_error(exc, where) from exc
        finally:
            if channel is not None:
                channel.close()

    def _rpc_error(self, exc: grpc.RpcError, where: str) -> TransferError:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        if self._cancelled.is_set():
            return TransferError(self.error or "cancelled")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return self._timed_out(f"{where} (PullKv deadline)")
        return TransferError(f"PullKv failed while {where}: {code.name if code else 'error'}: {details}")

    def _on_cancel(self) -> None:
        call = self._call
        if call is not None:
            call.cancel()

    def _write(self, chunk: worker_pb2.KvChunk) -> None:
        layout = self.layout
        rows = torch.empty(chunk.rows, layout.row_dim, dtype=layout.dtype)  # [n, D]
        raw_bytes(rows)[:] = chunk.data  # one copy, into the uint8 view of rows
        if self._on_wire is not None:
            self._on_wire(chunk.layer, rows)
        if self._checksum and zlib.crc32(raw_bytes(rows)) != chunk.crc32:
            raise TransferError(
                f"checksum mismatch in layer {chunk.layer} (rows {chunk.first_token}..{chunk.first_token + chunk.rows})"
            )
        with self._data():
            self._sink.write(chunk.layer, chunk.first_token, rows)
        self._add_bytes(len(chunk.data))


class _Cursor:
    """Where the stream must be next: (layer, first_token); checks each chunk against the layout."""

    def __init__(self, receiver: GrpcKvReceiver) -> None:
        self.receiver = receiver
        self.layout = receiver.layout
        self.layer = 0
        self.token = 0

    def receive(self, chunk: worker_pb2.KvChunk) -> str:
        """Check and write one chunk; returns what the stream is waiting for next."""
        layout, n = self.layout, chunk.rows
        if self.layer == layout.num_layers:
            raise TransferError(f"extra rows: chunk for layer {chunk.layer} after all {layout.num_layers} layers")
        if chunk.layer != self.layer or chunk.first_token != self.token:
            if chunk.layer < self.layer or (chunk.layer == self.layer and chunk.first_token < self.token):
                raise TransferError(
                    f"extra rows: layer {chunk.layer} rows from {chunk.first_token} again "
                    f"(expected layer {self.layer} from row {self.token})"
                )
            raise TransferError(f"missing rows: layer {self.layer} rows {self.token}..{layout.num_tokens} never came")
        if n < 1 or self.token + n > layout.num_tokens:
            raise TransferError(
                f"extra rows: chunk of {n} rows at {self.token} in layer {self.layer} of {layout.num_tokens} tokens"
            )
        if len(chunk.data) != n * layout.row_nbytes:
            raise TransferError(
                f"chunk of layer {self.layer} has {len(chunk.data)} bytes, expected {n} rows × {layout.row_nbytes}"
            )
        self.receiver._begin_transferring()
        self.receiver._write(chunk)
        self.token += n
        if self.token == layout.num_tokens:
            self.layer, self.token = self.layer + 1, 0
        return f"receiving layer {self.layer} from row {self.token}"

    def finish(self) -> None:
        if self.layer < self.layout.num_layers:
            raise TransferError(
                f"missing rows: the stream ended at layer {self.layer} row {self.token} "
                f"({self.layout.num_layers} layers × {self.layout.num_tokens} tokens expected)"
            )
