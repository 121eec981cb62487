"""The locustfiles, run headless as real ``locust`` processes against a router over the tiny model:
a few seconds of two users give request rows without failures and the custom ``METRIC`` rows
(TTFT, ITL, TPOT, total latency) with counts; with a wrong API key every request is a failure
(``catch_response`` for SSE / HTTP, the status code for gRPC) and locust exits 1. Each run is
bounded by a subprocess timeout."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from router_fixtures import LiveRouter, live_router

from k2serve.tiny_model import make_tiny_model

ROOT = Path(__file__).resolve().parent.parent
LOCUST = Path(sys.executable).parent / "locust"
KEY = "locust-key"
METRICS = ("time_to_first_token", "inter_token_latency", "time_per_output_token", "total_latency")
REQUEST_ROWS = {"openai": "POST /v1/chat/completions (stream)", "grpc": "Serving/Chat"}
TIMEOUT_S = 90


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveRouter]:
    model_dir = make_tiny_model(tmp_path_factory.mktemp("lc") / "tiny", seed=11)
    with live_router(model_dir, api_keys=(KEY,)) as router:
        yield router


def run_locust(
    live: LiveRouter, kind: str, out: Path, *, key: str, seconds: int
) -> tuple[int, dict[str, dict[str, str]]]:
    """Run ``loadtest/locustfile_KIND.py`` headless; -> (exit code, stats rows by name)."""
    if not LOCUST.exists():
        pytest.skip("locust is not installed")
    env = {
        **os.environ,
        "K2SERVE_API_KEY": key,
        "K2SERVE_MAX_TOKENS": "6",
        "K2SERVE_MODEL": live.model_name,
        "K2SERVE_GRPC_TARGET": live.grpc_target,
    }
    command = [str(LOCUST), "-f", str(ROOT / "loadtest" / f"locustfile_{kind}.py"), "--headless"]
    command += ["-u", "2", "-r", "2", "-t", f"{seconds}s", "--host", live.http_url, "--csv", str(out / kind)]
    command += ["--only-summary", "--stop-timeout", "10", "--loglevel", "WARNING"]
    done = subprocess.run(command, env=env, cwd=out, capture_output=True, text=True, timeout=TIMEOUT_S)
    stats = out / f"{kind}_stats.csv"
    assert stats.exists(), done.stdout[-2000:] + done.stderr[-4000:]
    with stats.open(newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    return done.returncode, rows


@pytest.mark.parametrize("kind", ["openai", "grpc"])
def test_locust_reports_requests_and_stream_metrics_without_failures(
    live: LiveRouter, tmp_path: Path, kind: str
) -> None:
    code, rows = run_locust(live, kind, tmp_path, key=KEY, seconds=6)
    assert code == 0, rows
    request = rows[REQUEST_ROWS[kind]]
    assert int(request["Request Count"]) > 4 and int(request["Failure Count"]) == 0
    assert all(int(row["Failure Count"]) == 0 for row in rows.values())
    for name in METRICS:
        assert rows[name]["Type"] == "METRIC" and int(rows[name]["Request Count"]) > 0, name
    assert (
        0
        < float(rows["time_to_first_token"]["Average Response Time"])
        <= float(rows["total_latency"]["Average Response Time"])
    )
    assert 1 <= float(rows["total_latency"]["Average Content Size"]) <= 6  # output tokens per request


@pytest.mark.parametrize("kind", ["openai", "grpc"])
def test_locust_marks_refused_requests_as_failures(live: LiveRouter, tmp_path: Path, kind: str) -> None:
    code, rows = run_locust(live, kind, tmp_path, key="wrong", seconds=2)
    assert code == 1
    request = rows[REQUEST_ROWS[kind]]
    assert int(request["Request Count"]) > 0 and request["Failure Count"] == request["Request Count"]
    assert not any(name in rows for name in METRICS)
    failures = (tmp_path / f"{kind}_failures.csv").read_text()
    assert ("401" if kind == "openai" else "UNAUTHENTICATED") in failures
