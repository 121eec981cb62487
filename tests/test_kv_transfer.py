"""KV transfer: layout, paged-cache source/sink, the in-process, torch.distributed p2p and gRPC transports,
and the prefill side's lease table. Loopback only; every wait has a deadline."""

from __future__ import annotations

import json
import random
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, cast

import grpc
import pytest
import torch
from kv_caches import BLOCK_SIZE, NUM_BLOCKS, NUM_LAYERS, ROW_DIM, paged_cache

from k2serve.proto import worker_pb2, worker_pb2_grpc
from k2serve.workers.kv_lease import KvLeaseTable
from k2serve.workers.kv_offer_inbox import OFFERS_KEY
from k2serve.workers.kv_p2p_link import JOIN_GONE, JOIN_LEFT, join_key, new_answer_key
from k2serve.workers.kv_pair_group import MAX_LANES, PairGroup, PairLanes, PointToPointBackend
from k2serve.workers.kv_transfer import (
    BufferPool,
    CacheKvSink,
    CacheKvSource,
    KvLayout,
    KvTransfer,
    SendFault,
    TransferState,
    slot_mapping,
)
from k2serve.workers.kv_transport_grpc import GrpcKvReceiver, kv_chunks
from k2serve.workers.kv_transport_inproc import InProcessTransport
from k2serve.workers.kv_transport_p2p import P2pKvClient, P2pKvServer
from k2serve.workers.parallel import host_store

SENDER = "prefill-0"


def _blocks(num_tokens: int, seed: int) -> list[int]:
    return random.Random(seed).sample(range(NUM_BLOCKS), -(-num_tokens // BLOCK_SIZE))


class _Pair:
    """A source cache and an empty destination cache with different, shuffled block ids."""

    def __init__(self, num_tokens: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> None:
        self.num_tokens = num_tokens
        self.src, self.dst = paged_cache(dtype, seed), paged_cache(dtype, seed, zero=True)
        self.src_blocks, self.dst_blocks = _blocks(num_tokens, seed), _blocks(num_tokens, seed + 1)

    def source(self) -> CacheKvSource:
        return CacheKvSource(self.src, self.src_blocks, self.num_tokens)

    def sink(self) -> CacheKvSink:
        return CacheKvSink(self.dst, self.dst_blocks, self.num_tokens)

    def assert_moved(self) -> None:
        for layer in range(NUM_LAYERS):
            want = CacheKvSource(self.src, self.src_blocks, self.num_tokens).layer(layer)
            got = CacheKvSource(self.dst, self.dst_blocks, self.num_tokens).layer(layer)
            assert torch.equal(want, got), f"layer {layer} differs"


def _wait_all(*transfers: KvTransfer, limit_s: float = 10.0) -> list[TransferState]:
    return [t.wait(limit_s) for t in transfers]


def _flip_byte(target_layer: int) -> Callable[[int, torch.Tensor], None]:
    def tap(layer: int, rows: torch.Tensor) -> None:
        if layer == target_layer:
            view = rows.view(-1).view(torch.uint8)
            view[3] ^= 0x40

    return tap


# ---- layout, source, sink ---------------------------------------------------------------------------


def test_layout_bytes_are_row_dim_times_dtype_size_times_layers_times_tokens() -> None:
    layout = KvLayout(num_layers=61, num_tokens=1000, row_dim=576, dtype=torch.bfloat16)
    assert layout.nbytes == 576 * 2 * 61 * 1000
    assert layout.layer_nbytes == 576 * 2 * 1000
    with pytest.raises(ValueError, match="num_tokens"):
        KvLayout(1, 0, 576, torch.bfloat16)


def test_source_and_sink_follow_the_slot_of_every_token() -> None:
    pair = _Pair(num_tokens=37)  # 3 blocks, the last one partly filled
    slots = slot_mapping(pair.src_blocks, 37, BLOCK_SIZE, torch.device("cpu"))
    t = 20
    assert slots[t] == pair.src_blocks[t // BLOCK_SIZE] * BLOCK_SIZE + t % BLOCK_SIZE
    rows = pair.source().layer(1)
    assert rows.shape == (37, ROW_DIM) and rows.is_contiguous()
    assert torch.equal(rows[t], pair.src[1][pair.src_blocks[1], t % BLOCK_SIZE])
    pair.sink().write(1, 10, rows[10:30])
    assert torch.equal(pair.dst[1][pair.dst_blocks[1], t % BLOCK_SIZE], rows[t])
    with pytest.raises(ValueError, match="outside"):
        pair.sink().write(1, 30, rows[:10])


# ---- in-process transport ---------------------------------------------------------------------------


def test_in_process_round_trip_and_checksum_mismatch() -> None:
    transport = InProcessTransport(timeout_s=5.0)
    pair = _Pair(num_tokens=50)
    receiver = transport.start_receive("t1", pair.sink(), checksum=True)  # the receiver may come first
    sender = transport.start_send("t1", pair.source(), checksum=True)
    assert _wait_all(sender, receiver) == [TransferState.SUCCESS] * 2
    pair.assert_moved()
    assert sender.bytes_moved == receiver.bytes_moved == ROW_DIM * 2 * NUM_LAYERS * 50

    bad = _Pair(num_tokens=50, seed=3)
    sender = transport.start_send("t2", bad.source(), checksum=True)
    receiver = transport.start_receive("t2", bad.sink(), checksum=True, on_wire=_flip_byte(2))
    assert _wait_all(sender, receiver) == [TransferState.FAILED] * 2
    assert receiver.error == "checksum mismatch in layer 2"
    assert sender.error is not None and "checksum mismatch in layer 2" in sender.error


# ---- p2p (torch.distributed, gloo on loopback) ------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[P2pKvServer]:
    server = P2pKvServer(SENDER, "127.0.0.1", timeout_s=5.0)
    yield server
    server.close()


@pytest.fixture(scope="module")
def client() -> Iterator[P2pKvClient]:
    client = P2pKvClient("decode-0", timeout_s=5.0)
    yield client
    client.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_p2p_moves_every_row_into_shuffled_blocks(server: P2pKvServer, client: P2pKvClient, dtype: torch.dtype) -> None:
    for k, receiver_first in enumerate((True, False)):  # the order of the two calls does not matter
        pair = _Pair(num_tokens=301, dtype=dtype, seed=10 + k)
        tid = f"rows-{dtype}-{k}"
        start_receive = lambda p=pair, t=tid: client.start_receive(t, SENDER, server.rendezvous, p.sink())  # noqa: E731
        start_send = lambda p=pair, t=tid: server.start_send(t, "decode-0", p.source())  # noqa: E731
        if receiver_first:
            receiver = start_receive()
            time.sleep(0.05)
            sender = start_send()
        else:
            sender = start_send()
            time.sleep(0.05)
            receiver = start_receive()
        assert _wait_all(sender, receiver) == [TransferState.SUCCESS] * 2, (sender.error, receiver.error)
        pair.assert_moved()
        nbytes = ROW_DIM * torch.empty((), dtype=dtype).element_size() * NUM_LAYERS * 301
        assert sender.bytes_moved == receiver.bytes_moved == nbytes
        assert sender.error is None and receiver.error is None and sender.seconds > 0
    # both transfers ran on the one cached pair group
    assert server.slot("decode-0", "gloo").generation == 1


def test_p2p_checksum_mismatch_fails_both_sides_and_keeps_the_group(server: P2pKvServer, client: P2pKvClient) -> None:
    pair = _Pair(num_tokens=64, seed=20)
    sender = server.start_send("crc-bad", "decode-0", pair.source(), checksum=True)
    receiver = client.start_receive(
        "crc-bad", SENDER, server.rendezvous, pair.sink(), checksum=True, on_wire=_flip_byte(1)
    )
    assert _wait_all(sender, receiver) == [TransferState.FAILED] * 2
    assert receiver.error == "checksum mismatch in layer 1"
    assert sender.error == "receiver reported checksum mismatch in layer 1"
    generation = server.slot("decode-0", "gloo").generation
    sender = server.start_send("crc-good", "decode-0", pair.source(), checksum=True)
    receiver = client.start_receive("crc-good", SENDER, server.rendezvous, pair.sink(), checksum=True)
    assert _wait_all(sender, receiver) == [TransferState.SUCCESS] * 2, (sender.error, receiver.error)
    pair.assert_moved()
    assert server.slot("decode-0", "gloo").generation == generation


def test_p2p_layout_mismatch_fails_both_sides(server: P2pKvServer, client: P2pKvClient) -> None:
    pair, other = _Pair(num_tokens=40, seed=30), _Pair(num_tokens=41, seed=31)
    sender = server.start_send("shape", "decode-0", pair.source())
    receiver = client.start_receive("shape", SENDER, server.rendezvous, other.sink())
    assert _wait_all(sender, receiver) == [TransferState.FAILED] * 2
    for t in (sender, receiver):
        assert t.error is not None and t.error.startswith("layout mismatch: sender has 3 layers × 40 tokens")


def test_p2p_receiver_whose_sender_never_comes_fails_within_its_timeout(
    server: P2pKvServer, client: P2pKvClient
) -> None:
    pair = _Pair(num_tokens=16, seed=40)
    started = time.monotonic()
    receiver = client.start_receive("nobody", SENDER, server.rendezvous, pair.sink(), timeout_s=0.5)
    assert receiver.poll() in (TransferState.BOOTSTRAPPING, TransferState.FAILED)  # poll never blocks
    assert receiver.wait(5.0) is TransferState.FAILED
    assert time.monotonic() - started < 2.0
    assert receiver.error == f"timed out after 0.5s waiting for sender {SENDER} to answer"


def test_p2p_concurrent_transfers_of_one_pair_all_succeed_whatever_the_order(
    server: P2pKvServer, client: P2pKvClient
) -> None:
    pairs = {tid: _Pair(num_tokens=100 + 7 * k, seed=60 + k) for k, tid in enumerate(("c0", "c1", "c2"))}
    receivers = [client.start_receive(tid, SENDER, server.rendezvous, p.sink()) for tid, p in pairs.items()]
    senders = [server.start_send(tid, "decode-0", pairs[tid].source()) for tid in reversed(pairs)]
    assert _wait_all(*receivers, *senders) == [TransferState.SUCCESS] * 6, [t.error for t in (*receivers, *senders)]
    for pair in pairs.values():
        pair.assert_moved()


def test_p2p_a_pending_transfer_does_not_hold_up_the_next_one_of_its_pair(
    server: P2pKvServer, client: P2pKvClient
) -> None:
    """Lanes: a transfer whose sender has not come yet keeps its lane; the pair's next transfer takes
    another lane and finishes first (on one lane it would queue behind the first)."""
    waiting, passing = _Pair(num_tokens=90, seed=70), _Pair(num_tokens=50, seed=71)
    first = client.start_receive("lane-wait", SENDER, server.rendezvous, waiting.sink())
    slots, deadline = client.lanes(server.rendezvous, SENDER, "gloo").slots, time.monotonic() + 5.0
    while not any(slot.lock.locked() for slot in slots):
        assert time.monotonic() < deadline, "the first receiver never took a lane"
        time.sleep(0.005)
    held = next(lane for lane, slot in enumerate(slots) if slot.lock.locked())
    second = client.start_receive("lane-pass", SENDER, server.rendezvous, passing.sink())
    sent = server.start_send("lane-pass", "decode-0", passing.source())
    assert _wait_all(second, sent) == [TransferState.SUCCESS] * 2, (second.error, sent.error)
    passing.assert_moved()
    assert first.poll() is TransferState.BOOTSTRAPPING  # still waiting for its sender, on its lane
    assert slots[held].lock.locked()  # so the second went on another lane
    late = server.start_send("lane-wait", "decode-0", waiting.source())
    assert _wait_all(first, late) == [TransferState.SUCCESS] * 2, (first.error, late.error)
    waiting.assert_moved()


def test_p2p_a_failure_on_one_lane_leaves_the_other_lanes_groups_alone(
    server: P2pKvServer, client: P2pKvClient
) -> None:
    held, failing = _Pair(num_tokens=64, seed=72), _Pair(num_tokens=64, seed=73)
    lanes = client.lanes(server.rendezvous, SENDER, "gloo")
    for slot in lanes.slots:
        slot.avoid_until = 0.0  # forget the failures of earlier tests
    taken = lanes.acquire(5.0)  # keep lane 0 busy, so the failing transfer goes on lane 1
    assert taken is not None and taken[0] == 0
    try:
        receiver = client.start_receive("lane-drop", SENDER, server.rendezvous, failing.sink())
        sender = server.start_send("lane-drop", "decode-0", failing.source(), fault=SendFault(drop=True))
        assert _wait_all(receiver, sender) == [TransferState.FAILED] * 2
        assert server.slot("decode-0", "gloo", lane=1).group is None  # lane 1's group was dropped
    finally:
        lanes.release(taken[1])
    lane0 = server.slot("decode-0", "gloo", lane=0)
    group, generation = lane0.usable(), lane0.generation
    assert group is not None  # earlier tests left lane 0 a working group
    receiver = client.start_receive("lane-ok", SENDER, server.rendezvous, held.sink())
    sender = server.start_send("lane-ok", "decode-0", held.source())
    assert _wait_all(receiver, sender) == [TransferState.SUCCESS] * 2, (receiver.error, sender.error)
    held.assert_moved()
    assert lane0.generation == generation and lane0.group is group  # the same group carried it


def test_p2p_a_lane_whose_transfer_failed_is_avoided_while_its_sender_may_still_hold_it(
    server: P2pKvServer, client: P2pKvClient
) -> None:
    lanes = client.lanes(server.rendezvous, SENDER, "gloo")
    for slot in lanes.slots:
        assert not slot.lock.locked()
        slot.avoid_until = 0.0  # forget the failures of earlier tests
    lost = client.start_receive("lane-lost", SENDER, server.rendezvous, _Pair(num_tokens=16).sink(), timeout_s=0.3)
    assert lost.wait(5.0) is TransferState.FAILED  # no sender came: one may yet hold lane 0 on its side
    assert lanes.slots[0].avoid_until > time.monotonic()
    after = lanes.acquire(1.0)
    assert after is not None and after[0] != 0  # lane 0 is skipped while another is free
    lanes.release(after[1])
    pair = _Pair(num_tokens=48, seed=74)
    receiver = client.start_receive("lane-next", SENDER, server.rendezvous, pair.sink())
    sender = server.start_send("lane-next", "decode-0", pair.source())
    assert _wait_all(receiver, sender) == [TransferState.SUCCESS] * 2, (receiver.error, sender.error)
    pair.assert_moved()


def test_p2p_sender_rejects_an_offer_for_a_lane_out_of_range(server: P2pKvServer) -> None:
    sender = server.start_send("bad-lane", "decode-0", _Pair(num_tokens=16).source(), timeout_s=2.0)
    offer = {"transfer": "bad-lane", "receiver": "decode-0", "lane": MAX_LANES, "cached": ""}
    offer |= {"layout": [3, 16, ROW_DIM, "bfloat16"], "checksum": False, "runs": None, "answer": new_answer_key()}
    server.store.queue_push(OFFERS_KEY, json.dumps(offer))
    assert sender.wait(5.0) is TransferState.FAILED
    assert sender.error is not None and "offer.lane: expected an int in [0, 16), got 16" in sender.error
    answer = json.loads(server.store.queue_pop(offer["answer"], block=False))
    assert answer == {"transfer": "bad-lane", "error": sender.error}


def _offer_by_hand(server: P2pKvServer, transfer_id: str, receiver_id: str, num_tokens: int) -> str:
    """Play the receiver up to the answer of a new group: push an offer, return the answered prefix."""
    offer = {"transfer": transfer_id, "receiver": receiver_id, "lane": 0, "cached": ""}
    offer |= {"layout": [NUM_LAYERS, num_tokens, ROW_DIM, "bfloat16"], "checksum": False, "runs": None}
    offer["answer"] = new_answer_key()
    server.store.queue_push(OFFERS_KEY, json.dumps(offer))
    own = server.connect_store(5.0)  # not the server's handle: the sender answers on that one
    return str(json.loads(own.queue_pop(offer["answer"], block=True))["prefix"])


def _lets_go_of_lane_0(server: P2pKvServer, receiver_id: str, limit_s: float) -> bool:
    lock = server.slot(receiver_id, "gloo", lane=0).lock
    if not lock.acquire(timeout=limit_s):
        return False
    lock.release()
    return True


def test_p2p_sender_whose_receiver_left_after_the_answer_lets_go_of_its_lane_at_once(server: P2pKvServer) -> None:
    """A receiver cancelled between the answer and joining says "gone"; the sender, which would
    otherwise wait in the group's rendezvous until its deadline holding the lane, fails at once."""
    sender = server.start_send("left", "decode-7", _Pair(num_tokens=16).source(), timeout_s=30.0)
    prefix = _offer_by_hand(server, "left", "decode-7", 16)
    started = time.monotonic()
    server.store.set(join_key(prefix), JOIN_GONE)
    assert sender.wait(5.0) is TransferState.FAILED
    assert sender.error == f"the receiver left before joining pair group {prefix}"
    assert _lets_go_of_lane_0(server, "decode-7", 1.0) and time.monotonic() - started < 2.0


def test_p2p_sender_cancelled_while_its_receiver_has_not_joined_lets_go_of_its_lane_at_once(
    server: P2pKvServer,
) -> None:
    """The decode rank's ReleaseKv (or an Abort) cancels a sender whose receiver never announced itself:
    the lane is free at once, the sender's "left" keeps a late receiver out of the rendezvous, and the
    lane's next transfer (a real receiver) builds a new group on it."""
    sender = server.start_send("silent", "decode-8", _Pair(num_tokens=16).source(), timeout_s=30.0)
    prefix = _offer_by_hand(server, "silent", "decode-8", 16)
    time.sleep(0.1)  # the sender is waiting for the announcement
    assert sender.poll() is TransferState.BOOTSTRAPPING
    started = time.monotonic()
    sender.cancel("the receiver released the lease")
    assert sender.poll() is TransferState.FAILED
    assert _lets_go_of_lane_0(server, "decode-8", 1.0) and time.monotonic() - started < 1.0
    assert server.store.get(join_key(prefix)) == JOIN_LEFT.encode()
    client = P2pKvClient("decode-8", timeout_s=5.0)
    try:
        pair = _Pair(num_tokens=40, seed=75)
        receiver = client.start_receive("after-silent", SENDER, server.rendezvous, pair.sink())
        sent = server.start_send("after-silent", "decode-8", pair.source())
        assert _wait_all(receiver, sent) == [TransferState.SUCCESS] * 2, (receiver.error, sent.error)
        pair.assert_moved()
        assert server.slot("decode-8", "gloo").generation == 2
    finally:
        client.close()


def test_p2p_receiver_whose_sender_left_after_answering_does_not_enter_the_rendezvous() -> None:
    """The sender's side played by hand: it answers a new group, then leaves ("left") before the real
    receiver claims the join key; the receiver fails at once instead of waiting for it until its deadline."""
    store = host_store("127.0.0.1", timeout_s=5.0)
    client = P2pKvClient("decode-5", timeout_s=30.0)
    try:
        receiver = client.start_receive("abandoned", SENDER, f"127.0.0.1:{store.port}", _Pair(num_tokens=16).sink())
        offer = json.loads(store.queue_pop(OFFERS_KEY, block=True))
        prefix = "kvpair/by-hand/l0/g1"
        store.set(join_key(prefix), JOIN_LEFT)
        answer = {"transfer": offer["transfer"], "prefix": prefix, "seq": 0, "runs": None}
        store.queue_push(offer["answer"], json.dumps(answer))
        started = time.monotonic()
        assert receiver.wait(5.0) is TransferState.FAILED
        assert time.monotonic() - started < 2.0
        assert receiver.error == f"the sender left before the receiver joined pair group {prefix}"
    finally:
        client.close()


def test_p2p_receiver_cancelled_while_waiting_for_the_answer_wakes_at_once_and_logs_nothing(
    server: P2pKvServer, capfd: pytest.CaptureFixture[str]
) -> None:
    """One blocking pop woken by cancel(), not 50 ms slices (c10d logs a warning at each slice that ends)."""
    client = P2pKvClient("decode-6", timeout_s=30.0, lanes=1)
    try:
        receiver = client.start_receive("unanswered", SENDER, server.rendezvous, _Pair(num_tokens=16).sink())
        lanes = client.lanes(server.rendezvous, SENDER, "gloo")
        time.sleep(0.4)  # waiting for an answer no sender gives
        assert receiver.poll() is TransferState.BOOTSTRAPPING
        started = time.monotonic()
        receiver.cancel()
        taken = lanes.acquire(2.0)  # the only lane: free once the thread has let go
        assert taken is not None and time.monotonic() - started < 1.0
        lanes.release(taken[1])
        assert receiver.error == "cancelled"
    finally:
        client.close()
    assert "waitForInput" not in capfd.readouterr().err


def test_pair_lanes_hand_out_the_lowest_free_lane_and_wait_boundedly() -> None:
    lanes = PairLanes(2)
    a, b = lanes.acquire(0.1), lanes.acquire(0.1)
    assert a is not None and b is not None and (a[0], b[0]) == (0, 1)
    started = time.monotonic()
    assert lanes.acquire(0.05) is None and time.monotonic() - started < 1.0
    lanes.release(a[1])
    again = lanes.acquire(0.1)
    assert again is not None and again[0] == 0
    lanes.release(again[1])
    lanes.release(b[1])
    lanes.slots[0].avoid_until = time.monotonic() + 60  # its last transfer failed
    first = lanes.acquire(0.1)
    assert first is not None and first[0] == 1  # avoided while another lane is free
    only = lanes.acquire(0.1)
    assert only is not None and only[0] == 0  # taken when it is the only one left
    lanes.release(first[1])
    lanes.release(only[1])
    lanes.slots[0].avoid_until = 0.0
    lanes.slots[1].group = PairGroup("p/l1/g1", "gloo", backend=cast(PointToPointBackend, object()))
    cached = lanes.acquire(0.1)
    assert cached is not None and cached[0] == 1  # a working group beats a lower lane that has none
    lanes.release(cached[1])
    lanes.slots[1].group.broken = "failed"
    lowest = lanes.acquire(0.1)
    assert lowest is not None and lowest[0] == 0  # no working group anywhere: the lowest free lane
    with pytest.raises(ValueError, match=r"lanes: expected 1\.\.16, got 0"):
        PairLanes(0)


def test_p2p_sender_whose_receiver_never_comes_fails_within_its_timeout(server: P2pKvServer) -> None:
    sender = server.start_send("unclaimed", "decode-9", _Pair(num_tokens=16).source(), timeout_s=0.5)
    assert sender.wait(5.0) is TransferState.FAILED
    assert sender.error == "timed out after 0.5s waiting for receiver decode-9 to join the transfer"


def test_buffer_pool_reuses_buffers_and_keeps_at_most_its_limit() -> None:
    pool = BufferPool(max_free_bytes=3000 * ROW_DIM * 4)
    a = pool.take(1000, ROW_DIM, torch.float32, torch.device("cpu"))
    assert a.shape == (1024, ROW_DIM)  # rounded up, so nearby lengths share buffers
    pool.give(a)
    assert pool.take(900, ROW_DIM, torch.float32, torch.device("cpu")) is a
    pool.give(a)
    pool.give(pool.take(4000, ROW_DIM, torch.float32, torch.device("cpu")))  # over the limit: dropped
    assert pool.free_bytes == 1024 * ROW_DIM * 4


_DYING_RECEIVER = """
import sys, time, torch
from k2serve.workers.kv_transfer import CacheKvSink
from k2serve.workers.kv_transport_p2p import P2pKvClient

class StallingSink(CacheKvSink):
    @property
    def pages(self):
        return None  # staged: every layer goes through write()

    def write(self, layer, first_token, rows):
        if layer == 1:
            print("stalled", flush=True)
            time.sleep(60)
        super().write(layer, first_token, rows)

rendezvous, num_tokens, blocks = sys.argv[1], int(sys.argv[2]), [int(b) for b in sys.argv[3].split(",")]
cache = [torch.zeros(NUM_BLOCKS, BLOCK_SIZE, ROW_DIM, dtype=torch.bfloat16) for _ in range(NUM_LAYERS)]
receiver = P2pKvClient("decode-1", timeout_s=30).start_receive(
    "dies", "prefill-0", rendezvous, StallingSink(cache, blocks, num_tokens)
)
receiver.wait(60)
"""
for _name, _value in (
    ("NUM_BLOCKS", NUM_BLOCKS),
    ("BLOCK_SIZE", BLOCK_SIZE),
    ("ROW_DIM", ROW_DIM),
    ("NUM_LAYERS", NUM_LAYERS),
):
    _DYING_RECEIVER = _DYING_RECEIVER.replace(_name, str(_value))


def _read_line(proc: subprocess.Popen[str], limit_s: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], limit_s)
    return proc.stdout.readline().strip() if ready else ""


def test_p2p_sender_whose_receiver_dies_mid_transfer_fails_and_a_new_pair_works(server: P2pKvServer) -> None:
    pair = _Pair(num_tokens=600, seed=50)
    blocks = ",".join(str(b) for b in pair.dst_blocks)
    args = [sys.executable, "-c", _DYING_RECEIVER, str(server.rendezvous), "600", blocks]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        sender = server.start_send("dies", "decode-1", pair.source(), timeout_s=20.0)
        assert _read_line(proc, 15.0) == "stalled"  # the receiver is inside layer 1, layer 2 on its way
        assert sender.poll() is TransferState.TRANSFERRING
        proc.kill()  # the decode rank dies: the OS closes its sockets
        started = time.monotonic()
        assert sender.wait(5.0) is TransferState.FAILED
        assert time.monotonic() - started < 2.0  # seen at once, not at the 20 s timeout
        assert sender.error is not None and "the peer is gone" in sender.error, sender.error
    finally:
        proc.kill()
        proc.wait(10)

    restarted = P2pKvClient("decode-1", timeout_s=5.0)
    fresh = _Pair(num_tokens=600, seed=51)
    sender = server.start_send("after", "decode-1", fresh.source(), checksum=True)
    receiver = restarted.start_receive("after", SENDER, server.rendezvous, fresh.sink(), checksum=True)
    assert _wait_all(sender, receiver) == [TransferState.SUCCESS] * 2, (sender.error, receiver.error)
    fresh.assert_moved()
    assert server.slot("decode-1", "gloo").generation == 2  # the broken group was replaced
    restarted.close()


def test_p2p_cancel_stops_at_once_and_the_peer_fails_by_its_deadline(server: P2pKvServer, client: P2pKvClient) -> None:
    pair = _Pair(num_tokens=32, seed=55)
    receiver = client.start_receive("cancelled", SENDER, server.rendezvous, pair.sink(), timeout_s=1.0)
    receiver.cancel()
    assert receiver.poll() is TransferState.FAILED and receiver.error == "cancelled"
    sender = server.start_send("cancelled", "decode-0", pair.source(), timeout_s=1.0)
    assert sender.wait(5.0) is TransferState.FAILED


# ---- gRPC stream ------------------------------------------------------------------------------------


class _PullKvOnly(worker_pb2_grpc.WorkerServicer):
    def __init__(self) -> None:
        self.sources: dict[str, tuple[CacheKvSource, bool]] = {}
        self.mangle: Callable[[list[worker_pb2.KvChunk]], list[worker_pb2.KvChunk]] = lambda chunks: chunks

    def PullKv(self, request: worker_pb2.PullKvRequest, context: grpc.ServicerContext) -> Iterator[worker_pb2.KvChunk]:
        if request.lease_id not in self.sources:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown lease {request.lease_id}")
        source, checksum = self.sources[request.lease_id]
        yield from self.mangle(list(kv_chunks(source, checksum=checksum, max_chunk_bytes=5000)))


@pytest.fixture(scope="module")
def grpc_peer() -> Iterator[tuple[str, _PullKvOnly]]:
    servicer = _PullKvOnly()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield f"127.0.0.1:{port}", servicer
    srv.stop(grace=None)


def test_kv_chunks_carry_raw_little_endian_bf16_rows() -> None:
    pair = _Pair(num_tokens=40)
    chunks = list(kv_chunks(pair.source(), checksum=True, max_chunk_bytes=16 * ROW_DIM * 2))
    assert [(c.layer, c.first_token, c.rows) for c in chunks[:3]] == [(0, 0, 16), (0, 16, 16), (0, 32, 8)]
    rows = pair.source().layer(0)[16:32]
    assert chunks[1].data == rows.view(torch.int16).numpy().astype("<i2").tobytes()
    assert sum(len(c.data) for c in chunks) == ROW_DIM * 2 * NUM_LAYERS * 40


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grpc_receiver_writes_every_chunk(grpc_peer: tuple[str, _PullKvOnly], dtype: torch.dtype) -> None:
    address, servicer = grpc_peer
    pair = _Pair(num_tokens=130, dtype=dtype, seed=60)
    servicer.sources[f"lease-{dtype}"] = (pair.source(), True)
    receiver = GrpcKvReceiver(address, f"lease-{dtype}", pair.sink(), timeout_s=5.0, checksum=True)
    assert receiver.wait(10.0) is TransferState.SUCCESS, receiver.error
    pair.assert_moved()
    assert receiver.bytes_moved == pair.source().layout.nbytes


def _grpc_failure(
    grpc_peer: tuple[str, _PullKvOnly],
    lease: str,
    mangle: Callable[[list[Any]], list[Any]],
    *,
    on_wire: Callable[[int, torch.Tensor], None] | None = None,
) -> str:
    address, servicer = grpc_peer
    pair = _Pair(num_tokens=70, seed=70)
    servicer.sources[lease] = (pair.source(), True)
    servicer.mangle = mangle
    channel = grpc.insecure_channel(address)
    try:
        receiver = GrpcKvReceiver(
            lambda: worker_pb2_grpc.WorkerStub(channel),
            lease,
            pair.sink(),
            timeout_s=5.0,
            checksum=True,
            on_wire=on_wire,
        )
        assert receiver.wait(10.0) is TransferState.FAILED
    finally:
        servicer.mangle = lambda chunks: chunks
        channel.close()
    assert receiver.error is not None
    return receiver.error


def test_grpc_receiver_rejects_missing_extra_and_corrupt_rows(grpc_peer: tuple[str, _PullKvOnly]) -> None:
    assert _grpc_failure(grpc_peer, "gap", lambda c: c[:3] + c[4:]).startswith("missing rows: layer")
    assert _grpc_failure(grpc_peer, "short", lambda c: c[:-1]).startswith("missing rows: the stream ended at layer 2")
    assert _grpc_failure(grpc_peer, "extra", lambda c: [*c, c[-1]]).startswith("extra rows")
    assert _grpc_failure(grpc_peer, "again", lambda c: [*c[:3], c[2], *c[3:]]).startswith("extra rows")
    assert _grpc_failure(grpc_peer, "crc", lambda c: c, on_wire=_flip_byte(2)).startswith(
        "checksum mismatch in layer 2"
    )
    address, _ = grpc_peer
    pair = _Pair(num_tokens=8)
    receiver = GrpcKvReceiver(address, "no-such-lease", pair.sink(), timeout_s=5.0)
    assert receiver.wait(10.0) is TransferState.FAILED
    assert receiver.error is not None and "NOT_FOUND" in receiver.error and "unknown lease" in receiver.error


# ---- lease table ------------------------------------------------------------------------------------


def test_lease_table_grants_releases_and_expires_with_pinned_blocks_back_to_zero() -> None:
    now = [100.0]
    table = KvLeaseTable(ttl_s=10.0, clock=lambda: now[0])
    layout = KvLayout(3, 40, ROW_DIM, torch.bfloat16)
    a = table.grant("req-a", [4, 9, 2], 40, layout)
    b = table.grant("req-b", [7, 1, 3], 40, layout)
    assert a.lease_id != b.lease_id and a.expires_at == 110.0
    assert len(table) == 2 and table.pinned_blocks == 6
    assert table.get(a.lease_id) == a
    assert table.release(a.lease_id) == a
    assert table.release(a.lease_id) is None  # released once
    assert len(table) == 1 and table.pinned_blocks == 3
    now[0] = 110.0
    assert table.get(b.lease_id) is None  # past its time: no longer handed out
    assert table.release(b.lease_id) is None  # ... nor released: expire() owns it
    assert table.expire() == [b]
    assert table.expire() == []
    assert len(table) == 0 and table.pinned_blocks == 0

    c = table.grant("req-c", [5], 40, layout)
    d = table.grant("req-d", [6, 8], 40, layout)
    assert table.release_request("req-c") == [c]  # an aborted request gives its lease back
    assert table.expire_all() == [d]  # a stopping rank gives back everything
    assert len(table) == 0 and table.pinned_blocks == 0
