"""``P2pKvSender``: the prefill rank's side of one p2p KV transfer (the protocol is in
``kv_transport_p2p``): it finds the receiver's offer, answers it, and sends every layer, straight from
the source's pages where the plan says so (``kv_segments``), else gathered into pooled buffers.

Lifecycle: built and started by ``P2pKvServer.start_send``; one transfer (``KvTransfer``).
"""

from __future__ import annotations

import json
import logging
import zlib
from collections import deque
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from k2serve.workers import kv_segments
from k2serve.workers.kv_p2p_link import (
    ACK_CHECKSUM,
    ACK_FAILED,
    ACK_OK,
    ANSWER_PREFIX,
    SLICE_S,
    STAGED_AHEAD,
    P2pTransfer,
    Tags,
    TransferRejected,
    first_line,
    generation_keys,
    header_values,
    is_answer_key,
    layout_from_json,
    recv_from,
    runs_json,
    send_to,
)
from k2serve.workers.kv_pages import PagedRows, paged_rows
from k2serve.workers.kv_pair_group import MAX_LANES, PairGroup, backend_kind
from k2serve.workers.kv_segments import Plan
from k2serve.workers.kv_transfer import (
    NO_FAULT,
    KvSender,
    KvSource,
    SendFault,
    TransferError,
    raw_bytes,
)

if TYPE_CHECKING:
    from k2serve.workers.kv_transport_p2p import P2pKvServer

logger = logging.getLogger(__name__)


class P2pKvSender(P2pTransfer, KvSender):
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
        self._threads = server.threads

    def _main(self) -> None:
        super()._main()  # the state is reported: what follows delays no one
        try:
            self._server.sweep.run_due()
        except Exception:  # never into the transport's thread
            logger.exception("transfer %s: sweeping the transfer store failed", self.transfer_id)

    def _run(self) -> None:
        self._fault.wait(self)
        server, rid = self._server, self._receiver_id
        kind = backend_kind(self._source.device)
        offer_text = self._await_offer(f"waiting for receiver {rid} to join the transfer")
        offer, theirs, problem = self._read_offer(offer_text)
        key = str(offer.get("answer"))  # the receiver lane's answer queue, checked by _read_offer
        pages: PagedRows | None = None
        if problem is None:
            try:  # a source that fails before the answer fails both sides at once and keeps the group
                self._await_ready(-1)
                pages = self._pages()
            except Exception as exc:
                problem = str(exc) if isinstance(exc, TransferError) else f"the source failed: {first_line(exc)}"
        if problem is not None:
            if is_answer_key(key):  # else the offer was not a receiver's: no one to tell
                server.store.queue_push(key, json.dumps({"transfer": self.transfer_id, "error": problem}))
            raise TransferRejected(problem)
        ours = kv_segments.advertised(pages.runs) if pages is not None else None
        plan = kv_segments.plan(ours, theirs, self.layout.num_tokens, self.layout.row_nbytes)
        lane = int(offer["lane"])  # checked by _read_offer
        slot = server.slot(rid, kind, lane)
        if not slot.lock.acquire(timeout=self._remaining(f"waiting for the previous transfer to {rid} on lane {lane}")):
            raise self._timed_out(f"waiting for the previous transfer to {rid} on lane {lane}")
        try:
            group = slot.usable()
            fresh = group is None or group.prefix != offer["cached"]
            if fresh:
                if slot.group is not None:
                    slot.drop(slot.group, "replaced")
                if slot.generation > 0:  # no transfer is in its rendezvous: both sides hold this lane
                    replaced = server.pair_prefix(rid, kind, lane, slot.generation)
                    server.sweep.later(generation_keys(replaced, kind), self.timeout_s)
                slot.generation += 1
                group = PairGroup(server.pair_prefix(rid, kind, lane, slot.generation), kind)
                slot.group = group
            assert group is not None
            seq = group.next_seq
            group.next_seq += 1
            answer = {"transfer": self.transfer_id, "prefix": group.prefix, "seq": seq, "runs": runs_json(ours)}
            server.store.queue_push(key, json.dumps(answer))
            self._group = group
            if fresh:
                if slot.store is None:
                    slot.store = server.connect_store(self._remaining("connecting to the transfer store"))
                self._join(slot, group, 0, server.host)
            try:
                self._send(seq, plan, pages if plan.sender_direct else None)
            except TransferRejected:
                raise  # both sides finished the protocol: the group is fine
            except Exception as exc:  # the peer may still be mid-protocol: this group cannot be trusted
                slot.drop(group, str(exc))
                raise
        finally:
            self._let_go()
            slot.lock.release()

    def _await_offer(self, what: str) -> bytes:
        """The receiver's offer, from the server's ``OfferInbox`` (in slices, so cancel() holds)."""
        while True:
            left = self._remaining(what)
            try:
                text = self._server.offers.take(self.transfer_id, min(SLICE_S, left))
            except RuntimeError as exc:
                raise TransferError(f"no offers can arrive while {what}: {first_line(exc)}") from exc
            if text is not None:
                return text
            if self._cancelled.is_set():
                raise TransferError(self.error or "cancelled")

    def _read_offer(self, text: bytes) -> tuple[dict[str, Any], kv_segments.Runs | None, str | None]:
        """(offer, the receiver's runs, the problem that rejects it or None). A bad offer comes back as
        parsed (or {}), so that its problem goes to the answer queue it names, if it names one."""
        offer: dict[str, Any] = {}
        try:
            parsed = json.loads(text)
            if not isinstance(parsed, dict):
                raise TypeError(f"offer: expected a JSON object, got {type(parsed).__name__}")
            offer = parsed
            if offer.get("receiver") != self._receiver_id:
                return (
                    offer,
                    None,
                    f"transfer {self.transfer_id} is for {self._receiver_id}, not {offer.get('receiver')!r}",
                )
            theirs = layout_from_json(offer["layout"])
            if theirs != self.layout:
                problem = f"layout mismatch: sender has {self.layout.describe()}, receiver expects {theirs.describe()}"
                return offer, None, problem
            if bool(offer["checksum"]) != self._checksum:
                return (
                    offer,
                    None,
                    f"checksum setting differs: sender {self._checksum}, receiver {bool(offer['checksum'])}",
                )
            if not isinstance(offer.get("cached"), str):
                raise TypeError(f"offer.cached: expected a group prefix or '', got {offer.get('cached')!r}")
            lane = offer.get("lane")
            if type(lane) is not int or not 0 <= lane < MAX_LANES:
                raise ValueError(f"offer.lane: expected an int in [0, {MAX_LANES}), got {lane!r}")
            if not is_answer_key(offer.get("answer")):
                raise ValueError(
                    f"offer.answer: expected {ANSWER_PREFIX} and 16 hex digits, got {offer.get('answer')!r}"
                )
            return offer, kv_segments.parse_runs(offer.get("runs"), self.layout.num_tokens, "offer.runs"), None
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            return offer, None, f"bad offer from {self._receiver_id}: {first_line(exc)}"

    def _await_ready(self, layer: int) -> None:
        """``source.ready(layer)`` in slices, so cancel() and the deadline hold while a prefill runs."""
        what = "waiting for the source's blocks" if layer < 0 else f"waiting for layer {layer} of the source"
        while not self._source.ready(layer, min(SLICE_S, self._remaining(what))):
            pass

    def _pages(self) -> PagedRows | None:
        """The source's pages when it may send from them (after ``ready(-1)``): not with a corrupt fault,
        whose flipped byte must land in a copy, never in the cache."""
        pages = paged_rows(self._source)
        if pages is None or self._fault.corrupt or pages.layout != self.layout:
            return None
        return pages

    def _send(self, seq: int, plan: Plan, pages: PagedRows | None) -> None:
        layout, device, segments = self.layout, self._source.device, plan.segments
        tags = Tags(seq, layout.num_layers)
        direct: list[list[torch.Tensor]] = []  # per layer, its segments' views of the cache (sent as they are)
        if pages is not None:  # built before any row is ready: a push has nothing but the sends left to do
            first_rows = pages.segment_rows(segments)
            direct = [
                [pages.segment(i, row, seg.count) for row, seg in zip(first_rows, segments, strict=True)]
                for i in range(layout.num_layers)
            ]
        header = self._small(header_values(layout, seq, plan), device)  # [6]
        ack = self._small([ACK_FAILED, -1], device)  # [status, layer]
        ack_work = self._post("posting the acknowledgement receive", recv_from(1, ack, tags.ack))
        # per layer in flight: its sends (work, what, bytes) and the staged buffer they read, if any
        in_flight: deque[tuple[list[tuple[dist.Work, str, int]], torch.Tensor | None]] = deque()
        in_flight.append(
            ([(self._post("sending the header", send_to(1, header, tags.header)), "sending the header", 0)], None)
        )
        self._begin_transferring()
        crcs: list[int] = []
        pool = self._server.buffers
        for i in range(layout.num_layers):
            self._fault.maybe_drop(i, layout)  # the group is dropped with it: the receiver fails at once
            self._await_ready(i)
            buffer = None
            with self._data():
                if pages is not None:  # views of the cache: sent as they are, no copy
                    pieces = direct[i]
                else:  # gathered while layer i-1 is in flight, sent in slices at the segments
                    buffer = pool.take(layout.num_tokens, layout.row_dim, layout.dtype, device)  # [>= N, D]
                    rows = self._source.layer(i, out=buffer[: layout.num_tokens])  # [N, D]
                    pieces = [rows[seg.first : seg.first + seg.count] for seg in segments]
            if self._checksum:
                crc = 0
                for piece in pieces:
                    crc = zlib.crc32(raw_bytes(piece), crc)
                crcs.append(crc)
            if buffer is not None:
                self._fault.tamper(i, pieces[0])  # after its checksum: what a bad link would do
            sends = []
            for j, piece in enumerate(pieces):
                what = f"sending layer {i}" if len(pieces) == 1 else f"sending layer {i} segment {j}"
                work = self._post(what, send_to(1, piece, tags.message(i, j)))
                sends.append((work, what, piece.shape[0] * layout.row_nbytes))
            in_flight.append((sends, buffer))
            while len(in_flight) > (layout.num_layers if pages is not None else STAGED_AHEAD):
                self._retire(*in_flight.popleft())
        if self._checksum:
            sums = self._small(crcs, device)  # [L]
            in_flight.append(
                ([(self._post("sending checksums", send_to(1, sums, tags.checksums)), "sending checksums", 0)], None)
            )
        if pages is not None:
            # Direct: no buffer waits to be given back, so wait for the acknowledgement first. gloo wakes a
            # pending receive when the peer goes, but not a send it was writing at that moment (that one
            # waits out the deadline); the receiver acknowledges only once every message is in, so then
            # every send has completed: they are counted, not waited for one by one.
            self._wait(ack_work, "waiting for the receiver's acknowledgement")
            self._add_bytes(sum(nbytes for sends, _ in in_flight for _, _, nbytes in sends))
            in_flight.clear()
        while in_flight:
            self._retire(*in_flight.popleft())
        if pages is None:
            self._wait(ack_work, "waiting for the receiver's acknowledgement")
        status, layer = (int(v) for v in ack.tolist())
        if status == ACK_CHECKSUM:
            raise TransferRejected(f"receiver reported checksum mismatch in layer {layer}")
        if status != ACK_OK:
            raise TransferError(f"receiver reported failure (status {status})")

    def _retire(self, sends: list[tuple[dist.Work, str, int]], buffer: torch.Tensor | None) -> None:
        for work, what, nbytes in sends:
            self._wait(work, what)
            self._add_bytes(nbytes)
        if buffer is not None:  # only finished sends give their buffer back; a failed one may still read it
            self._server.buffers.give(buffer)
