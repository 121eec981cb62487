"""Router-level fault tests, admission (reliability.md §4.2 test 3) against a live router.

A router with a small cap (``max_running`` cost units) and queue (``max_waiting``) over a real rank:
a burst of 3Q concurrent streams gets CAP running, Q waiting and the rest 429 (529 on the Anthropic
surface) with ``Retry-After`` before any stream byte and no 5xx; the waiters run when slots come
back; a round at the cap afterwards is 100% served (the overload -> recovery phase of Dynamo PR
#3930). A request with ``n`` choices takes ``n`` units, all at once or none. The admission unit
tests (FIFO, cancellation, deadlines, draining) are in test_router_protection.py.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from misbehaving_clients import HangUp, post_bytes
from request_ledger import Ledger, Result, report
from router_faults import (
    BIG_CACHE,
    COMPLETIONS,
    FIRST_TOKEN,
    LIFECYCLE_TOKENS,
    LONG_LEN,
    QUIET_S,
    REQUEST_S,
    Oracle,
    completion,
    http_5xx,
    leaked_blocks,
    prompts,
    run_ledgered,
    served_job,
    stream_completion,
    wait_for,
)
from router_fixtures import LiveRouter, live_router

from k2serve.router.admission import AdmissionLimits
from k2serve.tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("faults") / "tiny", seed=11)


@pytest.fixture(scope="module")
def oracle(model_dir: Path) -> Oracle:
    return Oracle(model_dir)


# -- test 3: admission: a bounded queue, refusals before any stream byte, n choices as n slots -----------

CAP, QUEUE = 3, 3  # max_running (cost units) and max_waiting of the admitting router
RETRY_AFTER_S = 2


@pytest.fixture(scope="module")
def admitting(model_dir: Path) -> Iterator[LiveRouter]:
    limits = AdmissionLimits(max_running=CAP, max_waiting=QUEUE, max_wait_s=30.0, retry_after_s=RETRY_AFTER_S)
    with live_router(model_dir, admission=limits, max_model_len=LONG_LEN, **BIG_CACHE) as live:
        yield live


class Peak:
    """The highest admission running / waiting counts seen, sampled every few ms on a thread."""

    def __init__(self, live: LiveRouter) -> None:
        self.admission = live.frontend.admission
        self.running = self.waiting = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.running = max(self.running, self.admission.running)
            self.waiting = max(self.waiting, self.admission.waiting)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def long_stream(surface: str, prompt: list[int]) -> tuple[str, dict[str, Any]]:
    """A streamed request that runs ~5 s (idle) unless its client leaves: completions or chat."""
    if surface == "completions":
        return COMPLETIONS, completion(prompt, LIFECYCLE_TOKENS)
    body = {"messages": [{"role": "user", "content": "hello " * len(prompt)}], "max_tokens": LIFECYCLE_TOKENS}
    return "/v1/chat/completions", {**body, "temperature": 0, "ignore_eos": True, "stream": True}


def assert_refused_before_any_byte(raw: bytes, status: int, error_type: str) -> None:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert raw.startswith(f"HTTP/1.1 {status} ".encode()), raw[:200]
    assert f"retry-after: {RETRY_AFTER_S}".encode() in head.lower(), head
    assert b"text/event-stream" not in head and b"data:" not in body and b"event:" not in body
    assert error_type.encode() in body, body[:300]


def test_a_burst_beyond_the_queue_is_refused_before_any_stream_byte_then_recovers(
    admitting: LiveRouter, oracle: Oracle
) -> None:
    """3Q concurrent streams against CAP running + QUEUE waiting: CAP run, QUEUE wait, the rest get 429
    (529 on the Anthropic surface) with Retry-After before any SSE byte and no 5xx; the waiters run
    when the runners leave; then a round at the cap is 100% ok (Dynamo PR #3930's recovery phase)."""
    live, ledger = admitting, Ledger()
    admission = live.frontend.admission
    live.wait_quiet(QUIET_S)
    rejected_before = admission.rejected
    burst = 3 * QUEUE
    with Peak(live) as peak, contextlib.ExitStack() as stack:
        clients = []
        for i, prompt in enumerate(prompts(burst, seed=3)):
            path, body = long_stream(("completions", "chat")[i % 2], prompt)
            clients.append(stack.enter_context(HangUp(live.http_url, post_bytes(live.http_url, path, body))))
        refused_count = burst - CAP - QUEUE
        wait_for(
            lambda: (
                admission.running == CAP
                and admission.waiting == QUEUE
                and admission.rejected - rejected_before == refused_count
            ),
            what="the burst to settle",
        )

        def answered() -> list[HangUp]:
            for c in clients:
                if c.status is None:
                    c.read_events(1, timeout_s=0.02)
            return [c for c in clients if c.status is not None]

        wait_for(lambda: len(answered()) == CAP + refused_count, what="the runners' and the refused answers")
        refused = [c for c in clients if c.status == 429]
        running = [c for c in clients if c.status == 200]
        assert len(refused) == refused_count and len(running) == CAP
        for c in refused:
            c.read_events(1, timeout_s=2.0)  # the whole (small) error answer
            assert_refused_before_any_byte(c.received, 429, "rate_limit_error")
        # the Anthropic surface while full: 529 overloaded_error, streaming or not
        anthropic = {"model": live.model_name, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
        for stream in (True, False):
            raw = HangUp(live.http_url, post_bytes(live.http_url, "/v1/messages", {**anthropic, "stream": stream}))
            with raw:
                raw.read_events(1, timeout_s=5.0)
                assert_refused_before_any_byte(raw.received, 529, "overloaded_error")
            ledger.record(Result(f"messages-stream-{stream}", "error: http 529 (refused, full)"))
        waiting = [c for c in clients if c.status is None]
        assert len(waiting) == QUEUE and all(c.received == b"" for c in waiting)  # not a byte while queued
        for c in running:
            c.hang_up()
        for c in waiting:  # admitted in turn as the slots come back
            c.read_events(FIRST_TOKEN, timeout_s=REQUEST_S)
            assert c.status == 200 and c.events >= FIRST_TOKEN
            c.hang_up()
        for i, c in enumerate(clients):
            ledger.record(Result(f"burst-{i}", "ok" if c.status == 200 else f"error: http {c.status} (refused)"))
    assert peak.running <= CAP and peak.waiting <= QUEUE
    live.wait_quiet(QUIET_S)
    # recovery: two rounds of CAP concurrent requests, every one served and equal to the oracle
    for round_ in range(2):
        batch = prompts(CAP, seed=10 + round_)
        jobs = {f"recovery-{round_}-{i}": served_job(live.http_url, oracle, p, 16) for i, p in enumerate(batch)}
        run_ledgered(ledger, jobs)
    report(
        "test_fault_admission::burst_and_recovery",
        ledger.figure(refused_count + 2, leaked_blocks=leaked_blocks(live)),
    )
    ledger.assert_none()
    assert all(ledger.results[f"recovery-{r}-{i}"].kind == "ok" for r in range(2) for i in range(CAP))
    assert http_5xx(live) == 0


def test_n_choices_take_n_slots_all_or_nothing(admitting: LiveRouter) -> None:
    """A request with n=3 needs 3 free units at once: while one unit is busy it waits without taking
    any (running stays 1), and once the unit is free it takes all 3 together."""
    live = admitting
    admission = live.frontend.admission
    live.wait_quiet(QUIET_S)
    path, body = long_stream("completions", prompts(1, seed=4)[0])
    sampled = {"prompt": prompts(1, seed=8)[0], "max_tokens": 24, "n": 3, "temperature": 1.0, "seed": 1}
    with Peak(live) as peak:
        with HangUp(live.http_url, post_bytes(live.http_url, path, body)) as holder:
            assert holder.read_events(FIRST_TOKEN) >= FIRST_TOKEN and admission.running == 1
            pool = ThreadPoolExecutor(max_workers=1)
            try:
                n3 = pool.submit(stream_completion, live.http_url, {**sampled, "stream": True, "ignore_eos": True})
                wait_for(lambda: admission.waiting == 1, what="the n=3 request to queue")
                time.sleep(0.2)
                assert admission.running == 1 and admission.waiting == 1  # no partial grant of 2 free units
                holder.hang_up()
                wait_for(lambda: admission.running in (0, 3) and admission.waiting == 0, what="the n=3 grant")
                streamed = n3.result(timeout=REQUEST_S)
            finally:
                pool.shutdown(wait=False, cancel_futures=True)
    assert streamed.status == 200 and streamed.done and streamed.finishes == {0: "length", 1: "length", 2: "length"}
    assert peak.running == CAP  # the three choices ran together
    live.wait_quiet(QUIET_S)
