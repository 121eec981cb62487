"""The ``k2serve`` command: one console script, one subcommand per program.

Each subcommand module is imported only when it runs, so ``k2serve --help`` (and, later, the
router) never imports torch. Environment variables with the ``K2SERVE_`` prefix are read here and
nowhere else.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

Command = Callable[[argparse.Namespace], int]


def _make_tiny_model(args: argparse.Namespace) -> int:
    from k2serve.tiny_model import make_tiny_model

    path = make_tiny_model(args.out, preset=args.preset, seed=args.seed, force=args.force)
    print(f"wrote {args.preset} model to {path}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from k2serve.generate import run_generate

    return run_generate(args)


def _bench_engine(args: argparse.Namespace) -> int:
    from k2serve.bench_engine import run_bench_engine

    return run_bench_engine(args)


def _bench_ep(args: argparse.Namespace) -> int:
    from k2serve.bench_ep import run_bench_ep

    return run_bench_ep(args)


def _bench_kv_transfer(args: argparse.Namespace) -> int:
    from k2serve.bench_kv_transfer import run_bench_kv_transfer

    return run_bench_kv_transfer(args)


def _bench_handoff(args: argparse.Namespace) -> int:
    from k2serve.bench_handoff import run_bench_handoff

    return run_bench_handoff(args)


def _bench_router(args: argparse.Namespace) -> int:
    from k2serve.bench_router import run_bench_router

    return run_bench_router(args)


def _bench_kernels(args: argparse.Namespace) -> int:
    from k2serve.kernels.bench import run_bench_kernels

    return run_bench_kernels(args)


def _worker(args: argparse.Namespace) -> int:
    from k2serve.worker import run_worker

    return run_worker(args)


def _add_worker(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("worker", help="run one rank of an expert-parallel group (no Ray)")
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--ep-size", type=int, default=1)
    p.add_argument("--ep-rank", type=int, default=0)
    p.add_argument("--rendezvous", default=None, help="HOST:PORT of the group's TCP store")
    p.add_argument("--host-store", action="store_true", help="this rank (0) starts the store at --rendezvous")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds any collective may wait for a peer")
    p.add_argument("--redundant-experts", type=int, default=0, help="extra expert slots over the group (EPLB)")
    p.add_argument("--placement", type=Path, default=None, help="expert placement JSON (default: contiguous)")
    p.add_argument("--rebalance-window", type=int, default=0, help="steps between EPLB rebalances (0: off)")
    p.add_argument("--measure-window", type=int, default=32, help="steps between expert-load measurements")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-blocks", type=int, default=256)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--requests", type=Path, required=True, help="JSONL of this rank's requests")
    p.add_argument("--output", type=Path, default=None, help="JSONL of token deltas (default: stdout)")
    p.add_argument("--stats", type=Path, default=None, help="write step and dispatch statistics (JSON)")
    p.add_argument("--metrics", type=Path, default=None, help="write the Prometheus exposition at exit")
    p.set_defaults(func=_worker)


def _router(args: argparse.Namespace) -> int:
    from k2serve.router_main import run_router

    return run_router(args)


def _add_router(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("router", help="run a router (REST + gRPC) in front of a registry's workers or a fixed list")
    p.add_argument("model", help="model folder (tokenizer, chat template and config.json; no weights are read)")
    p.add_argument("--registry", default=None, help="HOST:PORT of the controller's registry (follow its workers)")
    p.add_argument("--registry-wait", type=float, default=600.0, help="seconds to wait for the registry at start")
    p.add_argument("--worker", action="append", help="a fixed worker ID=ROLE@HOST:PORT (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (REST and gRPC)")
    p.add_argument("--port", type=int, default=8000, help="REST port (0 = any free port)")
    p.add_argument("--grpc-port", type=int, default=50051, help="gRPC port (0 = any, -1 = none)")
    p.add_argument("--policy", default="auto", help="routing policy (auto, round_robin, least_load, prefix, session)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: folder name)")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: config.json)")
    p.add_argument("--api-key", action="append", help="accepted API key (repeatable; also K2SERVE_API_KEYS)")
    p.add_argument("--max-running", type=int, default=256, help="admission: choices running at once")
    p.add_argument("--max-waiting", type=int, default=1024, help="admission: queued requests before 429")
    p.add_argument("--max-wait", type=float, default=30.0, help="admission: seconds queued before 429")
    p.add_argument("--max-body-bytes", type=int, default=8 * 2**20, help="REST bodies over this get 413")
    p.add_argument("--migration-limit", type=int, default=3, help="re-issues of a stream whose rank failed (0 = off)")
    p.add_argument("--stall-timeout", type=float, default=30.0, help="seconds a started stream may be silent (0 = off)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds in-flight requests get at shutdown")
    _add_tls(p)
    p.set_defaults(func=_router)


def _add_tls(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", default=None, help="PEM certificate (chain) of the REST and gRPC listeners")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert (give both or neither)")
    p.add_argument("--tls-ca", default=None, help="PEM CA: clients must show a certificate it signed (mutual TLS)")


def _serve(args: argparse.Namespace) -> int:
    from k2serve.serve import run_serve

    return run_serve(args)


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name, text in (
        ("serve", "start Ray, the worker pools and the router on this machine (MODEL_DIR, --demo or --config)"),
        ("cluster", "head node: start or join Ray, the controller, the pools of --config FILE and the router"),
    ):
        p = sub.add_parser(name, help=text)
        if name == "serve":
            p.add_argument("model", nargs="?", help="model folder (one prefill and one decode group of EP=2)")
            p.add_argument("--demo", action="store_true", help="the tiny model, written to --demo-dir on first use")
            p.add_argument("--demo-dir", default=demo_dir_default())
        p.add_argument("--config", type=Path, default=None, required=name == "cluster", help="cluster YAML")
        p.add_argument("--colocated", action="store_true", help="one colocated pool instead of prefill + decode")
        if name == "cluster":
            p.add_argument("--no-router", action="store_true", help="run no router here (routers follow the registry)")
        p.add_argument("--host", default=None, help="router interface (default from the config: 127.0.0.1)")
        p.add_argument("--port", type=int, default=None, help="router HTTP port (0 = any free port)")
        p.add_argument("--grpc-port", type=int, default=None, help="router gRPC port (0 = any free port)")
        p.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for every group")
        p.add_argument("--grace", type=float, default=10.0, help="seconds in-flight requests get at shutdown")
        _add_tls(p)
        p.set_defaults(func=_serve)


def _add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = sub.add_parser("bench", help="benchmarks (results go to docs/BENCHMARKS.md with --write)")
    which = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    engine = which.add_parser("engine", help="offline engine throughput vs transformers generate, same weights")
    engine.add_argument("--model", required=True, help="model folder (e.g. from make-tiny-model --preset small)")
    engine.add_argument("--num-requests", type=int, default=64)
    engine.add_argument("--input-len", type=int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"))
    engine.add_argument("--output-len", type=int, nargs=2, default=(16, 64), metavar=("MIN", "MAX"))
    engine.add_argument("--seed", type=int, default=0)
    engine.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    engine.add_argument("--block-size", type=int, default=16)
    engine.add_argument("--max-num-batched-tokens", type=int, default=2048)
    engine.add_argument("--skip-transformers", action="store_true", help="run only k2serve's engine")
    engine.add_argument("--write", metavar="PATH", help="put the table into this markdown file (docs/BENCHMARKS.md)")
    engine.set_defaults(func=_bench_engine)
    ep = which.add_parser("ep", help="step time of EP=2/4 groups vs EP=1 (worker processes, gloo)")
    ep.add_argument("--model", required=True, help="model folder (e.g. from make-tiny-model --preset small)")
    ep.add_argument("--ep-sizes", type=int, nargs="+", default=(1, 2, 4))
    ep.add_argument("--num-requests", type=int, default=32)
    ep.add_argument("--input-len", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX"))
    ep.add_argument("--output-len", type=int, nargs=2, default=(16, 48), metavar=("MIN", "MAX"))
    ep.add_argument("--seed", type=int, default=0)
    ep.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ep.add_argument("--threads", type=int, default=1, help="torch threads per rank process")
    ep.add_argument("--num-blocks", type=int, default=512)
    ep.add_argument("--timeout", type=float, default=1800.0, help="seconds one group may run")
    ep.add_argument("--write", metavar="PATH", help="put the table into this markdown file (docs/BENCHMARKS.md)")
    ep.set_defaults(func=_bench_ep)
    kv = which.add_parser("kv-transfer", help="KV transfer GB/s between two processes (p2p, gRPC) vs a raw send")
    kv.add_argument("--model", nargs="+", metavar="DIR", help="model folders (e.g. the tiny and small presets)")
    kv.add_argument("--presets", nargs="+", choices=("tiny", "small"), help="built-in presets instead of folders")
    kv.add_argument("--tokens", type=int, nargs="+", default=(1024, 8192, 32768), help="prompt lengths")
    kv.add_argument("--reps", type=int, default=5, help="timed repetitions per method (at least 5, after 1 warm-up)")
    kv.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    kv.add_argument("--block-size", type=int, default=16)
    kv.add_argument("--threads", type=int, default=1, help="torch threads in each of the two processes")
    kv.add_argument(
        "--pages",
        nargs="+",
        choices=("contiguous", "shuffled"),
        default=("contiguous", "shuffled"),
        help="block ids of both sides: what a fresh pool allocates (contiguous) and a worst case (shuffled)",
    )
    kv.add_argument(
        "--in-flight",
        type=int,
        nargs="+",
        default=(1,),
        help="requests handed over at once (each count its own row); GB/s is then the pair's throughput",
    )
    kv.add_argument("--timeout", type=float, default=120.0, help="seconds any one transfer may take")
    kv.add_argument("--write", metavar="PATH", help="put the table into this markdown file (docs/BENCHMARKS.md)")
    kv.set_defaults(func=_bench_kv_transfer)
    router = which.add_parser("router", help="latency the router adds (REST, gRPC) vs a worker's gRPC stream")
    router.add_argument("--model", required=True, help="model folder (e.g. from make-tiny-model --preset tiny)")
    router.add_argument("--concurrency", type=int, nargs="+", default=(1, 8))
    router.add_argument("--reps", type=int, default=10, help="rounds per concurrency (each: a batch per path)")
    router.add_argument("--prompt-tokens", type=int, default=32)
    router.add_argument("--output-tokens", type=int, default=32)
    router.add_argument("--seed", type=int, default=0)
    router.add_argument("--write", metavar="PATH", help="put the table into this markdown file (docs/BENCHMARKS.md)")
    router.set_defaults(func=_bench_router)
    kernels = which.add_parser("kernels", help="GPU kernel roofline benchmark (needs CUDA)")
    kernels.add_argument("--write", metavar="PATH", help="put the table into this markdown file (docs/BENCHMARKS.md)")
    kernels.add_argument("--quick", action="store_true", help="a few cells only (a smoke run, not for the record)")
    kernels.add_argument("--warmup", type=int, default=5, help="warm-up calls per implementation (at least 5)")
    kernels.add_argument("--reps", type=int, default=30, help="timed repetitions per implementation (at least 30)")
    kernels.add_argument(
        "--sweep", action="store_true", help="time the kernels' tile configurations instead and name the fastest"
    )
    kernels.add_argument(
        "--sweep-seconds", type=float, default=90.0, help="with --sweep: seconds of configurations per cell"
    )
    kernels.set_defaults(func=_bench_kernels)
    from k2serve.bench_serve import add_bench_serve_parser  # light: option modules only

    add_bench_serve_parser(which)
    from k2serve.bench_load_step import add_load_step_parser  # light: the cluster starts when it runs

    add_load_step_parser(which)
    handoff = which.add_parser("handoff", help="time the KV handoff adds between token 1 and 2, pushed vs pulled")
    handoff.add_argument("--model", required=True, help="model folder (e.g. from make-tiny-model --preset small)")
    handoff.add_argument("--tokens", type=int, nargs="+", default=(512, 2048), help="prompt lengths")
    handoff.add_argument("--reps", type=int, default=5, help="requests per mode and length (after 1 warm-up)")
    handoff.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    handoff.add_argument("--seed", type=int, default=0)
    handoff.add_argument("--write", metavar="PATH", help="put the table into this markdown file (docs/BENCHMARKS.md)")
    handoff.set_defaults(func=_bench_handoff)


def _add_pools(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from k2serve.pools import add_pools_parser  # light: ray loads when the command runs

    add_pools_parser(sub)


def _add_plan(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from k2serve.plan import add_plan_parser  # light: arithmetic only

    add_plan_parser(sub)


def _add_make_tiny_model(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "make-tiny-model",
        help="write a random model of the Kimi K2 architecture in the real checkpoint format",
        description="Writes config.json, INT4 pack-quantized routed experts and bf16 weights in sharded "
        "safetensors with an index, generation_config.json, tiktoken.model, tokenizer_config.json and "
        "chat_template.jinja.",
    )
    p.add_argument("out", help="output folder")
    p.add_argument("--preset", choices=("tiny", "small"), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
    p.set_defaults(func=_make_tiny_model)


def _add_generate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("generate", help="single-process greedy generation (the smallest end-to-end demo)")
    p.add_argument("model", help="model folder (config.json, safetensors, tokenizer)")
    p.add_argument("--prompt", required=True, help="user message, rendered with the chat template")
    p.add_argument("--system", default=None, help="system prompt (default: the template's)")
    p.add_argument("--raw", action="store_true", help="feed --prompt verbatim, without the chat template")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--show-ids", action="store_true", help="also print the generated token ids")
    p.set_defaults(func=_generate)


def demo_dir_default() -> str:
    """Where ``serve --demo`` (and ``bench load-step``) keep the tiny demo model."""
    return os.environ.get("K2SERVE_DEMO_DIR", "~/.cache/k2serve/demo-tiny")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="k2serve", description="Serve Kimi K2 Thinking.")
    parser.add_argument("--log-level", default=os.environ.get("K2SERVE_LOG_LEVEL", "WARNING"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_make_tiny_model(sub)
    _add_generate(sub)
    _add_bench(sub)
    _add_pools(sub)
    _add_worker(sub)
    _add_serve(sub)
    _add_router(sub)
    _add_plan(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    func: Command = args.func
    try:
        return func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        # Typed errors (ConfigError, CheckpointError, ...) are user errors: one clear line, exit 2.
        print(f"k2serve {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
