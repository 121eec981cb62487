"""``P2pKvReceiver``: the decode rank's side of one p2p KV transfer (the protocol is in
``kv_transport_p2p``): it offers, waits for the answer, and receives every layer, straight into the
sink's pages where the plan says so (``kv_segments``), else into pooled buffers it scatters from. Its
posted receives go through a ``ReceiveFence``: once it is FAILED (``cancel()``, its own failure, or a
``poll()`` past the deadline), none of them writes the sink any more.

Lifecycle: built and started by ``P2pKvClient.start_receive``; one transfer (``KvTransfer``).
"""

from __future__ import annotations

import datetime
import json
import time
import zlib
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from k2serve.workers import kv_segments
from k2serve.workers.kv_offer_inbox import OFFERS_KEY
from k2serve.workers.kv_p2p_link import (
    ACK_CHECKSUM,
    ACK_OK,
    STAGED_AHEAD,
    TRIM_EVERY,
    P2pTransfer,
    Tags,
    TransferRejected,
    first_line,
    forget_waiters,
    header_values,
    layout_json,
    new_answer_key,
    recv_from,
    runs_json,
    send_to,
)
from k2serve.workers.kv_pages import PagedRows, paged_rows
from k2serve.workers.kv_pair_group import PairGroup, PairSlot, backend_kind
from k2serve.workers.kv_receive_fence import FenceClosed, ReceiveFence
from k2serve.workers.kv_segments import Plan
from k2serve.workers.kv_transfer import KvReceiver, KvSink, TransferError, TransferState, WireTap, raw_bytes
from k2serve.workers.parallel import Rendezvous

if TYPE_CHECKING:
    from k2serve.workers.kv_transport_p2p import P2pKvClient


class P2pKvReceiver(P2pTransfer, KvReceiver):
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
        self._fence = ReceiveFence(backend_kind(sink.device), peer_rank=0)
        self._threads = client.threads
        self._answer_key: str | None = None  # while the thread waits for the answer (guarded by _lock)
        self._wake = json.dumps({"wake": transfer_id}).encode()  # what cancel() pushes to end that wait
        self._slot: PairSlot | None = None  # the lane this transfer holds

    def poll(self) -> TransferState:
        """As ``KvTransfer.poll``; a transfer reported FAILED has no receive left that may write its sink."""
        state = super().poll()
        if state is TransferState.FAILED:
            self._fence.close()  # at once, and only if a receive is still posted (a cancel() in progress)
        return state

    def _on_cancel(self) -> None:
        self._fence.drain()  # before the group goes: the thread may still finish its receives on it
        super()._on_cancel()
        with self._lock:
            key = self._answer_key
        if key is not None:  # the thread is (or is about to be) blocked on the answer: wake it
            self._threads.run(lambda: self._client.push(self._rendezvous, key, self._wake))

    def _await_answer(self, slot: PairSlot, what: str) -> dict[str, Any]:
        """This transfer's answer, popped from the lane's answer queue on the lane's answer connection
        (both this transfer's while it holds the lane) in blocking waits up to the deadline: c10d logs a
        warning at every pop that times out, so no slices. ``cancel()`` ends the wait at once by pushing
        this transfer's wake-up onto the queue from a connection of its own.

        The queue is the lane's, not the transfer's: c10d's store server never forgets a queue (about
        830 bytes each), so a queue per transfer grew the prefill rank by that much per transfer. What an
        earlier transfer of the lane left there (an answer that came after its receiver gave up, a
        wake-up that crossed its answer) is popped and dropped here: every message names its transfer.
        The server also keeps every connection that ever waited on a queue among its waiters, and may
        wake it with nothing to pop: the pop then waits again. That is why the lane keeps this
        connection for answers alone: the group's rendezvous, on ``slot.store``, cannot wait again."""
        store, key = slot.answers, slot.answer_key
        assert store is not None
        with self._lock:
            self._answer_key = key
        try:
            while True:
                left = self._remaining(what)  # after the key is set: a cancel() from here on wakes the pop
                store.set_timeout(datetime.timedelta(seconds=left))
                try:
                    text = store.queue_pop(key, block=True)
                except dist.QueueEmptyError:
                    continue  # a wake-up with nothing to pop (above): bounded by the deadline
                slot.answers_popped += 1
                message = _message(text)
                if message.get("wake") == self.transfer_id:
                    raise TransferError(self.error or "cancelled")
                if message.get("transfer") == self.transfer_id:
                    break
        except TransferError:
            raise
        except RuntimeError as exc:
            says_timeout = "timeout" in str(exc).lower()
            raise self._failed_wait(what, says_timeout, f"store unreachable while {what}: {first_line(exc)}") from exc
        finally:
            with self._lock:
                self._answer_key = None
        if slot.answers_popped >= TRIM_EVERY:
            slot.answers_popped = 0
            try:
                forget_waiters(store, key)  # not waiting now, and the lane's only waiter
            except RuntimeError:
                pass  # housekeeping only: the answer is in, and the store shows its state to the next step
        return message

    def _run(self) -> None:
        sid = self._sender_id
        kind = backend_kind(self._sink.device)
        lanes = self._client.lanes(self._rendezvous, sid, kind)
        taken = lanes.acquire(self._remaining(f"waiting for a free lane from {sid}"))
        if taken is None:
            raise self._timed_out(f"waiting for a free lane from {sid}")
        lane, slot = taken
        self._slot = slot
        finished = False
        try:
            reaching = f"reaching the transfer store at {self._rendezvous}"
            if slot.store is None:
                slot.store = self._client.connect_store(self._rendezvous, self._remaining(reaching))
            if slot.answers is None:
                slot.answers = self._client.connect_store(self._rendezvous, self._remaining(reaching))
                slot.answer_key = new_answer_key()
            cached = slot.usable()
            pages = paged_rows(self._sink)
            if pages is not None and pages.layout != self.layout:
                pages = None
            ours = kv_segments.advertised(pages.runs) if pages is not None else None
            offer = {
                "transfer": self.transfer_id,
                "receiver": self._client.worker_id,
                "lane": lane,
                "cached": cached.prefix if cached is not None else "",
                "layout": layout_json(self.layout),
                "checksum": self._checksum,
                "runs": runs_json(ours),
                "answer": slot.answer_key,
            }
            slot.store.queue_push(OFFERS_KEY, json.dumps(offer))
            try:
                answer = self._await_answer(slot, f"waiting for sender {sid} to answer")
            except TransferError:
                self._withdraw(slot.store)
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
                theirs = kv_segments.parse_runs(answer.get("runs"), self.layout.num_tokens, "answer.runs")
                plan = kv_segments.plan(theirs, ours, self.layout.num_tokens, self.layout.row_nbytes)
                self._receive(int(answer["seq"]), plan, pages if plan.receiver_direct else None)
            except TransferRejected:
                raise  # both sides finished the protocol: the group is fine
            except Exception as exc:  # e.g. the sink raised: the sender is still mid-protocol
                self._fence.settle()  # no posted receive writes the sink once this transfer is FAILED
                slot.drop(group, str(exc))
                if isinstance(exc, FenceClosed):
                    raise TransferError(self.error or "cancelled") from exc
                raise
            finished = True
        except TransferRejected:
            finished = True  # the sender ended the protocol too (a rejection, a checksum verdict)
            raise
        finally:
            self._let_go()
            if not finished:  # the sender may still hold its side of the lane, up to its deadline
                slot.avoid_until = time.monotonic() + self.timeout_s
            lanes.release(slot)
            slot.acknowledging = False  # after the release: a transfer waiting for this lane takes it at once

    def _succeed(self) -> None:
        slot = self._slot
        if slot is not None:  # the pair's next transfer waits for this lane (ACK_WAIT_S) rather than open one
            slot.acknowledging = True
        super()._succeed()

    def _withdraw(self, store: dist.Store) -> None:
        """Take back an offer no sender took (best effort: the store may be gone too)."""
        try:
            store.queue_push(OFFERS_KEY, json.dumps({"withdraw": self.transfer_id}))
        except RuntimeError:
            pass

    def _post_receive(self, what: str, target: torch.Tensor, tag: int) -> dist.Work:
        group = self._group
        if group is None or group.backend is None:
            raise TransferError(f"{what}: no pair group")
        backend = group.backend
        return self._fence.post(backend, lambda: self._post(what, recv_from(0, target, tag)))

    def _receive(self, seq: int, plan: Plan, pages: PagedRows | None) -> None:
        layout, device, segments = self.layout, self._sink.device, plan.segments
        tags = Tags(seq, layout.num_layers)
        first_rows = pages.segment_rows(segments) if pages is not None else []
        header = self._small([0] * 6, device)
        header_work = self._post_receive("receiving the header", header, tags.header)
        pool, n = self._client.buffers, layout.num_tokens
        bases = (
            [pool.take(n, layout.row_dim, layout.dtype, device) for _ in range(STAGED_AHEAD)] if pages is None else []
        )
        buffers = [base[:n] for base in bases]  # [N, D] each: staged layer i arrives in buffers[i % 2]

        def post_layer(i: int) -> list[tuple[dist.Work, torch.Tensor]]:
            if pages is not None:  # straight into the cache
                targets = [pages.segment(i, row, seg.count) for row, seg in zip(first_rows, segments, strict=True)]
            else:
                buffer = buffers[i % STAGED_AHEAD]
                targets = [buffer[seg.first : seg.first + seg.count] for seg in segments]
            what = f"receiving layer {i}"
            return [(self._post_receive(what, t, tags.message(i, j)), t) for j, t in enumerate(targets)]

        ahead = layout.num_layers if pages is not None else STAGED_AHEAD
        posted = {i: post_layer(i) for i in range(min(ahead, layout.num_layers))}  # with the header
        self._wait_receive(header_work, "waiting for the header")
        expected = header_values(layout, seq, plan)
        if header.tolist() != expected:
            raise TransferError(f"header mismatch: got {header.tolist()}, expected {expected}")  # breaks the group
        self._begin_transferring()
        ack = self._small([ACK_OK, -1], device)  # [status, layer]: the verdict once every row is in
        crcs: list[int] = []
        at_once = pages is not None and not self._checksum and self._on_wire is None
        if at_once:
            # Nothing to do per layer: one wake-up when the last message lands instead of one per layer,
            # which on a loaded host takes the cores the copies need. One connection delivers the messages
            # in the order they were sent, so by then every earlier one is in too (and gloo work takes one
            # wait: a second would block to its timeout).
            self._wait(posted[layout.num_layers - 1][-1][0], f"receiving layer {layout.num_layers - 1}")
            self._fence.all_done()
            self._add_bytes(layout.nbytes)
        for i in range(0 if at_once else layout.num_layers):
            crc = 0
            for work, rows in posted.pop(i):
                self._wait_receive(work, f"receiving layer {i}")
                if self._on_wire is not None:
                    self._on_wire(i, rows)
                if self._checksum:
                    crc = zlib.crc32(raw_bytes(rows), crc)
            crcs.append(crc)
            if pages is None:
                with self._data():
                    self._sink.write(i, 0, buffers[i % STAGED_AHEAD])
            self._add_bytes(layout.layer_nbytes)
            if i + ahead < layout.num_layers:  # its buffer held layer i, now written
                posted[i + ahead] = post_layer(i + ahead)
        for base in bases:  # every receive has finished: nothing writes into them any more
            pool.give(base)
        bad: list[int] = []
        if self._checksum:
            sums = self._small([0] * layout.num_layers, device)
            self._exchange("receiving checksums", recv_from(0, sums, tags.checksums))
            bad = [i for i, (want, got) in enumerate(zip(sums.tolist(), crcs, strict=True)) if want != got]
        if bad:
            ack.copy_(torch.tensor([ACK_CHECKSUM, bad[0]]))
        else:
            self._succeed()  # every row is written (and verified): the owner may go on while the ack goes
        self._exchange("sending the acknowledgement", send_to(0, ack, tags.ack))
        if bad:
            raise TransferRejected(f"checksum mismatch in layer {bad[0]}")

    def _wait_receive(self, work: dist.Work, what: str) -> None:
        self._wait(work, what)
        self._fence.done(work)


def _message(text: bytes) -> dict[str, Any]:
    """A message of the answer queue, or {} for one that is not JSON of an object (never this transfer's)."""
    try:
        message = json.loads(text)
    except ValueError:
        return {}
    return message if isinstance(message, dict) else {}
