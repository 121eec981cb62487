"""Zero-copy p2p KV transfer: runs and segments, direct sends and receives straight from and into the
paged cache (staged where a side is fragmented), the safety of cancel() with receives posted into the
decode rank's pages, and a source whose layers become ready one by one. Loopback gloo; every wait has a
deadline."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch
from kv_caches import BLOCK_SIZE, NUM_BLOCKS, NUM_LAYERS, ROW_DIM, paged_cache

from k2serve.workers import kv_segments
from k2serve.workers.kv_pages import CacheKvSink, CacheKvSource, KvLayout, PagedRows
from k2serve.workers.kv_receive_fence import DRAIN_S
from k2serve.workers.kv_segments import Segment, parse_runs, plan, refine, run_lengths
from k2serve.workers.kv_transfer import SendFault, TransferError, TransferState
from k2serve.workers.kv_transport_p2p import P2pKvClient, P2pKvServer
from k2serve.workers.transfer_threads import TransferThreads

SENDER, RECEIVER = "prefill-d", "decode-d"


# ---- runs and segments ------------------------------------------------------------------------------


def test_runs_are_the_stretches_of_consecutive_block_ids_in_token_order() -> None:
    assert run_lengths([4, 5, 6], 40, 16) == (40,)  # one run; the last block is partly filled
    assert run_lengths([4, 5, 9, 10, 2], 70, 16) == (32, 32, 6)
    assert run_lengths([7, 6, 5], 48, 16) == (16, 16, 16)  # descending ids are not consecutive
    assert run_lengths([3, 4, 99], 20, 16) == (20,)  # blocks past the tokens do not count
    with pytest.raises(ValueError, match="block_ids"):
        run_lengths([1], 40, 16)


def test_paged_rows_find_the_same_runs_and_refuse_a_segment_across_a_gap() -> None:
    for seed in range(40):
        rng = random.Random(seed)
        num_tokens = rng.randint(1, 400)
        needed = -(-num_tokens // BLOCK_SIZE)
        ids = sorted(rng.sample(range(NUM_BLOCKS), needed)) if seed % 2 else rng.sample(range(NUM_BLOCKS), needed)
        pages = PagedRows(paged_cache(torch.float32, seed), ids, num_tokens)
        assert pages.runs == run_lengths(ids, num_tokens, BLOCK_SIZE)
    pages = PagedRows(paged_cache(torch.float32, 0), [4, 5, 9], 40)
    assert pages.segment_rows([Segment(0, 32), Segment(32, 8)]) == [4 * BLOCK_SIZE, 9 * BLOCK_SIZE]
    assert torch.equal(pages.segment(1, 4 * BLOCK_SIZE + 3, 20), pages.kv[1].view(-1, ROW_DIM)[67:87])
    with pytest.raises(ValueError, match=r"segment \[16, 40\)"):
        pages.segment_rows([Segment(16, 24)])


def test_segments_are_the_common_refinement_of_the_direct_sides() -> None:
    assert refine(100, (40, 60), (10, 90)) == (Segment(0, 10), Segment(10, 30), Segment(40, 60))
    assert refine(100, (40, 60), None) == (Segment(0, 40), Segment(40, 60))  # a staged side: no boundary
    assert refine(100, None, None) == (Segment(0, 100),)
    with pytest.raises(ValueError, match="cover"):
        refine(100, (40, 50))


def test_the_plan_is_the_cheapest_choice_under_the_message_cost() -> None:
    row = 1152  # Kimi K2: 576 bf16 values
    one = plan((8192,), (8192,), 8192, row)
    assert (one.sender_direct, one.receiver_direct, one.segments) == (True, True, (Segment(0, 8192),))
    # a fragmented receiver stages: 63 more messages cost more than one copy of a 9.4 MB layer
    fragmented = tuple([128] * 64)
    sender_only = plan((8192,), fragmented, 8192, row)
    assert (sender_only.sender_direct, sender_only.receiver_direct, len(sender_only.segments)) == (True, False, 1)
    # a few runs on each side: both direct, cut at every boundary of either side
    few = plan((4096, 4096), (2048, 6144), 8192, row)
    assert (few.sender_direct, few.receiver_direct) == (True, True)
    assert few.segments == (Segment(0, 2048), Segment(2048, 2048), Segment(4096, 4096))
    # a side that did not advertise runs (no pages, or more than MAX_SEGMENTS) stages
    assert plan(None, (8192,), 8192, row).sender_direct is False
    small = plan(tuple([16] * 8), tuple([16] * 8), 128, row)  # 147 KB layers: copying is cheaper
    assert (small.sender_direct, small.receiver_direct, small.segments) == (False, False, (Segment(0, 128),))


def test_a_peers_runs_are_validated_and_the_field_is_named() -> None:
    assert parse_runs(None, 10, "offer.runs") is None
    assert parse_runs([4, 6], 10, "offer.runs") == (4, 6)
    for bad in ([4, 5], [0, 10], [-1, 11], "10", [True, 9], [10.0], list(range(1, 200))):
        with pytest.raises(ValueError, match=r"^offer\.runs: expected"):
            parse_runs(bad, 10, "offer.runs")


# ---- direct round trips -----------------------------------------------------------------------------


def _contiguous(num_tokens: int, first: int) -> list[int]:
    return list(range(first, first + -(-num_tokens // BLOCK_SIZE)))


def _shuffled(num_tokens: int, seed: int) -> list[int]:
    return random.Random(seed).sample(range(NUM_BLOCKS), -(-num_tokens // BLOCK_SIZE))


class _CountingSource(CacheKvSource):
    """Counts the gathers (``layer`` calls): a direct sender makes none."""

    def __init__(self, kv_cache: list[torch.Tensor], block_ids: list[int], num_tokens: int) -> None:
        super().__init__(kv_cache, block_ids, num_tokens)
        self.gathers = 0

    def layer(self, index: int, out: torch.Tensor | None = None) -> torch.Tensor:
        self.gathers += 1
        return super().layer(index, out)


class _CountingSink(CacheKvSink):
    """Counts the scatters (``write`` calls): a direct receiver makes none."""

    def __init__(self, kv_cache: list[torch.Tensor], block_ids: list[int], num_tokens: int) -> None:
        super().__init__(kv_cache, block_ids, num_tokens)
        self.writes = 0

    def write(self, layer: int, first_token: int, rows: torch.Tensor) -> None:
        self.writes += 1
        super().write(layer, first_token, rows)


class _Pair:
    def __init__(
        self, num_tokens: int, src_blocks: list[int], dst_blocks: list[int], dtype: torch.dtype = torch.bfloat16
    ) -> None:
        self.num_tokens = num_tokens
        self.src, self.dst = paged_cache(dtype, len(src_blocks)), paged_cache(dtype, 0, zero=True)
        self.src_blocks, self.dst_blocks = src_blocks, dst_blocks
        self.source = _CountingSource(self.src, src_blocks, num_tokens)
        self.sink = _CountingSink(self.dst, dst_blocks, num_tokens)

    def moved(self) -> bool:
        return all(self.layer_moved(layer) for layer in range(NUM_LAYERS))

    def layer_moved(self, layer: int) -> bool:
        return torch.equal(
            CacheKvSource(self.src, self.src_blocks, self.num_tokens).layer(layer),
            CacheKvSource(self.dst, self.dst_blocks, self.num_tokens).layer(layer),
        )


@pytest.fixture(scope="module")
def server() -> Iterator[P2pKvServer]:
    server = P2pKvServer(SENDER, "127.0.0.1", timeout_s=5.0)
    yield server
    server.close()


@pytest.fixture(scope="module")
def client() -> Iterator[P2pKvClient]:
    client = P2pKvClient(RECEIVER, timeout_s=5.0)
    yield client
    client.close()


def _transfer(
    server: P2pKvServer,
    client: P2pKvClient,
    tid: str,
    pair: _Pair,
    *,
    checksum: bool = False,
    on_wire: Callable[[int, torch.Tensor], None] | None = None,
) -> None:
    receiver = client.start_receive(tid, SENDER, server.rendezvous, pair.sink, checksum=checksum, on_wire=on_wire)
    sender = server.start_send(tid, RECEIVER, pair.source, checksum=checksum)
    states = [receiver.wait(10.0), sender.wait(10.0)]
    assert states == [TransferState.SUCCESS] * 2, (receiver.error, sender.error)
    nbytes = pair.sink.layout.nbytes  # = ROW_DIM × dtype size × NUM_LAYERS × num_tokens
    assert sender.bytes_moved == receiver.bytes_moved == nbytes, (sender.bytes_moved, receiver.bytes_moved)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("checksum", [False, True])
def test_contiguous_pages_move_with_neither_gather_nor_scatter(
    server: P2pKvServer, client: P2pKvClient, dtype: torch.dtype, checksum: bool
) -> None:
    pair = _Pair(301, _contiguous(301, 3), _contiguous(301, 20), dtype)  # a partly filled last block
    _transfer(server, client, f"contig-{dtype}-{checksum}", pair, checksum=checksum)
    assert pair.moved()
    assert pair.source.gathers == 0 and pair.sink.writes == 0


def test_a_fragmented_side_stages_while_the_other_stays_direct(server: P2pKvServer, client: P2pKvClient) -> None:
    pair = _Pair(200, _contiguous(200, 0), _shuffled(200, 5))
    _transfer(server, client, "one-side", pair, checksum=True)
    assert pair.moved()
    assert pair.source.gathers == 0 and pair.sink.writes == NUM_LAYERS  # the receiver scattered each layer

    pair = _Pair(200, _shuffled(200, 6), _contiguous(200, 30))
    _transfer(server, client, "other-side", pair)
    assert pair.moved()
    assert pair.source.gathers == NUM_LAYERS and pair.sink.writes == 0

    pair = _Pair(200, _shuffled(200, 7), _shuffled(200, 8))
    _transfer(server, client, "both-fragmented", pair, checksum=True)
    assert pair.moved()
    assert pair.source.gathers == pair.sink.writes == NUM_LAYERS


def test_runs_on_both_sides_cut_each_layer_into_direct_segments(
    server: P2pKvServer, client: P2pKvClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kv_segments, "MESSAGE_COST_BYTES", 64)  # messages nearly free: segments win
    src = [10, 11, 12, 30, 31, 32, 33, 0, 1, 2, 3, 4, 5]  # runs of 48, 64, 88 tokens
    dst = [40, 41, 20, 21, 22, 23, 24, 25, 26, 27, 5, 6, 7]  # runs of 32, 128, 40 tokens
    seen: dict[int, list[int]] = {}
    pair = _Pair(200, src, dst)
    _transfer(
        server,
        client,
        "segments",
        pair,
        checksum=True,
        on_wire=lambda i, rows: seen.setdefault(i, []).append(len(rows)),
    )
    assert pair.moved()
    assert pair.source.gathers == 0 and pair.sink.writes == 0
    assert seen == {i: [32, 16, 64, 48, 40] for i in range(NUM_LAYERS)}  # every boundary of either side


def test_a_corrupt_byte_in_a_direct_segment_fails_the_checksum(
    server: P2pKvServer, client: P2pKvClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kv_segments, "MESSAGE_COST_BYTES", 64)
    pair = _Pair(100, [0, 1, 2, 9, 10, 11, 12], _contiguous(100, 30))  # sender runs of 48 and 52 tokens

    def flip(layer: int, rows: torch.Tensor) -> None:
        if layer == 2 and rows.shape[0] == 52:  # the second segment, already in the sink's pages
            rows.view(-1).view(torch.uint8)[5] ^= 0x10

    receiver = client.start_receive("corrupt", SENDER, server.rendezvous, pair.sink, checksum=True, on_wire=flip)
    sender = server.start_send("corrupt", RECEIVER, pair.source, checksum=True)
    assert [receiver.wait(10.0), sender.wait(10.0)] == [TransferState.FAILED] * 2
    assert receiver.error == "checksum mismatch in layer 2"
    assert sender.error == "receiver reported checksum mismatch in layer 2"
    assert pair.sink.writes == 0


def test_an_injected_corruption_never_touches_the_senders_pages(server: P2pKvServer, client: P2pKvClient) -> None:
    pair = _Pair(64, _contiguous(64, 0), _contiguous(64, 10))
    before = [layer.clone() for layer in pair.src]
    receiver = client.start_receive("fault", SENDER, server.rendezvous, pair.sink, checksum=True)
    sender = server.start_send("fault", RECEIVER, pair.source, checksum=True, fault=SendFault(corrupt=True))
    assert [receiver.wait(10.0), sender.wait(10.0)] == [TransferState.FAILED] * 2
    assert receiver.error == "checksum mismatch in layer 0"
    assert all(torch.equal(a, b) for a, b in zip(before, pair.src, strict=True))
    assert pair.source.gathers >= 1  # the fault's flipped byte went into a staged copy


# ---- cancel and failure with receives posted into the pages -------------------------------------------


class _GatedSource(_CountingSource):
    """Layers from ``gate_layer`` on are ready only once ``gate`` is set: the sender stops there."""

    def __init__(self, kv_cache: list[torch.Tensor], block_ids: list[int], num_tokens: int, gate_layer: int) -> None:
        super().__init__(kv_cache, block_ids, num_tokens)
        self.gate_layer = gate_layer
        self.gate = threading.Event()

    def ready(self, layer: int, timeout_s: float) -> bool:
        return layer < self.gate_layer or self.gate.wait(timeout_s)


def _until(condition: Callable[[], bool], limit_s: float = 5.0) -> None:
    end = time.monotonic() + limit_s
    while not condition() and time.monotonic() < end:
        time.sleep(0.005)
    assert condition(), "condition not met in time"


def _gated_pair(num_tokens: int) -> tuple[_Pair, _GatedSource]:
    pair = _Pair(num_tokens, _contiguous(num_tokens, 0), _contiguous(num_tokens, 20))
    source = _GatedSource(pair.src, pair.src_blocks, num_tokens, gate_layer=1)
    return pair, source


def test_cancel_returns_only_once_no_posted_receive_can_write_the_pages(
    server: P2pKvServer, client: P2pKvClient
) -> None:
    pair, source = _gated_pair(256)
    receiver = client.start_receive("cancel-direct", SENDER, server.rendezvous, pair.sink, timeout_s=20.0)
    sender = server.start_send("cancel-direct", RECEIVER, source, timeout_s=6.0)
    _until(lambda: pair.layer_moved(0))  # layer 0 is in the pages; layers 1, 2 are posted into them
    snapshot = [layer.clone() for layer in pair.dst]
    started = time.monotonic()
    receiver.cancel()
    assert time.monotonic() - started < DRAIN_S + 1.0
    assert receiver.poll() is TransferState.FAILED and receiver.error == "cancelled"
    source.gate.set()  # the sender goes on with layers 1 and 2, straight at the posted receives
    state = sender.wait(10.0)  # it fails: at once, or at its deadline when gloo does not tell it
    time.sleep(0.2)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, pair.dst, strict=True)), "written after cancel()"
    assert not pair.dst[1].any()  # layer 1 never arrived
    assert pair.sink.writes == 0
    assert state is TransferState.FAILED

    fresh = _Pair(256, _contiguous(256, 0), _contiguous(256, 20))
    _transfer(server, client, "after-cancel", fresh, checksum=True)  # a new group carries the next one
    assert fresh.moved()


def test_a_receiver_that_fails_writes_nothing_once_it_reports_failed(server: P2pKvServer, client: P2pKvClient) -> None:
    pair, source = _gated_pair(128)

    def boom(layer: int, rows: torch.Tensor) -> None:
        raise RuntimeError("tap broke")

    receiver = client.start_receive("fails", SENDER, server.rendezvous, pair.sink, timeout_s=20.0, on_wire=boom)
    sender = server.start_send("fails", RECEIVER, source, timeout_s=6.0)
    assert receiver.wait(10.0) is TransferState.FAILED
    assert receiver.error == "RuntimeError: tap broke"
    snapshot = [layer.clone() for layer in pair.dst]
    source.gate.set()
    state = sender.wait(10.0)
    time.sleep(0.2)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, pair.dst, strict=True)), "written after FAILED"
    assert state is TransferState.FAILED


# ---- readiness ----------------------------------------------------------------------------------------


class _PrefillSource(CacheKvSource):
    """Blocks known only after ``begin`` and layers written one by one, like a prefill still running: the
    pages are supplied lazily (this class never calls ``CacheKvSource.__init__`` before ``begin``)."""

    def __init__(self, kv_cache: list[torch.Tensor], block_ids: list[int], num_tokens: int) -> None:
        self._cache, self._ids = kv_cache, block_ids
        self._layout = KvLayout(len(kv_cache), num_tokens, ROW_DIM, kv_cache[0].dtype)
        self._cond = threading.Condition()
        self._begun, self._done, self._failure = False, 0, ""
        self.released_at: list[float] = []

    @property
    def layout(self) -> KvLayout:
        return self._layout

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def pages(self) -> PagedRows:
        assert self._begun, "pages read before ready(-1)"
        return PagedRows(self._cache, self._ids, self._layout.num_tokens)

    def begin(self) -> None:
        with self._cond:
            self._begun = True
            self._cond.notify_all()

    def layer_done(self) -> None:
        with self._cond:
            self._done += 1
            self.released_at.append(time.monotonic())
            self._cond.notify_all()

    def fail(self, reason: str) -> None:
        with self._cond:
            self._failure = reason
            self._cond.notify_all()

    def ready(self, layer: int, timeout_s: float) -> bool:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._failure or (self._begun if layer < 0 else self._done > layer), timeout_s
            )
            if self._failure:
                raise TransferError(f"the prefill failed: {self._failure}")
            return bool(ok)


def test_a_source_ready_layer_by_layer_is_sent_as_each_layer_is_written(
    server: P2pKvServer, client: P2pKvClient
) -> None:
    pair = _Pair(150, _contiguous(150, 0), _contiguous(150, 25))
    source = _PrefillSource(pair.src, pair.src_blocks, 150)
    arrived: dict[int, float] = {}
    receiver = client.start_receive(
        "layers", SENDER, server.rendezvous, pair.sink, on_wire=lambda i, _: arrived.setdefault(i, time.monotonic())
    )
    sender = server.start_send("layers", RECEIVER, source)

    def prefill() -> None:
        time.sleep(0.1)
        source.begin()
        for _ in range(NUM_LAYERS):
            time.sleep(0.08)
            source.layer_done()

    threading.Thread(target=prefill, daemon=True).start()
    assert [receiver.wait(10.0), sender.wait(10.0)] == [TransferState.SUCCESS] * 2, (receiver.error, sender.error)
    assert pair.moved()
    for layer in range(NUM_LAYERS):
        assert arrived[layer] >= source.released_at[layer]  # never before it was written
    assert arrived[0] < source.released_at[-1]  # the first layer left while the last was being computed


def test_a_source_that_fails_before_its_blocks_are_known_fails_both_sides_and_keeps_the_group(
    server: P2pKvServer, client: P2pKvClient
) -> None:
    _transfer(server, client, "warm", _Pair(32, _contiguous(32, 0), _contiguous(32, 8)))
    generation = server.slot(RECEIVER, "gloo").generation
    pair = _Pair(64, _contiguous(64, 0), _contiguous(64, 10))
    source = _PrefillSource(pair.src, pair.src_blocks, 64)
    receiver = client.start_receive("early-fail", SENDER, server.rendezvous, pair.sink)
    sender = server.start_send("early-fail", RECEIVER, source)
    time.sleep(0.05)
    source.fail("aborted")
    assert [receiver.wait(10.0), sender.wait(10.0)] == [TransferState.FAILED] * 2
    assert sender.error == receiver.error == "the prefill failed: aborted"
    fresh = _Pair(64, _contiguous(64, 0), _contiguous(64, 10))
    _transfer(server, client, "after-early-fail", fresh)
    assert fresh.moved()
    assert server.slot(RECEIVER, "gloo").generation == generation  # the same group carried it


def test_a_receiver_reports_success_before_its_acknowledgement_and_a_late_cancel_keeps_the_group(
    server: P2pKvServer, client: P2pKvClient
) -> None:
    _transfer(server, client, "warm-ack", _Pair(32, _contiguous(32, 0), _contiguous(32, 8)))
    generation = server.slot(RECEIVER, "gloo").generation
    for k in range(5):  # the cancel lands before, during or after the acknowledgement goes out
        pair = _Pair(200, _contiguous(200, 0), _contiguous(200, 20))
        receiver = client.start_receive(f"late-cancel-{k}", SENDER, server.rendezvous, pair.sink)
        sender = server.start_send(f"late-cancel-{k}", RECEIVER, pair.source)
        assert receiver.wait(10.0) is TransferState.SUCCESS, receiver.error  # wakes the moment it is reported
        receiver.cancel("too late")
        assert receiver.poll() is TransferState.SUCCESS and receiver.error is None
        assert pair.moved()  # SUCCESS: every row is in the pages already
        assert sender.wait(10.0) is TransferState.SUCCESS, sender.error  # its acknowledgement still came
    fresh = _Pair(64, _contiguous(64, 0), _contiguous(64, 10))
    _transfer(server, client, "after-late-cancel", fresh)
    assert fresh.moved()
    assert server.slot(RECEIVER, "gloo").generation == generation  # the same group carried every one


def test_transfer_threads_are_reused() -> None:
    threads = TransferThreads("t", idle_s=5.0)
    done = threading.Semaphore(0)
    for _ in range(5):
        threads.run(done.release)
        assert done.acquire(timeout=5.0)
        _until(lambda: threads.idle_threads == 1)  # back from its job
    assert threads.threads_started == 1
    both = threading.Barrier(3, timeout=5.0)
    threads.run(both.wait)
    threads.run(both.wait)  # two at once need two threads
    both.wait()
    assert threads.threads_started == 2
