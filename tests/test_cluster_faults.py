"""The fault acceptance test of the cluster issue, on a real local Ray (token auth on) with the tiny
model and gloo on loopback. Requests go through the router's ``Dispatcher``, fed from the registry's
``Watch`` the way ``k2serve serve`` feeds it.

1. Concurrent greedy requests through the demo cluster (one prefill and one decode group, EP=2 each)
   equal the colocated pool's outputs and the single-process fp32 oracle, token for token, and
   are spread over both ranks of each group.
2. After that run no worker holds a lease or a pinned block, and the KV bytes the prefill ranks
   sent equal the bytes the decode ranks received equal Σ (kv_lora_rank + qk_rope_head_dim) × 4 B ×
   layers × prompt tokens.
3. A prefill rank (``ray.kill`` of its actor) and, separately, a decode rank (SIGKILL of its pid)
   die while a steady stream of requests runs. The ledger holds exactly one outcome per request:
   ``ok`` (the oracle's tokens), ``error: <why>`` (an ``error`` event, an ``AioRpcError`` or no live
   worker, each with its message), ``wrong`` (finished with other tokens) or ``hung`` (nothing by
   the request's deadline). None is hung or wrong; the controller recreates the group, the
   Dispatcher follows the registry to the new addresses, the next requests all succeed and match
   the oracle, and every lease and pinned block comes back. ``loads()`` keeps answering while the
   dead group is still listed (it leaves that group out).

Also here, because the fault runs above only sometimes hit them: requests already decoding finish
when their workers leave the Dispatcher's set (draining, replaced); and, on in-process servers
with exact timing, a prefill whose group fails under it answers UNAVAILABLE with the group's error
and pins nothing, and the Dispatcher releases the prefill rank's lease at once when no decode rank
takes the KV over (dead decode rank, consumer gone, no decode worker).

One cluster at a time: Ray gets 4 logical CPUs and a demo cluster takes 2. The colocated pool runs
first (a module fixture), then one demo cluster serves every test of the module. Every wait is
bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import ray
import torch
from local_ray import local_ray
from request_ledger import Ledger, Result, settle

from k2serve.cluster.config import ClusterConfig, RaySettings
from k2serve.cluster.controller_handle import ControllerHandle
from k2serve.cluster.ray_runtime import RayRuntime
from k2serve.cluster.registry_client import RegistryClient
from k2serve.cluster.worker_group import ACTOR_NAME_PREFIX
from k2serve.cluster.worker_record import WorkerSnapshot
from k2serve.proto import worker_pb2, worker_pb2_grpc
from k2serve.router.dispatcher import Dispatcher
from k2serve.router.worker_client import NoWorkerError, WorkerEndpoint
from k2serve.tiny_model import make_tiny_model
from k2serve.workers.config import ModelConfig
from k2serve.workers.greedy import greedy_generate
from k2serve.workers.group_rank import GroupRank, RankSpec
from k2serve.workers.model.model import KimiK2ForCausalLM
from k2serve.workers.model_loader import load_model
from k2serve.workers.parallel import GroupError
from k2serve.workers.service import WorkerOptions, WorkerServer

NAMESPACE = "k2serve-faults"
MAX_TOKENS = 6
LONG_TOKENS = 40  # requests that are still decoding when their worker leaves the Dispatcher's set
NUM_PROMPTS = 8
READY_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 60.0  # the Dispatcher's own deadline per RPC: a safety net above the ledger's
REQUEST_DEADLINE_S = 20.0  # a request with no outcome by then is "hung"
PACE_S = 0.1  # one new request this often while a fault plays out (about 4 to 8 in flight)
KILL_AFTER_OK = 4  # the rank dies once this many requests of the stream have succeeded
DETECT_LIMIT_S = 5.0  # from the kill to the dead group's workers leaving the Dispatcher (health every 1 s)
RECOVERY_LIMIT_S = 60.0  # from the kill to new ready workers in the Dispatcher
SETTLE_S = 15.0  # for counters and leases to settle after a run


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("faults") / "tiny", preset="tiny", seed=5)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(1, 500) for _ in range(rng.randint(3, 40))] for _ in range(NUM_PROMPTS)]


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> KimiK2ForCausalLM:
    """The single-process fp32 model of the oracle."""
    return load_model(model_dir, dtype=torch.float32, max_positions=256, progress=False)


@pytest.fixture(scope="module")
def oracle(reference: KimiK2ForCausalLM, prompts: list[list[int]]) -> list[list[int]]:
    return [greedy_generate(reference, p, max_tokens=MAX_TOKENS) for p in prompts]


@pytest.fixture(scope="module")
def long_oracle(reference: KimiK2ForCausalLM, prompts: list[list[int]]) -> list[list[int]]:
    return [greedy_generate(reference, p, max_tokens=LONG_TOKENS) for p in prompts]


@pytest.fixture(scope="module")
def ray_runtime() -> Iterator[RayRuntime]:
    with local_ray(NAMESPACE) as runtime:
        yield runtime


@pytest.fixture(scope="module")
def colocated_outputs(ray_runtime: RayRuntime, model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    """The colocated pool's outputs for every prompt at once; its cluster is gone before the demo starts."""
    with _controller(_config(model_dir, colocated=True)) as controller:
        assert controller.wait_ready(READY_TIMEOUT_S), controller.status()
        results = asyncio.run(_all_at_once(controller.registry_address, "co", prompts, None))
    assert all(r.outcome == "ok" for r in results), [r.outcome for r in results]
    return [r.tokens for r in results]


@pytest.fixture(scope="module")
def demo(ray_runtime: RayRuntime, model_dir: Path, colocated_outputs: list[list[int]]) -> Iterator[ControllerHandle]:
    """The demo cluster (one prefill and one decode group, EP=2 each), after the colocated one."""
    with _controller(_config(model_dir)) as controller:
        assert controller.wait_ready(READY_TIMEOUT_S), controller.status()
        yield controller


def _config(model_dir: Path, *, colocated: bool = False) -> ClusterConfig:
    """``ClusterConfig.demo`` as shipped (its health and restart settings), in this module's namespace."""
    return dataclasses.replace(ClusterConfig.demo(model_dir, colocated=colocated), ray=RaySettings(namespace=NAMESPACE))


# ---- the cluster -------------------------------------------------------------------------------------------


@contextmanager
def _controller(config: ClusterConfig) -> Iterator[ControllerHandle]:
    controller = ControllerHandle.launch(config)
    try:
        yield controller
    finally:
        pids = _rank_pids()
        controller.shutdown()
    _assert_nothing_left(pids)


def _rank_actor(name: str) -> Any:
    return ray.get_actor(name, namespace=NAMESPACE)


def _rank_pids() -> list[int]:
    names = [
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(ACTOR_NAME_PREFIX)
    ]
    pids: list[int] = []
    for name in names:
        with contextlib.suppress(ray.exceptions.RayError, ValueError):  # a rank that just died
            pids.append(int(ray.get(_rank_actor(name).pid.remote(), timeout=10)))
    return pids


def _assert_nothing_left(pids: list[int]) -> None:
    deadline = time.monotonic() + 15
    while True:
        actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("k2serve")]
        groups = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
        alive = [pid for pid in pids if _alive(pid)]
        if not actors and not groups and not alive:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind: actors {actors}, placement groups {groups}, rank processes {alive}")
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _group_status(controller: ControllerHandle, pool: str) -> dict[str, Any]:
    return next(s for s in controller.status() if s["pool"] == pool and s["group"] == 0)


def _counter(load: dict[str, Any], name: str) -> int:
    return int(load.get(name, 0))  # MessageToDict leaves zeros out and writes int64 as text


# ---- the router ---------------------------------------------------------------------------------------------


def _endpoints(snapshot: WorkerSnapshot) -> list[WorkerEndpoint]:
    return [WorkerEndpoint(w.worker_id, w.role, w.address) for w in snapshot.ready() if w.address]


@asynccontextmanager
async def _router(registry_address: str) -> AsyncIterator[Dispatcher]:
    """A ``Dispatcher`` kept equal to the registry's ready workers by a watch task (as ``serve`` does)."""
    dispatcher = Dispatcher(request_timeout_s=REQUEST_TIMEOUT_S)
    registry = RegistryClient(registry_address)
    await dispatcher.update(_endpoints(await registry.list()))

    async def follow() -> None:
        async for snapshot in registry.watch():
            await dispatcher.update(_endpoints(snapshot))

    follower = asyncio.create_task(follow(), name="registry-watch")
    try:
        yield dispatcher
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        await dispatcher.close()


def _sampling(max_tokens: int = MAX_TOKENS) -> worker_pb2.SamplingParams:
    return worker_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


async def _request(
    dispatcher: Dispatcher,
    request_id: str,
    prompt: list[int],
    expected: list[int] | None,
    ledger: Ledger,
    *,
    max_tokens: int = MAX_TOKENS,
    on_first: Callable[[], None] = lambda: None,
) -> Result:
    """Run one request to its end or its deadline and record the outcome (``expected`` None: any tokens).
    ``on_first`` runs when the first token arrives."""
    tokens: list[int] = []
    started = time.monotonic()

    async def consume() -> str:
        async for event in dispatcher.generate(request_id, prompt, _sampling(max_tokens)):
            if not tokens:
                on_first()
            tokens.extend(event.token_ids)
            if event.finish_reason == "error":
                return f"error: {event.error}"
            if event.finish_reason:
                if expected is not None and tokens != expected:
                    return f"wrong: {tokens} instead of {expected} ({event.finish_reason})"
                return "ok"
        return f"wrong: the stream ended without a finish reason after {tokens}"

    outcome = await settle(consume(), REQUEST_DEADLINE_S, clean=(NoWorkerError,))
    result = Result(request_id, outcome, list(tokens), time.monotonic() - started)
    ledger.record(result)
    return result


async def _all_at_once(
    registry_address: str, prefix: str, prompts: Sequence[list[int]], oracle: Sequence[list[int]] | None
) -> list[Result]:
    async with _router(registry_address) as dispatcher:
        ledger = Ledger()
        return list(
            await asyncio.gather(
                *(
                    _request(dispatcher, f"{prefix}{i}", p, None if oracle is None else oracle[i], ledger)
                    for i, p in enumerate(prompts)
                )
            )
        )


Loads = dict[str, dict[str, Any]]  # GetLoad of every ready rank, by worker id (ControllerHandle.loads)


def _settled_loads(controller: ControllerHandle, done: Callable[[Loads], bool]) -> Loads:
    """Poll ``loads()`` (bounded) until ``done(loads)``; the last loads either way."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        loads = controller.loads()
        if done(loads) or time.monotonic() > deadline:
            return loads
        time.sleep(0.1)


def _idle(loads: Loads) -> bool:
    return len(loads) == 4 and all(
        _counter(load, "leases") == 0 and _counter(load, "pinned_blocks") == 0 for load in loads.values()
    )


# ---- the same faults on in-process servers (no Ray): exact timing ------------------------------------------------


@asynccontextmanager
async def _server(model_dir: Path, worker_id: str, role: str) -> AsyncIterator[WorkerServer]:
    spec = RankSpec(model_dir=model_dir, num_blocks=64, block_size=16, max_model_len=256)
    rank = await asyncio.to_thread(GroupRank.build, spec)
    server = await WorkerServer.start(rank, WorkerOptions(worker_id, role))  # type: ignore[arg-type]
    try:
        yield server
    finally:
        await server.stop(grace_s=1.0)


def _dead_address() -> str:
    """A loopback port nothing listens on (a worker that died)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def test_a_prefill_whose_group_fails_under_it_is_unavailable_and_pins_nothing(
    model_dir: Path, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """UNAVAILABLE with the group's error (which the Dispatcher retries elsewhere), not a crash of the handler."""

    async def body() -> None:
        async with _server(model_dir, "prefill-x", "prefill") as server:

            def peer_died(plan: object) -> None:
                raise GroupError("rank 0 of 2: all_gather failed, a peer rank is dead (injected)")

            monkeypatch.setattr(server.engine, "_forward", peer_died)
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = worker_pb2_grpc.WorkerStub(channel)
                request = worker_pb2.PrefillRequest(request_id="p0", prompt_token_ids=prompts[0], sampling=_sampling())
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await stub.Prefill(request, timeout=30)
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value
                assert "a peer rank is dead (injected)" in (failed.value.details() or "")
                load = await stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
                assert (load.leases, load.pinned_blocks, load.free_blocks) == (0, 0, load.num_blocks)

    asyncio.run(asyncio.wait_for(body(), 120))


def test_the_dispatcher_releases_a_lease_at_once_when_no_decode_rank_takes_the_kv(
    model_dir: Path, prompts: list[list[int]], oracle: list[list[int]]
) -> None:
    """A dead decode rank (an error event naming it), a consumer that leaves after the first token, and
    no decode worker at all: the prefill rank's blocks come back at once, not when the lease expires."""

    async def body() -> None:
        async with _server(model_dir, "prefill-x", "prefill") as prefill:
            assert prefill.leases.ttl_s >= 30  # a leaked lease would still be there at the checks below
            dispatcher = Dispatcher(request_timeout_s=REQUEST_TIMEOUT_S)
            try:
                endpoint = WorkerEndpoint("prefill-x", "prefill", prefill.address)
                await dispatcher.update([endpoint, WorkerEndpoint("decode-x", "decode", _dead_address())])
                events = [e async for e in dispatcher.generate("dead-decode", prompts[0], _sampling())]
                assert events[0].token_ids == (oracle[0][0],) and events[-1].finish_reason == "error", events
                assert events[-1].error.startswith("decode rank decode-x: UNAVAILABLE"), events[-1]
                assert (len(prefill.leases), prefill.engine.num_held_blocks) == (0, 0)

                stream = dispatcher.generate("consumer-left", prompts[1], _sampling())
                assert (await anext(stream)).token_ids == (oracle[1][0],)
                await stream.aclose()
                assert (len(prefill.leases), prefill.engine.num_held_blocks) == (0, 0)

                await dispatcher.update([endpoint])
                with pytest.raises(NoWorkerError, match="no live decode worker"):
                    await anext(dispatcher.generate("no-decode", prompts[2], _sampling()))
                assert prefill.engine.pool.num_free_blocks == prefill.engine.pool.num_blocks
            finally:
                await dispatcher.close()

    asyncio.run(asyncio.wait_for(body(), 120))


# ---- 1 + 2: concurrent requests, outputs and accounting ----------------------------------------------------------


def test_concurrent_disaggregated_requests_equal_colocated_and_oracle_and_every_kv_byte_is_accounted(
    demo: ControllerHandle,
    model_dir: Path,
    prompts: list[list[int]],
    oracle: list[list[int]],
    colocated_outputs: list[list[int]],
) -> None:
    assert colocated_outputs == oracle  # colocated EP=2 equals the single-process oracle
    before = demo.loads()
    assert sorted(before) == ["decode-g0-r0", "decode-g0-r1", "prefill-g0-r0", "prefill-g0-r1"]

    results = asyncio.run(_all_at_once(demo.registry_address, "pd", prompts, oracle))
    assert [r.outcome for r in results] == ["ok"] * len(prompts)
    assert [r.tokens for r in results] == colocated_outputs == oracle

    config = ModelConfig.from_model_dir(model_dir)
    row_bytes = (config.kv_lora_rank + config.qk_rope_head_dim) * 4  # fp32 cache
    expected = sum(row_bytes * config.num_hidden_layers * len(p) for p in prompts)

    def moved(loads: Loads, role: str, name: str) -> int:
        return sum(_counter(loads[w], name) - _counter(before[w], name) for w in loads if w.startswith(role))

    # the sender counts its bytes when its side completes (after the receiver's acknowledgement)
    after = _settled_loads(demo, lambda loads: _idle(loads) and moved(loads, "prefill", "kv_bytes_sent") == expected)
    assert moved(after, "prefill", "kv_bytes_sent") == moved(after, "decode", "kv_bytes_received") == expected
    for worker, load in after.items():
        assert (_counter(load, "leases"), _counter(load, "pinned_blocks")) == (0, 0), (worker, load)
        assert _counter(load, "free_blocks") == _counter(load, "num_blocks"), (worker, load)
        assert _counter(load, "kv_transfers_failed") == _counter(before[worker], "kv_transfers_failed"), worker
        # spread: every rank of both groups moved some of the requests' KV
        assert _counter(load, "kv_transfers_ok") > _counter(before[worker], "kv_transfers_ok"), (worker, load)


def test_requests_in_flight_finish_when_their_workers_leave_the_dispatchers_set(
    demo: ControllerHandle, prompts: list[list[int]], long_oracle: list[list[int]]
) -> None:
    """A worker that leaves the registry's ready set (draining, or replaced) keeps the calls already on
    it: the Dispatcher stops picking it at once but closes its channel only after they end."""

    async def body() -> list[Result]:
        dispatcher = Dispatcher(request_timeout_s=REQUEST_TIMEOUT_S)
        everyone = _endpoints(await RegistryClient(demo.registry_address).list())
        await dispatcher.update(everyone)
        decoding = asyncio.Event()
        first_tokens: list[int] = []

        def on_first() -> None:
            first_tokens.append(1)
            if len(first_tokens) == len(prompts):
                decoding.set()

        ledger = Ledger()
        try:
            requests = [
                asyncio.create_task(
                    _request(
                        dispatcher, f"leave{i}", p, long_oracle[i], ledger, max_tokens=LONG_TOKENS, on_first=on_first
                    )
                )
                for i, p in enumerate(prompts)
            ]
            await asyncio.wait_for(decoding.wait(), REQUEST_DEADLINE_S)  # every request is on a decode rank
            await dispatcher.update([e for e in everyone if e.role == "prefill"])  # the decode ranks leave
            assert {e.role for e in dispatcher.endpoints} == {"prefill"}
            with pytest.raises(NoWorkerError, match="no live decode worker"):
                await anext(aiter(dispatcher.generate("late", prompts[0], _sampling())))
            return list(await asyncio.gather(*requests))
        finally:
            await dispatcher.close()

    results = asyncio.run(body())
    assert [r.outcome for r in results] == ["ok"] * len(prompts), results
    assert _idle(_settled_loads(demo, _idle))


# ---- 3: a rank dies mid-run ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("pool", "rank", "how"), [("prefill", 1, "ray.kill"), ("decode", 0, "SIGKILL")])
def test_a_rank_killed_mid_run_hangs_no_request_and_the_pool_recovers(
    demo: ControllerHandle, prompts: list[list[int]], oracle: list[list[int]], pool: str, rank: int, how: str
) -> None:
    assert demo.wait_ready(READY_TIMEOUT_S), demo.status()
    status = _group_status(demo, pool)
    old = {w.address for w in demo.live_workers() if w.pool == pool}
    actor = _rank_actor(f"{ACTOR_NAME_PREFIX}:{pool}-g0-r{rank}:{status['generation']}")
    pid = int(ray.get(actor.pid.remote(), timeout=10))

    def kill() -> None:
        if how == "ray.kill":
            ray.kill(actor, no_restart=True)
        else:
            os.kill(pid, signal.SIGKILL)

    def addresses(dispatcher: Dispatcher) -> set[str]:
        return {e.address for e in dispatcher.endpoints if e.worker_id.startswith(f"{pool}-")}

    async def body() -> tuple[Ledger, int, list[Result], float, float]:
        ledger = Ledger()
        async with _router(demo.registry_address) as dispatcher:
            stream: list[asyncio.Task[Result]] = []
            killed_at: float | None = None
            loads_meanwhile: asyncio.Task[Loads] | None = None
            detected_at: float | None = None
            recovered_at: float | None = None
            for i in range(int(RECOVERY_LIMIT_S / PACE_S) + 100):  # bounded: the stream ends at recovery
                p = i % len(prompts)
                stream.append(asyncio.create_task(_request(dispatcher, f"{pool}-s{i}", prompts[p], oracle[p], ledger)))
                await asyncio.sleep(PACE_S)
                if killed_at is None and ledger.kinds().get("ok", 0) >= KILL_AFTER_OK:
                    kill()
                    killed_at = time.monotonic()
                    loads_meanwhile = asyncio.create_task(asyncio.to_thread(demo.loads))
                if killed_at is not None and detected_at is None and not addresses(dispatcher) & old:
                    detected_at = time.monotonic()
                if detected_at is not None and len(addresses(dispatcher) - old) == 2:
                    recovered_at = time.monotonic()
                    break
                if killed_at is not None and time.monotonic() - killed_at > RECOVERY_LIMIT_S:
                    break
            await asyncio.wait(stream)  # each one ends by its own deadline
            assert killed_at is not None, f"never {KILL_AFTER_OK} successes before the kill: {ledger.kinds()}"
            other = "decode" if pool == "prefill" else "prefill"
            assert loads_meanwhile is not None
            partial = await loads_meanwhile  # the dying group is left out; the call does not fail
            assert {w for w in partial if w.startswith(other)} == {f"{other}-g0-r0", f"{other}-g0-r1"}, partial
            assert recovered_at is not None and detected_at is not None, (
                f"no new ready {pool} workers {RECOVERY_LIMIT_S:g}s after the kill"
            )
            after = await asyncio.gather(
                *(_request(dispatcher, f"{pool}-a{i}", p, oracle[i], ledger) for i, p in enumerate(prompts))
            )
            return ledger, len(stream), list(after), detected_at - killed_at, recovered_at - killed_at

    ledger, streamed, after, detect_s, recovery_s = asyncio.run(body())
    issued = {f"{pool}-s{i}" for i in range(streamed)} | {f"{pool}-a{i}" for i in range(len(prompts))}
    assert set(ledger.results) == issued  # exactly one outcome per request id
    summary = f"{how} {pool} rank {rank}: {ledger.kinds()}, gone after {detect_s:.1f}s, back after {recovery_s:.1f}s"
    errors: dict[str, int] = {}
    for result in ledger.with_kind("error"):
        errors[result.outcome[:110]] = errors.get(result.outcome[:110], 0) + 1
    print(summary, *(f"{n} × {why}" for why, n in sorted(errors.items())), sep="\n  ")
    assert not ledger.with_kind("hung"), (summary, ledger.with_kind("hung"))
    assert not ledger.with_kind("wrong"), (summary, ledger.with_kind("wrong"))
    assert not ledger.with_kind("raised"), (summary, ledger.with_kind("raised"))
    for result in ledger.with_kind("error"):  # every failure says why
        why = result.outcome.removeprefix("error:").strip()
        assert why and "Unexpected <class" not in why and not why.startswith("UNKNOWN"), result  # not a crash
    assert [r.outcome for r in after] == ["ok"] * len(prompts), (summary, after)
    assert detect_s < DETECT_LIMIT_S, summary

    renewed = _group_status(demo, pool)
    assert (renewed["generation"], renewed["restarts"]) == (status["generation"] + 1, status["restarts"] + 1)
    assert "died" in renewed["last_error"], renewed
    assert {w.address for w in demo.live_workers() if w.pool == pool}.isdisjoint(old)
    loads = _settled_loads(demo, _idle)
    assert _idle(loads), loads  # no lease or pinned block outlives the fault
