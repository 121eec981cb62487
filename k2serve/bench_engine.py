"""``k2serve bench engine``: offline throughput of one rank's engine against transformers' ``generate``.

Lifecycle: build a seeded mixed-length workload -> load the model folder once -> run the whole
workload through the k2serve ``Engine`` (all requests queued at once, greedy, ``ignore_eos`` so
every request produces exactly its requested length) -> run the same prompts through Hugging Face
transformers' batched ``generate`` on the same weights, in the same process, one after the other
-> print a table and, with ``--write``, put it into docs/BENCHMARKS.md with the machine description.

Fairness: both sides use the same dtype, threads and weights (experts dequantized). transformers
pads the batch on the left and decodes every row to the longest requested length; only the tokens
each request asked for count as its output, which is what a user of either system receives.

This lives in the top-level package, not ``loadtest/``: it drives the engine in-process (torch),
and DESIGN.md §3 keeps torch out of ``loadtest``, which holds network clients.
"""

from __future__ import annotations

import argparse
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from k2serve.kernels.bench_report import write_section
from k2serve.workers.engine import Engine, EngineConfig
from k2serve.workers.model.kv_cache import allocate_kv_cache
from k2serve.workers.model_loader import load_model
from k2serve.workers.sampling_params import SamplingParams
from k2serve.workers.scheduler import SchedulerConfig


@dataclass(frozen=True)
class Workload:
    prompts: tuple[tuple[int, ...], ...]
    output_lens: tuple[int, ...]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


@dataclass(frozen=True)
class RunResult:
    name: str
    seconds: float
    output_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def make_workload(
    num_requests: int, vocab_size: int, input_lens: tuple[int, int], output_lens: tuple[int, int], seed: int
) -> Workload:
    rng = random.Random(seed)
    prompts = tuple(
        tuple(rng.randrange(vocab_size) for _ in range(rng.randint(*input_lens))) for _ in range(num_requests)
    )
    return Workload(prompts, tuple(rng.randint(*output_lens) for _ in range(num_requests)))


def run_engine(model_dir: str, workload: Workload, args: argparse.Namespace, dtype: torch.dtype) -> RunResult:
    max_len = max(len(p) for p in workload.prompts) + max(workload.output_lens) + 1
    model = load_model(model_dir, dtype=dtype, max_positions=max_len, progress=False)
    blocks = (
        sum(-(-(len(p) + n) // args.block_size) for p, n in zip(workload.prompts, workload.output_lens, strict=True))
        + 1
    )
    cache = allocate_kv_cache(model.config, blocks, args.block_size, dtype, "cpu")
    config = EngineConfig(
        block_size=args.block_size,
        max_model_len=max_len,
        scheduler=SchedulerConfig(
            max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=len(workload.prompts)
        ),
    )
    engine = Engine(model, cache, config)
    start = time.perf_counter()
    for i, (prompt, out_len) in enumerate(zip(workload.prompts, workload.output_lens, strict=True)):
        engine.add_request(f"b{i}", prompt, SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True))
    produced = 0
    for _ in range(1_000_000):  # bounded: far above any workload's step count
        if not engine.has_unfinished_requests():
            break
        produced += sum(len(o.new_token_ids) for o in engine.step())
    seconds = time.perf_counter() - start
    if produced != workload.num_output_tokens:
        raise RuntimeError(f"engine produced {produced} tokens, expected {workload.num_output_tokens}")
    return RunResult("k2serve Engine", seconds, produced)


def run_transformers(model_dir: str, workload: Workload, dtype: torch.dtype) -> RunResult:
    from k2serve.hf_reference import build_hf_model
    from k2serve.workers.config import ModelConfig
    from k2serve.workers.weights import load_weights

    config = ModelConfig.from_model_dir(model_dir)
    hf = build_hf_model(config, load_weights(model_dir, config, dtype=dtype, progress=False)).to(dtype)
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    width = max(len(p) for p in workload.prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in workload.prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in workload.prompts])
    start = time.perf_counter()
    with torch.no_grad():
        hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max(workload.output_lens),
            do_sample=False,
            pad_token_id=pad,
        )
    return RunResult("transformers generate (batched)", time.perf_counter() - start, workload.num_output_tokens)


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {platform.system()} {platform.release()}"
    )


def render(results: list[RunResult], workload: Workload, args: argparse.Namespace) -> str:
    base = results[0]
    lines = [
        f"Workload: {len(workload.prompts)} requests, prompts {args.input_len[0]}–{args.input_len[1]} tokens, "
        f"outputs {args.output_len[0]}–{args.output_len[1]} tokens (seed {args.seed}), greedy, {args.dtype}, "
        f"model `{Path(args.model).name}`.",
        f"Machine: {machine_description()}.",
        f"Rerun: `k2serve bench engine --model DIR --num-requests {len(workload.prompts)} --seed {args.seed} "
        f"--input-len {args.input_len[0]} {args.input_len[1]} --output-len {args.output_len[0]} {args.output_len[1]} "
        f"--dtype {args.dtype}` (DIR from `k2serve make-tiny-model DIR --preset small`).",
        "",
        "| system | seconds | output tokens | output tok/s | time per output token (ms, wall / tokens) | ratio vs k2serve |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.seconds:.2f} | {r.output_tokens} | {r.tokens_per_s:.1f} | "
            f"{1000 * r.seconds / r.output_tokens:.2f} | {r.tokens_per_s / base.tokens_per_s:.2f} |"
        )
    return "\n".join(lines)


def run_bench_engine(args: argparse.Namespace) -> int:
    dtype = getattr(torch, args.dtype)
    from k2serve.workers.config import ModelConfig

    vocab = ModelConfig.from_model_dir(args.model).vocab_size
    workload = make_workload(args.num_requests, vocab, tuple(args.input_len), tuple(args.output_len), args.seed)
    results = [run_engine(args.model, workload, args, dtype)]
    if not args.skip_transformers:
        results.append(run_transformers(args.model, workload, dtype))
    table = render(results, workload, args)
    print(table)
    if args.write:
        write_section(Path(args.write), table, name="engine", heading="Engine (offline, one rank)")
    return 0
