"""Soak with chaos (reliability.md §4.2 test 21; slow, run on demand):

    K2SERVE_SOAK_MINUTES=20 python -m pytest -q -m slow tests/test_soak.py -s

``k2serve cluster`` runs a disaggregated cluster (two prefill groups of one rank, two decode groups
of two expert-parallel ranks) with the router's migration on. Clients keep a steady concurrency of
greedy streaming completions (token-id prompts whose fp32 oracle is known); every
``K2SERVE_SOAK_KILL_S`` seconds (60) one random rank process gets SIGKILL. Each request lands in the
ledger (ok only with the oracle's tokens). At the end, with the load stopped: every rank reports 0
running, 0 leases and 0 pinned blocks on its /metrics (found through the router's HTTP service
discovery), and the figures are reported: success rate (goal ≥ 99 %), hung = 0, the router process's
RSS growth and open files between the first and the last minute, and the recovery times (kill → the
next request that succeeds).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import secrets
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from request_ledger import Ledger, Result, report
from serve_process import ServeProcess

from k2serve.tiny_model import make_tiny_model
from k2serve.workers.greedy import greedy_generate
from k2serve.workers.model_loader import load_model

pytestmark = pytest.mark.slow

MINUTES = float(os.environ.get("K2SERVE_SOAK_MINUTES", "20"))
KILL_EVERY_S = float(os.environ.get("K2SERVE_SOAK_KILL_S", "60"))
CONCURRENCY = int(os.environ.get("K2SERVE_SOAK_CONCURRENCY", "8"))
API_KEY = "soak-key"
MAX_TOKENS = 24
REQUEST_DEADLINE_S = 90.0  # no terminal event by then: hung
IDLE_SETTLE_S = 60.0
NUM_PROMPTS = 16


def _cluster_yaml(tmp_path: Path, model: Path) -> Path:
    config = {
        "model": str(model),
        "pools": {
            "prefill": {"groups": 2, "ep_size": 1, "cpus_per_rank": 0.5, "kv_cache_blocks": 128, "max_model_len": 512},
            "decode": {"groups": 2, "ep_size": 2, "cpus_per_rank": 0.5, "kv_cache_blocks": 128, "max_model_len": 512},
        },
        "ray": {"num_cpus": 4},
        "health": {"interval_s": 1.0, "timeout_s": 3.0, "failures": 2, "start_timeout_s": 180.0},
        "restart": {"max_restarts": 1000, "backoff_initial_s": 0.5, "backoff_max_s": 5.0},
    }
    path = tmp_path / "soak.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _rank_pids(root: int) -> list[int]:
    """The Ray worker processes that host a rank (``ray::WorkerActor``) under the serve process."""
    pids = []
    for proc in psutil.Process(root).children(recursive=True):
        try:
            if "WorkerActor" in " ".join(proc.cmdline()):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


async def _one(client: httpx.AsyncClient, url: str, request_id: str, prompt: list[int], expected: list[int]) -> Result:
    body = {
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
    }
    tokens: list[int] = []
    started = time.monotonic()

    async def consume() -> str:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                return f"error: http {response.status_code} {(await response.aread())[:200]!r}"
            finish = ""
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    return f"error: stream error event {chunk['error'].get('message', '')[:200]}"
                for choice in chunk.get("choices", ()):
                    tokens.extend(choice.get("token_ids") or ())
                    finish = choice.get("finish_reason") or finish
            if finish in ("", "error", "abort"):
                return f"error: finish {finish or 'missing'} after {len(tokens)} tokens"
            return "ok" if tokens == expected else f"wrong: {tokens} instead of {expected}"

    try:
        outcome = await asyncio.wait_for(consume(), REQUEST_DEADLINE_S)
    except TimeoutError:
        outcome = "hung"
    except httpx.HTTPError as exc:
        outcome = f"error: {type(exc).__name__}: {exc}"
    return Result(request_id, outcome, tokens, time.monotonic() - started)


def _metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if re.match(rf"^{name}(\{{|\s)", line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_soak_with_a_rank_killed_every_minute(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "model", preset="tiny", seed=11)
    reference = load_model(model)
    rng = random.Random(5)
    prompts = [[rng.randrange(1, 500) for _ in range(rng.randrange(8, 40))] for _ in range(NUM_PROMPTS)]
    oracle = [greedy_generate(reference, p, max_tokens=MAX_TOKENS) for p in prompts]

    env = {**os.environ, "RAY_AUTH_TOKEN": secrets.token_hex(32), "K2SERVE_API_KEYS": API_KEY}
    serving = ServeProcess.start(["cluster", "--config", str(_cluster_yaml(tmp_path, model))], tmp_path, env=env)
    router = psutil.Process(serving.proc.pid)
    ledger = Ledger()
    kills: list[float] = []
    recoveries: list[float] = []
    samples: list[tuple[float, int, int]] = []  # (t, RSS bytes, open files) of the router process
    try:

        async def run() -> None:
            headers = {"authorization": f"Bearer {API_KEY}"}
            limits = httpx.Limits(max_connections=CONCURRENCY * 2)
            async with httpx.AsyncClient(headers=headers, timeout=REQUEST_DEADLINE_S, limits=limits) as client:
                end = time.monotonic() + MINUTES * 60
                counter = 0
                pending_kill: list[float] = []

                async def worker(slot: int) -> None:
                    nonlocal counter
                    while time.monotonic() < end:
                        counter += 1
                        i = rng.randrange(NUM_PROMPTS)
                        result = await _one(client, serving.url, f"soak-{slot}-{counter}", prompts[i], oracle[i])
                        ledger.record(result)
                        if result.kind == "ok" and pending_kill:
                            recoveries.append(time.monotonic() - pending_kill.pop(0))

                async def chaos() -> None:
                    while time.monotonic() + KILL_EVERY_S < end:
                        await asyncio.sleep(KILL_EVERY_S)
                        samples.append((time.monotonic(), router.memory_info().rss, router.num_fds()))
                        pids = _rank_pids(serving.proc.pid)
                        if pids:
                            os.kill(rng.choice(pids), signal.SIGKILL)
                            kills.append(time.monotonic())
                            pending_kill.append(kills[-1])

                await asyncio.gather(chaos(), *(worker(s) for s in range(CONCURRENCY)))

        asyncio.run(run())
        samples.append((time.monotonic(), router.memory_info().rss, router.num_fds()))

        # quiescence: every rank back to 0 running, 0 leases, 0 pinned (their /metrics, via HTTP SD)
        deadline = time.monotonic() + IDLE_SETTLE_S
        headers = {"authorization": f"Bearer {API_KEY}"}
        while True:
            groups = httpx.get(f"{serving.url}/metrics/targets", headers=headers, timeout=10).json()
            targets = [t for g in groups if g["labels"].get("role") != "controller" for t in g["targets"]]
            texts = [httpx.get(f"http://{t}/metrics", timeout=10).text for t in targets]
            busy = {
                name: sum(_metric_sum(t, name) for t in texts)
                for name in ("k2serve_num_requests_running", "k2serve_kv_leases", "k2serve_kv_pinned_blocks")
            }
            if not any(busy.values()) or time.monotonic() > deadline:
                break
            time.sleep(1.0)
    finally:
        serving.stop()

    counts = ledger.kinds()
    total = len(ledger.results)
    rss_growth = (samples[-1][1] - samples[0][1]) / samples[0][1] if len(samples) > 1 else 0.0
    fds = [s[2] for s in samples]
    leaked = int(busy["k2serve_kv_pinned_blocks"])
    report(
        f"soak {MINUTES:g} min, concurrency {CONCURRENCY}, SIGKILL of a random rank every {KILL_EVERY_S:g} s",
        ledger.figure(len(kills), leaked_blocks=leaked, recovery_s=recoveries)
        + f", success {counts.get('ok', 0) / max(total, 1):.2%}, router RSS growth {rss_growth:+.1%}"
        + f", router open files {fds[0] if fds else '-'} -> {fds[-1] if fds else '-'}",
    )
    ledger.assert_none()
    assert busy == dict.fromkeys(busy, 0.0), busy
    assert counts.get("ok", 0) >= 0.99 * total, counts
    assert rss_growth < 0.10, samples
