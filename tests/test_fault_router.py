"""Router-level fault tests, cancellation (reliability.md §4.2 tests 1 and 2): clients that give up.

Test 1: a storm of streams whose clients time out after 0.5 s; test 2: one client that leaves at
each point of a request's life on the disaggregated path (queued for admission, in prefill, during
the KV transfer, after the first token, mid-stream, before the last step). Every test runs a real
router (uvicorn on loopback, the real ``Frontend`` and ``Dispatcher``) over real in-process ranks
of a tiny model (``router_fixtures.live_router``), records each request in a ``Ledger``, prints its
figure with ``report`` and checks the ranks' ``GetLoad`` at quiescence: nothing running or waiting,
every block free, no lease, no pinned block; the ranks' test-only fault plan (barrier files, a KV
send delay) pins the points. Greedy outputs are compared with the fp32 oracle.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from misbehaving_clients import HangUp, post_bytes
from request_ledger import Ledger, Result, report
from router_faults import (
    BIG_CACHE,
    COMPLETIONS,
    DISAGGREGATED,
    FIRST_TOKEN,
    LIFECYCLE_TOKENS,
    LONG_LEN,
    QUIET_S,
    REQUEST_S,
    Oracle,
    Streamed,
    completion,
    http_5xx,
    leaked_blocks,
    prompts,
    stream_completion,
    take_line,
    wait_for,
    worker_finished,
)
from router_fixtures import LiveRouter, live_router

from k2serve.router.admission import AdmissionLimits
from k2serve.tiny_model import make_tiny_model
from k2serve.workers.fault_plan import FaultPlan


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("faults") / "tiny", seed=11)


@pytest.fixture(scope="module")
def oracle(model_dir: Path) -> Oracle:
    return Oracle(model_dir)


# -- test 1: cancellation storm ------------------------------------------------------------------------

STORM = 64
STORM_TIMEOUT_S = 0.5  # each client gives up after this long (reliability.md §4.2 test 1)


async def _impatient(url: str, body: dict[str, Any]) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_S) as client:

        async def read() -> str:
            async with client.stream("POST", COMPLETIONS, json=body) as response:
                streamed = Streamed(response.status_code, dict(response.headers))
                if response.status_code != 200:
                    return f"error: http {response.status_code}"
                async for line in response.aiter_lines():
                    take_line(streamed, line)
                return streamed.outcome()

        try:
            return await asyncio.wait_for(read(), STORM_TIMEOUT_S)
        except TimeoutError:
            return "cancelled: client timeout"


def test_cancellation_storm_frees_every_block_and_lease_then_serves_at_once(model_dir: Path, oracle: Oracle) -> None:
    """64 streams of 240 tokens whose clients give up after 0.5 s: every worker is idle with every
    block free and no lease within the bound, and a fresh request is then served at once."""
    ledger = Ledger()
    # A short KV transfer deadline: a p2p sender whose receiver was cancelled after it answered can hold
    # the pair for that long (docs/RELIABILITY.md, known limits); the fresh request's bound covers it.
    with live_router(model_dir, roles=DISAGGREGATED, transfer_timeout_s=STORM_TRANSFER_TIMEOUT_S, **BIG_CACHE) as live:
        bodies = [completion(p, 240) for p in prompts(STORM, seed=1)]

        async def storm() -> list[str]:
            return await asyncio.gather(*(_impatient(live.http_url, b) for b in bodies))

        t0 = time.monotonic()
        outcomes = asyncio.run(asyncio.wait_for(storm(), REQUEST_S))
        for i, outcome in enumerate(outcomes):
            ledger.record(Result(f"storm-{i}", outcome))
        not_quiet = None
        try:
            quiet_s = live.wait_quiet(timeout_s=QUIET_S)
        except AssertionError as exc:  # reported with the figure below, then failed
            quiet_s, not_quiet = QUIET_S, str(exc)
        leaked = leaked_blocks(live)
        fresh_prompt = prompts(1, seed=99)[0]
        t1 = time.monotonic()
        fresh = stream_completion(live.http_url, completion(fresh_prompt, 16))
        fresh_s = time.monotonic() - t1
        ledger.record(Result("fresh", fresh.outcome(oracle(fresh_prompt, 16)), seconds=fresh_s))
        assert http_5xx(live) == 0
    report(
        "test_fault_router::cancellation_storm",
        ledger.figure(STORM, leaked_blocks=leaked, recovery_s=[quiet_s])
        + f"; {ledger.kinds().get('cancelled', 0)} cancelled, quiet {quiet_s:.2f} s after the storm "
        f"({time.monotonic() - t0:.1f} s in all), fresh request {fresh_s:.2f} s",
    )
    assert not_quiet is None, not_quiet
    ledger.assert_none()
    assert ledger.kinds().get("cancelled") == STORM, ledger.kinds()  # every stream was still running at 0.5 s
    assert ledger.results["fresh"].kind == "ok"
    assert leaked == 0
    assert fresh_s < 10.0  # spec: < 5 s; ~0.1 s idle; the bound allows a loaded box and a pair wedged for 4 s


# -- test 2: a client that disconnects at each point of a request's life (disaggregated) ---------------

STORM_TRANSFER_TIMEOUT_S = 4.0  # see test_cancellation_storm_...: bounds a wedged pair below the fresh bound
FRESH_S = 5.0  # a fresh 8-token request after each case (~0.1 s idle; ~1.1 s with the 1 s KV delay)
POINTS = ("queued", "prefill", "first_token", "mid_stream", "last_step")
KV_DELAY_MS = 1000  # the prefill rank holds each KV send this long: the window of the kv_transfer point
TRANSFER_TIMEOUT_S = 12.0  # the ranks' KV transfer deadline there: a wedged pair clears after this


@dataclass
class Lifecycle:
    live: LiveRouter
    prefill_barrier: Path
    decode_barrier: Path
    ledger: Ledger = field(default_factory=Ledger)


@pytest.fixture(scope="module")
def lifecycle(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lifecycle]:
    folder = tmp_path_factory.mktemp("barriers")
    prefill_barrier, decode_barrier = folder / "prefill", folder / "decode"
    overrides = {
        0: {"faults": FaultPlan(block_before_step=str(prefill_barrier))},
        1: {"faults": FaultPlan(block_before_step=str(decode_barrier))},
    }
    limits = AdmissionLimits(max_running=1, max_waiting=4)
    with live_router(
        model_dir,
        roles=DISAGGREGATED,
        admission=limits,
        max_model_len=LONG_LEN,
        worker_overrides=overrides,
        **BIG_CACHE,
    ) as live:
        state = Lifecycle(live, prefill_barrier, decode_barrier)
        yield state
        report(
            "test_fault_router::disconnect_at_every_lifecycle_point",
            state.ledger.figure(len(state.ledger.with_kind("cancelled")), leaked_blocks=leaked_blocks(live)),
        )


def fresh_request_is_served(live: LiveRouter, oracle: Oracle, ledger: Ledger, name: str) -> float:
    """One short greedy request right after a fault: it must be served (== the oracle) within FRESH_S."""
    prompt = prompts(1, seed=5)[0]
    t0 = time.monotonic()
    outcome = stream_completion(live.http_url, completion(prompt, 8)).outcome(oracle(prompt, 8))
    seconds = time.monotonic() - t0
    ledger.record(Result(name, outcome, seconds=seconds))
    assert outcome == "ok"
    return seconds


@pytest.mark.parametrize(
    "point",
    POINTS,
)
def test_a_client_leaving_at_any_point_aborts_the_request_on_both_ranks(
    lifecycle: Lifecycle, oracle: Oracle, point: str
) -> None:
    live = lifecycle.live
    prefill, decode = live.workers
    live.wait_quiet(QUIET_S)
    aborted_before = worker_finished(live, 1, "abort")
    max_tokens = 2 if point == "last_step" else LIFECYCLE_TOKENS  # last_step: the decode's first step is its last
    request = post_bytes(live.http_url, COMPLETIONS, completion(prompts(1, seed=7)[0], max_tokens))
    with contextlib.ExitStack() as stack:
        if point == "queued":  # a long request holds the only slot
            holder = stack.enter_context(HangUp(live.http_url, request))
            assert holder.read_events(FIRST_TOKEN) >= FIRST_TOKEN
        barrier = {"prefill": lifecycle.prefill_barrier, "last_step": lifecycle.decode_barrier}.get(point)
        if barrier is not None:
            barrier.touch()
            stack.callback(barrier.unlink, missing_ok=True)
        waits = (prefill.faults.barrier_waits, decode.faults.barrier_waits)
        victim = stack.enter_context(HangUp(live.http_url, request))
        if point == "queued":
            wait_for(lambda: live.frontend.admission.waiting == 1, what="the request to queue")
        elif point == "prefill":
            wait_for(lambda: prefill.faults.barrier_waits > waits[0], what="the prefill rank to block before its step")
        elif point == "first_token":
            assert victim.read_events(FIRST_TOKEN) >= FIRST_TOKEN
            wait_for(lambda: live.loads()[1].running == 1, timeout_s=QUIET_S, what="the decode rank to run it")
        elif point == "mid_stream":
            assert victim.read_events(FIRST_TOKEN + 20) >= FIRST_TOKEN + 20
        elif point == "last_step":
            assert victim.read_events(FIRST_TOKEN) >= FIRST_TOKEN  # the prefill rank's; the decode's step is the last
            wait_for(lambda: decode.faults.barrier_waits > waits[1], what="the decode rank to block before its step")
        status = victim.status
        victim.hang_up(abrupt=point in ("prefill", "mid_stream"))
        t0 = time.monotonic()
        lifecycle.ledger.record(Result(point, "cancelled: the client left" if status in (None, 200) else "wrong"))
        if point == "queued":  # it leaves the queue while the holder still runs
            wait_for(lambda: live.frontend.admission.waiting == 0, timeout_s=2.0, what="the queue to drop it")
            assert live.frontend.admission.running == 1
        if point == "last_step":  # the decode rank takes the abort while blocked before the request's last step
            wait_for(lambda: live.loads()[1].running == 0, timeout_s=QUIET_S, what="the abort at the barrier")
    # the barrier files are gone, the holder has hung up
    quiet_s = live.wait_quiet(QUIET_S)  # nothing running, no lease, nothing pinned, every block free
    assert time.monotonic() - t0 < QUIET_S + 2.0  # far sooner than the ~5 s (idle) the 900 tokens take
    if point in ("first_token", "mid_stream", "last_step"):  # the decode rank had it: it must have aborted it
        finished = {reason: worker_finished(live, 1, reason) for reason in ("abort", "length", "error")}
        assert finished["abort"] == aborted_before + 1, (point, finished)
    assert quiet_s < QUIET_S and http_5xx(live) == 0
    fresh_request_is_served(live, oracle, lifecycle.ledger, f"{point}-then-fresh")


def _long_stream(surface: str, model: str) -> tuple[str, dict[str, Any]]:
    """A greedy stream of LIFECYCLE_TOKENS on the chat or the Anthropic messages surface."""
    messages = [{"role": "user", "content": "tell me a long story"}]
    if surface == "chat":
        body = {"messages": messages, "max_tokens": LIFECYCLE_TOKENS, "temperature": 0, "ignore_eos": True}
        return "/v1/chat/completions", {**body, "stream": True}
    body = {"model": model, "messages": messages, "max_tokens": LIFECYCLE_TOKENS, "temperature": 0}
    return "/v1/messages", {**body, "stream": True}


@pytest.mark.parametrize("surface", ["chat", "messages"])
def test_a_client_leaving_mid_stream_aborts_the_request_on_every_streaming_surface(
    lifecycle: Lifecycle, oracle: Oracle, surface: str
) -> None:
    """The mid-stream case above on the chat and Anthropic streams, whose responses close the
    request their own way (the Anthropic one from inside the cancelled response)."""
    live = lifecycle.live
    live.wait_quiet(QUIET_S)
    aborted_before = worker_finished(live, 1, "abort")
    path, body = _long_stream(surface, live.model_name)
    with HangUp(live.http_url, post_bytes(live.http_url, path, body)) as victim:
        assert victim.read_events(FIRST_TOKEN + 20) >= FIRST_TOKEN + 20, victim.received[-300:]
        assert victim.status == 200
        victim.hang_up(abrupt=True)
        t0 = time.monotonic()
    lifecycle.ledger.record(Result(f"{surface}-mid_stream", "cancelled: the client left"))
    quiet_s = live.wait_quiet(QUIET_S)
    assert time.monotonic() - t0 < QUIET_S + 2.0
    finished = {reason: worker_finished(live, 1, reason) for reason in ("abort", "length", "stop", "error")}
    assert finished["abort"] == aborted_before + 1, finished
    assert quiet_s < QUIET_S and http_5xx(live) == 0
    fresh_request_is_served(live, oracle, lifecycle.ledger, f"{surface}-mid_stream-then-fresh")


def test_a_client_leaving_during_the_kv_transfer_frees_both_ranks(model_dir: Path, oracle: Oracle) -> None:
    """The prefill rank holds each KV send 1 s (fault plan); the client leaves after the first token,
    while the decode rank waits for the KV: the lease, the decode's reserved blocks and the pair's
    transfer are all let go, and the next request between those ranks is served at once."""
    ledger = Ledger()
    overrides = {0: {"faults": FaultPlan(kv_send_delay_ms=KV_DELAY_MS)}}
    with live_router(
        model_dir,
        roles=DISAGGREGATED,
        max_model_len=LONG_LEN,
        worker_overrides=overrides,
        transfer_timeout_s=TRANSFER_TIMEOUT_S,
        **BIG_CACHE,
    ) as live:
        prefill = live.workers[0]
        sends = prefill.faults.kv_sends
        request = post_bytes(live.http_url, COMPLETIONS, completion(prompts(1, seed=7)[0], LIFECYCLE_TOKENS))
        with HangUp(live.http_url, request) as victim:
            assert victim.read_events(FIRST_TOKEN) >= FIRST_TOKEN
            wait_for(lambda: prefill.faults.kv_sends > sends, what="the KV send to start")
            victim.hang_up(abrupt=True)
        ledger.record(Result("kv_transfer", "cancelled: the client left during the KV transfer"))
        quiet_s = live.wait_quiet(QUIET_S)
        try:
            fresh_s = fresh_request_is_served(live, oracle, ledger, "kv_transfer-then-fresh")
            assert fresh_s < FRESH_S, f"the next request took {fresh_s:.1f} s"
        finally:
            report(
                "test_fault_router::disconnect_during_kv_transfer",
                ledger.figure(1, leaked_blocks=leaked_blocks(live), recovery_s=[quiet_s]),
            )
        assert http_5xx(live) == 0
