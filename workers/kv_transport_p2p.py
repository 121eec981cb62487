"""The default KV transport: torch.distributed point-to-point between the prefill rank and the decode rank.

Who owns what: the prefill rank runs one ``P2pKvServer``. It hosts a ``TCPStore`` on its configured
interface (port chosen by the OS; the address goes into ``KvHandle.transfer_rendezvous``). The
decode rank runs one ``P2pKvClient``. Each (sender, receiver) pair has up to ``lanes`` (the client's
setting, default 4) lanes, so that that many transfers between them run at once; a lane is a 2-rank
pair group (rank 0 = sender, rank 1 = receiver) built from that store under its own prefix
(``kvpair/<server nonce>/<sender>/<receiver>/<backend>/l<lane>/g<generation>``): gloo on CPU
tensors, NCCL on CUDA tensors. Each side caches the lane's group for the next transfer on the lane,
and drops it when it breaks. The lane's next transfer then builds a new group under the next
generation. The receiver picks the lane (the lowest free one: serial traffic stays on lane 0).

Lifecycle of one transfer (``transfer_id`` unique per server). Either side may start first, and
each has ``timeout_s`` to meet the other:

1. Receiver: takes a lane (its lock: one transfer at a time per lane), then pushes an offer onto the
   server's one offer queue ``kv/offers`` (``kv_offer_inbox``: one thread of the server reads it and
   hands each offer to its sender): the transfer id, its worker id, the lane, the lane's cached group
   prefix (or ""), its layout, checksum setting, runs (``kv_segments``: the token counts of its
   stretches of consecutive blocks, or null when it can only stage) and the lane's own answer queue
   (``kv/a/<16 hex digits>``, random per lane). A receiver that gives up withdraws its offer. It
   waits for the answer in blocking pops, dropping what earlier transfers of the lane left there
   (every message names its transfer); ``cancel()`` wakes it by pushing a wake-up that names it
   onto that queue (``P2pKvClient.push``). One queue per lane, not per transfer: c10d's store server
   never forgets a queue, about 830 bytes each.
2. Sender: takes that offer from the inbox and checks it against its own layout. It waits until its
   source knows its blocks (``ready(-1)``), then takes the lane's lock. It reuses its cached group if
   the receiver has the same one, otherwise starts generation g+1. It answers on the queue the offer
   names: the transfer id and the prefix, the transfer's sequence number on that group and its own
   runs, or an error (a bad offer, a source that failed early), which fails both sides and keeps the
   group. Both sides compute the same plan from the two run lists (``kv_segments.plan``): which side
   moves rows straight from or into its pages, and the segments each layer is cut into.
3. Both sides join the group if it is new (a blocking connect, bounded by the time left, which
   nothing can interrupt). So neither enters it unless the other surely will: the receiver claims
   the store key ``<prefix>/join`` with "join" just before it connects, and the sender connects only
   once it reads "join". A side that ends first (``cancel()``: for the sender the decode rank's
   ``ReleaseKv`` or an ``Abort``; the deadline) claims the key instead ("gone", "left"), so the other
   side fails at once instead of at its deadline (``P2pTransfer._join``).
4. Data: sender -> header [6] int64 (num_tokens, num_layers, row_dim, dtype code, seq, segments),
   which the receiver checks; then per layer (after ``ready(i)``) one ``send`` per segment: a view of
   the sender's pages (direct) or a slice of the layer gathered into a pooled buffer (staged, while
   the previous layer is in flight). The receiver posts its receives into its pages (direct: every
   layer at once) or into one of two pooled buffers it scatters into its cache (staged: two layers
   ahead); a direct sender likewise keeps every layer in flight, a staged one two. Then, with
   checksums, the per-layer CRC32s as [num_layers] int64 (a CRC over a layer's rows in token order:
   chained over its segments, so direct and staged sides agree). Receiver -> acknowledgement [2] int64
   (status, layer). The sender is SUCCESS only once the receiver has written and verified everything.
5. Failure: a dead peer (gloo reports "connection closed") or the deadline makes the side FAILED and
   drops (aborts) the group. The peer then fails at once, except on a wait gloo does not wake: a send
   or receive it was in the middle of writing or reading when the connection went (that wait lasts
   until the deadline; a direct sender therefore waits for the acknowledgement before its sends). A
   checksum mismatch fails both sides but keeps the group. Every tag is distinct per transfer, layer and segment (``kv_p2p_link.Tags``).

Safety of direct receives: a posted receive writes the decode rank's pages whenever the bytes come,
so the receiver counts its posted receives (``ReceiveFence``) and neither its failure path, nor
``cancel()``, nor a ``poll()`` that reports FAILED returns before each of them has completed or can no
longer write (``kv_receive_fence`` says how, and what gloo's ``abort()`` does not do). A direct send
that still reads the sender's pages after ``cancel()`` only reads them, for a peer that fails.

Injected faults (``SendFault``, tests only): the sender waits out its delay before it looks for the
offer, drops the transfer (and the group) before the middle layer, or flips a byte of layer 0 after
its checksum (in its staged copy: a sender with that fault never sends from its pages).

Transfers on one lane run one after the other, in the order the receiver took them; a failure or
cancel drops its own lane's group only. Store connections are few and long-lived: the server's
offer reader holds one, the senders answer on the server's own store handle, and each lane holds one
connection for its group's rendezvous (and, on the receiver side, its offers) and, on the receiver
side, one it waits for answers on and nothing else (``P2pKvReceiver._await_answer`` says why; a
cancel's wake-up uses a short-lived one).
Transfers run on threads the server and the client keep for the next one (``TransferThreads``).
What transfers leave in the store (a replaced generation's rendezvous keys) the server's
``StoreSweep`` deletes once no transfer can read it (``kv_store_sweep``); each lane's newest
generation keeps its few keys, each receiver lane its answer queue. The offer reader and each
receiver lane also let the store server forget, every ``TRIM_EVERY`` pops, the waiter list it keeps
per queue (``kv_p2p_link.forget_waiters``).

Here: ``P2pKvServer`` and ``P2pKvClient``; the two sides of a transfer are ``kv_p2p_sender`` and
``kv_p2p_receiver``, what they share ``kv_p2p_link``.
"""

from __future__ import annotations

import datetime
import logging
import secrets

import torch.distributed as dist

from k2serve.workers.kv_offer_inbox import OFFERS_KEY, OfferInbox
from k2serve.workers.kv_p2p_link import PUSH_TIMEOUT_S, TransferRejected, first_line
from k2serve.workers.kv_p2p_receiver import P2pKvReceiver
from k2serve.workers.kv_p2p_sender import P2pKvSender
from k2serve.workers.kv_pair_group import (
    DEFAULT_LANES,
    MAX_LANES,
    LaneSets,
    PairLanes,
    PairSlot,
    PointToPointBackend,
    connect_pair_group,
    route_to,
)
from k2serve.workers.kv_store_sweep import StoreSweep
from k2serve.workers.kv_transfer import (
    DEFAULT_TIMEOUT_S,
    NO_FAULT,
    BufferPool,
    KvReceiver,
    KvSender,
    KvSink,
    KvSource,
    SendFault,
    TransferError,
    WireTap,
)
from k2serve.workers.parallel import Rendezvous, host_store
from k2serve.workers.transfer_threads import TransferThreads

logger = logging.getLogger(__name__)

__all__ = [
    "P2pKvClient",
    "P2pKvReceiver",
    "P2pKvSender",
    "P2pKvServer",
    "PointToPointBackend",
    "TransferRejected",
    "connect_pair_group",
]


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
        self.threads = TransferThreads(f"kv-send-{worker_id}")
        self.offers = OfferInbox(
            self.connect_store,
            lambda message: self.store.queue_push(OFFERS_KEY, message),
            ttl_s=2 * timeout_s,
            name=f"kv-offers-{worker_id}",
        )
        self.sweep = StoreSweep(self.store)  # what failed transfers and replaced groups leave in the store
        self._nonce = secrets.token_hex(4)  # a restarted server never reuses a prefix a client has cached
        self._lanes = LaneSets(MAX_LANES)  # every lane a receiver may name

    @property
    def rendezvous(self) -> str:
        return str(Rendezvous(self.host, self.store.port))

    def slot(self, receiver_id: str, kind: str, lane: int = 0) -> PairSlot:
        return self._lanes.get((receiver_id, kind)).slots[lane]

    def pair_prefix(self, receiver_id: str, kind: str, lane: int, generation: int) -> str:
        return f"kvpair/{self._nonce}/{self.worker_id}/{receiver_id}/{kind}/l{lane}/g{generation}"

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
        self.offers.close()
        self._lanes.close()


class P2pKvClient:
    """The decode rank's side: per prefill rank, up to ``lanes`` concurrent transfers, each lane with
    its own store connection and cached group.

    ``interface_host``: the address gloo binds on this side (default: the local address that routes to
    the rendezvous host, so a loopback rendezvous stays on loopback).
    """

    def __init__(
        self,
        worker_id: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        interface_host: str | None = None,
        lanes: int = DEFAULT_LANES,
    ) -> None:
        self.worker_id = worker_id
        self.timeout_s = timeout_s
        self._interface_host = interface_host
        self.buffers = BufferPool()  # the layers being received
        self.threads = TransferThreads(f"kv-recv-{worker_id}")
        self._lanes = LaneSets(lanes)

    def lanes(self, rendezvous: Rendezvous | str, sender_id: str, kind: str) -> PairLanes:
        return self._lanes.get((str(rendezvous), sender_id, kind))

    def interface_host(self, rendezvous: Rendezvous) -> str:
        return self._interface_host or route_to(rendezvous.host)

    def connect_store(self, rendezvous: Rendezvous, timeout_s: float) -> dist.TCPStore:
        try:
            return dist.TCPStore(
                rendezvous.host, rendezvous.port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s)
            )
        except (RuntimeError, TimeoutError) as exc:
            raise TransferError(f"cannot reach the transfer store at {rendezvous}: {first_line(exc)}") from exc

    def push(self, rendezvous: Rendezvous, key: str, message: bytes) -> None:
        """Push ``message`` onto the store queue ``key`` over a connection of its own (a lane's connection
        may be blocked in a pop), best effort: an unreachable store is logged and ignored."""
        try:
            self.connect_store(rendezvous, PUSH_TIMEOUT_S).queue_push(key, message)
        except (RuntimeError, TimeoutError) as exc:
            logger.warning("%s: could not push to %s on %s: %s", self.worker_id, key, rendezvous, first_line(exc))

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
        """Receive into ``sink`` what ``sender_id`` (whose server listens at ``rendezvous``) sends.
        ``on_wire`` sees every received message's rows (a layer, or a segment of one) before they are
        checked; on a direct receive they are already in the sink's pages."""
        where = Rendezvous.parse(rendezvous) if isinstance(rendezvous, str) else rendezvous
        receiver = P2pKvReceiver(
            self, transfer_id, sender_id, where, sink, checksum, timeout_s or self.timeout_s, on_wire
        )
        receiver.start()
        return receiver

    def close(self) -> None:
        self._lanes.close()
