"""The p2p transfer store's namespace key (``TransferStore``): only a holder of the prefill rank's key,
which travels inside a ``KvHandle``, can offer, answer or join there; a process that merely reaches the
store's port (a bare ``TCPStore`` client, or a client with another key) reaches no sender and no
group, and takes no KV rows."""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from kv_caches import paged_cache

from k2serve.workers.kv_offer_inbox import OFFERS_KEY
from k2serve.workers.kv_p2p_link import TransferStore, generation_keys
from k2serve.workers.kv_transfer import CacheKvSink, CacheKvSource, TransferState
from k2serve.workers.kv_transport_p2p import P2pKvClient, P2pKvServer
from k2serve.workers.parallel import Rendezvous

BLOCKS = [0, 1, 2, 3]
NUM_TOKENS = 64


@pytest.fixture
def server() -> Iterator[P2pKvServer]:
    server = P2pKvServer("prefill-0", "127.0.0.1", timeout_s=5.0)
    yield server
    server.close()


def _bare(server: P2pKvServer) -> dist.TCPStore:
    """A connection to the server's store by someone who knows only its address."""
    where = server.rendezvous.address
    return dist.TCPStore(where.host, where.port, is_master=False, timeout=datetime.timedelta(seconds=2))


def _finish_with_the_right_key(server: P2pKvServer, tid: str, src: list[torch.Tensor]) -> None:
    """The sender of ``tid`` still serves its real receiver, and the rows arrive intact."""
    dst = paged_cache(torch.bfloat16, 0, zero=True)
    client = P2pKvClient("decode-0", timeout_s=5.0)
    try:
        receiver = client.start_receive(tid, "prefill-0", server.rendezvous, CacheKvSink(dst, BLOCKS, NUM_TOKENS))
        assert receiver.wait(10.0) is TransferState.SUCCESS, receiver.error
        for want, got in zip(src, dst, strict=True):
            assert torch.equal(want[BLOCKS], got[BLOCKS])
    finally:
        client.close()


def test_a_receiver_with_another_key_reaches_no_sender_and_the_real_one_still_does(server: P2pKvServer) -> None:
    src = paged_cache(torch.bfloat16, 3)
    sender = server.start_send("t1", "decode-0", CacheKvSource(src, BLOCKS, NUM_TOKENS))
    intruder = P2pKvClient("decode-0", timeout_s=1.0)  # even the right worker id and transfer id
    try:
        wrong = TransferStore(server.rendezvous.address, "0" * 32)
        dst = paged_cache(torch.bfloat16, 0, zero=True)
        stolen = intruder.start_receive("t1", "prefill-0", wrong, CacheKvSink(dst, BLOCKS, NUM_TOKENS))
        assert stolen.wait(5.0) is TransferState.FAILED
        assert stolen.error is not None and "waiting for sender prefill-0 to answer" in stolen.error
        assert not any(layer.any() for layer in dst)  # not a row came
        assert sender.poll() is TransferState.BOOTSTRAPPING  # it never saw that offer
    finally:
        intruder.close()
    _finish_with_the_right_key(server, "t1", src)
    assert sender.wait(5.0) is TransferState.SUCCESS, sender.error


def test_an_offer_pushed_on_the_bare_store_is_never_read_and_no_key_is_outside_the_namespace(
    server: P2pKvServer,
) -> None:
    src = paged_cache(torch.bfloat16, 4)
    sender = server.start_send("t2", "decode-0", CacheKvSource(src, BLOCKS, NUM_TOKENS))
    bare = _bare(server)
    forged = {"transfer": "t2", "receiver": "decode-0", "lane": 0, "cached": "", "layout": [], "runs": None}
    bare.queue_push(OFFERS_KEY, json.dumps(forged))
    time.sleep(0.3)  # the server's offer reader would have popped it by now
    assert bare.queue_len(OFFERS_KEY) == 1  # still there: nobody reads the bare queue
    assert sender.poll() is TransferState.BOOTSTRAPPING
    _finish_with_the_right_key(server, "t2", src)
    assert sender.wait(5.0) is TransferState.SUCCESS, sender.error
    group = server.slot("decode-0", "gloo").group
    assert group is not None
    keys = generation_keys(group.prefix, "gloo")  # what the group's rendezvous wrote
    assert [k for k in keys if server.store.check([k])]  # inside the namespace
    assert not [k for k in keys if bare.check([k])]  # and nowhere a bare client would look


def test_the_key_is_checked_named_in_errors_and_kept_out_of_str_and_repr() -> None:
    where = Rendezvous("127.0.0.1", 5000)
    made = TransferStore.new(where)
    assert len(made.key) == 32 and made.key != TransferStore.new(where).key
    assert str(made) == "127.0.0.1:5000" and made.key not in repr(made)
    assert TransferStore.parse("127.0.0.1:5000", made.key) == made
    for bad in ("", "short", "x" * 129, "a/b" * 8, "é" * 16):
        with pytest.raises(ValueError, match=r"kv\.transfer_key"):
            TransferStore(where, bad)
    with pytest.raises(ValueError, match=r"kv\.transfer_rendezvous"):
        TransferStore.parse("no-port", made.key)
