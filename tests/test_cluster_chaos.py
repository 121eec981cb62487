"""Cluster-level chaos on a real local Ray (token auth on), the tiny model and gloo on loopback
(reliability.md §4.2 tests 10, 11 and 20, and the hang variants of tests/test_cluster_faults.py).

1. Test 20, determinism and batch invariance: a prompt P alone, then inside batches of 1 to 8
   concurrent random neighbours (random lengths, random output lengths, staggered starts), on a
   colocated pool and on the disaggregated one (EP=2 each): P's tokens, and every neighbour's,
   equal the single-process fp32 oracle in every configuration.
2. Test 11, an EP rank dies: SIGKILL (a crash) and SIGSTOP (a hang) of one rank of the decode group
   while requests stream through a ``Dispatcher`` (its defaults: request migration on, stall bound).
   The surviving peer's collective raises within the configured collective timeout (its rank then
   reports its group failed), no request hangs (each ends ok with the oracle's tokens, or with a
   clean error: with one decode group a migrated request has no live rank to go to), the
   controller recreates the group, the next requests equal the oracle and no lease or pinned block
   is left. The detection time (fault -> the dead group leaves the registry's ready set) and the
   recovery time (fault -> a new ready group) are reported with the ledger's figure. With a second
   decode group (the pool scaled to 2), every request of the stopped group migrates: all ok.
3. A prefill rank hangs (SIGSTOP): the same outcome. Nothing but timeouts can notice a stopped
   process: its peer's collective timeout (then the peer reports its group failed, which the
   controller takes as the group's death at its next health round) or, at the latest,
   ``health.failures`` rounds of the stopped rank's own health calls timing out.
4. Test 10, a router replica dies: two ``k2serve router`` processes follow the same registry;
   SIGKILL router A while streams run on it. Its clients get a connection error, the workers abort
   those requests (the gRPC stream cancellation reaches the ranks: running 0, abort counters up,
   leases and pinned blocks 0 within a bound), router B keeps serving the oracle's tokens, and a
   client that retries on B before its first byte loses no request.

The cluster: ``ClusterConfig.demo``'s shape (one prefill and one decode group, EP=2, half a CPU per
rank, the demo's health settings) with the knobs these faults need: ``pools.*.collective_timeout_s``
short (a stopped peer must fail the survivors' collectives in seconds, not the 30 s default; the same
timeout bounds a group's join at start, so a heavily loaded machine may need a second start),
``kv_transfer.lease_ttl_s`` 10 (a prefill lease whose decode side vanished frees its blocks in
seconds), and more restarts than the demo's 3 (several faults hit one group). One cluster at a time
(Ray gets 4 logical CPUs): the colocated one only inside its own slow test, the first of the
module; the disaggregated one for the rest. Every wait is bounded; a SIGSTOPped process gets
SIGCONT at the end whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import ray
import torch
from local_ray import local_ray
from request_ledger import Ledger, Result, report
from serve_process import ServeProcess

from k2serve.cluster.config import ClusterConfig
from k2serve.cluster.controller_handle import ControllerHandle
from k2serve.cluster.ray_runtime import RayRuntime
from k2serve.cluster.registry_client import RegistryClient
from k2serve.cluster.worker_group import ACTOR_NAME_PREFIX
from k2serve.cluster.worker_record import WorkerSnapshot
from k2serve.proto import serving_pb2, serving_pb2_grpc, worker_pb2
from k2serve.router.dispatcher import Dispatcher
from k2serve.router.worker_client import NoWorkerError, WorkerEndpoint
from k2serve.tiny_model import make_tiny_model
from k2serve.workers.greedy import greedy_generate
from k2serve.workers.model.model import KimiK2ForCausalLM
from k2serve.workers.model_loader import load_model

NAMESPACE = "k2serve-chaos"
COLLECTIVE_TIMEOUT_S = 4.0  # pools.*.collective_timeout_s of this module's clusters
LEASE_TTL_S = 10.0  # kv_transfer.lease_ttl_s
HEALTH = {"interval_s": 1.0, "timeout_s": 2.0, "failures": 2, "start_timeout_s": 120.0}  # the demo's
HEALTH_ROUND_S = 2 * 2.0 + 1.0  # one health round at worst: actor call and gRPC Check timing out, the interval
MAX_TOKENS = 6
STREAM_TOKENS = 24
NUM_PROMPTS = 8
READY_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 90.0  # the Dispatcher's own per-RPC deadline: a safety net above the ledger's
REQUEST_DEADLINE_S = 60.0  # a request with no outcome by then is "hung" (above the longest hang detection)
KILL_AFTER_OK = 4  # the fault comes once this many requests of the stream have succeeded
# A hang shows on the peer after COLLECTIVE_TIMEOUT_S, which the next health round takes as the group's
# death; Ray then needs a few seconds to kill a stopped process. Bounds have headroom for a loaded box.
PEER_LIMIT_S = COLLECTIVE_TIMEOUT_S + 6.0  # fault -> the peer reports its group failed
DETECT_LIMIT_S = {  # fault -> the group leaves the Dispatcher's ready set
    "SIGKILL": HEALTH_ROUND_S + 3.0,  # the dead actor is seen at the next round
    "SIGSTOP": COLLECTIVE_TIMEOUT_S + 2 * HEALTH_ROUND_S,  # the peer's failure, seen at the next round
}
RECOVERY_LIMIT_S = 90.0  # fault -> new ready workers in the Dispatcher
IN_FLIGHT_LIMIT_S = 45.0  # fault -> the last request in flight at the fault has its outcome
SETTLE_S = 40.0  # leases (TTL 10 s) and a sender blocked on a stopped peer (transfer timeout 30 s) settle
ROUTER_STREAMS = 6
ROUTER_STREAM_TOKENS = 1800  # seconds of decoding left when router A dies (max_model_len 2048)
ABORT_LIMIT_S = 10.0  # router A killed -> every rank reports running 0 (the streams had seconds left)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("chaos") / "tiny", preset="tiny", seed=11)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(17)
    return [[rng.randrange(1, 500) for _ in range(rng.randint(3, 40))] for _ in range(NUM_PROMPTS)]


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> KimiK2ForCausalLM:
    """The single-process fp32 model of the oracle."""
    return load_model(model_dir, dtype=torch.float32, max_positions=2048, progress=False)


@pytest.fixture(scope="module")
def oracle(reference: KimiK2ForCausalLM, prompts: list[list[int]]) -> list[list[int]]:
    return [greedy_generate(reference, p, max_tokens=MAX_TOKENS) for p in prompts]


@pytest.fixture(scope="module")
def stream_oracle(reference: KimiK2ForCausalLM, prompts: list[list[int]]) -> list[list[int]]:
    """Longer requests for the fault streams: several are decoding at any moment."""
    return [greedy_generate(reference, p, max_tokens=STREAM_TOKENS) for p in prompts]


@pytest.fixture(scope="module")
def ray_runtime() -> Iterator[RayRuntime]:
    with local_ray(NAMESPACE) as runtime:
        yield runtime


@pytest.fixture(scope="module")
def cluster(ray_runtime: RayRuntime, model_dir: Path) -> Iterator[ControllerHandle]:
    """The disaggregated cluster (one prefill and one decode group, EP=2 each) of every test but the first."""
    with _controller(_config(model_dir)) as controller:
        assert controller.wait_ready(READY_TIMEOUT_S), controller.status()
        yield controller


def _config(model_dir: Path, *, colocated: bool = False) -> ClusterConfig:
    """The demo's shape with this module's fault knobs (module docstring), as the YAML would say it."""
    pool = {
        "groups": 1,
        "ep_size": 2,
        "cpus_per_rank": 0.5,
        "kv_cache_blocks": 512,  # 8192 tokens a rank: the long streams of test 10 fit without preemption
        "max_model_len": 2048,
        "collective_timeout_s": COLLECTIVE_TIMEOUT_S,
    }
    return ClusterConfig.from_dict(
        {
            "model": str(model_dir),
            "pools": {"colocated": pool} if colocated else {"prefill": pool, "decode": pool},
            "ray": {"namespace": NAMESPACE},
            "kv_transfer": {"lease_ttl_s": LEASE_TTL_S},
            "health": HEALTH,
            "restart": {"max_restarts": 10, "backoff_initial_s": 0.5, "backoff_max_s": 5.0},
        }
    )


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


def _rank_actor(worker_id: str, generation: int) -> Any:
    return ray.get_actor(f"{ACTOR_NAME_PREFIX}:{worker_id}:{generation}", namespace=NAMESPACE)


def _rank_pids() -> list[int]:
    names = [
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(ACTOR_NAME_PREFIX)
    ]
    pids: list[int] = []
    for name in names:
        with contextlib.suppress(ray.exceptions.RayError, ValueError):  # a rank that just died
            pids.append(int(ray.get(ray.get_actor(name, namespace=NAMESPACE).pid.remote(), timeout=10)))
    return pids


def _assert_nothing_left(pids: list[int]) -> None:
    deadline = time.monotonic() + 30
    while True:
        actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("k2serve")]
        groups = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
        alive = [pid for pid in pids if _alive(pid)]
        if not actors and not groups and not alive:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind: actors {actors}, placement groups {groups}, rank processes {alive}")
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _group_status(controller: ControllerHandle, pool: str, group: int = 0) -> dict[str, Any]:
    return next(s for s in controller.status() if s["pool"] == pool and s["group"] == group)


def _counter(load: dict[str, Any], name: str) -> int:
    return int(load.get(name, 0))  # MessageToDict leaves zeros out and writes int64 as text


Loads = dict[str, dict[str, Any]]  # GetLoad of every ready rank, by worker id (ControllerHandle.loads)


def _settled_loads(controller: ControllerHandle, done: Callable[[Loads], bool], limit_s: float = SETTLE_S) -> Loads:
    """Poll ``loads()`` (bounded) until ``done(loads)``; the last loads either way."""
    deadline = time.monotonic() + limit_s
    while True:
        loads = controller.loads()
        if done(loads) or time.monotonic() > deadline:
            return loads
        time.sleep(0.2)


def _quiet(loads: Loads, ranks: int = 4) -> bool:
    """All ``ranks`` ranks answer, and none runs, queues, leases or pins anything, or holds a block."""
    names = ("running", "waiting", "leases", "pinned_blocks")
    return (
        len(loads) == ranks and not _leaked(loads) and all(_counter(x, n) == 0 for x in loads.values() for n in names)
    )


def _leaked(loads: Loads) -> int:
    """KV blocks not free (prefix-cached blocks count as free) or pinned, over every rank."""
    return sum(
        _counter(x, "num_blocks") - _counter(x, "free_blocks") + _counter(x, "pinned_blocks") for x in loads.values()
    )


def _nothing_running(loads: Loads) -> bool:
    return len(loads) == 4 and all(_counter(x, "running") == 0 and _counter(x, "waiting") == 0 for x in loads.values())


def _decoding(count: int) -> Callable[[Loads], bool]:
    def done(loads: Loads) -> bool:
        return sum(_counter(load, "running") for w, load in loads.items() if w.startswith("decode")) >= count

    return done


def _aborted(controller: ControllerHandle) -> dict[str, int]:
    """Requests each live rank finished as aborted (``k2serve_request_success_total{finished_reason="abort"}``)."""
    out: dict[str, int] = {}
    for worker in controller.live_workers():
        if worker.state != "ready":
            continue
        assert worker.metrics_address, worker
        with urllib.request.urlopen(f"http://{worker.metrics_address}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        out[f"{worker.worker_id}@{worker.address}"] = int(
            sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("k2serve_request_success_total{") and 'finished_reason="abort"' in line
            )
        )
    return out


# ---- requests through a Dispatcher ------------------------------------------------------------------------------


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


def _sampling(max_tokens: int) -> worker_pb2.SamplingParams:
    return worker_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


@dataclass
class Timeline:
    """When each request started and ended (monotonic seconds), for "in flight at the fault"."""

    started: dict[str, float] = field(default_factory=dict)
    ended: dict[str, float] = field(default_factory=dict)

    def in_flight_at(self, moment: float) -> list[str]:
        return [r for r, t in self.started.items() if t <= moment < self.ended.get(r, float("inf"))]


def _outcome_of_tokens(tokens: list[int], expected: list[int] | None, finish: str) -> str:
    if expected is not None and tokens != expected:
        return f"wrong: {tokens} instead of {expected} ({finish})"
    return "ok"


def _error_outcome(why: str, tokens: list[int], expected: list[int] | None) -> str:
    """A clean error, unless the tokens it sent before failing were already off the oracle."""
    if expected is not None and tokens != expected[: len(tokens)]:
        return f"wrong: {tokens} before the error, not a prefix of {expected} ({why})"
    return f"error: {why}"


async def _request(
    dispatcher: Dispatcher,
    request_id: str,
    prompt: Sequence[int],
    expected: list[int] | None,
    ledger: Ledger,
    timeline: Timeline | None = None,
    *,
    max_tokens: int = MAX_TOKENS,
) -> Result:
    """Run one request through the Dispatcher to its end or its deadline and record the outcome."""
    tokens: list[int] = []
    started = time.monotonic()
    if timeline is not None:
        timeline.started[request_id] = started

    async def consume() -> str:
        async for event in dispatcher.generate(request_id, list(prompt), _sampling(max_tokens)):
            tokens.extend(event.token_ids)
            if event.finish_reason == "error":
                return _error_outcome(event.error, tokens, expected)
            if event.finish_reason:
                return _outcome_of_tokens(tokens, expected, event.finish_reason)
        return f"wrong: the stream ended without a finish reason after {tokens}"

    try:
        outcome = await asyncio.wait_for(consume(), REQUEST_DEADLINE_S)
    except TimeoutError:
        outcome = "hung"
    except grpc.aio.AioRpcError as exc:
        outcome = _error_outcome(f"{exc.code().name}: {exc.details()}", tokens, expected)
    except NoWorkerError as exc:
        outcome = f"error: {exc}"
    except Exception as exc:  # anything else is a bug of the router or the workers
        outcome = f"raised: {type(exc).__name__}: {exc}"
    if timeline is not None:
        timeline.ended[request_id] = time.monotonic()
    return ledger.record(Result(request_id, outcome, list(tokens), time.monotonic() - started))


def _assert_clean(ledger: Ledger, summary: str) -> None:
    """No hung, wrong or raised request; every error names a reason that is not a crash."""
    ledger.assert_none()
    for result in ledger.with_kind("error"):
        why = result.outcome.removeprefix("error:").strip()
        assert why and "Unexpected <class" not in why and not why.startswith("UNKNOWN"), (summary, result)


def _error_summary(ledger: Ledger) -> str:
    errors: dict[str, int] = {}
    for result in ledger.with_kind("error"):
        why = re.sub(r"\d+", "N", result.outcome[:100])
        errors[why] = errors.get(why, 0) + 1
    return "\n  ".join(f"{n} x {why}" for why, n in sorted(errors.items()))


# ---- test 20: determinism / batch invariance ---------------------------------------------------------------------

P_TOKENS = 16


@dataclass(frozen=True)
class Neighbour:
    prompt: tuple[int, ...]
    max_tokens: int
    delay_s: float  # staggered start: P joins batches that are already decoding, and the reverse


def _neighbours(seed: int) -> list[list[Neighbour]]:
    """For k = 1..8: k random neighbours (lengths 1..70, outputs 1..24, starts within 60 ms)."""
    rng = random.Random(seed)
    return [
        [
            Neighbour(
                tuple(rng.randrange(1, 500) for _ in range(rng.randint(1, 70))),
                rng.randint(1, 24),
                rng.uniform(0.0, 0.06),
            )
            for _ in range(k)
        ]
        for k in range(1, 9)
    ]


async def _later(delay_s: float, run: Awaitable[Result]) -> Result:
    await asyncio.sleep(delay_s)
    return await run


def _batch_invariance(
    registry_address: str, reference: KimiK2ForCausalLM, shape: str, seed: int
) -> tuple[Ledger, list[str]]:
    """P alone, then P inside each batch of k = 1..8 neighbours; every request checked against the oracle.
    Returns the ledger and P's outcome per configuration."""
    rng = random.Random(seed)
    p = [rng.randrange(1, 500) for _ in range(37)]  # crosses two block boundaries (block size 16)
    p_oracle = greedy_generate(reference, p, max_tokens=P_TOKENS)
    batches = _neighbours(seed)
    expected = [[greedy_generate(reference, list(n.prompt), max_tokens=n.max_tokens) for n in b] for b in batches]

    async def body() -> tuple[Ledger, list[str]]:
        ledger = Ledger()
        p_outcomes: list[str] = []
        async with _router(registry_address) as dispatcher:
            alone = await _request(dispatcher, f"{shape}-P-alone", p, p_oracle, ledger, max_tokens=P_TOKENS)
            p_outcomes.append(alone.outcome)
            for k, (batch, wants) in enumerate(zip(batches, expected, strict=True), start=1):
                runs = [
                    _later(
                        n.delay_s,
                        _request(dispatcher, f"{shape}-b{k}-n{i}", n.prompt, want, ledger, max_tokens=n.max_tokens),
                    )
                    for i, (n, want) in enumerate(zip(batch, wants, strict=True))
                ]
                p_run = _request(dispatcher, f"{shape}-b{k}-P", p, p_oracle, ledger, max_tokens=P_TOKENS)
                runs.insert(rng.randrange(len(runs) + 1), _later(rng.uniform(0.0, 0.06), p_run))
                await asyncio.gather(*runs)
                p_outcomes.append(ledger.results[f"{shape}-b{k}-P"].outcome)
        return ledger, p_outcomes

    return asyncio.run(body())


@pytest.mark.slow
def test_a_prompt_alone_and_in_batches_of_1_to_8_random_neighbours_equals_the_oracle_colocated(
    ray_runtime: RayRuntime, model_dir: Path, reference: KimiK2ForCausalLM
) -> None:
    """Its own colocated cluster (EP=2), gone before the disaggregated one starts (the module's first test)."""
    with _controller(_config(model_dir, colocated=True)) as controller:
        assert controller.wait_ready(READY_TIMEOUT_S), controller.status()
        ledger, p_outcomes = _batch_invariance(controller.registry_address, reference, "co", seed=20)
    report("test 20 batch invariance, colocated EP=2", ledger.figure(0))
    assert p_outcomes == ["ok"] * 9, p_outcomes
    assert ledger.kinds() == {"ok": len(ledger.results)}, _error_summary(ledger) or ledger.kinds()


def test_a_prompt_alone_and_in_batches_of_1_to_8_random_neighbours_equals_the_oracle_disaggregated(
    cluster: ControllerHandle, reference: KimiK2ForCausalLM
) -> None:
    ledger, p_outcomes = _batch_invariance(cluster.registry_address, reference, "pd", seed=20)
    loads = _settled_loads(cluster, _quiet)
    report("test 20 batch invariance, disaggregated EP=2", ledger.figure(0, leaked_blocks=_leaked(loads)))
    assert p_outcomes == ["ok"] * 9, p_outcomes  # alone, then in batches of 1..8 neighbours
    assert ledger.kinds() == {"ok": len(ledger.results)}, _error_summary(ledger) or ledger.kinds()
    assert _quiet(loads), loads


# ---- tests 11 and the hang variants: a rank crashes or stops mid-run ---------------------------------------------


@dataclass
class FaultRun:
    ledger: Ledger
    timeline: Timeline
    issued: set[str]  # every request id sent: the stream ("{tag}-s{i}") and the checks after it ("{tag}-a{i}")
    faulted_at: float
    detected_s: float  # fault -> no old address of the pool in the Dispatcher
    recovered_s: float  # fault -> both ranks of the pool at new addresses
    peer_broke_s: float | None  # fault -> the peer rank reports its group failed (None: not watched, or killed first)
    peer_note: str
    migrations: dict[str, int]  # the Dispatcher's re-issues by kind (request migration)


def _watch_peer(peer: Any, since: float, limit_s: float) -> tuple[float | None, str]:
    """Poll the peer rank's ``health()`` until it reports its group failed (-> seconds since ``since``), its
    actor is gone, or ``limit_s`` passes."""
    deadline = since + limit_s
    while time.monotonic() < deadline:
        try:
            healthy = ray.get(peer.health.remote(), timeout=2.0)
        except ray.exceptions.GetTimeoutError:
            continue
        except ray.exceptions.RayError as exc:
            return None, f"the peer died before it reported its group failed ({type(exc).__name__})"
        if not healthy:
            return time.monotonic() - since, "the peer reported its group failed"
        time.sleep(0.05)
    return None, f"the peer still reported a healthy group after {limit_s:g}s"


def _run_fault(
    controller: ControllerHandle,
    prompts: list[list[int]],
    oracle: list[list[int]],
    *,
    pool: str,
    rank: int,
    group: int = 0,
    how: str,
    tag: str,
    pace_s: float,
) -> FaultRun:
    """A steady stream of requests; ``how`` (SIGKILL / SIGSTOP) hits rank ``rank`` of ``pool`` after
    ``KILL_AFTER_OK`` successes; the stream runs until a new group is ready; a stopped process gets
    SIGCONT at the end whatever happened."""
    assert controller.wait_ready(READY_TIMEOUT_S), controller.status()
    generation = _group_status(controller, pool, group)["generation"]
    old = {w.address for w in controller.live_workers() if w.pool == pool and w.group == group}
    victim = _rank_actor(f"{pool}-g{group}-r{rank}", generation)
    peer = _rank_actor(f"{pool}-g{group}-r{1 - rank}", generation)
    pid = int(ray.get(victim.pid.remote(), timeout=10))
    watched: dict[str, Any] = {}

    def addresses(dispatcher: Dispatcher) -> set[str]:
        return {e.address for e in dispatcher.endpoints if e.worker_id.startswith(f"{pool}-g{group}-")}

    async def body() -> FaultRun:
        ledger, timeline = Ledger(), Timeline()
        async with _router(controller.registry_address) as dispatcher:
            stream: list[asyncio.Task[Result]] = []
            faulted_at = detected_at = recovered_at = None
            watcher: threading.Thread | None = None
            for i in range(int(RECOVERY_LIMIT_S / pace_s) + 200):  # bounded: the stream ends at recovery
                p = i % len(prompts)
                stream.append(
                    asyncio.create_task(
                        _request(
                            dispatcher,
                            f"{tag}-s{i}",
                            prompts[p],
                            oracle[p],
                            ledger,
                            timeline,
                            max_tokens=len(oracle[p]),
                        )
                    )
                )
                await asyncio.sleep(pace_s)
                if faulted_at is None and ledger.kinds().get("ok", 0) >= KILL_AFTER_OK:
                    os.kill(pid, signal.SIGKILL if how == "SIGKILL" else signal.SIGSTOP)
                    faulted_at = time.monotonic()
                    watcher = threading.Thread(
                        target=lambda at=faulted_at: watched.update(result=_watch_peer(peer, at, PEER_LIMIT_S + 5)),
                        daemon=True,
                    )
                    watcher.start()
                now = time.monotonic()
                if faulted_at is not None and detected_at is None and not addresses(dispatcher) & old:
                    detected_at = now
                if detected_at is not None and len(addresses(dispatcher) - old) == 2:
                    recovered_at = now
                    break
                if faulted_at is not None and now - faulted_at > RECOVERY_LIMIT_S:
                    break
            await asyncio.wait(stream)  # each one ends by its own deadline
            assert faulted_at is not None, f"never {KILL_AFTER_OK} successes before the fault: {ledger.kinds()}"
            assert detected_at is not None and recovered_at is not None, (
                f"{how} {pool} rank {rank}: no new ready group {RECOVERY_LIMIT_S:g}s after the fault: "
                f"{ledger.kinds()}, {controller.status()}"
            )
            after = await asyncio.gather(
                *(
                    _request(dispatcher, f"{tag}-a{i}", p, oracle[i], ledger, max_tokens=len(oracle[i]))
                    for i, p in enumerate(prompts)
                )
            )
            assert [r.outcome for r in after] == ["ok"] * len(prompts), after
            assert watcher is not None
            await asyncio.to_thread(watcher.join, PEER_LIMIT_S + 10)
            peer_s, note = watched.get("result", (None, "the peer watch did not finish"))
            migrations = dict(dispatcher.migrations)
            issued = {f"{tag}-s{i}" for i in range(len(stream))} | {f"{tag}-a{i}" for i in range(len(prompts))}
            return FaultRun(
                ledger,
                timeline,
                issued,
                faulted_at,
                detected_at - faulted_at,
                recovered_at - faulted_at,
                peer_s,
                note,
                migrations,
            )

    try:
        return asyncio.run(body())
    finally:
        if how == "SIGSTOP":
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def _check_fault_run(
    controller: ControllerHandle, run: FaultRun, *, pool: str, how: str, name: str, group: int = 0, ranks: int = 4
) -> None:
    """The common verdict of a crash or hang of one rank (of ``ranks`` in the cluster); reports the figure."""
    in_flight = run.timeline.in_flight_at(run.faulted_at)
    hit = Ledger({r: run.ledger.results[r] for r in in_flight})
    last_s = max((run.timeline.ended[r] - run.faulted_at for r in in_flight), default=0.0)
    slowest_s = max(r.seconds for r in run.ledger.results.values())
    loads = _settled_loads(controller, lambda loads: _quiet(loads, ranks))
    leaked = _leaked(loads)
    summary = (
        f"{run.ledger.kinds()}; in flight at the fault: {hit.kinds()}, the last ended {last_s:.1f}s after it; "
        f"slowest request {slowest_s:.1f}s; migrations {run.migrations}; gone from the router after "
        f"{run.detected_s:.1f}s, new group after {run.recovered_s:.1f}s; peer: {run.peer_note}"
        + (f" after {run.peer_broke_s:.1f}s" if run.peer_broke_s is not None else "")
    )
    print(f"{name}: {summary}\n  {_error_summary(run.ledger)}")
    report(name, run.ledger.figure(1, leaked_blocks=leaked, recovery_s=[run.recovered_s]) + f" ({summary})")
    assert set(run.ledger.results) == run.issued  # exactly one outcome per request
    _assert_clean(run.ledger, summary)
    assert run.detected_s < DETECT_LIMIT_S[how], summary
    assert last_s < IN_FLIGHT_LIMIT_S, summary
    renewed = _group_status(controller, pool, group)
    assert renewed["state"] == "ready" and renewed["restarts"] >= 1, renewed
    assert _quiet(loads, ranks), loads  # no request, lease or pinned block outlives the fault


@pytest.mark.slow  # the fast run has tests/test_cluster_faults.py's SIGKILL of a decode rank
def test_an_ep_rank_killed_mid_run_fails_its_peers_collective_and_the_group_is_rebuilt(
    cluster: ControllerHandle, prompts: list[list[int]], stream_oracle: list[list[int]]
) -> None:
    """Test 11, crash: gloo reports the closed connection to the peer at once (no timeout to wait for)."""
    before = _group_status(cluster, "decode")
    run = _run_fault(cluster, prompts, stream_oracle, pool="decode", rank=1, how="SIGKILL", tag="kill", pace_s=0.1)
    _check_fault_run(cluster, run, pool="decode", how="SIGKILL", name="test 11 EP rank SIGKILL (decode rank 1)")
    after = _group_status(cluster, "decode")
    assert after["generation"] > before["generation"] and "died" in after["last_error"], after
    # the peer either reported its broken group or was killed with its group first; never a healthy survivor
    assert run.peer_broke_s is None or run.peer_broke_s < PEER_LIMIT_S, run.peer_note
    assert "still reported a healthy group" not in run.peer_note, run.peer_note


def test_an_ep_rank_stopped_mid_run_fails_its_peer_within_the_collective_timeout_and_the_group_is_rebuilt(
    cluster: ControllerHandle, prompts: list[list[int]], stream_oracle: list[list[int]]
) -> None:
    """Test 11, hang (SIGSTOP of decode rank 0): only time tells. The peer's collective raises after the
    configured timeout, the peer then reports its group failed, and the controller's next health round
    recreates the group (the stopped rank's own timed-out health calls would take ``health.failures``
    rounds)."""
    before = _group_status(cluster, "decode")
    run = _run_fault(cluster, prompts, stream_oracle, pool="decode", rank=0, how="SIGSTOP", tag="stop", pace_s=0.2)
    _check_fault_run(cluster, run, pool="decode", how="SIGSTOP", name="test 11 EP rank SIGSTOP (decode rank 0)")
    after = _group_status(cluster, "decode")
    assert after["generation"] > before["generation"], after
    assert run.peer_broke_s is not None, run.peer_note
    # not before the timeout (a stopped peer sends nothing to fail on), and soon after it
    assert COLLECTIVE_TIMEOUT_S - 0.5 <= run.peer_broke_s < PEER_LIMIT_S, run.peer_broke_s


@pytest.mark.slow
def test_a_prefill_rank_stopped_mid_run_hangs_no_request_and_the_pool_recovers(
    cluster: ControllerHandle, prompts: list[list[int]], stream_oracle: list[list[int]]
) -> None:
    before = _group_status(cluster, "prefill")
    run = _run_fault(cluster, prompts, stream_oracle, pool="prefill", rank=1, how="SIGSTOP", tag="pstop", pace_s=0.2)
    _check_fault_run(cluster, run, pool="prefill", how="SIGSTOP", name="SIGSTOP prefill rank 1")
    after = _group_status(cluster, "prefill")
    assert after["generation"] > before["generation"], after
    assert run.peer_broke_s is not None, run.peer_note


# ---- test 10: a router replica dies ------------------------------------------------------------------------------


def _greedy(max_tokens: int) -> serving_pb2.SamplingParams:
    return serving_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


async def _serve(
    targets: Sequence[str],
    request_id: str,
    prompt: Sequence[int],
    expected: list[int] | None,
    ledger: Ledger,
    *,
    max_tokens: int = MAX_TOKENS,
    first_byte: asyncio.Event | None = None,
) -> Result:
    """One ``Serving.Generate`` call through the routers ``targets``: a connection error before the first
    response is retried on the next router (retry-before-first-byte); after it, it is the outcome
    (``expected`` None: any tokens)."""
    tokens: list[int] = []
    started = time.monotonic()
    outcome = ""
    tries: list[str] = []
    for target in targets:
        async with grpc.aio.insecure_channel(target) as channel:
            call = serving_pb2_grpc.ServingStub(channel).Generate(
                serving_pb2.GenerateRequest(
                    token_ids=serving_pb2.TokenIds(ids=list(prompt)),
                    sampling=_greedy(max_tokens),
                    request_id=request_id,
                ),
                timeout=REQUEST_DEADLINE_S,
            )
            try:
                async for message in call:
                    tokens.extend(message.token_ids)
                    if first_byte is not None:
                        first_byte.set()
                    if message.finish_reason == "error":
                        outcome = _error_outcome(message.error, tokens, expected)
                    elif message.finish_reason:
                        outcome = _outcome_of_tokens(tokens, expected, message.finish_reason)
                if not outcome:
                    outcome = f"wrong: the stream ended without a finish reason after {tokens}"
            except grpc.aio.AioRpcError as exc:
                why = f"{exc.code().name}: {exc.details()}"
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    outcome = "hung"
                elif not tokens and exc.code() == grpc.StatusCode.UNAVAILABLE and target != targets[-1]:
                    tries.append(why)
                    continue  # nothing reached the client yet: the next router
                else:
                    outcome = _error_outcome(why, tokens, expected)
            break
    note = f": retried on the next router after {'; '.join(tries)}" if tries and outcome == "ok" else ""
    return ledger.record(Result(request_id, outcome + note, list(tokens), time.monotonic() - started))


def _grpc_target(router: ServeProcess) -> str:
    match = re.search(r"ready at \S+ \(gRPC (\S+),", router.log)
    assert match, router.log
    return match.group(1)


def test_a_router_killed_mid_stream_aborts_its_requests_on_the_workers_and_the_other_router_keeps_serving(
    cluster: ControllerHandle,
    model_dir: Path,
    prompts: list[list[int]],
    oracle: list[list[int]],
    reference: KimiK2ForCausalLM,
    tmp_path: Path,
) -> None:
    """Test 10. The streams on router A get a connection error; their work on the ranks is aborted (not run
    to its 1800 tokens); retry-before-first-byte clients lose nothing; router B serves the oracle's tokens."""
    assert cluster.wait_ready(READY_TIMEOUT_S), cluster.status()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # a router needs no Ray
    args = ["router", str(model_dir), "--registry", cluster.registry_address]
    routers: list[ServeProcess] = []

    async def body() -> tuple[Ledger, Ledger, float, float]:
        streams, others = Ledger(), Ledger()
        firsts = [asyncio.Event() for _ in range(ROUTER_STREAMS)]
        running = [
            asyncio.create_task(
                _serve(
                    [a],
                    f"A-stream{i}",
                    prompts[i],
                    None,
                    streams,
                    max_tokens=ROUTER_STREAM_TOKENS,
                    first_byte=firsts[i],
                )
            )
            for i in range(ROUTER_STREAMS)
        ]
        await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), REQUEST_DEADLINE_S)
        decoding = await asyncio.to_thread(_settled_loads, cluster, _decoding(ROUTER_STREAMS), 10.0)
        assert _decoding(ROUTER_STREAMS)(decoding), decoding  # every stream is on a decode rank now
        # clients that prefer A and arrive as it dies: sent, but no byte back yet
        racing = [asyncio.create_task(_serve([a, b], f"retry{i}", p, oracle[i], others)) for i, p in enumerate(prompts)]
        os.killpg(routers[0].proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        await asyncio.gather(*running, *racing)
        await asyncio.to_thread(_settled_loads, cluster, _nothing_running, ABORT_LIMIT_S + 5)
        quiet_at = time.monotonic()
        late = [_serve([a, b], f"late{i}", p, oracle[i], others) for i, p in enumerate(prompts)]  # A is gone
        on_b = [_serve([b], f"B{i}", p, oracle[i], others) for i, p in enumerate(prompts)]
        await asyncio.gather(*late, *on_b)
        return streams, others, killed_at, quiet_at

    try:
        routers.extend(ServeProcess.start(args, tmp_path, env=env) for _ in range(2))
        a, b = (_grpc_target(r) for r in routers)
        aborted_before = _aborted(cluster)
        streams, others, killed_at, quiet_at = asyncio.run(body())
    finally:
        stopped = [r.stop() for r in routers]
    logs = [r.log for r in routers]
    abort_s = quiet_at - killed_at
    loads = _settled_loads(cluster, _quiet, LEASE_TTL_S + 15)
    aborted_after = _aborted(cluster)
    aborted = sum(aborted_after.values()) - sum(aborted_before.values())
    ledger = Ledger({**streams.results, **others.results})
    retried = sum("retried on the next router" in r.outcome for r in others.results.values())
    summary = (
        f"streams on A: {streams.kinds()}; retrying and B clients: {others.kinds()} ({retried} retried on B); "
        f"ranks running 0 after {abort_s:.1f}s, {aborted} requests aborted on the ranks"
    )
    print(summary, _error_summary(ledger), sep="\n  ")
    leaked = _leaked(loads)
    report("test 10 router replica SIGKILL", ledger.figure(1, leaked_blocks=leaked) + f" ({summary})")
    _assert_clean(ledger, summary)
    # every stream that was streaming on A ended with a connection error, after its first tokens (the oracle's)
    for i, result in enumerate(streams.results[f"A-stream{i}"] for i in range(ROUTER_STREAMS)):
        assert result.kind == "error" and "UNAVAILABLE" in result.outcome, result
        assert 0 < len(result.tokens) < ROUTER_STREAM_TOKENS, result
        assert result.tokens == greedy_generate(reference, prompts[i], max_tokens=len(result.tokens)), result
    # retry-before-first-byte: nothing lost; an error is allowed only after a first byte from A
    lost = [r for r in others.results.values() if r.kind != "ok" and not r.tokens]
    assert not lost, lost
    assert all(others.results[f"{w}{i}"].kind == "ok" for w in ("late", "B") for i in range(len(prompts))), summary
    assert abort_s < ABORT_LIMIT_S, summary  # the streams had hundreds of tokens left
    assert aborted >= ROUTER_STREAMS, (aborted_before, aborted_after)  # the stream cancellation reached the ranks
    assert _quiet(loads), loads
    assert stopped[1][0] == 0, logs[1]  # B drains and exits cleanly


# ---- test 11 with somewhere to go: a second decode group takes the failed group's requests over -------------


@pytest.mark.slow
def test_with_a_second_decode_group_the_requests_of_a_stopped_ep_rank_migrate_and_none_fails(
    cluster: ControllerHandle, prompts: list[list[int]], stream_oracle: list[list[int]]
) -> None:
    """The pool scaled to two decode groups; SIGSTOP of decode group 0's rank 1. The router's request
    migration moves every stream of the dead group (stalled, refused, or cut when the group is killed)
    to a live decode rank: every request ends ok with the oracle's tokens, none errors. The module's
    last test: the pool goes back to one group at the end."""
    cluster.scale("decode", 2)
    try:
        assert cluster.wait_ready(READY_TIMEOUT_S), cluster.status()
        before = _group_status(cluster, "decode", 0)
        run = _run_fault(
            cluster, prompts, stream_oracle, pool="decode", group=0, rank=1, how="SIGSTOP", tag="mig", pace_s=0.2
        )
        name = "test 11 EP rank SIGSTOP with a second decode group (migration)"
        _check_fault_run(cluster, run, pool="decode", group=0, how="SIGSTOP", name=name, ranks=6)
        assert _group_status(cluster, "decode", 0)["generation"] > before["generation"]
        assert run.ledger.kinds() == {"ok": len(run.ledger.results)}, _error_summary(run.ledger)
        assert sum(run.migrations.values()) >= 1, run.migrations  # some request was on the dead group
    finally:
        cluster.scale("decode", 1, grace_s=0.0)
