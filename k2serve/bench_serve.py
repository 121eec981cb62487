"""``k2serve bench serve``: a request-rate / concurrency sweep against a running server, as ``vllm bench serve``.

Lifecycle: ``add_bench_serve_parser(which)`` adds the ``serve`` parser to the ``k2serve bench``
subparsers (flag names mirror vLLM's where the meaning is the same); ``run_bench_serve(args)``
turns the flags into ``BenchOptions``, runs the sweep (``k2serve.loadtest.bench_serve``), writes
``point-*.json``, ``results.json``, ``summary.md`` and, unless ``--no-plots``, the PNG plots into
``--result-dir``, prints the markdown table and returns 0 when every point completed every request,
else 1. Building the parser imports only the light option modules. The API key comes from ``--api-key`` or ``K2SERVE_API_KEY`` (read here, the entry point).

    k2serve bench serve --base-url http://127.0.0.1:8000 --dataset-name random \\
        --random-input-len 512 --random-output-len 128 --num-prompts 200 --request-rate 1 2 4 inf \\
        --goodput ttft:500 tpot:50
"""

from __future__ import annotations

import argparse
import asyncio
import os
from datetime import UTC, datetime
from pathlib import Path

from k2serve.loadtest.bench_options import BACKENDS, BenchOptions
from k2serve.loadtest.dataset import DATASETS, DatasetOptions

API_KEY_ENV = "K2SERVE_API_KEY"


def add_bench_serve_parser(which: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = which.add_parser("serve", help="online serving benchmark: request-rate / concurrency sweep (vLLM bench serve)")
    target = p.add_argument_group("target")
    target.add_argument("--base-url", default="http://127.0.0.1:8000", help="the router's REST address")
    target.add_argument("--backend", choices=BACKENDS, default="openai-chat")
    target.add_argument("--endpoint", default="/v1/chat/completions", help="chat path (openai-chat backend)")
    target.add_argument("--grpc-target", default="127.0.0.1:50051", help="HOST:PORT of Serving (grpc backend)")
    target.add_argument("--model", default=None, help="model id (default: the server's first model)")
    target.add_argument("--api-key", default=None, help=f"bearer key (default: ${API_KEY_ENV})")
    data = p.add_argument_group("dataset")
    data.add_argument("--dataset-name", choices=DATASETS, default="random")
    data.add_argument("--dataset-path", type=Path, default=None, help="ShareGPT JSON (sharegpt dataset)")
    data.add_argument("--num-prompts", type=int, default=1000, help="requests per point (random, sharegpt)")
    data.add_argument("--random-input-len", type=int, default=1024, help="prompt words")
    data.add_argument("--random-output-len", type=int, default=128, help="max output tokens")
    data.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths in [L(1-r), L(1+r)]")
    data.add_argument("--random-prefix-len", type=int, default=0, help="words shared by every prompt")
    data.add_argument("--sharegpt-output-len", type=int, default=None, help="fixed max output tokens")
    data.add_argument("--agentic-sessions", type=int, default=8, help="agent sessions per point")
    data.add_argument("--agentic-rounds", type=int, default=4, help="requests per session")
    data.add_argument("--agentic-tool-result-len", type=int, default=128, help="words of each tool result")
    data.add_argument("--agentic-system-len", type=int, default=512, help="words of the shared system prompt")
    data.add_argument("--agentic-num-tools", type=int, default=4, help="tools declared (1-4)")
    data.add_argument("--agentic-output-len", type=int, default=128, help="max output tokens per round")
    load = p.add_argument_group("load")
    load.add_argument("--request-rate", type=float, nargs="+", default=[float("inf")], help="req/s per point (inf)")
    load.add_argument("--max-concurrency", type=int, nargs="+", default=None, help="in-flight caps to sweep")
    load.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1 = Poisson)")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--num-warmups", type=int, default=0, help="unmeasured requests before the sweep")
    load.add_argument("--temperature", type=float, default=None, help="default: the server's")
    load.add_argument("--ignore-eos", action="store_true", help="ask the server to ignore end of turn")
    load.add_argument("--request-timeout", type=float, default=600.0, help="seconds one request may take")
    load.add_argument("--point-timeout", type=float, default=3600.0, help="seconds one sweep point may take")
    out = p.add_argument_group("results")
    out.add_argument("--goodput", nargs="+", default=[], metavar="NAME:MS", help="SLOs: ttft:500 tpot:50 e2el:5000")
    out.add_argument("--metric-percentiles", default="50,90,95,99", help="comma-separated percentiles")
    out.add_argument("--result-dir", type=Path, default=None, help="default: bench-results/<UTC timestamp>")
    out.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_bench_serve)
    return p


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    from k2serve.loadtest.bench_metrics import parse_goodput, parse_percentiles

    dataset = DatasetOptions(
        name=args.dataset_name,
        num_prompts=args.num_prompts,
        path=args.dataset_path,
        random_input_len=args.random_input_len,
        random_output_len=args.random_output_len,
        random_range_ratio=args.random_range_ratio,
        random_prefix_len=args.random_prefix_len,
        sharegpt_output_len=args.sharegpt_output_len,
        agentic_sessions=args.agentic_sessions,
        agentic_rounds=args.agentic_rounds,
        agentic_tool_result_len=args.agentic_tool_result_len,
        agentic_system_len=args.agentic_system_len,
        agentic_num_tools=args.agentic_num_tools,
        agentic_output_len=args.agentic_output_len,
    )
    return BenchOptions(
        base_url=args.base_url.rstrip("/"),
        backend=args.backend,
        grpc_target=args.grpc_target,
        endpoint=args.endpoint,
        model=args.model,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        dataset=dataset,
        request_rates=tuple(args.request_rate),
        max_concurrencies=tuple(args.max_concurrency) if args.max_concurrency else (None,),
        burstiness=args.burstiness,
        seed=args.seed,
        num_warmups=args.num_warmups,
        goodput=parse_goodput(args.goodput),
        percentiles=parse_percentiles(args.metric_percentiles),
        request_timeout_s=args.request_timeout,
        point_timeout_s=args.point_timeout,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        progress=not args.no_progress,
    )


def run_bench_serve(args: argparse.Namespace) -> int:
    # numpy, httpx, grpc and matplotlib load only when a benchmark runs, not with the parser.
    try:
        from k2serve.loadtest.bench_serve import run_sweep
        from k2serve.loadtest.plots import write_plots
        from k2serve.loadtest.report import summary_table, write_report
    except ModuleNotFoundError as exc:
        raise ValueError(f"{exc.name} is missing: pip install 'k2serve[loadtest]'") from exc

    options = options_from_args(args)
    result_dir: Path = args.result_dir or Path("bench-results") / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    results = asyncio.run(run_sweep(options))
    written = write_report(result_dir, results, options)
    if not args.no_plots:
        written += write_plots(result_dir, results)
    print(summary_table(results), end="")
    failures = sum(r.metrics.failed for r in results)
    if failures:
        errors = sorted({rec.error for r in results for rec in r.records if rec.error})
        print(f"{failures} request(s) failed; first errors: {errors[:3]}")
    print(f"results in {result_dir} ({len(written)} files)")
    ok = all(r.metrics.failed == 0 and r.metrics.completed == r.num_requests for r in results)
    return 0 if ok and results else 1
