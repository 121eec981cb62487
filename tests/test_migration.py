"""Request migration (reliability.md §1.2 "Decode worker dies mid-stream", §4.2 test 4), the stall
timeout and decode failover: the ``Dispatcher`` keeps a stream going on another rank when its rank
fails, and the client sees one stream equal to the fp32 greedy oracle, with no gap and no duplicate.

On in-process ``WorkerServer``s of the tiny model behind real gRPC (no Ray; the SIGKILL variant on a
real cluster is tests/test_cluster_chaos.py). A rank is killed the hardest way in-process: its gRPC
server cancels every call at once (its clients see UNAVAILABLE, as for a dead process), then it
stops. The engines are paced (a few ms per step) so that the kill lands mid-stream on a loaded
machine too. A stalled rank is either a fake ``Worker`` servicer on a real ``grpc.aio`` server that
sends the first tokens of the right answer and then nothing (a SIGSTOPped process, a blackholed
link), or a real decode rank whose engine blocks in its step (a hung forward). Every request is
recorded in a ``Ledger`` (one outcome each; ``hung`` past its deadline); the figures' recovery is
the time from the fault to each stream's next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import re
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import torch
from request_ledger import Ledger, Result, report, settle
from router_fixtures import LiveRouter, live_router

from k2serve.proto import worker_pb2, worker_pb2_grpc
from k2serve.router.dispatcher import Dispatcher
from k2serve.router.policy import parse_policy
from k2serve.router.request_progress import continued_sampling
from k2serve.router.worker_client import TokenEvent, WorkerEndpoint
from k2serve.tiny_model import make_tiny_model
from k2serve.workers.greedy import greedy_generate
from k2serve.workers.group_rank import GroupRank, RankSpec
from k2serve.workers.model.model import KimiK2ForCausalLM
from k2serve.workers.model_loader import load_model
from k2serve.workers.service import WorkerOptions, WorkerServer

MAX_TOKENS = 40
NUM_STREAMS = 8
KILL_AFTER_TOKENS = 5  # every stream has this many tokens when the victim dies: all are mid-stream
STEP_PACE_S = 0.01  # added to every engine step: 40 tokens take >= 0.4 s, so the kill lands mid-stream
REQUEST_DEADLINE_S = 60.0  # a request with no outcome by then is "hung" (8 streams on a loaded 2-core box)
STALL_TIMEOUT_S = 1.0
STALL_SLACK_S = 10.0  # after the stall bound: a re-prefill and the next token, on a loaded 2-core machine
STALL_HOLD_S = 60.0  # how long the fake stalled rank would stay silent if nobody cancelled its call
THINK_END = 700  # any id works for the engine; the router passes the tokenizer's </think>


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("migration") / "tiny", preset="tiny", seed=5)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> KimiK2ForCausalLM:
    """The single-process fp32 model of the oracle."""
    return load_model(model_dir, dtype=torch.float32, max_positions=256, progress=False)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(11)
    return [[rng.randrange(1, 500) for _ in range(rng.randint(3, 24))] for _ in range(NUM_STREAMS)]


@pytest.fixture(scope="module")
def oracle(reference: KimiK2ForCausalLM, prompts: list[list[int]]) -> list[list[int]]:
    return [greedy_generate(reference, p, max_tokens=MAX_TOKENS) for p in prompts]


def _greedy(max_tokens: int = MAX_TOKENS) -> worker_pb2.SamplingParams:
    return worker_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


# ---- ranks ---------------------------------------------------------------------------------------------------


@asynccontextmanager
async def _ranks(
    model_dir: Path, roles: dict[str, str], num_blocks: int = 64
) -> AsyncIterator[dict[str, WorkerServer]]:
    """In-process ranks by worker id, their engines paced; all stopped at the end (a killed one too)."""
    servers: dict[str, WorkerServer] = {}
    spec = RankSpec(model_dir=model_dir, num_blocks=num_blocks, block_size=16, max_model_len=256)
    try:
        for worker_id, role in roles.items():
            rank = await asyncio.to_thread(GroupRank.build, spec)
            server = await WorkerServer.start(rank, WorkerOptions(worker_id, role))  # type: ignore[arg-type]
            _pace(server)
            servers[worker_id] = server
        yield servers
    finally:
        for server in servers.values():
            await server.stop(grace_s=1.0)


def _pace(server: WorkerServer) -> None:
    step = server.engine.step

    def paced() -> list:  # type: ignore[type-arg]
        time.sleep(STEP_PACE_S)  # runs in the engine loop's worker thread
        return step()

    server.engine.step = paced  # type: ignore[method-assign]


async def _kill(server: WorkerServer) -> None:
    """Every call on the rank ends at once (UNAVAILABLE at its clients), then the rank stops."""
    assert server.server is not None
    await server.server.stop(None)
    await server.stop(grace_s=1.0)


def _endpoints(servers: dict[str, WorkerServer]) -> list[WorkerEndpoint]:
    return [WorkerEndpoint(w, s.options.role, s.address) for w, s in servers.items()]


def _idle(server: WorkerServer) -> bool:
    load = server.load()
    return (load.running, load.waiting, load.leases, load.pinned_blocks, load.free_blocks) == (
        0,
        0,
        0,
        0,
        load.num_blocks,
    )


async def _settle(servers: Sequence[WorkerServer], timeout_s: float = 10.0) -> bool:
    """Whether every server is idle with all blocks free within ``timeout_s`` (aborts land asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while not all(_idle(s) for s in servers):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


# ---- requests ------------------------------------------------------------------------------------------------


async def _request(
    dispatcher: Dispatcher,
    request_id: str,
    prompt: list[int],
    expected: list[int],
    ledger: Ledger,
    *,
    sampling: worker_pb2.SamplingParams | None = None,
    on_tokens: Callable[[int], None] = lambda n: None,
) -> tuple[Result, worker_pb2.Usage | None]:
    """One request to its end or its deadline, recorded; ``on_tokens(n)`` after each event with tokens."""
    tokens: list[int] = []
    usage: list[worker_pb2.Usage] = []
    started = time.monotonic()

    async def consume() -> str:
        async for event in dispatcher.generate(request_id, prompt, sampling or _greedy()):
            tokens.extend(event.token_ids)
            if event.token_ids:
                on_tokens(len(tokens))
            if event.usage is not None:
                usage.append(event.usage)
            if event.finish_reason == "error":
                return f"error: {event.error}"
            if event.finish_reason:
                return "ok" if tokens == expected else f"wrong: {tokens} instead of {expected}"
        return f"wrong: the stream ended without a finish reason after {tokens}"

    outcome = await settle(consume(), REQUEST_DEADLINE_S)
    result = ledger.record(Result(request_id, outcome, list(tokens), time.monotonic() - started))
    return result, (usage[-1] if usage else None)


@dataclass(frozen=True)
class _KillRun:
    ledger: Ledger
    on_victim: int  # the dispatcher's calls on the victim when it died
    usages: list[worker_pb2.Usage | None]  # the last usage of each stream
    recovery_s: list[float]  # per stream: from the kill to its next token
    migrations: Counter[str]


def _kill_run(
    model_dir: Path,
    roles: dict[str, str],
    victim: str,
    migration_limit: int,
    prompts: list[list[int]],
    oracle: list[list[int]],
) -> _KillRun:
    """``NUM_STREAMS`` concurrent streams over ``roles``; ``victim`` dies once every stream has
    ``KILL_AFTER_TOKENS`` tokens (none has all), then every stream runs to its end or its deadline;
    the surviving ranks are idle with every block free and no lease afterwards."""
    counts = [0] * len(prompts)
    seen_at: list[list[float]] = [[] for _ in prompts]  # when each stream's token events arrived
    everyone_started = asyncio.Event()

    def progress(i: int) -> Callable[[int], None]:
        def seen(n: int) -> None:
            counts[i] = n
            seen_at[i].append(time.monotonic())
            if all(c >= KILL_AFTER_TOKENS for c in counts):
                everyone_started.set()

        return seen

    async def body() -> _KillRun:
        ledger = Ledger()
        async with _ranks(model_dir, roles) as servers:
            dispatcher = Dispatcher(request_timeout_s=REQUEST_DEADLINE_S, migration_limit=migration_limit)
            try:
                await dispatcher.update(_endpoints(servers))
                tasks = [
                    asyncio.create_task(_request(dispatcher, f"s{i}", p, oracle[i], ledger, on_tokens=progress(i)))
                    for i, p in enumerate(prompts)
                ]
                await asyncio.wait_for(everyone_started.wait(), REQUEST_DEADLINE_S)
                role = servers[victim].options.role
                on_victim = next(load.in_flight for load in dispatcher.loads(role) if load.worker_id == victim)
                assert max(counts) < MAX_TOKENS, counts  # every stream is mid-way when the victim dies
                killed_at = time.monotonic()
                await _kill(servers[victim])
                results = await asyncio.gather(*tasks)
                survivors = [s for w, s in servers.items() if w != victim]
                assert await _settle(survivors), [s.load() for s in survivors]
            finally:
                await dispatcher.close()
        recovery = [next(t for t in times if t > killed_at) - killed_at for times in seen_at if times[-1] > killed_at]
        return _KillRun(ledger, on_victim, [usage for _, usage in results], recovery, dispatcher.migrations)

    return asyncio.run(asyncio.wait_for(body(), 300))


# ---- colocated and disaggregated: a rank killed mid-stream -----------------------------------------------------


@pytest.mark.parametrize("migration_limit", [3, 0], ids=["migration-on", "migration-off"])
def test_a_mixed_rank_killed_mid_stream_migrates_every_stream_to_the_oracle(
    model_dir: Path, prompts: list[list[int]], oracle: list[list[int]], migration_limit: int
) -> None:
    run = _kill_run(model_dir, {"mixed-0": "mixed", "mixed-1": "mixed"}, "mixed-1", migration_limit, prompts, oracle)
    _check(run, prompts, migration_limit, "mixed rank mixed-1: UNAVAILABLE")
    name = "migration on" if migration_limit else "migration off"
    report(f"mixed rank killed mid-stream (colocated), {name}", run.ledger.figure(1, recovery_s=run.recovery_s))


@pytest.mark.parametrize("migration_limit", [3, 0], ids=["migration-on", "migration-off"])
def test_a_decode_rank_killed_mid_stream_migrates_every_stream_to_the_oracle(
    model_dir: Path, prompts: list[list[int]], oracle: list[list[int]], migration_limit: int
) -> None:
    """Disaggregated: the extended prompt is prefilled again and decoded on the other decode rank;
    the prefill rank holds no lease and no pinned block afterwards."""
    roles = {"prefill-0": "prefill", "decode-0": "decode", "decode-1": "decode"}
    run = _kill_run(model_dir, roles, "decode-1", migration_limit, prompts, oracle)
    _check(run, prompts, migration_limit, "decode rank decode-1: UNAVAILABLE")
    name = "migration on" if migration_limit else "migration off"
    report(f"decode rank killed mid-stream, {name}", run.ledger.figure(1, recovery_s=run.recovery_s))


def _check(run: _KillRun, prompts: list[list[int]], migration_limit: int, victim_error: str) -> None:
    ledger = run.ledger
    ledger.assert_none()  # no hung, wrong (a gap, a duplicate, another token) or raised request
    assert run.on_victim >= 1, "the victim held no stream when it died"
    kinds = ledger.kinds()
    if migration_limit:
        assert kinds == {"ok": NUM_STREAMS}, ledger.results
        assert run.migrations["ongoing"] >= run.on_victim and not run.migrations["new"], (run.migrations, run.on_victim)
        for prompt, usage in zip(prompts, run.usages, strict=True):  # the original prompt, every generated token
            assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (len(prompt), MAX_TOKENS)
    else:
        assert kinds.get("error", 0) == run.on_victim and kinds.get("ok", 0) == NUM_STREAMS - run.on_victim, kinds
        assert all(r.outcome.startswith(f"error: {victim_error}") for r in ledger.with_kind("error")), ledger.results
        assert not run.migrations, run.migrations


class _TokenClock:
    """When a stream's token events arrive; ``longest_gap_s`` is its longest silence."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def seen(self, _: int) -> None:
        self.times.append(time.monotonic())

    @property
    def longest_gap_s(self) -> float:
        return max((b - a for a, b in itertools.pairwise(self.times)), default=0.0)


# ---- a stalled rank --------------------------------------------------------------------------------------------


class _ScriptedWorker(worker_pb2_grpc.WorkerServicer):
    """A fake mixed rank (a unit test of the dispatcher's worker seam): every ``Generate`` gets
    ``tokens``, one per delta, then ``end``: "stall" (nothing more: a SIGSTOPped process, a blackholed
    link), "length" (a normal end), "error" (an error delta: the engine died) or a gRPC status name
    (the call fails with it)."""

    def __init__(self, tokens: list[int], end: str) -> None:
        self.tokens, self.end = tokens, end
        self.requests: list[worker_pb2.GenerateRequest] = []
        self.cancelled = asyncio.Event()  # the router cancelled a call

    async def Generate(
        self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.TokenDelta]:
        self.requests.append(request)
        rid = request.request_id
        try:
            for token in self.tokens:
                yield worker_pb2.TokenDelta(request_id=rid, token_ids=[token])
            if self.end == "stall":
                await asyncio.sleep(STALL_HOLD_S)
            elif self.end == "length":
                usage = worker_pb2.Usage(
                    prompt_tokens=len(request.prompt_token_ids), completion_tokens=len(self.tokens)
                )
                yield worker_pb2.TokenDelta(request_id=rid, finish_reason="length", usage=usage)
            elif self.end == "error":
                yield worker_pb2.TokenDelta(
                    request_id=rid, finish_reason="error", error="the engine is dead (injected)"
                )
            else:
                await context.abort(grpc.StatusCode[self.end], f"{self.end} (injected)")
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def Abort(
        self, request: worker_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.AbortResponse:
        return worker_pb2.AbortResponse()


@asynccontextmanager
async def _scripted_rank(tokens: list[int], end: str) -> AsyncIterator[tuple[str, _ScriptedWorker]]:
    servicer = _ScriptedWorker(tokens, end)
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(None)


async def _stalled_then_migrated(
    model_dir: Path, prompt: list[int], sampling: worker_pb2.SamplingParams, sent: int
) -> tuple[list[int], Ledger, Dispatcher, float, bool, worker_pb2.Usage | None]:
    """The uninterrupted answer on a real rank, then the same request first on a rank that sends its
    first ``sent`` tokens and stalls (round robin picks "a-stalled" first), migrated to the real one."""
    async with _ranks(model_dir, {"b-real": "mixed"}) as servers:
        alone = Dispatcher(request_timeout_s=REQUEST_DEADLINE_S)
        try:
            await alone.update(_endpoints(servers))
            events = [e async for e in alone.generate("whole", prompt, sampling)]
        finally:
            await alone.close()
        uninterrupted = [t for e in events for t in e.token_ids]
        assert events[-1].finish_reason == "length", events[-1]
        ledger = Ledger()
        async with _scripted_rank(uninterrupted[:sent], "stall") as (address, stalled):
            dispatcher = Dispatcher(
                request_timeout_s=REQUEST_DEADLINE_S,
                stall_timeout_s=STALL_TIMEOUT_S,
                policy=parse_policy("round_robin"),
            )
            try:
                await dispatcher.update([WorkerEndpoint("a-stalled", "mixed", address), *_endpoints(servers)])
                clock = _TokenClock()
                _, usage = await _request(
                    dispatcher, "migrated", prompt, uninterrupted, ledger, sampling=sampling, on_tokens=clock.seen
                )
                await asyncio.wait_for(stalled.cancelled.wait(), 5)  # the silent call was cancelled
            finally:
                await dispatcher.close()
            assert await _settle(list(servers.values())), servers["b-real"].load()
        return uninterrupted, ledger, dispatcher, clock.longest_gap_s, stalled.cancelled.is_set(), usage


def test_a_stream_that_stalls_after_its_first_tokens_is_migrated_within_the_stall_timeout(
    model_dir: Path, prompts: list[list[int]], oracle: list[list[int]]
) -> None:
    uninterrupted, ledger, dispatcher, gap_s, cancelled, usage = asyncio.run(
        asyncio.wait_for(_stalled_then_migrated(model_dir, prompts[0], _greedy(), sent=3), 120)
    )
    assert uninterrupted == oracle[0]
    ledger.assert_none()
    assert ledger.kinds() == {"ok": 1}, ledger.results
    assert dispatcher.migrations == {"ongoing": 1} and cancelled
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (len(prompts[0]), MAX_TOKENS)
    assert STALL_TIMEOUT_S <= gap_s < STALL_TIMEOUT_S + STALL_SLACK_S, gap_s
    report("rank stalled after 3 tokens, stall timeout 1 s", ledger.figure(1, recovery_s=[gap_s]))


def test_a_decode_rank_whose_engine_hangs_mid_stream_is_migrated_after_the_stall_timeout(
    model_dir: Path, prompts: list[list[int]], oracle: list[list[int]]
) -> None:
    """Disaggregated: the hung decode rank's call is cancelled, the prompt + the tokens so far are
    prefilled again and decoded on the other decode rank; once the hang ends, the hung rank frees
    the request's blocks and the prefill rank holds no lease."""
    release = threading.Event()

    async def body() -> tuple[Ledger, Dispatcher, float]:
        ledger = Ledger()
        roles = {"prefill-0": "prefill", "decode-a": "decode", "decode-b": "decode"}
        async with _ranks(model_dir, roles) as servers:
            _hang_after(servers["decode-a"], steps=3, release=release)
            dispatcher = Dispatcher(
                request_timeout_s=REQUEST_DEADLINE_S,
                stall_timeout_s=STALL_TIMEOUT_S,
                policy=parse_policy("round_robin"),  # decode-a first
            )
            try:
                await dispatcher.update(_endpoints(servers))
                clock = _TokenClock()
                await _request(dispatcher, "hung", prompts[3], oracle[3], ledger, on_tokens=clock.seen)
                release.set()
                assert await _settle(list(servers.values())), [s.load() for s in servers.values()]
            finally:
                release.set()
                await dispatcher.close()
        return ledger, dispatcher, clock.longest_gap_s

    ledger, dispatcher, gap_s = asyncio.run(asyncio.wait_for(body(), 120))
    ledger.assert_none()
    assert ledger.kinds() == {"ok": 1}, ledger.results
    assert dispatcher.migrations == {"ongoing": 1}
    assert STALL_TIMEOUT_S <= gap_s < STALL_TIMEOUT_S + STALL_SLACK_S, gap_s
    report("decode rank hung mid-stream, stall timeout 1 s", ledger.figure(1, recovery_s=[gap_s]))


def _hang_after(server: WorkerServer, steps: int, release: threading.Event) -> None:
    """The rank's engine blocks in its step after ``steps`` steps until ``release`` (a hung forward)."""
    step, done = server.engine.step, [0]

    def hanging() -> list:  # type: ignore[type-arg]
        done[0] += 1
        if done[0] > steps:
            release.wait(STALL_HOLD_S)  # in the engine loop's worker thread: the gRPC side stays responsive
        return step()

    server.engine.step = hanging  # type: ignore[method-assign]


def test_a_migrated_request_keeps_its_reasoning_budget(model_dir: Path, prompts: list[list[int]]) -> None:
    """The budget counts output tokens on the rank: after 3 tokens moved into the prompt, the new rank
    must force ``</think>`` after 3 more, at the same index as the uninterrupted run (and only once)."""
    sampling = _greedy(12)
    sampling.max_reasoning_tokens = 6
    sampling.reasoning_end_token_ids.append(THINK_END)
    uninterrupted, ledger, dispatcher, _, _, usage = asyncio.run(
        asyncio.wait_for(_stalled_then_migrated(model_dir, prompts[1], sampling, sent=3), 120)
    )
    assert uninterrupted[6] == THINK_END and uninterrupted.count(THINK_END) == 1, uninterrupted
    assert ledger.kinds() == {"ok": 1}, ledger.results  # the migrated tokens == the uninterrupted ones
    assert dispatcher.migrations == {"ongoing": 1}
    assert usage is not None and usage.completion_tokens == 12


def test_continued_sampling_shrinks_the_limits_that_count_output_tokens() -> None:
    sampling = worker_pb2.SamplingParams(temperature=0.7, seed=9, max_tokens=20, min_tokens=5, max_reasoning_tokens=8)
    sampling.reasoning_end_token_ids.extend([THINK_END, 701])
    thinking = continued_sampling(sampling, [1, 2, 3])
    assert (thinking.max_tokens, thinking.min_tokens, thinking.max_reasoning_tokens) == (17, 2, 5)
    assert (thinking.seed, thinking.temperature) == (9, pytest.approx(0.7))
    answered = continued_sampling(sampling, [1, 2, 701, 4, 5, 6, 7])  # the reasoning ended: no budget left to force
    assert (answered.max_tokens, answered.min_tokens, answered.HasField("max_reasoning_tokens")) == (13, 0, False)
    spent = continued_sampling(sampling, list(range(1, 11)))  # past the budget without an end: force it at once
    assert spent.max_reasoning_tokens == 0
    unbounded = continued_sampling(worker_pb2.SamplingParams(temperature=0.0), [1, 2])
    assert not unbounded.HasField("max_tokens") and not unbounded.HasField("max_reasoning_tokens")
    assert sampling.max_tokens == 20  # the original is not changed


# ---- the rules of migration, on fake ranks -------------------------------------------------------------------


@asynccontextmanager
async def _scripted(
    scripts: dict[str, tuple[list[int], str]], **options: Any
) -> AsyncIterator[tuple[Dispatcher, dict[str, _ScriptedWorker]]]:
    """Fake mixed ranks by worker id, and a round-robin dispatcher over them (ids in order)."""
    async with contextlib.AsyncExitStack() as stack:
        ranks = {w: await stack.enter_async_context(_scripted_rank(*script)) for w, script in scripts.items()}
        dispatcher = Dispatcher(request_timeout_s=30.0, policy=parse_policy("round_robin"), **options)
        await dispatcher.update(WorkerEndpoint(w, "mixed", address) for w, (address, _) in ranks.items())
        try:
            yield dispatcher, {w: servicer for w, (_, servicer) in ranks.items()}
        finally:
            await dispatcher.close()


def test_migration_gives_up_after_its_limit_naming_every_rank_it_tried() -> None:
    """Each attempt gets the original prompt + every token so far and the rest of max_tokens."""

    async def body() -> tuple[list[TokenEvent], Dispatcher, dict[str, _ScriptedWorker]]:
        scripts = {w: ([7], "UNAVAILABLE") for w in ("a", "b", "c", "d")}
        async with _scripted(scripts, migration_limit=2) as (dispatcher, ranks):
            events = [e async for e in dispatcher.generate("r", [1, 2, 3], _greedy(10))]
            return events, dispatcher, ranks

    events, dispatcher, ranks = asyncio.run(asyncio.wait_for(body(), 30))
    assert [e.token_ids for e in events[:-1]] == [(7,), (7,), (7,)] and events[-1].finish_reason == "error"
    tried = {w: r.requests[0] for w, r in ranks.items() if r.requests}
    assert len(tried) == 3 and all(len(r.requests) <= 1 for r in ranks.values())  # never the same rank twice
    reasons = [
        f"mixed rank {w}: UNAVAILABLE: UNAVAILABLE (injected)"
        for w in sorted(tried, key=lambda w: len(tried[w].prompt_token_ids))
    ]
    assert events[-1].error == "; ".join([*reasons, "gave up after 2 migrations"]), events[-1].error
    assert dispatcher.migrations == {"ongoing": 2}
    sent = sorted((list(r.prompt_token_ids), r.sampling.max_tokens) for r in tried.values())
    assert sent == [([1, 2, 3], 10), ([1, 2, 3, 7], 9), ([1, 2, 3, 7, 7], 8)]


@pytest.mark.parametrize(
    ("sent", "end", "kind"),
    [([], "CANCELLED", "new"), ([5, 6], "UNAVAILABLE", "ongoing"), ([5, 6], "error", "ongoing")],
    ids=["cancelled-before-any-token", "unavailable-mid-stream", "error-delta-mid-stream"],
)
def test_a_rank_failure_migrates_the_request_and_counts_its_kind(sent: list[int], end: str, kind: str) -> None:
    async def body() -> tuple[list[TokenEvent], Dispatcher, _ScriptedWorker]:
        rest = [8, 9, 10, 11][len(sent) :]
        async with _scripted({"a": (sent, end), "b": (rest, "length")}) as (dispatcher, ranks):
            return [e async for e in dispatcher.generate("r", [1, 2, 3], _greedy(4))], dispatcher, ranks["b"]

    events, dispatcher, survivor = asyncio.run(asyncio.wait_for(body(), 30))
    assert [t for e in events for t in e.token_ids] == sent + [8, 9, 10, 11][len(sent) :]
    assert events[-1].finish_reason == "length" and dispatcher.migrations == {kind: 1}
    assert list(survivor.requests[0].prompt_token_ids) == [1, 2, 3, *sent]
    usage = events[-1].usage  # the original prompt and every generated token, not the last rank's view
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (3, 4)


@pytest.mark.parametrize("code", ["INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"])
def test_a_request_that_fails_for_its_own_reasons_is_not_migrated(code: str) -> None:
    async def body() -> tuple[grpc.StatusCode, Dispatcher, dict[str, _ScriptedWorker]]:
        async with _scripted({"a": ([], code), "b": ([8], "length")}) as (dispatcher, ranks):
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                [e async for e in dispatcher.generate("r", [1, 2, 3], _greedy(1))]
            return failed.value.code(), dispatcher, ranks

    status, dispatcher, ranks = asyncio.run(asyncio.wait_for(body(), 30))
    assert status == grpc.StatusCode[code] and not dispatcher.migrations and not ranks["b"].requests


# ---- decode failover: a decode rank without KV room ---------------------------------------------------------------


def test_a_decode_rank_without_kv_blocks_hands_the_request_to_another_decode_rank(
    model_dir: Path, prompts: list[list[int]], oracle: list[list[int]]
) -> None:
    """RESOURCE_EXHAUSTED before any token: the same KV handle goes to the next decode rank (the lease
    is still held); with no other decode rank the request ends with a clear error and the lease is
    released at once."""
    long = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    assert len(prompts[long]) > 16  # more than the small decode rank's one block

    async def body() -> tuple[Ledger, Dispatcher]:
        ledger = Ledger()
        async with (
            _ranks(model_dir, {"prefill-0": "prefill", "decode-b": "decode"}) as servers,
            _ranks(model_dir, {"decode-a": "decode"}, num_blocks=1) as small,
        ):
            dispatcher = Dispatcher(request_timeout_s=REQUEST_DEADLINE_S, policy=parse_policy("round_robin"))
            try:
                await dispatcher.update(_endpoints({**servers, **small}))  # round robin: decode-a first
                await _request(dispatcher, "failover", prompts[long], oracle[long], ledger)
                await dispatcher.update(_endpoints({"prefill-0": servers["prefill-0"], **small}))
                await _request(dispatcher, "no-room", prompts[long], oracle[long], ledger)
                assert await _settle([servers["prefill-0"], servers["decode-b"]]), servers["prefill-0"].load()
            finally:
                await dispatcher.close()
        return ledger, dispatcher

    ledger, dispatcher = asyncio.run(asyncio.wait_for(body(), 180))
    assert ledger.results["failover"].outcome == "ok", ledger.results
    no_room = ledger.results["no-room"].outcome
    assert re.match(r"error: decode rank decode-a: RESOURCE_EXHAUSTED: .*KV blocks", no_room), no_room
    assert "no other live decode rank" in no_room, no_room
    assert not dispatcher.migrations  # a failover, not a migration


# ---- through a live router: usage and the migration counter -----------------------------------------------------


@pytest.fixture
def live(model_dir: Path) -> Iterator[LiveRouter]:
    with live_router(model_dir, roles=("mixed", "mixed"), num_blocks=64, block_size=16) as router:
        for server in router.workers:
            _pace(server)
        yield router


def test_a_router_stream_migrated_mid_way_reports_full_usage_and_counts_the_migration(
    live: LiveRouter, prompts: list[list[int]], oracle: list[list[int]]
) -> None:
    prompt = prompts[2]
    body = {
        "model": live.model_name,
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks: list[dict] = []  # type: ignore[type-arg]
    with httpx.stream("POST", live.http_url + "/v1/completions", json=body, timeout=REQUEST_DEADLINE_S) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                chunks.append(json.loads(line.removeprefix("data: ")))
            if len(chunks) == KILL_AFTER_TOKENS:
                busy = [s for s, load in zip(live.workers, live.loads(), strict=True) if load.running]
                assert len(busy) == 1, live.loads()
                live.run(_kill(busy[0]))
                break
        for line in lines:
            if line.startswith("data: {"):
                chunks.append(json.loads(line.removeprefix("data: ")))
    ids = [t for c in chunks if c["choices"] for t in c["choices"][0].get("token_ids") or []]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    usage = chunks[-1]["usage"]
    assert ids == oracle[2]  # no gap, no duplicate across the kill
    assert finish == ["length"] and (usage["prompt_tokens"], usage["completion_tokens"]) == (len(prompt), MAX_TOKENS)
    metrics = httpx.get(live.http_url + "/metrics", timeout=10).text
    assert 'k2serve_router_migrations_total{kind="ongoing"} 1.0' in metrics, metrics
    assert 'k2serve_router_migrations_total{kind="new"} 0.0' in metrics
