"""``k2serve bench serve`` end to end against a real router over the tiny model (loopback): a rate
sweep writes the JSON, the table and the plots with every request counted exactly as the server
counted it; an agentic run reuses the prefix cache round after round; the gRPC backend with a
concurrency sweep respects the cap; a wrong API key fails every request quickly with exit code 1.

The router requires an API key here (``K2SERVE_API_KEY`` for the good runs) and has a 1024-token
context: the agentic prompts (system prompt, tool schemas, three rounds) outgrow the fixture's 256.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from router_fixtures import LiveRouter, live_router

from k2serve import cli
from k2serve.bench_serve import add_bench_serve_parser
from k2serve.loadtest.bench_options import BenchOptions, SweepPoint
from k2serve.loadtest.bench_request import BenchRequest, RequestRecord
from k2serve.loadtest.bench_serve import run_point
from k2serve.loadtest.client import OpenAIChatClient
from k2serve.loadtest.dataset import DatasetOptions
from k2serve.tiny_model import make_tiny_model

KEY = "bench-key"
BLOCK_SIZE = 4
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = ["--random-input-len", "16", "--random-output-len", "6", "--no-progress"]
AGENTIC = ["--dataset-name", "agentic", "--agentic-sessions", "2", "--agentic-rounds", "3"]
AGENTIC += ["--agentic-system-len", "8", "--agentic-num-tools", "1", "--agentic-tool-result-len", "6"]
AGENTIC += ["--agentic-output-len", "6", "--no-progress", "--no-plots"]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveRouter]:
    model_dir = make_tiny_model(tmp_path_factory.mktemp("bs") / "tiny", seed=11)
    with live_router(model_dir, api_keys=(KEY,), num_blocks=1024, block_size=BLOCK_SIZE, max_model_len=1024) as r:
        yield r


@pytest.fixture(autouse=True)
def _api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("K2SERVE_API_KEY", KEY)


def _registered_in_cli() -> bool:
    bench = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    which = next(a for a in bench.choices["bench"]._actions if isinstance(a, argparse._SubParsersAction))
    return "serve" in which.choices


def bench_serve(argv: list[str]) -> int:
    """``k2serve bench serve ARGV`` in-process: through ``cli.main`` once the command is registered,
    else through its own parser, with ``cli.main``'s rule for typed errors (one line, exit 2)."""
    if _registered_in_cli():
        return cli.main(["bench", "serve", *argv])
    parser = argparse.ArgumentParser(prog="k2serve bench")
    add_bench_serve_parser(parser.add_subparsers(dest="bench", required=True))
    args = parser.parse_args(["serve", *argv])
    try:
        return int(args.func(args))
    except ValueError as exc:
        print(f"k2serve bench: error: {exc}", file=sys.stderr)
        return 2


def _counter(live: LiveRouter, name: str) -> float:
    text = httpx.get(live.http_url + "/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE))


def _points(result_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(result_dir.glob("point-*.json"))]


def test_rate_sweep_writes_results_table_and_plots_and_counts_tokens_like_the_server(
    live: LiveRouter, tmp_path: Path
) -> None:
    generated_before = _counter(live, "k2serve_router_generation_tokens_total")
    prompt_before = _counter(live, "k2serve_router_prompt_tokens_total")
    argv = ["--base-url", live.http_url, "--num-prompts", "6", "--request-rate", "4", "inf", *SMALL]
    assert bench_serve([*argv, "--goodput", "ttft:60000", "--result-dir", str(tmp_path)]) == 0

    combined = json.loads((tmp_path / "results.json").read_text())
    assert combined["model"] == live.model_name and combined["base_url"] == live.http_url
    assert combined["k2serve_version"] and combined["date"] and combined["config"]["api_key"] == "***"
    assert [p["request_rate"] for p in combined["points"]] == ["4", "inf"]
    points = _points(tmp_path)
    assert [p["point"]["request_rate"] for p in points] == ["4", "inf"]
    records = [r for p in points for r in p["records"]]
    for p in points:
        m = p["metrics"]
        assert (m["completed"], m["failed"], len(p["records"])) == (6, 0, 6)
        assert m["request_goodput"] == pytest.approx(m["request_throughput"])  # a one-minute TTFT SLO
        assert m["p99_ttft_ms"] >= m["p50_ttft_ms"] > 0 and m["output_throughput"] > 0
    for r in records:
        assert r["success"] and 1 <= r["output_tokens"] <= 6 and r["prompt_tokens"] > 16
        assert 0 < r["ttft"] <= r["latency"] and len(r["itl"]) <= r["output_tokens"]
    # the usage of every record, summed, is what the router counted for the run
    assert sum(r["output_tokens"] for r in records) == _counter(live, "k2serve_router_generation_tokens_total") - (
        generated_before
    )
    assert sum(r["prompt_tokens"] for r in records) == _counter(live, "k2serve_router_prompt_tokens_total") - (
        prompt_before
    )

    rows = [line for line in (tmp_path / "summary.md").read_text().splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["4", "inf"]
    assert all(row.split("|")[4].strip() == "0" for row in rows[1:])  # failures column
    for name in ("latency_vs_throughput.png", "percentiles.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_agentic_sessions_hit_the_prefix_cache_more_every_round(live: LiveRouter, tmp_path: Path) -> None:
    cached_before = _counter(live, "k2serve_router_cached_prompt_tokens_total")
    assert (
        bench_serve(["--base-url", live.http_url, "--model", live.model_name, *AGENTIC, "--result-dir", str(tmp_path)])
        == 0
    )
    (point,) = _points(tmp_path)
    sessions: dict[str, list[dict[str, Any]]] = {}
    for r in point["records"]:
        sessions.setdefault(r["session_id"], []).append(r)
    assert len(sessions) == 2
    for rounds in sessions.values():
        rounds.sort(key=lambda r: r["turn"])
        assert [r["turn"] for r in rounds] == [0, 1, 2] and all(r["success"] for r in rounds)
        for before, after in itertools.pairwise(rounds):
            assert after["prompt_tokens"] > before["prompt_tokens"]
            # everything the previous round sent (whole blocks) comes from the cache
            assert after["cached_tokens"] >= before["prompt_tokens"] - BLOCK_SIZE
    assert point["metrics"]["cached_prompt_tokens"] > 0
    assert _counter(live, "k2serve_router_cached_prompt_tokens_total") > cached_before


def test_grpc_backend_concurrency_sweep_respects_each_cap(live: LiveRouter, tmp_path: Path) -> None:
    argv = ["--backend", "grpc", "--grpc-target", live.grpc_target, "--num-prompts", "4", *SMALL, "--no-plots"]
    argv += ["--num-warmups", "2"]  # sent first, not recorded
    assert bench_serve([*argv, "--max-concurrency", "1", "2", "--result-dir", str(tmp_path)]) == 0
    points = _points(tmp_path)
    assert [p["max_concurrency"] for p in points] == [1, 2]
    for p in points:
        m = p["metrics"]
        assert (m["completed"], m["failed"]) == (4, 0)
        assert 1 <= m["max_concurrent_requests"] <= p["max_concurrency"]
        assert all(r["output_tokens"] >= 1 and r["prompt_tokens"] > 0 for r in p["records"])
    assert points[0]["metrics"]["max_concurrent_requests"] == 1


@pytest.mark.parametrize("backend", ["openai-chat", "grpc"])
def test_a_wrong_api_key_fails_every_request_quickly_with_exit_code_1(
    live: LiveRouter, tmp_path: Path, backend: str
) -> None:
    argv = ["--base-url", live.http_url, "--grpc-target", live.grpc_target, "--backend", backend]
    argv += ["--api-key", "wrong", "--model", live.model_name, "--num-prompts", "4", *SMALL, "--no-plots"]
    started = time.monotonic()
    assert bench_serve([*argv, "--request-timeout", "20", "--result-dir", str(tmp_path)]) == 1
    assert time.monotonic() - started < 20
    (point,) = _points(tmp_path)
    assert (point["metrics"]["completed"], point["metrics"]["failed"]) == (0, 4)
    expected = "HTTP 401" if backend == "openai-chat" else "UNAUTHENTICATED"
    assert all(not r["success"] and expected in r["error"] for r in point["records"])
    assert "| inf | - | 0 | 4 |" in (tmp_path / "summary.md").read_text()


def test_without_a_model_a_server_that_refuses_the_key_is_a_clear_error(
    live: LiveRouter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench_serve(["--base-url", live.http_url, "--api-key", "wrong", "--result-dir", str(tmp_path), *SMALL]) == 2
    assert "pass --model" in capsys.readouterr().err and not list(tmp_path.iterdir())


# -- the client and the runner without a server ----------------------------------------------------


def _sse(*chunks: dict[str, Any] | str) -> bytes:
    lines = [": keep-alive\n\n"] + [f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n" for c in chunks]
    return "".join(lines).encode()


def _send(handler: Any, request: BenchRequest, **options: Any) -> RequestRecord:
    async def run() -> RequestRecord:
        transport = httpx.MockTransport(handler)
        async with OpenAIChatClient("http://bench.test", "m", api_key="k", transport=transport, **options) as client:
            return await client.send(request, time.perf_counter())

    return asyncio.run(run())


def test_openai_client_sends_vllms_body_with_the_session_header_and_reads_the_usage() -> None:
    seen: list[httpx.Request] = []
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    token = {"choices": [{"index": 0, "delta": {"content": "hi"}}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=_sse(role, token, token, usage, "[DONE]"))

    request = BenchRequest(messages=({"role": "user", "content": "x"},), max_tokens=5, session_id="s-1", turn=1)
    record = _send(handler, request)
    assert record.success and (record.prompt_tokens, record.output_tokens, len(record.itl)) == (7, 2, 2)
    (sent,) = seen
    body = json.loads(sent.content)
    assert sent.url.path == "/v1/chat/completions" and sent.headers["authorization"] == "Bearer k"
    assert sent.headers["x-session-id"] == "s-1"
    assert body == {
        "model": "m",
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_completion_tokens": 5,
    }


@pytest.mark.parametrize(
    ("response", "error"),
    [
        (httpx.Response(429, json={"error": {"message": "busy"}}), "HTTP 429"),
        (httpx.Response(200, content=_sse({"error": {"message": "engine died"}}, "[DONE]")), "engine died"),
        (httpx.Response(200, content=_sse({"choices": [{"index": 0, "delta": {"content": "a"}}]})), "without [DONE]"),
    ],
    ids=["status", "sse-error", "no-done"],
)
def test_openai_client_turns_every_failure_into_a_record(response: httpx.Response, error: str) -> None:
    record = _send(lambda request: response, BenchRequest(messages=(), max_tokens=1))
    assert not record.success and error in record.error


class _FakeClient:
    """Round 0 of every session answers at once; ``hang_turn`` never answers; ``fail_turn`` fails."""

    def __init__(self, hang_turn: int | None = None, fail_turn: int | None = None) -> None:
        self.hang_turn, self.fail_turn = hang_turn, fail_turn

    async def send(self, request: BenchRequest, origin: float) -> RequestRecord:
        if request.turn == self.hang_turn:
            await asyncio.sleep(3600)
        ok = request.turn != self.fail_turn
        return RequestRecord(
            ok, error="" if ok else "boom", output_tokens=2, ttft=0.01, latency=0.02, turn=request.turn
        )

    async def aclose(self) -> None:
        return None


@pytest.mark.parametrize(
    ("client", "error"), [(_FakeClient(hang_turn=1), "point-timeout"), (_FakeClient(fail_turn=1), "round 1")]
)
def test_runner_records_the_unfinished_rounds_of_a_session_as_failures(client: _FakeClient, error: str) -> None:
    dataset = DatasetOptions(name="agentic", agentic_sessions=2, agentic_rounds=3, agentic_system_len=4)
    options = BenchOptions(dataset=dataset, point_timeout_s=0.5, progress=False)
    started = time.monotonic()
    result = asyncio.run(run_point(client, options, SweepPoint(0, math.inf, None), "m"))
    assert time.monotonic() - started < 5
    assert (result.metrics.completed, result.metrics.failed, result.num_requests) == (2, 4, 6)
    skipped = [r for r in result.records if r.turn == 2]
    assert len(skipped) == 2 and all(error in r.error and r.session_id for r in skipped)
