"""``k2serve bench handoff``: what the prefill -> decode handoff adds to a request, pushed vs pulled.

Lifecycle: one process starts a prefill rank and a decode rank (real ``WorkerServer``s on loopback
gRPC, p2p KV transfer over gloo) from one model folder, and two router ``Dispatcher``s over them:
``kv_push`` on (the prefill rank sends each layer's KV while its last forward computes the later
layers) and off (the decode rank pulls the KV after the prefill). For every prompt length it runs 1
warm-up and ``--reps`` requests per mode, alternating the modes, each with a fresh random prompt (no
prefix-cache hit), greedy, 2 output tokens, one at a time. Per request, at the router:

- TTFT: request start -> first token (the prefill);
- handoff gap: first token -> second token = the ``Decode`` call, the KV handoff and one decode step.
  The decode step is the same in both modes, so the difference of the gaps is the transfer time the
  push hides behind the prefill's compute.

Reported: medians, the ratio push / pull of the gap, and the pull's KV transfer time as the decode
rank measured it (``k2serve_kv_transfer_seconds``). Every push must be claimed (no fallback).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from k2serve.kernels.bench_report import write_section
from k2serve.proto import worker_pb2
from k2serve.router.dispatcher import Dispatcher
from k2serve.router.worker_client import WorkerEndpoint
from k2serve.workers.group_rank import GroupRank, RankSpec
from k2serve.workers.service import WorkerOptions, WorkerServer

BLOCK = 16


@dataclass(frozen=True)
class Case:
    tokens: int
    kv_mb: float
    ttft_ms: dict[str, float]  # mode -> median
    gap_ms: dict[str, float]
    transfer_ms: float  # the pull's median KV transfer on the decode rank


async def _request(dispatcher: Dispatcher, rid: str, prompt: list[int]) -> tuple[float, float]:
    """(TTFT, handoff gap) in seconds for one greedy 2-token request."""
    sampling = worker_pb2.SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    started = time.perf_counter()
    times: list[float] = []
    async for event in dispatcher.generate(rid, prompt, sampling):
        if event.finish_reason == "error":
            raise RuntimeError(f"{rid}: {event.error}")
        times.extend(time.perf_counter() for _ in event.token_ids)
    if len(times) != 2:
        raise RuntimeError(f"{rid}: expected 2 tokens, got {len(times)}")
    return times[0] - started, times[1] - times[0]


def _transfer_s(decode: WorkerServer) -> tuple[float, float]:
    """(sum, count) of the decode rank's successful p2p receives so far."""
    registry = decode.metrics.registry
    labels = {"direction": "receive", "transport": "p2p"}
    total = registry.get_sample_value("k2serve_kv_transfer_seconds_sum", labels) or 0.0
    count = registry.get_sample_value("k2serve_kv_transfer_seconds_count", labels) or 0.0
    return total, count


async def _measure(args: argparse.Namespace) -> tuple[list[Case], str]:
    model_dir = Path(args.model)
    max_len = max(args.tokens) + 8
    spec = RankSpec(
        model_dir=model_dir,
        dtype=args.dtype,
        num_blocks=-(-max_len // BLOCK) * 2 + 8,
        block_size=BLOCK,
        max_model_len=max_len,
        max_num_batched_tokens=max(args.tokens),
    )
    prefill_rank = await asyncio.to_thread(GroupRank.build, spec)
    decode_rank = await asyncio.to_thread(GroupRank.build, spec)
    prefill = await WorkerServer.start(prefill_rank, WorkerOptions("p0", "prefill"))
    decode = await WorkerServer.start(decode_rank, WorkerOptions("d0", "decode"))
    cache = decode.engine.kv_cache
    row_bytes = len(cache) * cache[0].shape[-1] * cache[0].element_size()
    shape = f"{len(cache)} × {cache[0].shape[-1]}"
    endpoints = [WorkerEndpoint(s.options.worker_id, s.options.role, s.address) for s in (prefill, decode)]
    modes = {"push": Dispatcher(kv_push=True), "pull": Dispatcher(kv_push=False)}
    rng = random.Random(args.seed)
    vocab = prefill.engine.model.config.vocab_size
    cases = []
    try:
        for dispatcher in modes.values():
            await dispatcher.update(endpoints)
        for tokens in args.tokens:
            samples: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
            transfers: list[float] = []
            for rep in range(args.reps + 1):
                for mode, dispatcher in modes.items():
                    prompt = [rng.randrange(vocab) for _ in range(tokens)]
                    before = _transfer_s(decode)
                    ttft, gap = await _request(dispatcher, f"{mode}-{tokens}-{rep}", prompt)
                    after = _transfer_s(decode)
                    if rep:  # rep 0 warms up
                        samples[mode].append((ttft, gap))
                        if mode == "pull" and after[1] > before[1]:
                            transfers.append(after[0] - before[0])
            cases.append(
                Case(
                    tokens,
                    tokens * row_bytes / 1e6,
                    {m: statistics.median(s[0] for s in v) * 1e3 for m, v in samples.items()},
                    {m: statistics.median(s[1] for s in v) * 1e3 for m, v in samples.items()},
                    statistics.median(transfers) * 1e3 if transfers else float("nan"),
                )
            )
        claimed = decode.metrics.registry.get_sample_value("k2serve_kv_pushes_total", {"outcome": "claimed"}) or 0
        pushed = (args.reps + 1) * len(args.tokens)
        if claimed != pushed:
            raise RuntimeError(f"{pushed - claimed:g} of {pushed} pushes were not claimed (fell back to a pull)")
    finally:
        for dispatcher in modes.values():
            await dispatcher.close()
        await prefill.stop(grace_s=1.0)
        await decode.stop(grace_s=1.0)
    return cases, shape


def render(args: argparse.Namespace, cases: list[Case], shape: str) -> str:
    load = os.getloadavg()[0]
    lines = [
        f"Workload: one request at a time through the router's dispatcher to a prefill rank and a decode rank "
        f"(real gRPC services in one process, p2p KV over gloo, loopback), model `{Path(args.model).name}` "
        f"({shape} latent rows per token, {args.dtype}), greedy, 2 output tokens, a fresh random prompt per "
        f"request; median of {args.reps} requests per mode after 1 warm-up, modes alternating. Handoff gap = "
        f"first token -> second token at the router (the Decode call, the KV handoff, one decode step).",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, Python {platform.python_version()}; 1-minute load average "
        f"{load:.2f} after the run.",
        f"Rerun: `k2serve bench handoff --model DIR --tokens {' '.join(map(str, args.tokens))} --reps {args.reps} "
        f"--dtype {args.dtype} --write docs/BENCHMARKS.md`.",
        "",
        "| tokens | KV MB | TTFT pull ms | TTFT push ms | gap pull ms | gap push ms | **gap push / pull** | "
        "pull's KV transfer ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        lines.append(
            f"| {c.tokens} | {c.kv_mb:.1f} | {c.ttft_ms['pull']:.1f} | {c.ttft_ms['push']:.1f} | "
            f"{c.gap_ms['pull']:.1f} | {c.gap_ms['push']:.1f} | **{c.gap_ms['push'] / c.gap_ms['pull']:.2f}** | "
            f"{c.transfer_ms:.1f} |"
        )
    return "\n".join(lines)


def run_bench_handoff(args: argparse.Namespace) -> int:
    if args.reps < 3:
        raise SystemExit("--reps: at least 3")
    if min(args.tokens) < 1:
        raise SystemExit("--tokens: every prompt length must be >= 1")
    cases, shape = asyncio.run(_measure(args))
    body = render(args, cases, shape)
    print(body)
    if args.write:
        write_section(Path(args.write), body, name="handoff", heading="Prefill -> decode handoff (CPU, loopback)")
    return 0
