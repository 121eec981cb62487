"""``k2serve bench load-step``: a low -> high -> low request rate against a cluster whose autoscaler is on.

Lifecycle: write a cluster YAML (one prefill and one decode group of EP=1, the autoscaler on with
short windows) -> start ``k2serve serve --config`` in a child process with every prefill rank
emulating a fixed device time per prompt token (``K2SERVE_FAULTS=step_ms_per_token=X,role=prefill``,
so that capacity grows with groups on a machine without accelerators) -> sample the controller's
/metrics every second (ready and desired groups per pool) -> run one ``bench serve`` point per phase
(``--rates`` x ``--durations``) -> stop the server -> write ``load-step.json`` and ``load-step.png``
(TTFT of every request over time against the SLO, and the pools' groups) and print a summary:
whether the prefill pool grew and shrank back, and the p90 TTFT per phase and after the scale-up
settled.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from prometheus_client.parser import text_string_to_metric_families

from k2serve.loadtest.bench_options import BenchOptions
from k2serve.loadtest.bench_serve import run_sweep
from k2serve.loadtest.dataset import DatasetOptions

READY_TIMEOUT_S = 240.0


def add_load_step_parser(which: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = which.add_parser("load-step", help="autoscaler load step: low -> high -> low rate (docs/PLANNING.md)")
    from k2serve.cli import demo_dir_default  # light: argparse only

    p.add_argument("--model", default=None, help="model folder (default: the serve --demo tiny model)")
    p.add_argument("--demo-dir", default=demo_dir_default(), help="where the demo model is (written on first use)")
    p.add_argument("--rates", type=float, nargs="+", default=[1.0, 5.0, 1.0], help="req/s per phase")
    p.add_argument("--durations", type=float, nargs="+", default=[40.0, 100.0, 100.0], help="seconds per phase")
    p.add_argument("--prompt-words", type=int, default=100)
    p.add_argument("--output-tokens", type=int, default=8)
    p.add_argument("--step-ms-per-token", type=float, default=1.0, help="emulated prefill device time")
    p.add_argument("--ttft-slo", type=float, default=2.0)
    p.add_argument("--max-prefill-groups", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench-results/load-step"))
    p.set_defaults(func=run_load_step)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cluster_yaml(model: Path, args: argparse.Namespace, port: int, metrics_port: int) -> dict[str, Any]:
    pool = {"groups": 1, "ep_size": 1, "cpus_per_rank": 0.25, "kv_cache_blocks": 256, "max_model_len": 2048}
    return {
        "model": str(model),
        "pools": {"prefill": pool, "decode": pool},
        "router": {"port": port, "grpc_port": _free_port(), "max_wait_s": 120.0},
        "metrics": {"controller_port": metrics_port},
        "health": {"interval_s": 1.0, "timeout_s": 2.0, "failures": 3, "start_timeout_s": 120.0},
        "autoscaler": {
            "enabled": True,
            "interval_s": 2.0,
            "window_s": 10.0,
            "ttft_slo_s": args.ttft_slo,
            "itl_slo_s": 1.0,
            "target_utilization": 0.7,
            "scale_down_utilization": 0.35,
            "up_cooldown_s": 8.0,
            "down_cooldown_s": 20.0,
            "down_stable_s": 15.0,
            "pools": {
                "prefill": {"min_groups": 1, "max_groups": args.max_prefill_groups},
                "decode": {"min_groups": 1, "max_groups": 2},
            },
        },
    }


class GroupSampler:
    """Ready and desired groups per pool from the controller's /metrics, once a second, in a thread."""

    def __init__(self, url: str, origin: float) -> None:
        self.url, self.origin = url, origin
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GroupSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    text = r.read().decode()
            except OSError:
                continue
            row: dict[str, Any] = {"t": time.monotonic() - self.origin}
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    if s.name == "k2serve_pool_groups" and s.labels.get("state") == "ready":
                        row[f"{s.labels['pool']}_ready"] = s.value
                    elif s.name == "k2serve_pool_groups_desired":
                        row[f"{s.labels['pool']}_desired"] = s.value
                    elif s.name == "k2serve_autoscaler_decisions_total" and s.labels["direction"] != "hold" and s.value:
                        row[f"{s.labels['pool']} {s.labels['direction']} ({s.labels['reason']})"] = s.value
            self.samples.append(row)


def _wait_ready(proc: subprocess.Popen[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise RuntimeError(f"k2serve serve exited with {proc.returncode} before it was ready")
            continue
        if line.startswith("k2serve: ready"):
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            return
    raise TimeoutError(f"k2serve serve was not ready within {timeout_s:.0f} s")


def _phase(args: argparse.Namespace, base_url: str, rate: float, duration: float, seed: int) -> list[dict[str, Any]]:
    dataset = DatasetOptions(
        num_prompts=max(1, round(rate * duration)),
        random_input_len=args.prompt_words,
        random_output_len=args.output_tokens,
    )
    options = BenchOptions(
        base_url=base_url, dataset=dataset, request_rates=(rate,), seed=seed, request_timeout_s=300.0, progress=False
    )
    t0 = time.monotonic()
    (point,) = asyncio.run(run_sweep(options))
    return [{"t": t0 + r.start_time, "ttft": r.ttft, "ok": r.success, "error": r.error} for r in point.records]


def run_load_step(args: argparse.Namespace) -> int:
    if len(args.rates) != len(args.durations):
        raise ValueError("--rates and --durations: give one duration per rate")
    from k2serve.serve import demo_model  # ray loads with it: only when the command runs

    model = Path(args.model) if args.model else demo_model(Path(args.demo_dir).expanduser())
    args.out.mkdir(parents=True, exist_ok=True)
    port, metrics_port = _free_port(), _free_port()
    config = args.out / "cluster.yaml"
    config.write_text(yaml.safe_dump(cluster_yaml(model, args, port, metrics_port)))
    env = {**os.environ, "K2SERVE_FAULTS": f"step_ms_per_token={args.step_ms_per_token},role=prefill"}
    cmd = [sys.executable, "-m", "k2serve", "serve", "--config", str(config), "--grace", "5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tempfile.gettempdir())  # fmt: skip
    origin = time.monotonic()
    requests: list[dict[str, Any]] = []
    phases: list[dict[str, float]] = []
    try:
        _wait_ready(proc, READY_TIMEOUT_S)
        with GroupSampler(f"http://127.0.0.1:{metrics_port}/metrics", origin) as sampler:
            for i, (rate, duration) in enumerate(zip(args.rates, args.durations, strict=True)):
                start = time.monotonic() - origin
                requests += [
                    dict(r, t=r["t"] - origin) for r in _phase(args, f"http://127.0.0.1:{port}", rate, duration, i)
                ]
                phases.append({"rate": rate, "start": start, "end": time.monotonic() - origin})
            time.sleep(max(0.0, 40.0 - (time.monotonic() - origin - phases[-1]["end"])))  # let the scale-down show
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    result = summarize(requests, phases, sampler.samples, args.ttft_slo)
    (args.out / "load-step.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / "load-step.png")
    print(json.dumps(result["summary"], indent=2))
    return 0


def _p90(values: list[float]) -> float | None:
    return float(np.percentile(values, 90)) if values else None


def summarize(
    requests: list[dict[str, Any]], phases: list[dict[str, float]], groups: list[dict[str, Any]], slo: float
) -> dict[str, Any]:
    high = max(range(len(phases)), key=lambda i: phases[i]["rate"])
    peak = max((g.get("prefill_ready", 0) for g in groups), default=0)
    # settled: the first sample of the high phase at which the prefill pool reached its peak
    settled_at = next((g["t"] for g in groups if g["t"] >= phases[high]["start"] and g.get("prefill_ready", 0) >= peak), None)  # fmt: skip
    ok = [r for r in requests if r["ok"]]
    per_phase = []
    for p in phases:
        ttfts = [r["ttft"] for r in ok if p["start"] <= r["t"] < p["end"]]
        per_phase.append({"rate": p["rate"], "requests": len(ttfts), "ttft_p90_s": _p90(ttfts)})
    after = [r["ttft"] for r in ok if settled_at is not None and settled_at + 5 <= r["t"] < phases[high]["end"]]
    end = groups[-1] if groups else {}
    changes = {k: v for k, v in end.items() if k.endswith(")")}  # autoscaler decisions that changed a pool, by reason
    summary = {
        "requests": len(requests),
        "failed": len(requests) - len(ok),
        "prefill_groups_start": groups[0].get("prefill_ready") if groups else None,
        "prefill_groups_peak": peak,
        "prefill_groups_end": end.get("prefill_ready"),
        "decode_groups_peak": max((g.get("decode_ready", 0) for g in groups), default=0),
        "scale_decisions": changes,
        "scale_up_settled_at_s": settled_at,
        "ttft_p90_after_settle_s": _p90(after),
        "ttft_slo_s": slo,
        "phases": per_phase,
    }
    return {"summary": summary, "phases": phases, "groups": groups, "requests": requests}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    ok = [r for r in result["requests"] if r["ok"]]
    top.scatter([r["t"] for r in ok], [r["ttft"] for r in ok], s=4, label="TTFT per request")
    top.axhline(result["summary"]["ttft_slo_s"], color="red", linestyle="--", label="TTFT SLO (p90)")
    top.set_ylabel("TTFT (s)")
    top.set_yscale("log")
    top.legend(loc="upper right")
    t = [g["t"] for g in result["groups"]]
    for pool, style in (("prefill", "-"), ("decode", "--")):
        bottom.step(t, [g.get(f"{pool}_ready", 0) for g in result["groups"]], style, where="post", label=f"{pool} groups ready")  # fmt: skip
    rate = bottom.twinx()
    for p in result["phases"]:
        rate.plot([p["start"], p["end"]], [p["rate"], p["rate"]], color="gray", alpha=0.6)
    rate.set_ylabel("offered req/s", color="gray")
    bottom.set_ylabel("groups")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
