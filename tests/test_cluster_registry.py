"""The Registry without Ray: versions bump only on real changes, Watch streams the current set then every
change, List answers once, the client reconnects to a restarted registry and gives up, bounded, on a
dead one. Plus the controller's pure policies: restart back-off and placement strategy."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import AsyncIterator

import pytest

from k2serve.cluster.config import RestartSettings
from k2serve.cluster.placement import fits_cluster, group_strategy
from k2serve.cluster.registry import RegistryServer, WorkerBoard
from k2serve.cluster.registry_client import RegistryClient, RegistryUnavailableError
from k2serve.cluster.restart_policy import RestartPolicy
from k2serve.cluster.worker_record import WorkerRecord, WorkerSnapshot, worker_id
from k2serve.router.dispatcher import Dispatcher
from k2serve.router.scrape_targets import ScrapeTargets
from k2serve.router_main import registry_follower


def _worker(pool: str, group: int, rank: int, address: str = "", state: str = "ready") -> WorkerRecord:
    role = {"prefill": "prefill", "decode": "decode", "colocated": "mixed"}[pool]
    return WorkerRecord(worker_id(pool, group, rank), pool, role, group, rank, 2, address, state)  # type: ignore[arg-type]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _next(stream: AsyncIterator[WorkerSnapshot], timeout_s: float = 5.0) -> WorkerSnapshot:
    return await asyncio.wait_for(anext(stream), timeout_s)


def test_board_bumps_the_version_only_when_the_set_changes() -> None:
    async def body() -> None:
        board = WorkerBoard()
        first = await board.publish([_worker("prefill", 0, 1, "a:1"), _worker("prefill", 0, 0, "a:0")])
        assert first.version == 1 and [w.rank for w in first.workers] == [0, 1]  # ordered
        same = await board.publish([_worker("prefill", 0, 0, "a:0"), _worker("prefill", 0, 1, "a:1")])
        assert same.version == 1
        moved = await board.publish([_worker("prefill", 0, 0, "b:0"), _worker("prefill", 0, 1, "a:1")])
        assert moved.version == 2
        assert (await board.wait_newer(2, timeout_s=0.05)).version == 2  # bounded, no change

    asyncio.run(body())


def test_watch_streams_the_current_set_then_each_change_and_list_answers() -> None:
    async def body() -> None:
        board = WorkerBoard()
        await board.publish([_worker("decode", 0, 0, "h:1", "starting")])
        server = await RegistryServer.start(board, "127.0.0.1", 0, heartbeat_s=0.2)
        try:
            assert server.address.startswith("127.0.0.1:")
            client = RegistryClient(server.address, heartbeat_s=0.2)
            stream = client.watch()
            first = await _next(stream)
            assert first.version == 1 and first.workers[0].state == "starting" and not first.ready()
            await board.publish([_worker("decode", 0, 0, "h:1", "ready")])
            second = await _next(stream)  # heartbeats of version 1 are not yielded again
            assert second.version == 2 and [w.worker_id for w in second.ready("decode")] == ["decode-g0-r0"]
            listed = await client.list()
            assert listed == second
            await stream.aclose()
        finally:
            await server.stop(0.1)

    asyncio.run(body())


def test_client_reconnects_to_a_restarted_registry() -> None:
    async def body() -> None:
        port = _free_port()
        board = WorkerBoard()
        await board.publish([_worker("colocated", 0, 0, "h:1")])
        server = await RegistryServer.start(board, "127.0.0.1", port, heartbeat_s=0.2)
        client = RegistryClient(server.address, heartbeat_s=0.2, max_reconnects=20, backoff_max_s=0.2)
        stream = client.watch()
        try:
            assert (await _next(stream)).version == 1
            await server.stop(0)
            fresh = WorkerBoard()  # a restarted controller counts from 1 again
            await fresh.publish([_worker("colocated", 0, 0, "h:2")])
            server = await RegistryServer.start(fresh, "127.0.0.1", port, heartbeat_s=0.2)
            again = await _next(stream, timeout_s=10)
            assert again.version == 1 and again.workers[0].address == "h:2"
        finally:
            await stream.aclose()
            await server.stop(0)

    asyncio.run(body())


def test_client_gives_up_on_a_dead_registry_within_its_bound() -> None:
    async def body() -> None:
        client = RegistryClient(
            f"127.0.0.1:{_free_port()}", connect_timeout_s=0.2, max_reconnects=2, backoff_initial_s=0.05
        )
        with pytest.raises(RegistryUnavailableError, match="2 reconnects"):
            await asyncio.wait_for(anext(client.watch()), 10)

    asyncio.run(body())


def test_restart_backoff_doubles_up_to_the_cap_and_gives_up_after_max_restarts() -> None:
    policy = RestartPolicy(RestartSettings(max_restarts=3, backoff_initial_s=0.5, backoff_max_s=3.0, reset_after_s=60))
    assert [policy.delay_s(n) for n in range(6)] == [0.0, 0.5, 1.0, 2.0, 3.0, 3.0]
    assert [policy.exhausted(n) for n in (3, 4)] == [False, True]
    assert policy.forgives(60.0) and not policy.forgives(59.0)


def test_placement_strict_packs_a_group_that_fits_one_node_and_packs_otherwise() -> None:
    rank = {"CPU": 1.0, "GPU": 1.0}
    big, small = {"CPU": 64.0, "GPU": 8.0}, {"CPU": 64.0, "GPU": 4.0}
    assert group_strategy(rank, 8, [small, big]) == "STRICT_PACK"
    assert group_strategy(rank, 8, [small, small]) == "PACK"
    assert fits_cluster(rank, 8, [small, small]) and not fits_cluster(rank, 9, [small, small])
    assert group_strategy({"CPU": 0.5}, 4, [{"CPU": 2.0}]) == "STRICT_PACK"
    assert not fits_cluster({"CPU": 3.0}, 2, [{"CPU": 4.0}, {"CPU": 2.0}])  # 6 CPUs, but one rank per node fits


def test_a_router_waits_for_a_late_registry_and_lists_its_metrics_endpoints() -> None:
    """``router_main.registry_follower``: the first load retries until the head's registry is up (bounded),
    and the scrape targets name every rank's and the controller's ``/metrics``."""

    async def body() -> None:
        port = _free_port()
        targets, dispatcher = ScrapeTargets(), Dispatcher()
        first, _ = registry_follower(f"127.0.0.1:{port}", targets, None, wait_s=20.0, retry_s=0.2)
        waiting = asyncio.create_task(first(dispatcher))
        await asyncio.sleep(1.0)
        assert not waiting.done()  # nothing listens yet: still waiting, not failed
        board = WorkerBoard(controller_metrics_address="127.0.0.1:9400")
        ready = dataclasses.replace(_worker("prefill", 0, 0, "127.0.0.1:7001"), metrics_address="127.0.0.1:9101")
        await board.publish([ready])
        server = await RegistryServer.start(board, "127.0.0.1", port, heartbeat_s=0.2)
        try:
            await asyncio.wait_for(waiting, 15.0)
        finally:
            await server.stop(grace_s=0.1)
        assert [e.worker_id for e in dispatcher.endpoints] == ["prefill-g0-r0"]
        assert targets.http_sd() == [
            {
                "targets": ["127.0.0.1:9101"],
                "labels": {"worker": "prefill-g0-r0", "pool": "prefill", "role": "prefill", "group": "0"},
            },
            {"targets": ["127.0.0.1:9400"], "labels": {"role": "controller"}},
        ]
        await dispatcher.close()

    asyncio.run(body())


def test_a_router_gives_up_on_a_registry_that_never_comes_within_its_bound() -> None:
    async def body() -> None:
        first, _ = registry_follower(f"127.0.0.1:{_free_port()}", ScrapeTargets(), None, wait_s=1.0, retry_s=0.2)
        with pytest.raises(RegistryUnavailableError, match="not reachable"):
            await asyncio.wait_for(first(Dispatcher()), 15.0)

    asyncio.run(body())
