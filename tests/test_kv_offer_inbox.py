"""The prefill rank's offer inbox (p2p KV transfer): one reader thread files the offers of a real
``TCPStore`` queue by transfer id. Loopback only; every wait has a deadline."""

from __future__ import annotations

import datetime
import json
import threading
import time
from collections.abc import Iterator

import pytest
import torch.distributed as dist

from k2serve.workers.kv_offer_inbox import OFFERS_KEY, OfferInbox
from k2serve.workers.parallel import host_store


@pytest.fixture
def store() -> dist.TCPStore:
    return host_store("127.0.0.1", timeout_s=5.0)


def _inbox(store: dist.TCPStore, **kwargs: float) -> OfferInbox:
    def connect(timeout_s: float) -> dist.Store:
        return dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))

    return OfferInbox(connect, lambda message: store.queue_push(OFFERS_KEY, message), **kwargs)


@pytest.fixture
def inbox(store: dist.TCPStore) -> Iterator[OfferInbox]:
    inbox = _inbox(store, ttl_s=30.0)
    yield inbox
    inbox.close()


def _offer(store: dist.TCPStore, transfer_id: str, **extra: object) -> None:
    store.queue_push(OFFERS_KEY, json.dumps({"transfer": transfer_id, **extra}))


def _until(condition: object, what: str) -> None:
    deadline = time.monotonic() + 5.0
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def test_an_offer_pushed_before_its_sender_waits_is_kept_for_it(store: dist.TCPStore, inbox: OfferInbox) -> None:
    assert inbox.take("warm", 0.01) is None  # starts the reader
    _offer(store, "early", lane=0)
    _until(lambda: inbox.pending == 1, "the offer was never filed")
    assert json.loads(inbox.take("early", 1.0) or b"null") == {"transfer": "early", "lane": 0}
    assert inbox.pending == 0 and inbox.take("early", 0.01) is None  # taken once


def test_a_waiting_sender_wakes_when_its_offer_arrives_and_others_stay_filed(
    store: dist.TCPStore, inbox: OfferInbox
) -> None:
    got: list[bytes | None] = []
    waiter = threading.Thread(target=lambda: got.append(inbox.take("late", 5.0)))
    waiter.start()
    time.sleep(0.05)
    _offer(store, "someone-else")
    _offer(store, "late", n=1)
    _offer(store, "late", n=2)
    waiter.join(5.0)
    assert not waiter.is_alive() and json.loads(got[0] or b"null") == {
        "transfer": "late",
        "n": 1,
    }  # first in, first out
    _until(lambda: inbox.pending == 2, "the other offers were not kept")
    assert json.loads(inbox.take("late", 1.0) or b"null")["n"] == 2
    assert inbox.take("someone-else", 1.0) is not None


def test_a_withdrawn_offer_is_dropped_and_garbage_is_ignored(store: dist.TCPStore, inbox: OfferInbox) -> None:
    _offer(store, "gone")
    store.queue_push(OFFERS_KEY, b"not json")
    store.queue_push(OFFERS_KEY, b"[1, 2]")
    store.queue_push(OFFERS_KEY, json.dumps({"withdraw": "gone"}))
    _offer(store, "kept")
    assert inbox.take("kept", 5.0) is not None  # the reader went past the garbage
    assert inbox.take("gone", 0.05) is None and inbox.pending == 0


def test_unclaimed_offers_expire_and_at_most_max_pending_are_kept(store: dist.TCPStore) -> None:
    inbox = _inbox(store, ttl_s=0.2, max_pending=2)
    try:
        inbox.take("warm", 0.01)
        _offer(store, "old")
        _until(lambda: inbox.pending == 1, "the offer was never filed")
        time.sleep(0.3)
        _offer(store, "new")  # pruning happens as offers arrive
        _until(lambda: inbox.take("new", 0.01) is not None, "the new offer was never filed")
        assert inbox.take("old", 0.01) is None  # expired
        for k in range(3):
            _offer(store, f"burst-{k}")
        _until(lambda: inbox.take("burst-2", 0.01) is not None, "the burst was never filed")
        assert inbox.take("burst-0", 0.01) is None and inbox.pending == 1  # the oldest went first
    finally:
        inbox.close()


def test_close_ends_the_reader_and_fails_a_waiting_take(store: dist.TCPStore) -> None:
    inbox = _inbox(store, ttl_s=30.0)
    errors: list[str] = []

    def wait() -> None:
        try:
            inbox.take("never", 10.0)
        except RuntimeError as exc:
            errors.append(str(exc))

    waiter = threading.Thread(target=wait)
    waiter.start()
    _until(lambda: any(t.name == "kv-offers" for t in threading.enumerate()), "the reader never started")
    inbox.close()
    waiter.join(5.0)
    assert not waiter.is_alive() and errors == ["the transfer server is closed"]
    _until(lambda: not any(t.name == "kv-offers" for t in threading.enumerate()), "the reader did not end")
    with pytest.raises(RuntimeError, match="closed"):
        inbox.take("after", 0.01)
