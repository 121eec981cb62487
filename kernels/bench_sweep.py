"""``k2serve bench kernels --sweep``: time each kernel's tile configurations at the bench's shapes and
name the fastest, so that a new GPU can check (or get) its own defaults.

Lifecycle: one run on one CUDA device -> for each sweep cell: the bench's seeded inputs and the torch
reference -> the configurations of the cell's grid, the current default first, the rest in a fixed
shuffled order: run one, check it against the reference (a configuration that fails or is wrong is
reported, not timed), time it as a replayed CUDA graph -> a cell stops taking configurations after
``seconds`` (``--sweep-seconds``) -> a markdown table: per cell the default, the best three and best / default.

The grids are the ones the H100 sweep of docs/BENCHMARKS.md ran: MLA decode heads per program ×
keys per step × warps × pipeline stages; W4A16 MoE M × N × K tile × warps × stages, with the M tile
chosen by rows per expert (16 for decode, 32–64 in between, 64–128 for prefill).
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from k2serve.kernels import bench
from k2serve.kernels.mla_decode import (
    DEFAULT_BLOCK_N,
    DEFAULT_NUM_STAGES,
    DEFAULT_NUM_WARPS,
    default_block_h,
    mla_decode,
    mla_decode_reference,
)
from k2serve.kernels.moe_w4a16 import MoeGemmConfig, default_config, fused_moe_w4a16, fused_moe_w4a16_reference

# MLA: (block_h, block_n, warps, stages); MoE: (block_n, block_k, warps, stages), M tiles by moe_block_ms
MLA_GRID = tuple(itertools.product((16, 32, 64), (16, 32, 64), (4, 8), (1, 2, 3)))
MOE_TILES_NK = tuple(itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (3, 4)))
MLA_SWEEP_CELLS = bench.MLA_CELLS
MOE_SWEEP_CELLS = ((6, 1), (48, 8), (48, 32), (12, 128), (48, 256), (6, 4096))  # (local experts, tokens)
SHUFFLE_SEED = 0


@dataclass(frozen=True)
class SweepResult:
    kernel: str
    cell: str
    default: str
    timed: dict[str, float]  # configuration -> graph-replayed median µs
    failed: dict[str, str]  # configuration -> why it was not timed
    planned: int


class SweepTimer(Protocol):
    """What the sweep needs of ``bench.Timer``: time replays of captured calls."""

    def run(self, fns: dict[str, Callable[[], object]]) -> dict[str, bench.Timing]: ...

    def graphed(self, fns: dict[str, Callable[[], object]]) -> dict[str, Callable[[], object]]: ...


def moe_block_ms(rows_per_expert: float) -> tuple[int, ...]:
    if rows_per_expert <= 16:
        return (16,)
    return (32, 64) if rows_per_expert <= 1024 else (64, 128)


def _default_first(default: tuple[int, ...], grid: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The default, then the rest of the grid in a fixed shuffled order (a time cap cuts evenly)."""
    rest = [cfg for cfg in grid if cfg != default]
    random.Random(SHUFFLE_SEED).shuffle(rest)
    return [default, *rest]


def _mla_call(tensors: bench.MlaTensors, cfg: tuple[int, ...]) -> Callable[[], torch.Tensor]:
    block_h, block_n, warps, stages = cfg
    return lambda: mla_decode(
        *tensors,
        bench.SOFTMAX_SCALE,
        impl="triton",
        block_h=block_h,
        block_n=block_n,
        num_warps=warps,
        num_stages=stages,
    )


def _moe_call(args: tuple[torch.Tensor, ...], cfg: tuple[int, ...]) -> Callable[[], torch.Tensor]:
    config = MoeGemmConfig(*cfg)
    return lambda: fused_moe_w4a16(*args, impl="triton", config=config)


def _sweep_cell(
    timer: SweepTimer,
    kernel: str,
    cell: str,
    configs: list[tuple[str, Callable[[], torch.Tensor]]],
    ref: torch.Tensor,
    seconds: float,
) -> SweepResult:
    """``configs[0]`` is the default; the loop stops once ``seconds`` have passed (the default always runs)."""
    timed: dict[str, float] = {}
    failed: dict[str, str] = {}
    deadline = time.monotonic() + seconds
    for index, (name, fn) in enumerate(configs):
        if index and time.monotonic() > deadline:
            break
        try:
            err = bench.relative_error(fn(), ref)
            if err > bench.TOLERANCE:
                failed[name] = f"wrong: relative error {err:.1e}"
                continue
            timed[name] = timer.run(timer.graphed({name: fn}))[name].median_ms * 1e3
        except (RuntimeError, ValueError, OutOfResources, CompilationError) as exc:  # e.g. too much shared memory
            failed[name] = f"{type(exc).__name__}: {str(exc)[:60]}"
    return SweepResult(kernel, cell, configs[0][0], timed, failed, len(configs))


def sweep_mla(
    timer: SweepTimer,
    device: torch.device,
    cells: tuple[tuple[int, int], ...],
    grid: tuple[tuple[int, ...], ...],
    seconds: float,
) -> list[SweepResult]:
    gen = torch.Generator(device=device).manual_seed(1)
    results = []
    for num_seqs, context in cells:
        tensors, _, _ = bench.mla_inputs(num_seqs, context, gen, device)
        ref = mla_decode_reference(*tensors, bench.SOFTMAX_SCALE)
        default = (default_block_h(bench.HEADS), DEFAULT_BLOCK_N, DEFAULT_NUM_WARPS, DEFAULT_NUM_STAGES)
        configs = [
            (f"h{c[0]} n{c[1]} w{c[2]} s{c[3]}", _mla_call(tensors, c)) for c in _default_first(default, list(grid))
        ]
        results.append(_sweep_cell(timer, "mla_decode", f"B={num_seqs} L={context}", configs, ref, seconds))
    return results


def sweep_moe(
    timer: SweepTimer,
    device: torch.device,
    cells: tuple[tuple[int, int], ...],
    tiles_nk: tuple[tuple[int, ...], ...],
    seconds: float,
) -> list[SweepResult]:
    gen = torch.Generator().manual_seed(0)
    results = []
    for num_experts, num_tokens in cells:
        w = bench.packed_experts(num_experts, device, gen)
        args, _, _, _ = bench.moe_inputs(w, num_tokens, False, gen, device)
        ref = fused_moe_w4a16_reference(*args)
        pairs = args[1].numel()
        d = default_config(pairs, num_experts)
        default = (d.block_m, d.block_n, d.block_k, d.num_warps, d.num_stages)
        rows_per_expert = pairs / max(min(num_experts, pairs), 1)
        grid = [(m, *nk) for m in moe_block_ms(rows_per_expert) for nk in tiles_nk]
        configs = [
            (f"m{c[0]} n{c[1]} k{c[2]} w{c[3]} s{c[4]}", _moe_call(args, c)) for c in _default_first(default, grid)
        ]
        cell = f"n={num_experts} B={num_tokens} pairs={pairs}"
        results.append(_sweep_cell(timer, "moe_w4a16", cell, configs, ref, seconds))
    return results


def render_sweep(results: list[SweepResult], env: str, seconds: float) -> str:
    lines = [
        f"Environment: {env}.",
        f"Method: each configuration checked against the torch reference, then timed as one replayed CUDA graph "
        f"(median, L2 flushed); at most {seconds:.0f} s of configurations per cell, the default first. "
        "Rerun: `k2serve bench kernels --sweep --write docs/BENCHMARKS.md`.",
        "",
        "| kernel | cell | default | default µs | best three (µs) | best / default | timed / planned | not timed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        best = sorted(r.timed.items(), key=lambda kv: kv[1])[:3]
        default_us = r.timed.get(r.default)
        ratio = f"{best[0][1] / default_us:.2f}" if best and default_us else "–"
        lines.append(
            f"| {r.kernel} | {r.cell} | {r.default} | {f'{default_us:.1f}' if default_us else '–'} | "
            f"{', '.join(f'{name} ({us:.1f})' for name, us in best) or '–'} | {ratio} | "
            f"{len(r.timed) + len(r.failed)} / {r.planned} | {len(r.failed)} |"
        )
    return "\n".join(lines)
