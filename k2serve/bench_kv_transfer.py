"""``k2serve bench kv-transfer``: KV transfer throughput between two processes over loopback, against a raw send.

Lifecycle: this process plays the prefill rank. It hosts a ``P2pKvServer``, a gRPC server that
answers ``PullKv`` and one fresh 2-rank gloo group for the raw baseline. It spawns the decode rank
(``python -m k2serve.bench_kv_peer``) and drives it with one JSON line per command
on its stdin; the peer answers one JSON line on its stdout. For every model, prompt length and page
layout both sides allocate a random paged cache and the requests' block ids; each method runs once to
warm up (push, p2p and gRPC: then the peer's CRC32 of every request's received rows is checked against the
source), then ``--reps`` rounds time every method once each, in turn, so that a machine whose speed
drifts (other jobs share it) weighs on all methods alike.

In flight (``--in-flight K``, 1 by default): K requests of the same length are handed over at once, as
when a prefill batch ends together (each its own blocks on both sides); a repetition ends when all K
have arrived, so GB/s is the throughput of the pair. Raw then sends all K requests' bytes as one
message.

Page layouts (``--pages``, both by default):

- ``contiguous``: the ids a fresh ``BlockPool`` allocates (what a serving rank gets: ascending and
  consecutive), so the transport sends from and receives into the pages without a copy;
- ``shuffled``: a random permutation of the cache's blocks on each side (the worst case: every block
  its own run, so both sides gather and scatter through a buffer).

Methods:

- ``push``: the default transport (``P2pKvServer`` / ``P2pKvClient``, gloo pair group, cached) as a
  ``Prefill`` with ``push_to`` uses it (``kv_push``): the sender reads a ``ProgressKvSource`` whose
  blocks are known but whose layers are not written, so the two sides meet (offer, answer, header)
  first, as they do while a prefill's forward runs (each side waits for the other to be past it:
  ``await_transferring``); then every layer is marked written at once and the clock runs until the
  peer has the rows (no compute to overlap: the least a push hides);
- ``p2p`` (the pull): the same transport started after the rows are written, offer and answer included;
- ``p2p-nocopy``: the pull between a source that hands out ready rows and a sink that drops them. That
  is the protocol's own cost, without the gather from and scatter into the pages;
- ``grpc``: the ``PullKv`` stream (``kv_chunks`` / ``GrpcKvReceiver``);
- ``floor``: about the least a pull transport that sends one message per layer pays here, on the
  baseline group: per request the peer posts one receive per layer, then sends a 1-value offer; this
  side waits for it and sends the layers (ready rows, no gather, no scatter: the peer receives them
  into one scratch tensor), then gets a 1-value acknowledgement. No threads, no store, no checks: it
  is what ``p2p-nocopy`` would cost with a handshake of one message and no Python around it;
- ``floor-push``: the same without the offer: what one message per layer costs over one message;
- ``raw``: one ``send`` of a [nbytes] uint8 tensor over the baseline group (all K requests' bytes in
  one message: the strongest baseline, with no per-message cost), then a 1-value acknowledgement back
  (the transports end with one too).

Each repetition is timed on this side from writing the command (push: ``settle``, written once the
two sides have met) to reading the peer's "done", so every method pays the same pipe round trip. GB/s = rows moved (num_layers × num_tokens × row_dim ×
dtype size × requests in flight) / median seconds; the ratios are against ``raw`` of the same case.
Every timed transfer must end SUCCESS on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import torch

from k2serve.bench_kv_case import (
    HOST,
    PAGES,
    RECEIVER,
    SENDER,
    Case,
    ReadyRows,
    Result,
    await_transferring,
    paged_cache,
    rows_crc,
)
from k2serve.bench_kv_report import goal_line, label, table_rows
from k2serve.kernels.bench_report import write_section
from k2serve.proto import worker_pb2, worker_pb2_grpc
from k2serve.workers.config import ModelConfig
from k2serve.workers.kv_progress import LayerProgress, ProgressKvSource
from k2serve.workers.kv_transfer import CacheKvSource, KvSender, KvSource, TransferState
from k2serve.workers.kv_transport_grpc import kv_chunks
from k2serve.workers.kv_transport_p2p import P2pKvServer, PointToPointBackend, connect_pair_group

METHODS = ("push", "p2p", "p2p-nocopy", "grpc", "floor", "floor-push", "raw")
FLOOR_TAG_BASE = 1 << 20  # above the raw method's tags, on the same group


class _PullKv(worker_pb2_grpc.WorkerServicer):
    """Answers only ``PullKv``: request k of the current case (the lease id ends with ``/k``)."""

    def __init__(self) -> None:
        self.sources: list[CacheKvSource] = []

    def PullKv(self, request: worker_pb2.PullKvRequest, context: grpc.ServicerContext) -> Iterator[worker_pb2.KvChunk]:
        yield from kv_chunks(self.sources[int(request.lease_id.rsplit("/", 1)[1])])


class _Peer:
    def __init__(self, args: list[str], timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "k2serve.bench_kv_peer", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"the peer process did not answer within {self.timeout_s:g}s (exit {self.proc.poll()})")
        answer: dict[str, Any] = json.loads(line)
        if not answer.get("ok"):
            raise RuntimeError(f"the peer failed: {answer.get('error')}")
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(op="quit")
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)


def measure(
    case: Case, peer: _Peer, server: P2pKvServer, servicer: _PullKv, raw: PointToPointBackend, args: argparse.Namespace
) -> Result:
    cache, blocks = paged_cache(case, seed=0)
    sources = [CacheKvSource(cache, ids, case.num_tokens) for ids in blocks]
    servicer.sources = sources
    want_crc = [rows_crc(cache, ids, case.num_tokens) for ids in blocks]
    peer.send(op="case", case=case.__dict__)
    peer.reply()
    name = f"{case.model}-{case.num_tokens}-{case.pages}-{case.in_flight}"

    def ids(op: str, rep: int) -> list[str]:
        return [f"{name}-{op}-{rep}/{k}" for k in range(case.in_flight)]

    def p2p(rep: int, op: str = "p2p", sending: list[KvSource] | None = None) -> float:
        tids = ids(op, rep)
        started = time.perf_counter()
        peer.send(op=op, ids=tids)
        senders = [server.start_send(t, RECEIVER, s) for t, s in zip(tids, sending or sources, strict=True)]
        peer.reply()
        elapsed = time.perf_counter() - started
        _check_senders(op, senders)
        return elapsed

    def push(rep: int) -> float:
        tids = ids("push", rep)
        progresses = [LayerProgress(case.num_layers) for _ in range(case.in_flight)]
        for progress, block_ids in zip(progresses, blocks, strict=True):
            progress.begin(block_ids)  # the last forward began: the blocks are known, no row is written yet
        peer.send(op="push", ids=tids)
        senders = [
            server.start_send(t, RECEIVER, ProgressKvSource(p, cache, case.num_tokens))
            for t, p in zip(tids, progresses, strict=True)
        ]
        peer.reply()
        await_transferring(senders, args.timeout)
        started = time.perf_counter()
        peer.send(op="settle")
        for progress in progresses:  # the whole prompt's rows written at once: nothing overlaps the sends
            for layer in range(case.num_layers):
                progress.layer_done(layer)
        peer.reply()
        elapsed = time.perf_counter() - started
        _check_senders("push", senders)
        return elapsed

    ready: list[KvSource] = [ReadyRows(case.layout)] * case.in_flight

    def p2p_nocopy(rep: int) -> float:
        return p2p(rep, "p2p-nocopy", ready)

    def grpc_pull(rep: int) -> float:
        started = time.perf_counter()
        peer.send(op="grpc", ids=ids("grpc", rep))
        peer.reply()
        return time.perf_counter() - started

    rows = torch.zeros(case.num_tokens, case.row_dim, dtype=case.layout.dtype)  # [N, D]: every layer sends it
    offers = [torch.zeros(1, dtype=torch.int64) for _ in range(case.in_flight)]
    acks = [torch.zeros(1, dtype=torch.int64) for _ in range(case.in_flight)]

    def floor(rep: int, offer: bool = True) -> float:
        bases = floor_tags(case, rep, 0 if offer else 1)
        started = time.perf_counter()
        peer.send(op="floor", tags=bases, offer=offer)
        offered = [raw.recv([o], 1, base) for o, base in zip(offers, bases, strict=True)] if offer else []
        acked = [raw.recv([ack], 1, base + case.num_layers + 1) for ack, base in zip(acks, bases, strict=True)]
        sent = []
        for k, base in enumerate(bases):
            if offer:
                offered[k].wait()
            sent += [raw.send([rows], 1, base + 1 + i) for i in range(case.num_layers)]
        for work in sent + acked:
            work.wait()
        peer.reply()
        return time.perf_counter() - started

    def floor_push(rep: int) -> float:
        return floor(rep, offer=False)

    payload = torch.empty(case.nbytes, dtype=torch.uint8)  # every request in flight
    ack = torch.zeros(1, dtype=torch.int64)

    def raw_send(rep: int) -> float:
        tag = 2 * (rep + 2)
        started = time.perf_counter()
        peer.send(op="raw", tag=tag)
        sent = raw.send([payload], 1, tag)
        acked = raw.recv([ack], 1, tag + 1)
        sent.wait()
        acked.wait()
        peer.reply()
        return time.perf_counter() - started

    methods: dict[str, Callable[[int], float]] = {
        "push": push,
        "p2p": p2p,
        "p2p-nocopy": p2p_nocopy,
        "grpc": grpc_pull,
        "floor": floor,
        "floor-push": floor_push,
        "raw": raw_send,
    }
    for method, run_one in methods.items():
        run_one(-1)  # warm-up
        if method in ("push", "p2p", "grpc"):
            peer.send(op="crc")  # the peer zeroes its cache after the check
            got = peer.reply()["crc"]
            if got != want_crc:
                raise RuntimeError(f"{method}: the peer's rows differ from the source (crc {got} != {want_crc})")
    seconds: dict[str, list[float]] = {method: [] for method in methods}
    for rep in range(args.reps):  # every method once per round: a drift in machine speed hits them alike
        for method, run_one in methods.items():
            seconds[method].append(run_one(rep))
    return Result(case, seconds)


def _check_senders(op: str, senders: list[KvSender]) -> None:
    """Every sender of a timed repetition ended SUCCESS (after the peer said "done": no wait is timed)."""
    failed = [s.error for s in senders if s.wait() is not TransferState.SUCCESS]
    if failed:
        raise RuntimeError(f"{op} sender failed: {failed[0]}")


def floor_tags(case: Case, rep: int, variant: int = 0) -> list[int]:
    """Per request in flight, the first of a floor method's tags in repetition ``rep`` (-1: the warm-up;
    ``variant`` 0: ``floor``, 1: ``floor-push``): its offer (``floor`` only); its layers and its
    acknowledgement follow."""
    stride = case.num_layers + 2
    first = ((rep + 1) * 2 + variant) * case.in_flight
    return [FLOOR_TAG_BASE + (first + k) * stride for k in range(case.in_flight)]


def _cases(args: argparse.Namespace) -> list[Case]:
    configs: list[tuple[str, ModelConfig]] = []
    for folder in args.model or ():
        configs.append((Path(folder).name, ModelConfig.from_model_dir(folder)))
    if args.presets:
        from k2serve.tiny_presets import preset_config

        configs.extend((f"preset {name}", preset_config(name)) for name in args.presets)
    if not configs:
        raise ValueError("bench kv-transfer: name model folders (--model) or presets (--presets)")
    pages = _pages(args)
    return [
        Case(name, c.num_hidden_layers, c.kv_lora_rank + c.qk_rope_head_dim, n, args.dtype, args.block_size, kind, k)
        for name, c in configs
        for n in args.tokens
        for kind in pages
        for k in _in_flight(args)
    ]


def _in_flight(args: argparse.Namespace) -> tuple[int, ...]:
    counts = tuple(getattr(args, "in_flight", None) or (1,))
    bad = [k for k in counts if not 1 <= k <= 64]
    if bad:
        raise ValueError(f"--in-flight: expected counts in 1..64, got {bad}")
    return counts


def _pages(args: argparse.Namespace) -> tuple[str, ...]:
    pages = tuple(getattr(args, "pages", None) or PAGES)
    bad = [p for p in pages if p not in PAGES]
    if bad:
        raise ValueError(f"--pages: expected some of {PAGES}, got {bad}")
    return pages


def render(args: argparse.Namespace, results: list[Result], load: tuple[float, float]) -> str:
    models = " ".join(Path(m).name for m in args.model or ())
    source = f"--model {models}" if models else f"--presets {' '.join(args.presets)}"
    tokens = " ".join(str(n) for n in args.tokens)
    in_flight = " ".join(str(k) for k in _in_flight(args))
    return "\n".join(
        [
            f"Workload: the latent KV rows of one prompt ({args.dtype}, block size {args.block_size}) moved from a "
            "prefill process to a decode process over loopback, with the request's blocks contiguous on both sides "
            "(the ids a fresh `BlockPool` allocates) or shuffled on both sides (a random permutation of the cache's "
            f"blocks); {in_flight} request(s) of that length in flight at once (each its own blocks; a repetition "
            "ends when all have arrived; MB and GB/s count them all); "
            f"median of {args.reps} rounds after 1 warm-up, each round timing every method once in turn, "
            'each transfer timed from the command to the peer\'s "done" (the same pipe round trip for every method). '
            "Push = the p2p transport as `Prefill` with `push_to` drives it: sender and receiver meet (offer, "
            "answer, header) while the source's layers are not written yet, as during a prefill's forward; the "
            "clock starts once both sides are past that and every layer is written at once (the least overlap "
            "a push gets). Pull = the p2p transport started after the rows "
            "are written (offer and answer included). No-copy = the pull between a source of ready rows and a "
            "sink that drops them. Raw = one gloo `send` of the same bytes (all requests in flight) as a single "
            "tensor on a 2-rank group formed beforehand, plus a 1-value acknowledgement. Floors, on that group, "
            "one thread a side, per request: push floor = one `send` per layer of ready rows and a 1-value "
            "acknowledgement (about the least a transport that sends one message per layer pays); pull floor = "
            "the same after a 1-value offer from the peer. The rows received in the warm-up (push, pull, gRPC) "
            "are checked (CRC32) against the source.",
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch "
            f"thread(s) per process, Python "
            f"{platform.python_version()}, torch {torch.__version__}, grpcio {grpc.__version__}, "
            f"{platform.system()} {platform.release()}; 1-minute load average {load[0]:.2f} before, {load[1]:.2f} "
            "after (other jobs share this machine).",
            f"Rerun: `k2serve bench kv-transfer {source} --tokens {tokens} --in-flight {in_flight} "
            f"--pages {' '.join(_pages(args))} --reps {args.reps} --dtype {args.dtype} --threads {args.threads} "
            "--write docs/BENCHMARKS.md` (the folders made by `k2serve make-tiny-model k2-tiny --preset tiny` and "
            "`... k2-small --preset small`).",
            "",
            *table_rows(results),
            "",
            goal_line(results),
        ]
    )


def run_bench_kv_transfer(args: argparse.Namespace) -> int:
    if args.reps < 5:
        raise ValueError("--reps: at least 5")
    cases = _cases(args)
    load_before = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    server = P2pKvServer(SENDER, HOST, args.timeout)
    servicer = _PullKv()
    grpc_server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2), options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    )
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, grpc_server)
    grpc_port = grpc_server.add_insecure_port(f"{HOST}:0")
    grpc_server.start()
    peer = _Peer(
        [
            *("--rendezvous", server.rendezvous, "--grpc", f"{HOST}:{grpc_port}"),
            *("--timeout", str(args.timeout), "--threads", str(args.threads)),
        ],
        args.timeout,
    )
    results: list[Result] = []
    try:
        peer.send(op="raw_join", prefix="bench/raw")
        raw = connect_pair_group(server.connect_store(args.timeout), "bench/raw", 0, "gloo", HOST, args.timeout)
        peer.reply()
        for case in cases:
            results.append(measure(case, peer, server, servicer, raw, args))
            r = results[-1]
            print(
                f"{label(case)} tokens, {case.pages} pages: " + ", ".join(f"{m} {r.gbs(m):.2f} GB/s" for m in METHODS),
                flush=True,
            )
    finally:
        peer.close()
        grpc_server.stop(grace=None)
        server.close()
    body = render(args, results, (load_before, os.getloadavg()[0]))
    print(body)
    if args.write:
        write_section(Path(args.write), body, name="kv_transfer", heading="KV transfer (CPU, loopback)")
    return 0
