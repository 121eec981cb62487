"""``ParallelContext`` plumbing: the store binds only the interface it is given; bad ranks are refused."""

from __future__ import annotations

import psutil
import pytest

from k2serve.workers.parallel import GroupError, ParallelContext, Rendezvous, host_store


def test_the_store_listens_on_the_given_interface_only() -> None:
    store = host_store("127.0.0.1")
    listening = [c for c in psutil.Process().net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
    mine = [c for c in listening if c.laddr.port == store.port]
    assert mine and all(c.laddr.ip == "127.0.0.1" for c in mine)


def test_bad_arguments_name_the_field() -> None:
    with pytest.raises(ValueError, match="ep_rank"):
        ParallelContext.create("127.0.0.1:1", 2, 2)
    with pytest.raises(ValueError, match="ep_size"):
        ParallelContext.create("127.0.0.1:1", 0, 0)
    with pytest.raises(ValueError, match="rendezvous"):
        Rendezvous.parse("no-port")
    with pytest.raises(GroupError, match="cannot reach the rendezvous"):
        ParallelContext.create("127.0.0.1:1", 0, 2, timeout_s=0.5)
    assert ParallelContext.single().all_gather_ints([3, 4]) == [[3, 4]]
