"""``k2serve worker``: one rank of an expert-parallel group, without Ray.

Lifecycle: parse the flags into a ``RankSpec`` -> (rank 0 with ``--host-store``: start the group's
store) -> ``GroupRank.build`` joins the group and loads this rank's experts -> serve the
``--requests`` JSONL in lockstep with the other ranks (``run_offline``), one JSON line per token
delta to ``--output`` -> write ``--stats`` (JSON) and ``--metrics`` (Prometheus text) -> leave the
group. Exit status: 0 all requests finished, 3 the group failed (every request this rank held got
an ``error`` delta naming the failure), 2 bad flags or files.

N ranks run as N processes, e.g. two on one host::

    k2serve worker --model M --ep-size 2 --ep-rank 0 --rendezvous 127.0.0.1:29500 --host-store --requests r0.jsonl
    k2serve worker --model M --ep-size 2 --ep-rank 1 --rendezvous 127.0.0.1:29500 --requests r1.jsonl

The gRPC worker service of the cluster layer replaces the request file for live traffic.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import IO

from prometheus_client import CollectorRegistry, generate_latest

from k2serve.workers.ep_metrics import ExpertParallelCollector
from k2serve.workers.group_rank import GroupRank, OfflineRequest, RankSpec, run_offline
from k2serve.workers.parallel import Rendezvous, host_store


def run_worker(args: argparse.Namespace) -> int:
    spec = RankSpec(
        model_dir=Path(args.model),
        ep_size=args.ep_size,
        ep_rank=args.ep_rank,
        rendezvous=args.rendezvous,
        timeout_s=args.timeout,
        redundant_experts=args.redundant_experts,
        placement_file=args.placement,
        rebalance_window=args.rebalance_window,
        measure_window=args.measure_window,
        dtype=args.dtype,
        device=args.device,
        num_blocks=args.num_blocks,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    requests = [OfflineRequest.from_json(json.loads(line)) for line in args.requests.read_text().splitlines() if line]
    with ExitStack() as stack:
        if args.host_store:
            if args.ep_rank != 0 or not args.rendezvous:
                raise ValueError("--host-store: only rank 0 hosts the store, at --rendezvous HOST:PORT")
            where = Rendezvous.parse(args.rendezvous)
            stack.enter_context(_Kept(host_store(where.host, port=where.port, timeout_s=args.timeout)))
        rank = GroupRank.build(spec)
        stack.callback(rank.close)
        out: IO[str] = stack.enter_context(args.output.open("w")) if args.output else sys.stdout
        status = run_offline(rank, requests, out)
        if args.stats:
            args.stats.write_text(json.dumps(rank.stats()))
        if args.metrics:
            registry = CollectorRegistry()
            if rank.dispatcher is not None:
                registry.register(ExpertParallelCollector(rank.dispatcher, rank.balancer))
            args.metrics.write_bytes(generate_latest(registry))
    return status


class _Kept:
    """Keeps an object alive for the ``with`` block (the store server dies with its handle)."""

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __enter__(self) -> object:
        return self.obj

    def __exit__(self, *exc: object) -> None:
        self.obj = None
