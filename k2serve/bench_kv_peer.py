"""The decode-side process of ``k2serve bench kv-transfer`` (``python -m k2serve.bench_kv_peer``): it
receives what the driver (``bench_kv_transfer``, the prefill side) sends, by the method each command
names.

Lifecycle: started by the driver with the rendezvous of its ``P2pKvServer``, the address of its
``PullKv`` server and the raw baseline's store; reads one JSON command per line on stdin (``raw_join``,
``case``, ``p2p`` / ``p2p-nocopy`` / ``grpc`` with the transfer ids, ``push`` with the transfer ids
(starts the receivers and answers once each has met its sender) then ``settle`` (waits for them),
``floor`` with each request's first tag and whether it offers, ``raw`` with a tag, ``crc``, ``quit``)
and answers each with one JSON line on stdout (``ok``, and ``error`` or ``crc``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from k2serve.bench_kv_case import (
    HOST,
    RECEIVER,
    SENDER,
    Case,
    ReadyRows,
    await_transferring,
    paged_cache,
    rows_crc,
)
from k2serve.workers.kv_transfer import CacheKvSink, KvReceiver, KvSink, TransferState
from k2serve.workers.kv_transport_grpc import GrpcKvReceiver
from k2serve.workers.kv_transport_p2p import P2pKvClient, PointToPointBackend, connect_pair_group
from k2serve.workers.parallel import Rendezvous


def run_peer(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    client = P2pKvClient(RECEIVER, args.timeout)
    raw: PointToPointBackend | None = None
    cache: list[torch.Tensor] = []
    blocks: list[list[int]] = []  # per request in flight
    case: Case | None = None
    raw_buffer = torch.empty(0, dtype=torch.uint8)
    scratch = torch.empty(0)
    store: Any = None  # keeps the baseline group's store connection open
    pushed: list[KvReceiver] = []  # started by "push", waited for by "settle"
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        reply: dict[str, Any] = {"ok": True}
        if op == "quit":
            break
        if op == "raw_join":
            store = client.connect_store(Rendezvous.parse(args.rendezvous), args.timeout)
            raw = connect_pair_group(store, cmd["prefix"], 1, "gloo", HOST, args.timeout)
        elif op == "case":
            case = Case(**cmd["case"])
            cache, blocks = paged_cache(case, seed=1)
            for layer in cache:
                layer.zero_()
            raw_buffer = torch.empty(case.nbytes, dtype=torch.uint8)
            scratch = torch.empty(case.num_tokens, case.row_dim, dtype=case.layout.dtype)  # [N, D]
        elif op in ("p2p", "p2p-nocopy", "grpc"):
            assert case is not None
            receivers = []
            for tid, ids in zip(cmd["ids"], blocks, strict=True):
                sink: KvSink = (
                    ReadyRows(case.layout) if op == "p2p-nocopy" else CacheKvSink(cache, ids, case.num_tokens)
                )
                if op != "grpc":
                    receivers.append(client.start_receive(tid, SENDER, args.rendezvous, sink))
                else:
                    receivers.append(GrpcKvReceiver(args.grpc, tid, sink, args.timeout))
            failed = [r.error for r in receivers if r.wait() is not TransferState.SUCCESS]
            reply = {"ok": not failed, "error": failed[0] if failed else None}
        elif op == "push":  # start the receivers; answer once they met their senders (rows come on "settle")
            assert case is not None
            pushed = [
                client.start_receive(tid, SENDER, args.rendezvous, CacheKvSink(cache, ids, case.num_tokens))
                for tid, ids in zip(cmd["ids"], blocks, strict=True)
            ]
            try:
                await_transferring(pushed, args.timeout)
            except RuntimeError as exc:
                reply = {"ok": False, "error": str(exc)}
        elif op == "settle":
            failed = [r.error for r in pushed if r.wait() is not TransferState.SUCCESS]
            pushed = []
            reply = {"ok": not failed, "error": failed[0] if failed else None}
        elif op == "floor":  # see the driver's ``floor``: every layer lands in one scratch tensor, unchecked
            assert raw is not None and case is not None
            ack = torch.ones(1, dtype=torch.int64)
            layers = []
            for base in cmd["tags"]:
                layers += [raw.recv([scratch], 0, base + 1 + i) for i in range(case.num_layers)]
                if cmd["offer"]:
                    raw.send([ack], 0, base).wait()
            for work in layers:
                work.wait()
            for base in cmd["tags"]:
                raw.send([ack], 0, base + case.num_layers + 1).wait()
        elif op == "raw":
            assert raw is not None and case is not None
            ack = torch.ones(1, dtype=torch.int64)
            raw.recv([raw_buffer], 0, cmd["tag"]).wait()
            raw.send([ack], 0, cmd["tag"] + 1).wait()
        elif op == "crc":
            assert case is not None
            reply = {"ok": True, "crc": [rows_crc(cache, ids, case.num_tokens) for ids in blocks]}
            for layer in cache:
                layer.zero_()
        print(json.dumps(reply), flush=True)
    client.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="internal: the decode-side process of bench kv-transfer")
    parser.add_argument("--rendezvous", required=True)
    parser.add_argument("--grpc", required=True)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--threads", type=int, default=1)
    return run_peer(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
