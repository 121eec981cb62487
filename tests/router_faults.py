"""What the router fault tests (tests/test_fault_*.py) share: requests, reading a streamed
completion, a ledgered thread pool, the oracle, and what to read off a live router.

Lifecycle: imported by those test modules only; everything is a plain function or a small class,
so each test module makes its own fixtures (a tiny model folder, an ``Oracle`` over it, its live
routers). Streamed completions ask for ``return_token_ids`` so a test compares the very ids with
the fp32 greedy oracle; ``Streamed.outcome`` maps what a client saw to a ``Ledger`` outcome.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from request_ledger import Ledger, Result
from router_fixtures import LiveRouter

from k2serve.workers.greedy import greedy_generate
from k2serve.workers.model.model import KimiK2ForCausalLM
from k2serve.workers.model_loader import load_model

COMPLETIONS = "/v1/completions"
DISAGGREGATED = ("prefill", "decode")
BIG_CACHE: dict[str, Any] = {"num_blocks": 512, "block_size": 16}  # 8,192 tokens a rank: no preemption in these tests
LONG_LEN = 1024  # max_model_len of the routers whose requests must outlive the test's actions
QUIET_S = 5.0  # spec: 2 s to quiescence (reliability.md §4.2 test 1); headroom for a loaded 2-core box
REQUEST_S = 60.0  # a request's deadline in the ledger (then it is "hung")
FIRST_TOKEN = 2  # SSE events up to the first token: the prompt_token_ids chunk, then the token
LIFECYCLE_TOKENS = 900  # ~5 s of decoding idle: quiescence well before that means the request was aborted


class Oracle:
    """Greedy fp32 single-sequence decoding over the model folder, memoised: ``oracle(prompt, n)``."""

    def __init__(self, model_dir: Path) -> None:
        self.model: KimiK2ForCausalLM = load_model(model_dir, dtype=torch.float32, max_positions=256, progress=False)
        self._memo: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def __call__(self, prompt: list[int], max_tokens: int) -> list[int]:
        key = (tuple(prompt), max_tokens)
        if key not in self._memo:
            self._memo[key] = greedy_generate(self.model, prompt, max_tokens=max_tokens)
        return self._memo[key]


def prompts(count: int, seed: int = 0, length: tuple[int, int] = (4, 12)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 500) for _ in range(rng.randint(*length))] for _ in range(count)]


def completion(prompt: list[int], max_tokens: int, *, stream: bool = True, **extra: Any) -> dict[str, Any]:
    """A greedy completion that runs exactly ``max_tokens`` (ignore_eos) and reports its token ids."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return {**body, "stream": stream, "return_token_ids": True, **extra}


# -- reading a streamed completion -------------------------------------------------------------------


@dataclass
class Streamed:
    """What a client saw of one streamed completion."""

    status: int
    headers: dict[str, str]
    token_ids: list[int] = field(default_factory=list)
    finish: str | None = None
    error: dict[str, Any] | None = None
    done: bool = False  # saw ``data: [DONE]``
    finishes: dict[int, str] = field(default_factory=dict)  # choice index -> finish reason
    body: str = ""  # a non-200 answer's body

    def outcome(self, expected: list[int] | None = None) -> str:
        if self.status != 200:
            return f"error: http {self.status} {self.body[:120]}"
        if self.error is not None:
            return f"error: stream error event {self.error.get('code')}: {str(self.error.get('message'))[:120]}"
        if not self.done or self.finish is None:
            return "wrong: the stream ended without a finish reason and [DONE]"
        if expected is not None and self.token_ids != expected:
            return f"wrong: {len(self.token_ids)} tokens differ from the oracle's {len(expected)}"
        return "ok"


def take_line(streamed: Streamed, line: str) -> None:
    if not line.startswith("data:"):
        return
    data = line[5:].strip()
    if data == "[DONE]":
        streamed.done = True
        return
    payload = json.loads(data)
    if "error" in payload:
        streamed.error = payload["error"]
        return
    for choice in payload.get("choices", []):
        streamed.token_ids += choice.get("token_ids") or []
        if choice.get("finish_reason"):
            streamed.finish = streamed.finishes[choice.get("index", 0)] = choice["finish_reason"]


def stream_completion(
    url: str,
    body: dict[str, Any],
    *,
    headers: dict[str, str] | None = None,
    timeout_s: float = REQUEST_S,
    path: str = COMPLETIONS,
) -> Streamed:
    """POST ``body`` and read the SSE answer to its end (bounded by ``timeout_s`` a read)."""
    with httpx.Client(base_url=url, timeout=timeout_s) as client:
        with client.stream("POST", path, json=body, headers=headers) as response:
            streamed = Streamed(response.status_code, dict(response.headers))
            if response.status_code != 200:
                streamed.body = response.read().decode(errors="replace")
                return streamed
            for line in response.iter_lines():
                take_line(streamed, line)
            return streamed


def served_job(url: str, oracle: Oracle, prompt: list[int], max_tokens: int) -> Callable[[], str]:
    """A ``run_ledgered`` job: stream a greedy completion of ``prompt``; "ok" only with the oracle's tokens."""

    def job() -> str:
        return stream_completion(url, completion(prompt, max_tokens)).outcome(oracle(prompt, max_tokens))

    return job


def run_ledgered(
    ledger: Ledger, jobs: dict[str, Callable[[], str]], *, deadline_s: float = REQUEST_S, workers: int = 16
) -> None:
    """Run every job (returns its outcome) on a thread pool; one ledger entry each: ``hung`` when it
    has no outcome by ``deadline_s``, ``raised`` when it raised."""
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        started = time.monotonic()
        futures = {request_id: (pool.submit(job), time.monotonic()) for request_id, job in jobs.items()}
        for request_id, (future, t0) in futures.items():
            try:
                outcome = future.result(timeout=max(0.0, deadline_s - (time.monotonic() - started)))
            except FutureTimeout:
                outcome = "hung"
            except Exception as exc:  # the client path failed in a way no outcome covers
                outcome = f"raised: {type(exc).__name__}: {str(exc)[:160]}"
            ledger.record(Result(request_id, outcome, seconds=time.monotonic() - t0))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def http_5xx(live: LiveRouter) -> int:
    """REST answers with a 5xx status so far (the router's own counter); 529 is Anthropic's overload
    refusal (our 429), not a server error."""
    total = 0.0
    for metric in live.frontend.metrics.http_requests.collect():
        for sample in metric.samples:
            status = sample.labels.get("status", "")
            if sample.name.endswith("_total") and status.startswith("5") and status != "529":
                total += sample.value
    return int(total)


def worker_finished(live: LiveRouter, index: int, reason: str) -> int:
    """Requests worker ``index`` finished with ``reason`` (its ``k2serve_request_success`` counter)."""
    registry = live.workers[index].metrics.registry
    total = 0.0
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == "k2serve_request_success_total" and sample.labels.get("finished_reason") == reason:
                total += sample.value
    return int(total)


def leaked_blocks(live: LiveRouter) -> int:
    return sum(load.num_blocks - load.free_blocks + load.pinned_blocks for load in live.loads())


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "a condition") -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout_s:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.01)
    return time.monotonic() - t0


def follow(url: str, body: dict[str, Any], progressed: threading.Event, tokens: int) -> Streamed:
    """Stream ``body`` to its end; set ``progressed`` once ``tokens`` tokens arrived."""
    with httpx.Client(base_url=url, timeout=REQUEST_S) as client:
        with client.stream("POST", COMPLETIONS, json=body) as response:
            streamed = Streamed(response.status_code, dict(response.headers))
            for line in response.iter_lines():
                take_line(streamed, line)
                if len(streamed.token_ids) >= tokens:
                    progressed.set()
            progressed.set()
            return streamed
