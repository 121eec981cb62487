"""The cluster token (``proto/cluster_token.py``) on a real gRPC server, without Ray: the registry with a
token refuses a client without it or with another one, and serves one with it (List and the Watch
stream); a router whose token the registry refuses fails its first load at once with a message that
names the variable, instead of waiting out its bound; ``authorized`` keeps the caller's own metadata;
what the entry points accept as a token. The live stack (every rank's Worker service, the router
calling the ranks with it) is test_security's."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from k2serve.cluster.registry import RegistryServer, WorkerBoard
from k2serve.cluster.registry_client import RegistryClient, RegistryUnavailableError
from k2serve.cluster.worker_record import WorkerRecord
from k2serve.proto import cluster_token
from k2serve.router.dispatcher import Dispatcher
from k2serve.router.scrape_targets import ScrapeTargets
from k2serve.router_main import registry_follower
from k2serve.serve import cluster_token as resolve_cluster_token

TOKEN = cluster_token.new_token()


def _record() -> WorkerRecord:
    return WorkerRecord("decode-g0-r0", "decode", "decode", 0, 0, 1, "127.0.0.1:7001", "ready")


@contextlib.asynccontextmanager
async def _registry(token: str | None) -> AsyncIterator[RegistryServer]:
    """A registry with one worker on the board, checking ``token``; stopped on the way out."""
    board = WorkerBoard()
    await board.publish([_record()])
    server = await RegistryServer.start(board, "127.0.0.1", 0, heartbeat_s=0.2, cluster_token=token)
    try:
        yield server
    finally:
        await server.stop(grace_s=0.1)


def test_the_registry_serves_only_callers_with_the_cluster_token() -> None:
    async def body() -> None:
        async with _registry(TOKEN) as server:
            listed = await RegistryClient(server.address, cluster_token=TOKEN).list()
            assert [w.worker_id for w in listed.workers] == ["decode-g0-r0"]
            watched = await anext(RegistryClient(server.address, cluster_token=TOKEN).watch())
            assert watched.version == listed.version
            for token in (None, cluster_token.new_token(), TOKEN[:-1]):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await RegistryClient(server.address, cluster_token=token).list(timeout_s=5.0)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert cluster_token.METADATA_KEY in (refused.value.details() or "")
            quiet = RegistryClient(server.address, cluster_token=None, max_reconnects=0)
            with pytest.raises(RegistryUnavailableError, match="UNAUTHENTICATED"):
                async with asyncio.timeout(10.0):
                    await anext(quiet.watch())
            async with grpc.aio.insecure_channel(server.address) as channel:  # health needs no token
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5.0)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING

    asyncio.run(body())


def test_a_registry_without_a_token_serves_everyone() -> None:
    async def body() -> None:
        async with _registry(None) as server:
            for token in (None, TOKEN):
                assert len((await RegistryClient(server.address, cluster_token=token).list()).workers) == 1

    asyncio.run(body())


def test_a_router_with_the_wrong_token_fails_its_first_load_at_once() -> None:
    async def body() -> None:
        async with _registry(TOKEN) as server:
            first, _ = registry_follower(server.address, ScrapeTargets(), "wrong-" + TOKEN, wait_s=30.0, retry_s=0.2)
            started = time.monotonic()
            with pytest.raises(RegistryUnavailableError, match=cluster_token.ENV_VAR):
                async with asyncio.timeout(15.0):
                    await first(Dispatcher())
            assert time.monotonic() - started < 10.0  # not the 30 s bound of an unreachable registry

    asyncio.run(body())


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def GetLoad(self, request: object, **kwargs: Any) -> str:
        self.calls.append(kwargs)
        return "answer"


def test_authorized_adds_the_token_to_every_call_and_keeps_the_callers_metadata() -> None:
    stub = _Recorder()
    assert cluster_token.authorized(stub, None) is stub
    wrapped = cluster_token.authorized(stub, TOKEN)
    assert wrapped.GetLoad("request", timeout=1.0) == "answer"
    wrapped.GetLoad("request", metadata=(("x-request-id", "r1"),))
    assert stub.calls == [
        {"timeout": 1.0, "metadata": ((cluster_token.METADATA_KEY, TOKEN),)},
        {"metadata": ((cluster_token.METADATA_KEY, TOKEN), ("x-request-id", "r1"))},
    ]


@pytest.mark.parametrize(
    "value",
    [
        "short",
        "has a space in it ......",
        "non-ascii-token-é-123456",
        "tab\there-1234567890",
        f"{TOKEN},short",  # each token of a rotation list is checked
        f"{TOKEN},",
        ",".join([TOKEN] * 5),  # at most MAX_TOKENS
    ],
)
def test_a_token_that_grpc_metadata_cannot_carry_as_is_is_refused_with_the_variable_named(value: str) -> None:
    with pytest.raises(ValueError, match=cluster_token.ENV_VAR):
        cluster_token.checked_token(value)


def test_a_rotation_list_sends_its_first_token_and_a_server_accepts_any_of_its_tokens() -> None:
    """ "NEW,OLD" on the head: routers still on OLD and those already on NEW are served, others are not;
    a process with "NEW,OLD" sends NEW, so a server that knows only OLD refuses it."""
    new, old, other = (cluster_token.new_token() for _ in range(3))
    assert cluster_token.checked_token(f"{new},{old}") == f"{new},{old}"
    assert cluster_token.sent_token(f"{new},{old}") == new and cluster_token.sent_token(new) == new

    async def body() -> None:
        async with _registry(f"{new},{old}") as rotating, _registry(old) as stale:
            for token in (new, old, f"{new},{old}", f"{old},{other}"):  # the first of a list is sent
                assert len((await RegistryClient(rotating.address, cluster_token=token).list()).workers) == 1
            for token in (other, f"{other},{new}", f"{new}{old}", None):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await RegistryClient(rotating.address, cluster_token=token).list(timeout_s=5.0)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await RegistryClient(stale.address, cluster_token=f"{new},{old}").list(timeout_s=5.0)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    asyncio.run(body())


def test_the_entry_points_take_the_variable_else_make_one_except_for_a_head_without_a_router(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert cluster_token.checked_token("") is None and cluster_token.checked_token(None) is None
    assert cluster_token.checked_token(TOKEN) == TOKEN
    monkeypatch.delenv(cluster_token.ENV_VAR, raising=False)
    made = {resolve_cluster_token(argparse.Namespace(no_router=False)) for _ in range(2)}
    assert len(made) == 2 and all(cluster_token.checked_token(t) == t for t in made)  # fresh, valid
    with pytest.raises(ValueError, match=f"--no-router: set {cluster_token.ENV_VAR}"):
        resolve_cluster_token(argparse.Namespace(no_router=True))
    monkeypatch.setenv(cluster_token.ENV_VAR, TOKEN)
    assert resolve_cluster_token(argparse.Namespace(no_router=True)) == TOKEN
    monkeypatch.setenv(cluster_token.ENV_VAR, "short")
    with pytest.raises(ValueError, match=cluster_token.ENV_VAR):
        resolve_cluster_token(argparse.Namespace(no_router=False))
