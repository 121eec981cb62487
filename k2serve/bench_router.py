"""``k2serve bench router``: the latency the router adds, against calling a worker's gRPC stream directly.

Lifecycle: spawn one worker process (a colocated rank of ``--model`` serving the ``Worker`` gRPC
service on loopback) and one router process (``k2serve router --worker ...``) in front of it; then,
from this process, for each concurrency and repetition, send the same kind of request three ways
in rotating order: ``direct`` (``Worker.Generate``), ``rest`` (``POST /v1/completions`` with
``stream: true``, token-id prompt, SSE) and ``grpc`` (``Serving.Generate``). Every request has a
fresh random prompt (no prefix-cache hits), greedy sampling, ``ignore_eos`` and the same length.
Per method: median time to first token, median time per output token after the first, median
end-to-end; the router's overhead is the difference from ``direct`` in the same run. Both child
processes are stopped at the end (also on errors).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx

from k2serve.kernels.bench_report import write_section
from k2serve.proto import serving_pb2, serving_pb2_grpc, worker_pb2, worker_pb2_grpc
from k2serve.proto.cluster_token import authorized

HOST = "127.0.0.1"
METHODS = ("direct", "rest", "grpc")


@dataclass
class Sample:
    ttft_s: float
    per_token_s: float
    e2e_s: float


@dataclass
class Cell:
    concurrency: int
    samples: dict[str, list[Sample]] = field(default_factory=lambda: {m: [] for m in METHODS})

    def median(self, method: str, metric: str) -> float:
        return statistics.median(getattr(s, metric) for s in self.samples[method])


# -- child processes -------------------------------------------------------------------------------


def _serve_worker(model: str, num_blocks: int) -> int:
    """Child: one colocated rank on loopback; prints its address; stops on SIGTERM."""
    from k2serve.workers.group_rank import GroupRank, RankSpec
    from k2serve.workers.service import WorkerOptions, WorkerServer

    async def main() -> int:
        rank = GroupRank.build(
            RankSpec(model_dir=Path(model), num_blocks=num_blocks, block_size=16, max_model_len=2048)
        )
        server = await WorkerServer.start(rank, WorkerOptions("bench-0", "mixed", host=HOST))
        print(f"address {server.address}", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(grace_s=1.0)
        return 0

    return asyncio.run(main())


def _wait_line(process: subprocess.Popen[str], pattern: str, timeout_s: float) -> re.Match[str]:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            raise RuntimeError(f"child exited with {process.returncode} before printing {pattern!r}")
        if match := re.search(pattern, line):
            return match
    raise TimeoutError(f"no {pattern!r} from the child in {timeout_s:g} s")


@asynccontextmanager
async def _children(args: argparse.Namespace) -> AsyncIterator[tuple[str, str, str]]:
    """(worker address, router URL, router gRPC target); both children stopped on exit."""
    env = {**os.environ, "K2SERVE_API_KEYS": ""}
    worker = subprocess.Popen(
        [sys.executable, "-m", "k2serve.bench_router", "--serve-worker", args.model, "--num-blocks", "2048"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    router: subprocess.Popen[str] | None = None
    try:
        address = (await asyncio.to_thread(_wait_line, worker, r"address (\S+)", 120.0)).group(1)
        router = subprocess.Popen(
            [
                *(sys.executable, "-m", "k2serve", "router", args.model, "--worker", f"bench-0=mixed@{address}"),
                *("--host", HOST, "--port", "0", "--grpc-port", "0", "--max-model-len", "2048"),
            ],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        ready = await asyncio.to_thread(_wait_line, router, r"ready at (http://\S+) \(gRPC (\S+),", 60.0)
        yield address, ready.group(1), ready.group(2)
    finally:
        for child in (router, worker):
            if child is not None and child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in (router, worker):
            if child is not None:
                try:
                    child.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    child.kill()


# -- the three ways to ask -------------------------------------------------------------------------


class _Clients:
    def __init__(self, worker_address: str, router_url: str, router_grpc: str, output_tokens: int) -> None:
        self.worker_channel = grpc.aio.insecure_channel(worker_address)
        self.worker = authorized(worker_pb2_grpc.WorkerStub(self.worker_channel), None)  # its own rank: no token
        self.router_channel = grpc.aio.insecure_channel(router_grpc)
        self.serving = serving_pb2_grpc.ServingStub(self.router_channel)
        self.http = httpx.AsyncClient(base_url=router_url, timeout=120.0)
        self.output_tokens = output_tokens
        self._ids = 0

    async def close(self) -> None:
        await self.http.aclose()
        await self.worker_channel.close()
        await self.router_channel.close()

    async def run(self, method: str, prompt: list[int]) -> Sample:
        start = time.perf_counter()
        arrivals: list[float] = []
        count = 0
        async for n in getattr(self, f"_{method}")(prompt):
            if n:
                arrivals.append(time.perf_counter())
                count += n
        if count != self.output_tokens:
            raise RuntimeError(f"{method}: {count} tokens, expected {self.output_tokens}")
        first, last = arrivals[0] - start, arrivals[-1] - start
        return Sample(first, (last - first) / max(1, self.output_tokens - 1), last)

    async def _direct(self, prompt: list[int]) -> AsyncIterator[int]:
        self._ids += 1
        sampling = worker_pb2.SamplingParams(temperature=0.0, max_tokens=self.output_tokens, ignore_eos=True)
        request = worker_pb2.GenerateRequest(
            request_id=f"direct-{self._ids}", prompt_token_ids=prompt, sampling=sampling
        )
        async for delta in self.worker.Generate(request, timeout=120):
            yield len(delta.token_ids)

    async def _rest(self, prompt: list[int]) -> AsyncIterator[int]:
        body = {
            "prompt": prompt,
            "max_tokens": self.output_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "return_token_ids": True,
        }
        async with self.http.stream("POST", "/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                yield sum(len(c.get("token_ids") or ()) for c in chunk.get("choices", ()))

    async def _grpc(self, prompt: list[int]) -> AsyncIterator[int]:
        sampling = serving_pb2.SamplingParams(temperature=0.0, max_tokens=self.output_tokens, ignore_eos=True)
        request = serving_pb2.GenerateRequest(token_ids=serving_pb2.TokenIds(ids=prompt), sampling=sampling)
        async for message in self.serving.Generate(request, timeout=120):
            yield len(message.token_ids)


async def _measure(args: argparse.Namespace, clients: _Clients, progress: Callable[[str], None]) -> list[Cell]:
    rng = random.Random(args.seed)

    def prompt() -> list[int]:
        return [rng.randrange(300, 500) for _ in range(args.prompt_tokens)]

    for method in METHODS:  # warm-up: connections, the worker's first steps, the router's imports
        await asyncio.gather(*(clients.run(method, prompt()) for _ in range(2)))
    cells = []
    for concurrency in args.concurrency:
        cell = Cell(concurrency)
        for rep in range(args.reps):
            order = METHODS[rep % 3 :] + METHODS[: rep % 3]
            for method in order:
                batch = await asyncio.gather(*(clients.run(method, prompt()) for _ in range(concurrency)))
                cell.samples[method].extend(batch)
        cells.append(cell)
        progress(
            f"concurrency {concurrency}: "
            + ", ".join(f"{m} ttft {cell.median(m, 'ttft_s') * 1e3:.1f} ms" for m in METHODS)
        )
    return cells


def render(args: argparse.Namespace, cells: list[Cell], load: tuple[float, float]) -> str:
    import grpc as grpc_module

    rows = [
        "| concurrency | path | TTFT p50 ms | per-token p50 ms | end-to-end p50 ms | TTFT added ms | "
        "per-token added ms | **end-to-end / direct** |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        base = {metric: cell.median("direct", metric) for metric in ("ttft_s", "per_token_s", "e2e_s")}
        for method in METHODS:
            ttft, per_token, e2e = (cell.median(method, m) for m in ("ttft_s", "per_token_s", "e2e_s"))
            added = "–" if method == "direct" else f"{(ttft - base['ttft_s']) * 1e3:+.2f}"
            added_tok = "–" if method == "direct" else f"{(per_token - base['per_token_s']) * 1e3:+.2f}"
            rows.append(
                f"| {cell.concurrency} | {method} | {ttft * 1e3:.1f} | {per_token * 1e3:.2f} | {e2e * 1e3:.1f} | "
                f"{added} | {added_tok} | **{e2e / base['e2e_s']:.2f}** |"
            )
    conc = " ".join(str(c) for c in args.concurrency)
    return "\n".join(
        [
            f"Workload: {args.prompt_tokens}-token random prompts (no prefix-cache hits), {args.output_tokens} output "
            f"tokens (greedy, `ignore_eos`), {args.reps} rounds per concurrency, each round one batch of concurrent "
            "requests per path in rotating order. `direct` = the worker's `Worker.Generate` stream; `rest` = the "
            "router's `POST /v1/completions` (SSE, token-id prompt); `grpc` = the router's `Serving.Generate`. One "
            "colocated worker process and one router process on loopback; this process is the client.",
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
            f"{platform.python_version()}, grpcio {grpc_module.__version__}, httpx {httpx.__version__}, "
            f"{platform.system()} {platform.release()}; 1-minute load average {load[0]:.2f} before, {load[1]:.2f} "
            "after (client, router and worker share these cores).",
            f"Rerun: `k2serve bench router --model <tiny model folder> --concurrency {conc} --reps {args.reps} "
            f"--prompt-tokens {args.prompt_tokens} --output-tokens {args.output_tokens} --write docs/BENCHMARKS.md`.",
            "",
            *rows,
        ]
    )


def run_bench_router(args: argparse.Namespace) -> int:
    if args.output_tokens < 2:
        raise ValueError("--output-tokens: at least 2")
    load_before = os.getloadavg()[0]

    async def main() -> list[Cell]:
        async with _children(args) as (address, url, target):
            clients = _Clients(address, url, target, args.output_tokens)
            try:
                return await _measure(args, clients, lambda line: print(line, flush=True))
            finally:
                await clients.close()

    cells = asyncio.run(main())
    body = render(args, cells, (load_before, os.getloadavg()[0]))
    print(body)
    if args.write:
        write_section(Path(args.write), body, name="router", heading="Router overhead (CPU, loopback)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="internal: the worker process of bench router")
    parser.add_argument("--serve-worker", required=True, metavar="MODEL")
    parser.add_argument("--num-blocks", type=int, default=2048)
    args = parser.parse_args(argv)
    return _serve_worker(args.serve_worker, args.num_blocks)


if __name__ == "__main__":
    raise SystemExit(main())
