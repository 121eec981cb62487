"""``k2serve bench ep``: step time of expert-parallel groups (EP=2, EP=4) against EP=1, same workload.

Lifecycle: build one seeded workload -> for each EP size, split it round-robin over the ranks
(data-parallel attention: each rank schedules its own requests) and run the group as
``k2serve worker`` processes (``group_launcher``), one after the other -> read each rank's
statistics -> print a table and, with ``--write``, put it into docs/BENCHMARKS.md.

Figures per EP size: serving time (slowest rank, first step to the end; process start and model
loading excluded) and output tokens/s of the group over it; group steps;
mean step time (rank 0's wall time per step that ran a forward); dispatch and combine seconds per
step (rank 0, host clock, inside the MoE layers) and their share of the step; hidden bytes sent
to other ranks per step. Ratios are against EP=1 of the same run.

On a CPU host every rank is a process competing for the same cores, and the all-to-alls are gloo
over loopback TCP: the figures show the cost structure of the code path, not what NCCL over
NVLink/RDMA gives on GPUs.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from k2serve.kernels.bench_report import write_section
from k2serve.workers.config import ModelConfig
from k2serve.workers.group_launcher import launch_group


@dataclass(frozen=True)
class EpResult:
    ep_size: int
    wall_s: float  # process start to exit, model loading included
    serve_s: float  # the slowest rank's serving time, first step to the group's end
    output_tokens: int
    steps: int
    step_s: float
    dispatch_s: float  # per step
    combine_s: float  # per step
    bytes_per_step: float

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.serve_s


def _workload(args: argparse.Namespace, vocab: int) -> list[dict[str, Any]]:
    rng = random.Random(args.seed)
    return [
        {
            "request_id": f"b{i}",
            "prompt_token_ids": [rng.randrange(min(vocab, 500)) for _ in range(rng.randint(*args.input_len))],
            "max_tokens": rng.randint(*args.output_len),
            "ignore_eos": True,
        }
        for i in range(args.num_requests)
    ]


def run_one(args: argparse.Namespace, workload: list[dict[str, Any]], ep_size: int, workdir: Path) -> EpResult:
    per_rank = [workload[r::ep_size] for r in range(ep_size)]
    started = time.perf_counter()
    group = launch_group(
        args.model,
        per_rank,
        workdir / f"ep{ep_size}",
        worker_args=("--dtype", args.dtype, "--num-blocks", str(args.num_blocks), "--max-model-len", "1024"),
        timeout_s=120.0,
        env={"OMP_NUM_THREADS": str(args.threads)},
    )
    codes = group.wait(args.timeout)
    wall = time.perf_counter() - started
    if codes != [0] * ep_size:
        raise RuntimeError(f"EP={ep_size} group failed: exit codes {codes}\n{group.log(0)[-2000:]}")
    stats = group.stats(0)
    steps = max(stats["steps"], 1)
    return EpResult(
        ep_size=ep_size,
        wall_s=wall,
        serve_s=max(group.stats(r)["serve_seconds"] for r in range(ep_size)),
        output_tokens=sum(r["max_tokens"] for r in workload),
        steps=stats["steps"],
        step_s=stats["step_seconds_total"] / steps,
        dispatch_s=stats.get("dispatch_seconds", 0.0) / steps,
        combine_s=stats.get("combine_seconds", 0.0) / steps,
        bytes_per_step=stats.get("dispatch_bytes", 0) / steps,
    )


def render(args: argparse.Namespace, results: list[EpResult]) -> str:
    base = results[0]
    rows = [
        "| EP | serve s | output tok/s | tok/s vs EP=1 | steps | step ms (rank 0) | step vs EP=1 | dispatch ms/step | "
        "combine ms/step | dispatch+combine share | KiB sent/step (rank 0) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        share = (r.dispatch_s + r.combine_s) / r.step_s if r.step_s else 0.0
        rows.append(
            f"| {r.ep_size} | {r.serve_s:.1f} | {r.tokens_per_s:.1f} | {r.tokens_per_s / base.tokens_per_s:.2f} | "
            f"{r.steps} | {r.step_s * 1e3:.1f} | {r.step_s / base.step_s:.2f} | {r.dispatch_s * 1e3:.2f} | "
            f"{r.combine_s * 1e3:.2f} | {share:.0%} | {r.bytes_per_step / 1024:.1f} |"
        )
    return "\n".join(
        [
            f"Workload: {args.num_requests} requests, prompts {args.input_len[0]}–{args.input_len[1]} tokens, outputs "
            f"{args.output_len[0]}–{args.output_len[1]} tokens (seed {args.seed}), greedy, {args.dtype}, model "
            f"`{Path(args.model).name}`, split round-robin over the ranks.",
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch "
            f"thread(s) per rank, Python {platform.python_version()}, torch {torch.__version__}, gloo over loopback.",
            f"Rerun: `k2serve bench ep --model DIR --ep-sizes {' '.join(str(r.ep_size) for r in results)} "
            f"--num-requests {args.num_requests} --seed {args.seed}` (DIR from `k2serve make-tiny-model DIR --preset small`).",
            "",
            *rows,
        ]
    )


def run_bench_ep(args: argparse.Namespace) -> int:
    if 1 not in args.ep_sizes:
        raise ValueError("--ep-sizes: include 1, the baseline the ratios are against")
    config = ModelConfig.from_model_dir(args.model)
    workload = _workload(args, config.vocab_size)
    results = []
    with tempfile.TemporaryDirectory(prefix="k2-bench-ep-") as tmp:
        for ep_size in sorted(args.ep_sizes):
            results.append(run_one(args, workload, ep_size, Path(tmp)))
            print(f"EP={ep_size}: {results[-1]}", flush=True)
    body = render(args, results)
    print(body)
    if args.write:
        write_section(Path(args.write), body, name="ep", heading="Expert parallelism (CPU, gloo)")
    return 0
