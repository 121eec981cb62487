"""A p2p receiver's blocking wait for its answer on the prefill rank's store, with the sender's side
played by hand: a late message on an earlier transfer's answer queue (the second of a crossed answer and
cancel wake-up) must not end the wait of the lane's next transfer. c10d's store server keeps a
connection among the waiters of every queue it ever blocked on, and wakes it for such a message."""

from __future__ import annotations

import datetime
import json
import threading
import time

import torch
import torch.distributed as dist
from kv_caches import paged_cache

from k2serve.workers.kv_offer_inbox import OFFERS_KEY
from k2serve.workers.kv_p2p_link import TransferStore, answer_key
from k2serve.workers.kv_p2p_receiver import WAKE
from k2serve.workers.kv_transfer import CacheKvSink, TransferState
from k2serve.workers.kv_transport_p2p import P2pKvClient
from k2serve.workers.parallel import Rendezvous, host_store

SENDER = "prefill-0"


def _sink() -> CacheKvSink:
    return CacheKvSink(paged_cache(torch.bfloat16, 0, zero=True), [0, 1], 32)


def test_the_store_server_wakes_a_connection_for_a_queue_it_waited_on_before() -> None:
    """The library behaviour the receiver copes with (if a torch release fixes it, this test says so)."""
    server = host_store("127.0.0.1", timeout_s=5.0)
    timeout = datetime.timedelta(seconds=5)
    waiter = dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=timeout)
    other = dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=timeout)
    popped: list[object] = []

    def pop(key: str) -> None:
        try:
            popped.append(waiter.queue_pop(key, block=True))
        except dist.QueueEmptyError as exc:
            popped.append(exc)

    first = threading.Thread(target=pop, args=("a",))
    first.start()
    time.sleep(0.2)
    other.queue_push("a", "1")
    first.join(5.0)
    second = threading.Thread(target=pop, args=("b",))
    second.start()
    time.sleep(0.2)
    other.queue_push("a", "2")  # a late message on the queue the connection waited on before
    second.join(5.0)
    assert not second.is_alive()
    assert popped[0] == b"1" and isinstance(popped[1], dist.QueueEmptyError)


def test_a_late_message_on_an_earlier_answer_queue_does_not_end_the_next_transfers_wait() -> None:
    listener = host_store("127.0.0.1", timeout_s=5.0)
    at = TransferStore.new(Rendezvous("127.0.0.1", listener.port))
    store = at.scoped(listener)
    client = P2pKvClient("decode-9", timeout_s=5.0, lanes=1)  # one lane: both transfers on its connections
    try:
        first = client.start_receive("t1", SENDER, at, _sink())
        assert json.loads(store.queue_pop(OFFERS_KEY, block=True))["transfer"] == "t1"
        store.queue_push(answer_key("t1"), json.dumps({"error": "not now"}))
        assert first.wait(5.0) is TransferState.FAILED and first.error == "not now"

        second = client.start_receive("t2", SENDER, at, _sink())
        assert json.loads(store.queue_pop(OFFERS_KEY, block=True))["transfer"] == "t2"
        time.sleep(0.2)  # the receiver blocks in its pop of t2's answer
        store.queue_push(answer_key("t1"), WAKE)  # t1's cancel wake-up, crossed with its answer
        time.sleep(0.3)
        assert second.poll() is TransferState.BOOTSTRAPPING, second.error  # still waiting for its own answer
        store.queue_push(answer_key("t2"), json.dumps({"error": "t2 answered"}))
        assert second.wait(5.0) is TransferState.FAILED and second.error == "t2 answered"
    finally:
        client.close()
