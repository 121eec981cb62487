"""``k2serve serve --demo`` and ``k2serve cluster --config`` from the command line: the demo writes the
tiny model, starts a local Ray, one prefill and one decode group of EP=2 and the router; the
cluster entry does the same from a colocated YAML. Each answers a streaming completion and stops
cleanly on SIGTERM with no Ray process left."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml
from serve_process import ServeProcess

from k2serve.cluster.config import ClusterConfig
from k2serve.tiny_model import make_tiny_model


def _cluster_yaml(tmp_path: Path) -> Path:
    """A colocated head-node config for ``k2serve cluster``: one group of EP=2 ranks serving Generate."""
    model = make_tiny_model(tmp_path / "model", preset="tiny")
    config = ClusterConfig.demo(model, colocated=True).to_dict()
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("entry", ["serve --demo", "cluster --config"])
def test_serve_demo_streams_a_completion_and_stops_cleanly(tmp_path: Path, entry: str) -> None:
    if entry == "serve --demo":
        args = ["serve", "--demo", "--demo-dir", str(tmp_path / "demo")]
    else:
        args = ["cluster", "--config", str(_cluster_yaml(tmp_path))]
    env = {**os.environ, "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # shared with `k2serve pools` below
    serving = ServeProcess.start(args, tmp_path, env=env)
    try:
        url = serving.url
        print(f"{entry} ready in {serving.ready_s:.1f}s")

        body = {"prompt": "Hello, Kimi", "max_tokens": 6, "temperature": 0, "stream": True, "return_token_ids": True}
        body["stream_options"] = {"include_usage": True}
        headers = {"content-type": "application/json"}
        request = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(), headers)
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            events = [line.decode().removeprefix("data: ").strip() for line in response if line.startswith(b"data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        token_ids = [t for c in chunks for choice in c["choices"] for t in choice.get("token_ids") or ()]
        assert len(token_ids) == 6  # demo: the first token from the prefill rank, five from the decode rank
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
        if entry == "cluster --config":
            _check_pools_command(tmp_path, env)
    finally:
        returncode, children = serving.stop()
    assert returncode == 0, serving.log
    deadline = time.monotonic() + 30
    while any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children):
        assert time.monotonic() < deadline, [c.cmdline()[:2] for c in children if c.is_running()]
        time.sleep(0.2)


def _check_pools_command(cwd: Path, env: dict[str, str]) -> None:
    """``k2serve pools`` from another process reaches the running cluster's controller (token auth on)."""

    def pools(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "k2serve", "pools", *args]
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=90)

    status = pools("status")
    assert status.returncode == 0, status.stdout + status.stderr
    answer = json.loads(status.stdout[status.stdout.index("{") :])
    assert answer["desired"] == {"colocated": 1}
    assert [g["state"] for g in answer["groups"]] == ["ready"]
    unknown = pools("scale", "decode", "2")  # a colocated cluster has no decode pool
    assert unknown.returncode == 1 and "no pool named 'decode'" in unknown.stdout, unknown.stdout + unknown.stderr
