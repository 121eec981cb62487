"""``StoreSweep`` on a real ``TCPStore``, and what a p2p transfer server's store holds after many
cancelled transfers: an answer queue per receiver lane (none per transfer), and at most the newest
generation's keys of each lane."""

from __future__ import annotations

import datetime
import random
import time

import torch
import torch.distributed as dist
from kv_caches import paged_cache

from k2serve.workers.kv_pair_group import DEFAULT_LANES
from k2serve.workers.kv_store_sweep import StoreSweep
from k2serve.workers.kv_transfer import CacheKvSink, CacheKvSource, TransferState
from k2serve.workers.kv_transport_p2p import P2pKvClient, P2pKvServer
from k2serve.workers.transfer_threads import TransferThreads


def _store() -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=5), wait_for_workers=False)


def test_the_sweep_deletes_keys_once_their_grace_has_passed() -> None:
    store, now = _store(), [100.0]
    sweep = StoreSweep(store, clock=lambda: now[0])
    store.set("a", "1")
    store.set("b", "2")
    sweep.later(["a"], grace_s=1.0)
    sweep.later(["b"], grace_s=5.0)
    assert sweep.run_due() == 0 and sweep.pending == 2  # nothing is due yet
    now[0] = 102.0
    assert sweep.run_due() == 1  # "a"
    assert not store.check(["a"]) and store.check(["b"])
    assert sweep.pending == 1
    sweep.later(["never-set"], grace_s=0.0)
    assert sweep.run_due(now=float("inf")) == 1  # "b"; a key that is not there counts nothing
    assert not store.check(["b"]) and sweep.pending == 0


def test_a_store_that_is_gone_deletes_nothing_and_raises_nothing() -> None:
    server = _store()
    client = dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=datetime.timedelta(seconds=2))
    sweep = StoreSweep(client)
    sweep.later(["a", "b"], grace_s=0.0)
    del server  # the store's server stops with its last reference
    assert sweep.run_due() == 0 and sweep.pending == 0


def test_cancelled_transfers_leave_only_each_lanes_answer_queue_and_newest_group_keys() -> None:
    """Receivers cancelled at random points of the handshake (waiting for the answer, joining, receiving):
    each such transfer used to leave its pair-group generation's keys in the prefill rank's store for
    good, and an answer queue of its own (c10d never forgets a queue, even an emptied one)."""
    server = P2pKvServer("prefill-0", "127.0.0.1", timeout_s=2.0)
    client = P2pKvClient("decode-0", timeout_s=2.0)
    src, dst = paged_cache(torch.bfloat16, 0), paged_cache(torch.bfloat16, 0, zero=True)
    rng = random.Random(7)
    try:
        for i in range(16):
            tid = f"cancel-{i}"
            sender = server.start_send(tid, "decode-0", CacheKvSource(src, [0, 1, 2, 3], 64))
            receiver = client.start_receive(tid, "prefill-0", server.rendezvous, CacheKvSink(dst, [0, 1, 2, 3], 64))
            time.sleep(rng.random() * 0.004)
            receiver.cancel()
            assert receiver.wait(5.0).done  # FAILED, or SUCCESS when the cancel came after the end
            assert sender.wait(5.0).done
        ok = server.start_send("after", "decode-0", CacheKvSource(src, [0, 1, 2, 3], 64))
        back = client.start_receive("after", "prefill-0", server.rendezvous, CacheKvSink(dst, [0, 1, 2, 3], 64))
        assert [ok.wait(5.0), back.wait(5.0)] == [TransferState.SUCCESS] * 2
        _await_idle(server.threads, client.threads)  # a cancelled side's thread may still be leaving its group
        server.sweep.run_due(now=float("inf"))  # as a transfer ending after every grace would
        lanes = client.lanes(server.rendezvous, "prefill-0", "gloo").slots
        queues = {slot.answer_key for slot in lanes if slot.answer_key}
        assert 1 <= len(queues) <= DEFAULT_LANES  # the lanes' own queues (test_kv_store_waits: a lane reuses its)
        # what stays: each lane's newest generation (its join key or the library's two rendezvous keys)
        assert server.store.num_keys() <= 3 * DEFAULT_LANES, server.store.num_keys()
    finally:
        client.close()
        server.close()


def _await_idle(*pools: TransferThreads, limit_s: float = 10.0) -> None:
    """Until every thread of ``pools`` waits for its next transfer (bounded)."""
    deadline = time.monotonic() + limit_s
    while any(pool.idle_threads < pool.threads_started for pool in pools):
        assert time.monotonic() < deadline, "transfer threads still busy"
        time.sleep(0.01)
