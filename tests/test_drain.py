"""Graceful drain on SIGTERM (reliability.md §0.7, §1.4 "Graceful shutdown", §4.2 test 9), with real
processes: ``k2serve serve --demo`` (router + controller + four ranks on an embedded Ray), a standalone
``k2serve router`` in front of a worker, and a rank's own Ray actor process.

1. ``serve`` with ``--grace 10`` and ten greedy streams in flight: SIGTERM turns readiness (``GET
   /health`` and the router's gRPC health) to 503 / NOT_SERVING at once; a new request gets 503
   while the drain runs; every stream in flight finishes with the oracle's tokens, most of them sent
   after the signal; the process exits 0 well within the grace plus the teardown, and no process of
   its tree (raylet, GCS, the ranks, the controller) is left.
2. The same with ``--grace 0``: the streams end at once with finish reason ``abort`` (never a hang),
   and the exit takes only the teardown.
3. A standalone ``k2serve router`` drains the same way in front of an in-process worker, which is
   left with no request, lease or pinned block.
4. SIGTERM to a rank's process (the Ray actor of a ``WorkerActor``): gRPC health NOT_SERVING and
   new calls UNAVAILABLE "draining" at once, the streams on it finish, then the process exits. Bare
   (no controller): the rank drains alone. Under a controller (slow): the controller drains and
   replaces the rank's whole group, the router sends new requests to the other group meanwhile, and
   the group comes back.

Every request is recorded in a ``Ledger``; the figure lines go to docs/RELIABILITY.md via ``report``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import re
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
import pytest
import ray
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from local_ray import local_ray
from request_ledger import Ledger, Result, report, settle
from serve_process import ServeProcess

from k2serve.cluster.config import ClusterConfig, RaySettings
from k2serve.cluster.controller_handle import ControllerHandle
from k2serve.cluster.rank_plan import rank_spec_dict, worker_options_dict
from k2serve.cluster.ray_runtime import RayRuntime
from k2serve.cluster.registry_client import RegistryClient
from k2serve.cluster.worker_actor import GRACE_ENV, MAX_CONCURRENCY, WORKER_ACTOR
from k2serve.cluster.worker_group import ACTOR_NAME_PREFIX
from k2serve.proto import worker_pb2, worker_pb2_grpc
from k2serve.router.dispatcher import Dispatcher
from k2serve.router.worker_client import WorkerEndpoint
from k2serve.tiny_model import make_tiny_model
from k2serve.workers.greedy import greedy_generate
from k2serve.workers.group_rank import GroupRank, RankSpec
from k2serve.workers.model_loader import load_model
from k2serve.workers.service import WorkerOptions, WorkerServer

GRACE_S = 10.0
NUM_STREAMS = 10
MAX_TOKENS = 60  # ~1.5 s of decoding for ten streams on two cores: still running when the signal comes
MAX_MODEL_LEN = 256
STREAM_DEADLINE_S = 60.0  # a stream with no terminal event by then is "hung"
FIRST_TOKENS_S = 60.0  # until every stream has its first token (the signal waits for that)
READY_503_LIMIT_S = 1.0  # "at once": the handler acts within milliseconds; headroom for a loaded machine
TEARDOWN_S = 5.0  # after the drain: the controller stops four ranks and the embedded Ray stops (~2 s idle)
ABORT_EXIT_LIMIT_S = 8.0  # grace 0: ~2.5 s idle on 2 cores (router 0.2 s, ranks 0.5 s, Ray 1.4 s), 5 s at load 25
CHILDREN_GONE_S = 10.0  # after the exit, for the last processes of the tree to be reaped
WORKER_GRACE_S = 10.0  # K2SERVE_WORKER_GRACE_S of the rank processes below
WORKER_EXIT_LIMIT_S = WORKER_GRACE_S + 25.0  # worker_actor.SIGTERM_EXIT_MARGIN_S: the bound it promises
NAMESPACE = "k2serve-drain"


# ---- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's tiny model (``serve --demo --demo-dir`` finds it there and writes nothing)."""
    return make_tiny_model(tmp_path_factory.mktemp("drain") / "demo", preset="tiny")


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(9)
    return [[rng.randrange(1, 500) for _ in range(rng.randint(3, 20))] for _ in range(NUM_STREAMS)]


@pytest.fixture(scope="module")
def oracle(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy fp32 tokens of every prompt on the single-process reference model."""
    reference = load_model(model_dir, dtype=torch.float32, max_positions=MAX_MODEL_LEN, progress=False)
    return [greedy_generate(reference, p, max_tokens=MAX_TOKENS) for p in prompts]


# ---- REST clients -------------------------------------------------------------------------------------------


@dataclass
class _Signal:
    """When the SIGTERM went out (monotonic), shared with the client threads."""

    at: float | None = None


@dataclass
class _Stream:
    """One streaming completion in a thread, recorded in the ledger when it ends."""

    url: str
    request_id: str
    prompt: list[int]
    expected: list[int]
    ledger: Ledger
    sent: _Signal
    first_token: threading.Event = field(default_factory=threading.Event)
    after_signal: int = 0  # tokens received after the SIGTERM
    ended_at: float = 0.0

    def run(self) -> None:
        started, tokens = time.monotonic(), list[int]()
        body = {
            "prompt": self.prompt,
            "max_tokens": len(self.expected),
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "return_token_ids": True,
        }
        try:
            outcome = self._consume(body, tokens)
        except httpx.TimeoutException:
            outcome = "hung"
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
            outcome = f"error: the connection ended: {type(exc).__name__}: {exc}"
        except Exception as exc:  # anything else is a bug of the client path
            outcome = f"raised: {type(exc).__name__}: {exc}"
        self.ended_at = time.monotonic()
        self.first_token.set()  # a stream that failed before its first token does not block the test
        self.ledger.record(Result(self.request_id, outcome, tokens, self.ended_at - started))

    def _consume(self, body: dict[str, Any], tokens: list[int]) -> str:
        finish: str | None = None
        timeout = httpx.Timeout(STREAM_DEADLINE_S, connect=10.0)
        with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=timeout) as response:
            if response.status_code != 200:
                return f"error: http {response.status_code} {response.read().decode()[:200]}"
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    if finish in ("length", "stop"):
                        return "ok" if tokens == self.expected else f"wrong: {tokens} instead of {self.expected}"
                    return f"error: finish reason {finish}"
                for choice in json.loads(line.removeprefix("data: ")).get("choices", []):
                    ids = choice.get("token_ids") or []
                    tokens.extend(ids)
                    if ids:
                        self.first_token.set()
                        if self.sent.at is not None:
                            self.after_signal += len(ids)
                    finish = choice.get("finish_reason") or finish
        return f"wrong: the stream ended without [DONE] after {len(tokens)} tokens (finish {finish})"


def _start_streams(
    url: str, prefix: str, prompts: list[list[int]], oracle: list[list[int]], ledger: Ledger, sent: _Signal
) -> tuple[list[_Stream], list[threading.Thread]]:
    streams = [_Stream(url, f"{prefix}{i}", p, oracle[i], ledger, sent) for i, p in enumerate(prompts)]
    threads = [threading.Thread(target=s.run, name=s.request_id, daemon=True) for s in streams]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + FIRST_TOKENS_S
    for stream in streams:
        assert stream.first_token.wait(max(0.0, deadline - time.monotonic())), f"{stream.request_id}: no first token"
    return streams, threads


def _until_ready_503(url: str, grpc_target: str | None, since: float) -> tuple[float, str]:
    """(seconds from ``since``, what readiness said): ``503`` once ``GET /health`` answers 503 (the
    gRPC health is then NOT_SERVING too), or ``refused`` when the listener was already closed (a
    drain with nothing left to wait for)."""
    deadline = since + 10.0
    while True:
        try:
            answer = httpx.get(f"{url}/health", timeout=2.0)
        except httpx.ConnectError:
            return time.monotonic() - since, "refused"
        if answer.status_code == 503:
            assert answer.json() == {"status": "draining"}, answer.text
            break
        assert answer.status_code == 200, answer.text
        assert time.monotonic() < deadline, "readiness never turned 503"
        time.sleep(0.01)
    elapsed = time.monotonic() - since
    if grpc_target is not None:
        with grpc.insecure_channel(grpc_target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    return elapsed, "503"


def _new_request(url: str) -> str:
    """What a request sent during the drain gets: ``503`` (the listener still answers) or ``refused``."""
    body = {"prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0}
    try:
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=10.0)
    except httpx.ConnectError:
        return "refused"
    assert answer.status_code == 503, answer.text
    assert answer.headers.get("retry-after") == "1"
    assert "draining" in answer.json()["error"]["message"]
    return "503"


@dataclass(frozen=True)
class _Drain:
    ready_503_s: float
    readiness: str  # 503, or refused (the listener had closed already)
    new_request: str
    exit_code: int | None
    exit_s: float
    after_signal: int  # tokens the streams received after the SIGTERM
    completed_after_signal: int  # streams that ended after the SIGTERM
    log: str


def _sigterm_under_load(
    serving: ServeProcess, prompts: list[list[int]], oracle: list[list[int]], ledger: Ledger, prefix: str
) -> _Drain:
    """Streams in flight, SIGTERM, then readiness, a new request, the exit and the streams' ends."""
    grpc_match = re.search(r"\(gRPC (\S+),", serving.log)
    sent = _Signal()
    streams, threads = _start_streams(serving.url, prefix, prompts, oracle, ledger, sent)
    children = psutil.Process(serving.proc.pid).children(recursive=True)
    sent.at = time.monotonic()
    serving.proc.send_signal(signal.SIGTERM)
    ready_503_s, readiness = _until_ready_503(serving.url, grpc_match.group(1) if grpc_match else None, sent.at)
    new_request = _new_request(serving.url)
    try:
        exit_code: int | None = serving.proc.wait(timeout=GRACE_S + 60)
    except Exception:
        exit_code = None
    exit_s = time.monotonic() - sent.at
    for thread in threads:
        thread.join(timeout=STREAM_DEADLINE_S)
    _, _ = serving.stop(timeout_s=10)  # collects the output; kills the group if the exit failed above
    _assert_gone(children)
    after = sum(s.after_signal for s in streams)
    completed = sum(1 for s in streams if s.ended_at > sent.at)
    return _Drain(ready_503_s, readiness, new_request, exit_code, exit_s, after, completed, serving.log)


def _assert_gone(processes: list[psutil.Process]) -> None:
    """No process of the tree outlives it (reaped zombies excepted), within ``CHILDREN_GONE_S``."""
    deadline = time.monotonic() + CHILDREN_GONE_S
    while True:
        alive = []
        for p in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{p.pid} {p.name()}")
        if not alive:
            return
        assert time.monotonic() < deadline, f"left behind: {alive}"
        time.sleep(0.1)


def _serve(model_dir: Path, tmp_path: Path, grace_s: float) -> ServeProcess:
    args = ["serve", "--demo", "--demo-dir", str(model_dir), "--grace", f"{grace_s:g}"]
    return ServeProcess.start(args, tmp_path)


# ---- 1, 2: k2serve serve ------------------------------------------------------------------------------------


def test_sigterm_drains_serve_readiness_503_at_once_in_flight_finish_then_exit_with_no_orphans(
    model_dir: Path, tmp_path: Path, prompts: list[list[int]], oracle: list[list[int]]
) -> None:
    ledger = Ledger()
    drain = _sigterm_under_load(_serve(model_dir, tmp_path, GRACE_S), prompts, oracle, ledger, "g10-")
    report(
        "drain: serve SIGTERM, grace 10 s",
        ledger.figure(1)
        + f", readiness 503 after {drain.ready_503_s:.2f} s, new request {drain.new_request}, exit {drain.exit_s:.1f} s, "
        f"{drain.completed_after_signal} requests and {drain.after_signal} tokens completed after SIGTERM",
    )
    assert drain.exit_code == 0, drain.log
    ledger.assert_none("hung", "wrong", "raised", "error", "cancelled")
    assert len(ledger.with_kind("ok")) == NUM_STREAMS
    # in flight at the signal (the signal waits for every first token; on a loaded machine the first
    # streams may be done by the time the last one starts)
    assert drain.completed_after_signal > NUM_STREAMS // 2 and drain.after_signal > 0
    assert drain.readiness == "503" and drain.ready_503_s < READY_503_LIMIT_S
    assert drain.new_request == "503"  # the listener answers while the drain runs
    assert drain.exit_s < GRACE_S + TEARDOWN_S, drain.log
    assert "router drained" in drain.log and "(0 aborted)" in drain.log, drain.log


def test_sigterm_with_grace_0_aborts_in_flight_streams_and_exits_within_the_teardown(
    model_dir: Path, tmp_path: Path, prompts: list[list[int]], oracle: list[list[int]]
) -> None:
    ledger = Ledger()
    drain = _sigterm_under_load(_serve(model_dir, tmp_path, 0.0), prompts, oracle, ledger, "g0-")
    report(
        "drain: serve SIGTERM, grace 0",
        ledger.figure(1) + f", readiness {drain.readiness} after {drain.ready_503_s:.2f} s, "
        f"new request {drain.new_request}, exit {drain.exit_s:.1f} s",
    )
    assert drain.exit_code == 0, drain.log
    ledger.assert_none("hung", "wrong", "raised")
    # each stream ends with its finish reason abort (the usual case), or finished just before the signal
    assert all(r.outcome in ("ok", "error: finish reason abort") for r in ledger.results.values()), ledger.kinds()
    assert len(ledger.with_kind("error")) > 0
    assert drain.ready_503_s < READY_503_LIMIT_S  # 503, or the listener closed already: both within the bound
    assert drain.exit_s < ABORT_EXIT_LIMIT_S, drain.log


# ---- 3: k2serve router --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _worker_in_thread(model_dir: Path) -> Iterator[tuple[WorkerServer, asyncio.AbstractEventLoop]]:
    """One mixed ``WorkerServer`` on its own loop in a background thread (the router is a subprocess)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="drain-worker", daemon=True)
    thread.start()

    async def start() -> WorkerServer:
        spec = RankSpec(model_dir=model_dir, num_blocks=256, block_size=4, max_model_len=MAX_MODEL_LEN)
        rank = await asyncio.to_thread(GroupRank.build, spec)
        return await WorkerServer.start(rank, WorkerOptions("mixed-0", "mixed"))

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(120)
    try:
        yield server, loop
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(server.stop(grace_s=1.0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


def test_sigterm_drains_a_standalone_router_in_front_of_a_worker(
    model_dir: Path, tmp_path: Path, prompts: list[list[int]], oracle: list[list[int]]
) -> None:
    with _worker_in_thread(model_dir) as (worker, loop):
        args = ["router", str(model_dir), "--worker", f"mixed-0=mixed@{worker.address}", "--grace", f"{GRACE_S:g}"]
        ledger = Ledger()
        drain = _sigterm_under_load(ServeProcess.start(args, tmp_path), prompts, oracle, ledger, "r-")
        load = asyncio.run_coroutine_threadsafe(_load(worker.address), loop).result(10)
    report(
        "drain: router SIGTERM, grace 10 s",
        ledger.figure(1) + f", readiness 503 after {drain.ready_503_s:.2f} s, exit {drain.exit_s:.1f} s, "
        f"{drain.completed_after_signal} requests completed after SIGTERM",
    )
    assert drain.exit_code == 0, drain.log
    ledger.assert_none("hung", "wrong", "raised", "error", "cancelled")
    assert drain.completed_after_signal > NUM_STREAMS // 2 and drain.after_signal > 0
    assert drain.readiness == "503" and drain.ready_503_s < READY_503_LIMIT_S
    assert drain.new_request == "503"
    assert drain.exit_s < GRACE_S + 2.0, drain.log  # a router alone has no cluster to stop
    assert (load.running, load.waiting, load.leases, load.pinned_blocks) == (0, 0, 0, 0)


async def _load(address: str) -> worker_pb2.Load:
    async with grpc.aio.insecure_channel(address) as channel:
        return await worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=5)


# ---- 4: a rank's process ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_runtime() -> Iterator[RayRuntime]:
    """A local Ray whose worker processes see ``K2SERVE_WORKER_GRACE_S`` (they inherit this env)."""
    with local_ray(NAMESPACE, {GRACE_ENV: f"{WORKER_GRACE_S:g}"}) as runtime:
        yield runtime


def _colocated(model_dir: Path, groups: int, ep_size: int) -> ClusterConfig:
    config = ClusterConfig.demo(model_dir, colocated=True).to_dict()
    config["pools"]["colocated"].update(groups=groups, ep_size=ep_size, max_model_len=MAX_MODEL_LEN)
    config["ray"] = dataclasses.asdict(RaySettings(namespace=NAMESPACE))
    return ClusterConfig.from_dict(config)


def _sampling() -> worker_pb2.SamplingParams:
    return worker_pb2.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


async def _generate(
    stub: Any, request_id: str, prompt: list[int], expected: list[int], ledger: Ledger, first: asyncio.Event
) -> tuple[Result, float]:
    """One Generate stream straight to a rank, to its end or its deadline; (its result, when it ended)."""
    tokens: list[int] = []
    started = time.monotonic()

    async def consume() -> str:
        request = worker_pb2.GenerateRequest(request_id=request_id, prompt_token_ids=prompt, sampling=_sampling())
        async for delta in stub.Generate(request, timeout=STREAM_DEADLINE_S):
            tokens.extend(delta.token_ids)
            first.set()
            if delta.finish_reason:
                if delta.finish_reason == "error":
                    return f"error: {delta.error}"
                return "ok" if tokens == expected else f"wrong: {tokens} instead of {expected}"
        return "wrong: the stream ended without a finish reason"

    outcome = await settle(consume(), STREAM_DEADLINE_S)
    first.set()
    return ledger.record(Result(request_id, outcome, tokens, time.monotonic() - started)), time.monotonic()


async def _health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        return int(reply.status)


async def _until_not_serving(address: str, since: float) -> float:
    while await _health(address) != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() - since < 10.0, "the rank never turned NOT_SERVING"
        await asyncio.sleep(0.01)
    return time.monotonic() - since


async def _refused_while_draining(address: str) -> None:
    """A new Generate on the draining rank: UNAVAILABLE, and the message says it drains."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        request = worker_pb2.GenerateRequest(request_id="late", prompt_token_ids=[1, 2, 3], sampling=_sampling())
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.Generate(request, timeout=10):
                pass
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "draining" in (refused.value.details() or "")


def _until_dead(pid: int, since: float, limit_s: float) -> float:
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() - since < limit_s, f"rank process {pid} still alive {limit_s:g} s after SIGTERM"
        time.sleep(0.05)
    return time.monotonic() - since


def test_sigterm_to_a_bare_rank_process_drains_it_then_it_exits(
    ray_runtime: RayRuntime, model_dir: Path, prompts: list[list[int]], oracle: list[list[int]]
) -> None:
    """No controller to hand the group to: the rank drains alone and ends its process when idle."""
    config = _colocated(model_dir, groups=1, ep_size=1)
    pool = config.pool("colocated")
    actor = WORKER_ACTOR.options(
        name=f"{ACTOR_NAME_PREFIX}:bare", namespace=NAMESPACE, max_concurrency=MAX_CONCURRENCY, num_cpus=0.5
    ).remote("colocated-g0-r0")
    try:
        served = ray.get(
            actor.start.remote(
                rank_spec_dict(config, pool, 0, None), worker_options_dict(config, pool, "colocated-g0-r0")
            ),
            timeout=120,
        )
        pid = int(ray.get(actor.pid.remote(), timeout=10))
        ledger = Ledger()
        figures = asyncio.run(_drain_a_rank(served["address"], pid, prompts[:6], oracle[:6], ledger))
    finally:
        with contextlib.suppress(Exception):
            ray.kill(actor)
    report(
        "drain: SIGTERM to a bare rank process",
        ledger.figure(1) + f", NOT_SERVING after {figures['not_serving_s']:.2f} s, "
        f"exit {figures['exit_s']:.1f} s, {figures['after']} requests completed after SIGTERM",
    )
    ledger.assert_none("hung", "wrong", "raised", "error", "cancelled")
    assert figures["after"] == 6
    assert figures["not_serving_s"] < READY_503_LIMIT_S
    assert figures["exit_s"] < WORKER_GRACE_S  # idle long before the grace: it does not wait for it
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actor.pid.remote(), timeout=30)


async def _drain_a_rank(
    address: str, pid: int, prompts: list[list[int]], oracle: list[list[int]], ledger: Ledger
) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        firsts = [asyncio.Event() for _ in prompts]
        streams = [
            asyncio.create_task(_generate(stub, f"bare-{i}", p, oracle[i], ledger, firsts[i]))
            for i, p in enumerate(prompts)
        ]
        await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), FIRST_TOKENS_S)
        sent = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        not_serving_s = await _until_not_serving(address, sent)
        await _refused_while_draining(address)
        ended = await asyncio.gather(*streams)
        after = sum(1 for result, at in ended if result.kind == "ok" and at > sent)
        exit_s = await asyncio.to_thread(_until_dead, pid, sent, WORKER_EXIT_LIMIT_S)
    return {"not_serving_s": not_serving_s, "exit_s": exit_s, "after": after}


# ---- 4 under a controller -----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _following(registry_address: str) -> AsyncIterator[Dispatcher]:
    """A ``Dispatcher`` kept equal to the registry's ready workers (as ``serve`` keeps it)."""
    dispatcher = Dispatcher(request_timeout_s=STREAM_DEADLINE_S)
    registry = RegistryClient(registry_address)

    def endpoints(snapshot: Any) -> list[WorkerEndpoint]:
        return [WorkerEndpoint(w.worker_id, w.role, w.address) for w in snapshot.ready() if w.address]

    await dispatcher.update(endpoints(await registry.list()))

    async def follow() -> None:
        async for snapshot in registry.watch():
            await dispatcher.update(endpoints(snapshot))

    follower = asyncio.create_task(follow())
    try:
        yield dispatcher
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        await dispatcher.close()


async def _through_router(
    dispatcher: Dispatcher,
    request_id: str,
    prompt: list[int],
    expected: list[int],
    ledger: Ledger,
    first: asyncio.Event,
) -> tuple[Result, float]:
    """One request through the router's ``Dispatcher``; (its result, when it ended)."""
    tokens: list[int] = []
    started = time.monotonic()

    async def consume() -> str:
        async for event in dispatcher.generate(request_id, prompt, _sampling(), timeout_s=STREAM_DEADLINE_S):
            tokens.extend(event.token_ids)
            first.set()
            if event.finish_reason == "error":
                return f"error: {event.error}"
            if event.finish_reason:
                return "ok" if tokens == expected else f"wrong: {tokens} instead of {expected}"
        return "wrong: the stream ended without a finish reason"

    outcome = await settle(consume(), STREAM_DEADLINE_S)
    first.set()
    return ledger.record(Result(request_id, outcome, tokens, time.monotonic() - started)), time.monotonic()


async def _until(condition: Any, limit_s: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < limit_s, f"{what}: not within {limit_s:g} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def _rank(worker_id: str) -> tuple[Any, int]:
    """The live actor of ``worker_id`` (any generation) and its pid."""
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"{ACTOR_NAME_PREFIX}:{worker_id}:")
    ]
    assert len(names) == 1, names
    actor: Any = ray.get_actor(names[0], namespace=NAMESPACE)
    return actor, int(ray.get(actor.pid.remote(), timeout=10))


@pytest.mark.slow
def test_sigterm_to_a_rank_drains_and_replaces_its_group_while_the_router_uses_the_other_group(
    ray_runtime: RayRuntime, model_dir: Path, prompts: list[list[int]], oracle: list[list[int]]
) -> None:
    """Two colocated groups of EP=2. SIGTERM to rank 1 of group 0: the rank and (through the
    controller) its peer stop taking requests, the requests on them finish, new requests go to group
    1, the rank's process ends, and the controller starts group 0 again."""
    controller = ControllerHandle.launch(_colocated(model_dir, groups=2, ep_size=2))
    pids: list[int] = []
    try:
        assert controller.wait_ready(180), controller.status()
        pids = [_rank(f"colocated-g{g}-r{r}")[1] for g in (0, 1) for r in (0, 1)]
        ledger = Ledger()
        figures = asyncio.run(_drain_under_controller(controller, prompts, oracle, ledger))
        status = next(s for s in controller.status() if s["group"] == 0)
    finally:
        controller.shutdown(grace_s=0)
    report(
        "drain: SIGTERM to an EP rank under the controller",
        ledger.figure(1) + f", NOT_SERVING after {figures['not_serving_s']:.2f} s, "
        f"rank exit {figures['exit_s']:.1f} s, group back {figures['back_s']:.1f} s, "
        f"{figures['after']} requests completed after SIGTERM",
    )
    ledger.assert_none("hung", "wrong", "raised", "error", "cancelled")
    assert figures["after"] > 0
    assert figures["not_serving_s"] < READY_503_LIMIT_S
    assert status["state"] == "ready" and status["restarts"] == 0, status  # a planned replacement, not a crash
    _assert_gone([psutil.Process(pid) for pid in pids if psutil.pid_exists(pid)])


async def _drain_under_controller(
    controller: ControllerHandle, prompts: list[list[int]], oracle: list[list[int]], ledger: Ledger
) -> dict[str, Any]:
    async with _following(controller.registry_address) as dispatcher:
        await _until(lambda: len(dispatcher.endpoints) == 4, 30, "four ranks in the router's set")
        _, pid = _rank("colocated-g0-r1")
        address = next(e.address for e in dispatcher.endpoints if e.worker_id == "colocated-g0-r1")
        peer = next(e.address for e in dispatcher.endpoints if e.worker_id == "colocated-g0-r0")
        firsts = [asyncio.Event() for _ in prompts]
        streams = [
            asyncio.create_task(_through_router(dispatcher, f"c-{i}", p, oracle[i], ledger, firsts[i]))
            for i, p in enumerate(prompts)
        ]
        await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), FIRST_TOKENS_S)
        held = [await _load(a) for a in (address, peer)]  # group 0 has requests of its own at the signal
        sent = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        not_serving_s = await _until_not_serving(address, sent)
        await _refused_while_draining(address)
        await _until_not_serving(peer, sent)  # the controller drains the whole group
        in_group_0 = lambda: any(e.worker_id.startswith("colocated-g0") for e in dispatcher.endpoints)  # noqa: E731
        await _until(lambda: not in_group_0(), 10, "group 0 out of the router's set")
        fresh = [asyncio.Event() for _ in prompts[:4]]
        late = await asyncio.gather(
            *(
                _through_router(dispatcher, f"late-{i}", p, oracle[i], ledger, fresh[i])
                for i, p in enumerate(prompts[:4])
            )
        )
        ended = await asyncio.gather(*streams)
        exit_s = await asyncio.to_thread(_until_dead, pid, sent, WORKER_EXIT_LIMIT_S)
        await _until(in_group_0, 120, "group 0 back in the router's set")
        back_s = time.monotonic() - sent
        again = await asyncio.gather(
            *(
                _through_router(dispatcher, f"again-{i}", p, oracle[i], ledger, asyncio.Event())
                for i, p in enumerate(prompts[:4])
            )
        )
    assert all(r.kind == "ok" for r, _ in [*late, *again])
    after = sum(1 for result, at in ended if result.kind == "ok" and at > sent)
    in_group_0_at_signal = sum(load.running + load.waiting for load in held)
    assert in_group_0_at_signal > 0
    return {"not_serving_s": not_serving_s, "exit_s": exit_s, "back_s": back_s, "after": after}
