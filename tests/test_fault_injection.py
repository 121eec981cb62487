"""The worker-side fault hooks (``K2SERVE_FAULTS``, reliability.md §4.1 injector 3) and what the
serving path does under them (§4.2 tests 2, 7 and 8), on real in-process ``WorkerServer``s on
loopback with the tiny model; greedy outputs are checked against the fp32 oracle.

- ``FaultPlan`` parses every key and names the bad one; ``FaultInjector`` counts per rank.
- Test 8 (vLLM's ``evil_forward``): an engine whose steps keep failing is declared dead after
  ``max_step_failures`` failures in a row: every request ends with an error (none hangs), gRPC
  health turns NOT_SERVING, new requests get UNAVAILABLE "engine dead", ``GetLoad`` and
  ``k2serve_engine_failed`` say so. One failed step alone fails only its requests.
- Test 7: KV transfers delayed, dropped or corrupted on the prefill side, with checksums on, through
  the router's ``Dispatcher``: outputs equal the oracle or end with a clean error, the corruption
  is detected, nothing hangs, and no lease, pinned block or KV block is left.
- Test 2, last point: a request held at the barrier before its step is aborted by the client and
  ends aborted with every block free (vLLM's abort in the final step).
- On a real local Ray: ``K2SERVE_FAULTS`` set before Ray starts reaches the rank actors; the
  controller sees the dead engine's NOT_SERVING and recreates the group (slow).

Every wait is bounded; every request is recorded in a ``Ledger``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from request_ledger import Ledger, Result, report, settle

from k2serve.proto import worker_pb2, worker_pb2_grpc
from k2serve.router.dispatcher import Dispatcher
from k2serve.router.worker_client import NoWorkerError, WorkerEndpoint
from k2serve.tiny_model import make_tiny_model
from k2serve.workers.fault_plan import FaultInjector, FaultPlan, InjectedFault
from k2serve.workers.greedy import greedy_generate
from k2serve.workers.group_rank import GroupRank, RankSpec
from k2serve.workers.kv_pair_group import DEFAULT_LANES
from k2serve.workers.kv_transfer import CacheKvSink, CacheKvSource, KvTransfer, SendFault
from k2serve.workers.kv_transport_p2p import P2pKvClient, P2pKvServer
from k2serve.workers.model.model import KimiK2ForCausalLM
from k2serve.workers.model_loader import load_model
from k2serve.workers.service import SERVICE_NAME, WorkerOptions, WorkerServer

MAX_TOKENS = 6
NUM_PROMPTS = 6
REQUEST_DEADLINE_S = 30.0  # a request with no outcome by then is "hung" (they take well under 1 s here)
SETTLE_S = 10.0  # for leases and blocks to come back after a run


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("fault-hooks") / "tiny", seed=13)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(9)
    return [[rng.randrange(1, 500) for _ in range(rng.randint(20, 40))] for _ in range(NUM_PROMPTS)]


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> KimiK2ForCausalLM:
    return load_model(model_dir, dtype=torch.float32, max_positions=256, progress=False)


@pytest.fixture(scope="module")
def oracle(reference: KimiK2ForCausalLM, prompts: list[list[int]]) -> list[list[int]]:
    return [greedy_generate(reference, p, max_tokens=MAX_TOKENS) for p in prompts]


# ---- FaultPlan and FaultInjector ----------------------------------------------------------------------------


def test_a_fault_plan_parses_every_key_and_describes_itself_in_the_same_syntax() -> None:
    text = (
        "fail_forward_after=10, fail_forward_times=2,block_before_step=/tmp/hold,block_max_s=5,"
        "kv_send_delay_ms=250,kv_drop_every=3,kv_corrupt_every=4,role=prefill,step_ms_per_token=0.5"
    )
    plan = FaultPlan.parse(text)
    assert plan == FaultPlan(10, 2, "/tmp/hold", 5.0, 250.0, 3, 4, "prefill", 0.5)
    assert plan.active and FaultPlan.parse(plan.describe()) == plan
    assert plan.applies_to("prefill") and not plan.applies_to("decode")
    for empty in ("", " ", ",,"):
        assert FaultPlan.parse(empty) == FaultPlan() and not FaultPlan.parse(empty).active
    assert FaultPlan().describe() == "" and not FaultPlan(role="decode").active


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("fail_forward_after=ten", "fail_forward_after"),
        ("fail_forward_after=-1", "fail_forward_after"),
        ("fail_forward_times=2", "fail_forward_times"),  # needs fail_forward_after
        ("fail_forward_after=1,fail_forward_times=0", "fail_forward_times"),
        ("block_before_step=", "block_before_step"),
        ("block_before_step=/x,block_max_s=0", "block_max_s"),
        ("kv_send_delay_ms=-5", "kv_send_delay_ms"),
        ("kv_drop_every=1.5", "kv_drop_every"),
        ("kv_corrupt_every=-2", "kv_corrupt_every"),
        ("step_ms_per_token=-1", "step_ms_per_token"),
        ("role=router", "role"),
        ("kv_drop_prob=0.1", "kv_drop_prob"),
        ("kv_drop_every=2,kv_drop_every=3", "kv_drop_every"),
        ("fail_forward_after", "K2SERVE_FAULTS"),
    ],
)
def test_a_bad_fault_plan_is_refused_naming_the_key(text: str, named: str) -> None:
    with pytest.raises(ValueError, match=f"^{named}:"):
        FaultPlan.parse(text)


def test_the_injector_counts_steps_and_transfers_of_its_own_rank() -> None:
    plan = FaultPlan.parse("fail_forward_after=2,fail_forward_times=2,kv_drop_every=2,kv_corrupt_every=3,role=prefill")
    rank = FaultInjector(plan, "prefill")
    rank.before_forward()
    rank.before_forward()  # steps 1 and 2 run
    for step in (3, 4):
        with pytest.raises(InjectedFault, match=f"forward step {step} failed"):
            rank.before_forward()
    rank.before_forward()  # fail_forward_times=2: step 5 runs again
    sends = [rank.next_kv_send() for _ in range(6)]
    assert [(s.drop, s.corrupt) for s in sends] == [
        (False, False),
        (True, False),
        (False, True),
        (True, False),
        (False, False),
        (True, False),  # a dropped transfer is not also corrupted
    ]
    assert (rank.failed_steps, rank.kv_dropped, rank.kv_corrupted) == (2, 3, 1)
    other = FaultInjector(plan, "decode")  # role=prefill: inert on a decode rank, counts nothing
    other.before_forward()
    assert not other.active and other.next_kv_send() == sends[0] and other.kv_sends == 0
    assert FaultInjector(plan, "prefill").kv_sends == 0  # counters are per injector, not per process


def test_a_send_fault_drops_or_corrupts_a_p2p_transfer_and_a_late_cancel_leaves_the_pair_group_alone() -> None:
    """The transport seam alone (gloo on loopback): a dropped transfer breaks its group (the next one
    builds a new generation); a corrupted one fails both sides on the checksum and keeps it, and
    cancelling those finished transfers afterwards (what the service does after a failed pull)
    must not break the group the pair's next transfer uses."""
    layout_blocks, num_tokens = list(range(4)), 50
    source_cache = [torch.randn(8, 16, 64) for _ in range(3)]  # [num_blocks, block_size, row_dim] per layer
    server = P2pKvServer("prefill-seam", "127.0.0.1", timeout_s=10.0)
    client = P2pKvClient("decode-seam", timeout_s=10.0)

    def transfer(tid: str, fault: SendFault) -> tuple[KvTransfer, KvTransfer, list[torch.Tensor]]:
        sink_cache = [torch.zeros(8, 16, 64) for _ in range(3)]
        sink = CacheKvSink(sink_cache, layout_blocks, num_tokens)
        receiver = client.start_receive(tid, "prefill-seam", server.rendezvous, sink, checksum=True)
        source = CacheKvSource(source_cache, layout_blocks, num_tokens)
        sender = server.start_send(tid, "decode-seam", source, checksum=True, fault=fault)
        assert receiver.wait(10.0).done and sender.wait(10.0).done
        return sender, receiver, sink_cache

    def groups() -> list[tuple[int, int]]:
        """(generation, group identity) of every lane, sender side."""
        slots = [server.slot("decode-seam", "gloo", lane) for lane in range(DEFAULT_LANES)]
        return [(slot.generation, id(slot.group)) for slot in slots]

    try:
        sender, receiver, moved = transfer("seam-ok", SendFault())
        assert (sender.error, receiver.error) == (None, None)
        assert all(
            torch.equal(m[:3], c[:3]) and torch.equal(m[3, :2], c[3, :2])
            for m, c in zip(moved, source_cache, strict=True)
        )
        sender, receiver, _ = transfer("seam-drop", SendFault(drop=True))
        assert sender.error == "injected fault: dropped" and receiver.error is not None, receiver.error
        assert groups()[0] == (1, id(None))  # lane 0's group was dropped with the transfer
        sender, receiver, _ = transfer("seam-corrupt", SendFault(corrupt=True))
        assert receiver.error == "checksum mismatch in layer 0", receiver.error
        assert sender.error == "receiver reported checksum mismatch in layer 0", sender.error
        kept = groups()
        receiver.cancel("the decode rank gave up the transfer")
        sender.cancel("the receiver released the lease")
        sender, receiver, _ = transfer("seam-after", SendFault())
        assert (sender.error, receiver.error) == (None, None)
        assert groups() == kept  # the corrupted transfer and its late cancels kept the group the next one used
    finally:
        server.close()
        client.close()


# ---- in-process ranks -----------------------------------------------------------------------------------------


@asynccontextmanager
async def _rank(
    model_dir: Path, worker_id: str, role: str, *, max_num_batched_tokens: int = 256, **options: Any
) -> AsyncIterator[WorkerServer]:
    spec = RankSpec(
        model_dir=model_dir,
        num_blocks=64,
        block_size=16,
        max_model_len=256,
        max_num_batched_tokens=max_num_batched_tokens,
    )
    rank = await asyncio.to_thread(GroupRank.build, spec)
    server = await WorkerServer.start(rank, WorkerOptions(worker_id, role, **options))
    try:
        yield server
    finally:
        await server.stop(grace_s=1.0)


def _run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), 150))


def _sampling(max_tokens: int = MAX_TOKENS) -> worker_pb2.SamplingParams:
    return worker_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def _endpoint(server: WorkerServer) -> WorkerEndpoint:
    return WorkerEndpoint(server.options.worker_id, server.options.role, server.address)


async def _request(
    dispatcher: Dispatcher,
    request_id: str,
    prompt: list[int],
    expected: list[int] | None,
    ledger: Ledger,
    *,
    max_tokens: int = MAX_TOKENS,
    token_times: list[float] | None = None,
) -> Result:
    """One request to its end or its deadline, recorded in ``ledger``; ``token_times`` gets the arrival
    time of every event that carries tokens."""
    tokens: list[int] = []
    started = time.monotonic()

    async def consume() -> str:
        async for event in dispatcher.generate(request_id, prompt, _sampling(max_tokens)):
            if event.token_ids and token_times is not None:
                token_times.append(time.monotonic())
            tokens.extend(event.token_ids)
            if event.finish_reason == "error":
                return f"error: {event.error}"
            if event.finish_reason == "abort":
                return "cancelled: aborted"
            if event.finish_reason:
                if expected is not None and tokens != expected:
                    return f"wrong: {tokens} instead of {expected} ({event.finish_reason})"
                return "ok"
        return f"wrong: the stream ended without a finish reason after {tokens}"

    outcome = await settle(consume(), REQUEST_DEADLINE_S, clean=(NoWorkerError,))
    return ledger.record(Result(request_id, outcome, list(tokens), time.monotonic() - started))


@asynccontextmanager
async def _dispatcher(*servers: WorkerServer, pull_retries: int = 1, kv_push: bool = True) -> AsyncIterator[Dispatcher]:
    dispatcher = Dispatcher(request_timeout_s=REQUEST_DEADLINE_S, pull_retries=pull_retries, kv_push=kv_push)
    await dispatcher.update([_endpoint(s) for s in servers])
    try:
        yield dispatcher
    finally:
        await dispatcher.close()


async def _health(server: WorkerServer, service: str) -> int:
    async with grpc.aio.insecure_channel(server.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return int(reply.status)


async def _load(server: WorkerServer) -> worker_pb2.Load:
    async with grpc.aio.insecure_channel(server.address) as channel:
        return await worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=5)


def _sample(server: WorkerServer, name: str, **labels: str) -> float:
    value = server.metrics.registry.get_sample_value(name, {"model_name": "", **labels})
    return 0.0 if value is None else value


def _used_blocks(server: WorkerServer) -> int:
    return server.engine.pool.num_blocks - server.engine.pool.num_free_blocks


async def _settled(servers: Sequence[WorkerServer]) -> int:
    """Blocks still used, leases and pinned blocks on ``servers`` once they settle (bounded)."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        left = sum(_used_blocks(s) + len(s.leases) + s.engine.num_held_blocks for s in servers)
        if left == 0 or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.05)


def _assert_clean(ledger: Ledger, *allowed_errors: str) -> None:
    """0 hung, 0 wrong, 0 raised; every error says one of ``allowed_errors`` (the injected cause)."""
    ledger.assert_none()
    for result in ledger.with_kind("error"):
        assert any(why in result.outcome for why in allowed_errors), result


# ---- test 8: engine forward exception ------------------------------------------------------------------------


def test_an_engine_whose_steps_keep_failing_is_dead_every_request_errors_and_health_turns_not_serving(
    model_dir: Path, prompts: list[list[int]]
) -> None:
    """fail_forward_after=3 with a 16-token step budget: the prompts need many prefill steps, so every
    request is still running when steps 4, 5, 6 fail and the engine is declared dead."""

    async def body() -> None:
        faults = FaultPlan.parse("fail_forward_after=3")
        async with _rank(model_dir, "mixed-evil", "mixed", max_num_batched_tokens=16, faults=faults) as server:
            assert server.faults.active and server.loop.max_step_failures == 3
            ledger = Ledger()
            async with _dispatcher(server) as dispatcher:
                await asyncio.gather(
                    *(_request(dispatcher, f"evil{i}", p, None, ledger) for i, p in enumerate(prompts))
                )
                assert ledger.kinds() == {"error": len(prompts)}, ledger.results  # each one ended, none hung
                reasons = {r.outcome for r in ledger.with_kind("error")}
                assert any("the engine step failed: injected fault: forward step 4 failed" in r for r in reasons)
                assert any("engine dead: 3 steps failed in a row" in r for r in reasons), reasons
                assert server.faults.failed_steps == 3

                for service in ("", SERVICE_NAME):
                    assert await _health(server, service) == health_pb2.HealthCheckResponse.NOT_SERVING
                late = await _request(dispatcher, "late", prompts[0], None, ledger)
                assert late.outcome.startswith("error: UNAVAILABLE: worker mixed-evil: engine dead: "), late
                load = await _load(server)
                assert load.engine_failed and "engine dead" in load.failure and (load.running, load.waiting) == (0, 0)
                assert load.free_blocks == load.num_blocks  # every failed request gave its blocks back
                assert _sample(server, "k2serve_engine_failed") == 1.0
                assert _sample(server, "k2serve_request_success_total", finished_reason="error") == len(prompts)
            ledger.assert_none()
            report("test 8 engine forward exception (in-process)", ledger.figure(server.faults.failed_steps))

    _run(body)


def test_one_failed_step_fails_only_its_requests_and_the_engine_keeps_serving(
    model_dir: Path, prompts: list[list[int]], oracle: list[list[int]]
) -> None:
    async def body() -> None:
        faults = FaultPlan.parse("fail_forward_after=0,fail_forward_times=1")
        async with _rank(model_dir, "mixed-once", "mixed", faults=faults) as server:
            ledger = Ledger()
            async with _dispatcher(server) as dispatcher:
                failed = await _request(dispatcher, "once0", prompts[0], oracle[0], ledger)
                assert failed.kind == "error" and "mixed-once: the engine step failed: injected fault" in failed.outcome
                after = await asyncio.gather(
                    *(_request(dispatcher, f"once{i}", p, oracle[i], ledger) for i, p in enumerate(prompts) if i)
                )
                assert [r.outcome for r in after] == ["ok"] * (len(prompts) - 1)
            for service in ("", SERVICE_NAME):
                assert await _health(server, service) == health_pb2.HealthCheckResponse.SERVING
            assert server.engine.failure is None and server.loop.failed_steps_in_a_row == 0
            assert not (await _load(server)).engine_failed and _sample(server, "k2serve_engine_failed") == 0.0
            assert await _settled([server]) == 0
            ledger.assert_none()

    _run(body)


# ---- test 7: KV transfer faults ---------------------------------------------------------------------------------


async def _direct(
    prefill: WorkerServer, decode: WorkerServer, rid: str, prompt: list[int]
) -> tuple[list[int], grpc.aio.AioRpcError | None]:
    """Prefill on ``prefill`` then Decode on ``decode``, without the Dispatcher: the decode's own error."""
    async with (
        grpc.aio.insecure_channel(prefill.address) as p_channel,
        grpc.aio.insecure_channel(decode.address) as d_channel,
    ):
        request = worker_pb2.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=_sampling())
        first = await worker_pb2_grpc.WorkerStub(p_channel).Prefill(request, timeout=30)
        tokens = [first.first_token_id]
        decode_request = worker_pb2.DecodeRequest(
            request_id=rid,
            prompt_token_ids=prompt,
            sampling=_sampling(),
            first_token_id=first.first_token_id,
            kv=first.kv,
            sampler_state=first.sampler_state,
        )
        try:
            async for delta in worker_pb2_grpc.WorkerStub(d_channel).Decode(decode_request, timeout=30):
                tokens.extend(delta.token_ids)
        except grpc.aio.AioRpcError as exc:
            return tokens, exc
        return tokens, None


# fault -> (plan, what the decode rank's error says: a p2p receiver sees its peer reset the connection,
# a gRPC one the status its sender ended the stream with; a checksum mismatch is named either way)
KV_FAULTS = {
    "drop": ("kv_drop_every=2", {"p2p": "the peer is gone", "grpc": "UNAVAILABLE: injected fault: dropped"}),
    "corrupt": ("kv_corrupt_every=2", {"p2p": "checksum mismatch in layer 0", "grpc": "checksum mismatch in layer 0"}),
}


@pytest.mark.parametrize(
    ("fault", "transport"), [("drop", "p2p"), ("corrupt", "p2p"), ("drop", "grpc"), ("corrupt", "grpc")]
)
def test_dropped_or_corrupted_kv_transfers_end_ok_or_clean_and_leave_nothing_behind(
    model_dir: Path, prompts: list[list[int]], oracle: list[list[int]], fault: str, transport: str
) -> None:
    """Every 2nd transfer of each prefill rank fails (checksums on). Sequenced on one pair first, the
    decode rank's own error names the cause; then concurrent requests through the Dispatcher, whose
    re-prefill on the other prefill rank saves some: each ends ok (== oracle) or with the cause."""
    plan, causes = KV_FAULTS[fault]
    cause = causes[transport]
    options = {"checksum": True, "transport": transport}
    faulty = {**options, "faults": FaultPlan.parse(f"{plan},role=prefill")}

    async def body() -> None:
        async with (
            _rank(model_dir, "prefill-a", "prefill", **faulty) as p0,
            _rank(model_dir, "prefill-b", "prefill", **faulty) as p1,
            _rank(model_dir, "decode-a", "decode", **options) as decode,  # type: ignore[arg-type]
        ):
            assert not decode.faults.active  # role=prefill
            tokens, error = await _direct(p0, decode, "direct0", prompts[0])
            assert (tokens, error) == (oracle[0], None)
            tokens, error = await _direct(p0, decode, "direct1", prompts[1])
            assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE, error
            details = error.details() or ""
            assert details.startswith("KV transfer failed: ") and cause in details, details  # detected, named
            assert tokens == oracle[1][:1]

            ledger = Ledger()
            async with _dispatcher(p0, p1, decode) as dispatcher:
                await asyncio.gather(
                    *(_request(dispatcher, f"{fault}{i}", p, oracle[i], ledger) for i, p in enumerate(prompts))
                )
            injected = sum(p.faults.kv_dropped + p.faults.kv_corrupted for p in (p0, p1))
            assert injected >= 2 and ledger.kinds().get("ok", 0) >= 1, ledger.results
            _assert_clean(ledger, cause)
            # every injected fault failed exactly one receive on the decode rank, and nothing else did
            assert decode.metrics.kv.failed == injected, (decode.metrics.kv.failed, injected)
            leaked = await _settled([p0, p1, decode])
            assert leaked == 0 and decode.engine.num_reserved_requests == 0
            report(f"test 7 kv {fault} every 2nd ({transport}, checksum on)", ledger.figure(injected))

    _run(body)


def test_without_checksums_the_same_corruption_reaches_the_output_undetected(
    model_dir: Path, prompts: list[list[int]], oracle: list[list[int]]
) -> None:
    """The control of the test above: the flipped byte matters, so only the checksum stops it."""

    async def body() -> None:
        faults = FaultPlan.parse("kv_corrupt_every=1")
        async with (
            _rank(model_dir, "prefill-nocrc", "prefill", faults=faults) as prefill,
            _rank(model_dir, "decode-nocrc", "decode") as decode,
        ):
            outputs = [await _direct(prefill, decode, f"nocrc{i}", prompts[i]) for i in range(3)]
            assert all(error is None for _, error in outputs), outputs  # nobody noticed
            assert any(tokens != oracle[i] for i, (tokens, _) in enumerate(outputs)), outputs
            assert prefill.faults.kv_corrupted == 3

    _run(body)


def test_a_delayed_kv_transfer_delays_the_second_token_and_changes_no_output(
    model_dir: Path, prompts: list[list[int]], oracle: list[list[int]]
) -> None:
    delay_ms = 300
    options = {"checksum": True}

    async def body() -> None:
        faults = FaultPlan.parse(f"kv_send_delay_ms={delay_ms}")
        async with (
            _rank(model_dir, "prefill-slow", "prefill", faults=faults, **options) as prefill,
            _rank(model_dir, "decode-slow", "decode", **options) as decode,
        ):
            ledger = Ledger()
            times: dict[int, list[float]] = {i: [] for i in range(len(prompts))}
            # the pull: its transfer starts after the first token, so the delay shows between tokens 1 and 2
            # (a push starts during the prefill's last forward and is not refused or replaced here)
            async with _dispatcher(prefill, decode, kv_push=False) as dispatcher:
                results = await asyncio.gather(
                    *(
                        _request(dispatcher, f"slow{i}", p, oracle[i], ledger, token_times=times[i])
                        for i, p in enumerate(prompts)
                    )
                )
            assert [r.outcome for r in results] == ["ok"] * len(prompts)
            # the first token comes from the prefill rank; the second waits for the KV (>= the delay)
            gaps = [t[1] - t[0] for t in times.values()]
            assert min(gaps) >= delay_ms / 1000 * 0.95, gaps
            assert prefill.faults.kv_sends == len(prompts) and decode.metrics.kv.failed == 0
            assert await _settled([prefill, decode]) == 0
            report(
                f"test 7 kv delay {delay_ms} ms (p2p)",
                ledger.figure(len(prompts)) + f", first-to-second token min {min(gaps):.2f} s / max {max(gaps):.2f} s",
            )

    _run(body)


# ---- test 2, last point: abort while held before the (final) step ------------------------------------------


@contextlib.contextmanager
def _barrier(path: Path) -> Iterator[Path]:
    path.write_text("hold")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


async def _until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not {what} within {timeout_s:g}s"
        await asyncio.sleep(0.01)


def test_a_request_aborted_while_held_before_its_final_step_ends_aborted_with_every_block_free(
    model_dir: Path, prompts: list[list[int]], oracle: list[list[int]], tmp_path: Path
) -> None:
    """max_tokens=1: the held step would be the request's last. Dispatcher.abort lands while it waits."""

    async def body() -> None:
        with _barrier(tmp_path / "hold-mixed") as hold:
            faults = FaultPlan(block_before_step=str(hold), block_max_s=30.0)
            async with _rank(model_dir, "mixed-held", "mixed", faults=faults) as server:
                ledger = Ledger()
                async with _dispatcher(server) as dispatcher:
                    held = asyncio.create_task(_request(dispatcher, "held", prompts[0], None, ledger, max_tokens=1))
                    await _until(lambda: server.engine.num_requests == 1 and server.faults.barrier_waits == 1, "held")
                    assert _used_blocks(server) == 0  # admitted, not yet scheduled
                    await dispatcher.abort("held")
                    result = await held
                    assert result.outcome == "cancelled: aborted" and result.tokens == [], result
                    assert _used_blocks(server) == 0 and server.engine.num_requests == 0
                    assert _sample(server, "k2serve_request_success_total", finished_reason="abort") == 1.0
                    hold.unlink()
                    after = await _request(dispatcher, "after", prompts[1], oracle[1], ledger)
                    assert after.outcome == "ok", after
                assert await _settled([server]) == 0
                ledger.assert_none()

    _run(body)


def test_a_prefill_whose_client_leaves_while_it_is_held_releases_everything(
    model_dir: Path, prompts: list[list[int]], tmp_path: Path
) -> None:
    """Disaggregated: the client closes its stream while the Prefill waits at the barrier; the prefill
    ends aborted on the prefill rank, no lease is granted and no block stays pinned."""

    async def body() -> None:
        with _barrier(tmp_path / "hold-prefill") as hold:
            faults = FaultPlan(block_before_step=str(hold), block_max_s=30.0)
            async with (
                _rank(model_dir, "prefill-held", "prefill", faults=faults) as prefill,
                _rank(model_dir, "decode-held", "decode") as decode,
            ):
                async with _dispatcher(prefill, decode) as dispatcher:
                    stream = dispatcher.generate("left", prompts[2], _sampling())
                    first = asyncio.create_task(anext(stream))
                    await _until(lambda: prefill.engine.num_requests == 1, "held on the prefill rank")
                    first.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await first
                    await stream.aclose()
                    await _until(lambda: prefill.engine.num_requests == 0, "aborted on the prefill rank")
                    abort_count = _sample(prefill, "k2serve_request_success_total", finished_reason="abort")
                    assert abort_count == 1.0
                    hold.unlink()
                assert await _settled([prefill, decode]) == 0
                assert (len(prefill.leases), prefill.engine.num_held_blocks) == (0, 0)

    _run(body)


# ---- on Ray: the environment reaches the rank actors, the controller restarts a dead engine ----------------------

RAY_NAMESPACE = "k2serve-fault-injection"
RAY_FAIL_AFTER = 8  # forward steps per rank before the engine fails: one request of MAX_TOKENS fits, two do not
READY_TIMEOUT_S = 120.0
RECOVERY_LIMIT_S = 90.0  # NOT_SERVING x health.failures rounds, backoff, a new group's start (tiny model)


@pytest.fixture(scope="module")
def ray_with_faults() -> Iterator[None]:
    """A local Ray started with ``K2SERVE_FAULTS`` in this process's environment (what its workers inherit)."""
    from local_ray import local_ray

    with local_ray(RAY_NAMESPACE, {"K2SERVE_FAULTS": f"fail_forward_after={RAY_FAIL_AFTER}"}):
        yield


def _leaked_on_ranks(controller: Any) -> int:
    """KV blocks in use, leases and pinned blocks over every ready rank once they settle (bounded)."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        loads = controller.loads().values()
        left = sum(
            int(load.get("num_blocks", 0))
            - int(load.get("free_blocks", 0))  # MessageToDict: int64 as text, 0 left out
            + int(load.get("leases", 0))
            + int(load.get("pinned_blocks", 0))
            for load in loads
        )
        if (loads and left == 0) or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


@pytest.mark.slow
def test_k2serve_faults_reaches_the_rank_actors_and_the_controller_restarts_the_dead_engine(
    ray_with_faults: None, model_dir: Path, prompts: list[list[int]], oracle: list[list[int]]
) -> None:
    from k2serve.cluster.config import ClusterConfig, RaySettings
    from k2serve.cluster.controller_handle import ControllerHandle
    from k2serve.cluster.health_probe import HealthProbe

    config = dataclasses.replace(
        ClusterConfig.demo(model_dir, colocated=True), ray=RaySettings(namespace=RAY_NAMESPACE)
    )
    controller = ControllerHandle.launch(config)
    try:
        assert controller.wait_ready(READY_TIMEOUT_S), controller.status()
        before = {w.address for w in controller.live_workers()}

        def live_workers() -> list[Any]:
            return [w for w in controller.live_workers() if w.address]

        async def body() -> tuple[Ledger, float, list[Result]]:
            ledger = Ledger()
            probe = HealthProbe()
            not_serving: list[float] = []  # when a first rank of the group answered NOT_SERVING

            async def watch() -> None:
                while not not_serving:
                    answers = await asyncio.gather(*(probe.check(a, 2.0) for a in before))
                    if any(a is not None and "NOT_SERVING" in a for a in answers):
                        not_serving.append(time.monotonic())
                    await asyncio.sleep(0.05)

            # no migration: the failed request must end with the error (a broken group's peer may take
            # its collective timeout to notice, and a request migrated there would wait that long)
            dispatcher = Dispatcher(request_timeout_s=REQUEST_DEADLINE_S, migration_limit=0)
            watcher = asyncio.create_task(watch())
            try:
                await dispatcher.update([WorkerEndpoint(w.worker_id, w.role, w.address) for w in live_workers()])
                failed_on = ""
                for i in range(12):  # bounded: the 2nd request on a rank passes its RAY_FAIL_AFTER steps
                    p = i % len(prompts)
                    result = await _request(dispatcher, f"ray{i}", prompts[p], oracle[p], ledger)
                    if result.kind == "error":
                        failed_on = result.outcome
                        break
                assert failed_on, f"no forward ever failed: K2SERVE_FAULTS did not reach the actors: {ledger.results}"
                assert "injected fault: forward step" in failed_on, failed_on
                await asyncio.wait_for(watcher, 5.0)  # the dead engine's rank says NOT_SERVING at once
                fresh: set[str] = set()
                while time.monotonic() < not_serving[0] + RECOVERY_LIMIT_S:
                    fresh = {w.address for w in live_workers()} - before
                    if len(fresh) == 2:
                        answers = await asyncio.gather(*(probe.check(a, 2.0) for a in fresh))
                        if all(a is None for a in answers):
                            break
                    await asyncio.sleep(0.1)
                recovery_s = time.monotonic() - not_serving[0]
                assert len(fresh) == 2 and recovery_s < RECOVERY_LIMIT_S, controller.status()
                await dispatcher.update([WorkerEndpoint(w.worker_id, w.role, w.address) for w in live_workers()])
                after = await asyncio.gather(
                    *(_request(dispatcher, f"after{i}", prompts[i], oracle[i], ledger) for i in range(2))
                )
                return ledger, recovery_s, list(after)
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    await watcher
                await dispatcher.close()
                await probe.close()

        ledger, recovery_s, after = asyncio.run(asyncio.wait_for(body(), READY_TIMEOUT_S + RECOVERY_LIMIT_S))
        assert [r.outcome for r in after] == ["ok", "ok"], after
        ledger.assert_none()
        status = next(s for s in controller.status() if s["pool"] == "colocated")
        assert status["restarts"] == 1 and "failed" in status["last_error"], status
        leaked = _leaked_on_ranks(controller)
        assert leaked == 0
        report(
            "test 8 engine forward exception (Ray, colocated EP=2)",
            ledger.figure(1, leaked_blocks=leaked, recovery_s=[recovery_s]),
        )
    finally:
        controller.shutdown()
