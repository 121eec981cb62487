"""``k2serve bench kernels``: the kernels at real Kimi K2 shapes against same-run ceilings and peers.

Lifecycle: one run on one CUDA device -> environment (GPU, driver, clocks, torch, Triton) ->
denominators measured in the same run (device-to-device copy bandwidth, cuBLAS bf16 8192³ rate)
-> for every cell of the shape grid below: build seeded inputs, check every implementation against
the torch reference (cells that fail are reported, not timed), then time all of them interleaved
(ABAB) with CUDA events -> print a markdown table; ``--write PATH`` puts it into that file between
markers (docs/BENCHMARKS.md). Without CUDA it prints why and exits 1.

Method (reference performance.md §9): ≥ 5 warm-ups and ≥ 30 timed repetitions per implementation,
median with p10/p90, L2 flushed (a 256 MB write) before each timed call, eager launches on both
sides (launch overhead included everywhere), correctness before timing (max relative error ≤ 1e-2
for bf16 outputs, bit-exact for the cache write). The kernels under test are timed a second way,
as one CUDA graph replayed (same flush, same count): the GPU time without Python and launch costs,
what a decode step captured in a graph pays. The peers sync with the host and cannot be captured. Bandwidth = bytes the kernel must move at least
(weights of the touched experts, scales, activations; KV rows of the context) ÷ median time.

Shape grid (fixed before any measurement; K2: hidden 7168, moe_intermediate 2048, group 32, top-8,
64 heads, latent 512 + rope 64, pages of 64 tokens):
- MoE W4A16 (``fused_moe_w4a16``): local experts n ∈ {6, 12, 48} (EP64/32/8), tokens B ∈ {1, 8,
  32, 128, 256}, i.e. 8·B (token, expert) rows as the rank receives them after dispatch, uniform
  routing, plus Zipf(s=1) routing at B = 32, and a prefill cell of B = 4096 (32k pairs) at n = 6. Peers: the torch reference (dequantize touched
  experts, matmul), tinygemm (``torch._weight_int4pack_mm``) looped over touched experts, and bf16
  cuBLAS looped over pre-dequantized touched experts (the compute ceiling, not a W4A16 kernel).
- MLA decode (``mla_decode``): (B, L) ∈ {(1, 4k), (32, 4k), (128, 4k), (32, 32k), (8, 128k)};
  peer: the torch reference (paged gather + fp32 einsum + softmax).
- KV cache write (``kv_cache_write``): T ∈ {128, 8192} rows into a 64-token paged cache; peer:
  the torch reference (index_put).
Goals (issue 4): MoE ≥ 0.6 of copy bandwidth for ≤ 64 tokens per expert; MLA ≥ 0.7 of copy
bandwidth for contexts ≥ 4k.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from k2serve.kernels.bench_report import Denominators, Row, Timing, environment, render, write_section
from k2serve.kernels.kv_cache_write import kv_cache_write, kv_cache_write_reference
from k2serve.kernels.mla_decode import mla_decode, mla_decode_reference
from k2serve.kernels.moe_w4a16 import dequantize_int4_reference, fused_moe_w4a16, fused_moe_w4a16_reference

HIDDEN, INTER, GROUP, TOP_K = 7168, 2048, 32, 8
HEADS, RANK, ROPE, PAGE = 64, 512, 64, 64
SOFTMAX_SCALE = 0.1446796
DTYPE = torch.bfloat16  # activations, scales and KV cache, as in the K2 Thinking checkpoint
TOLERANCE = 1e-2
FLUSH_BYTES = 256 * 2**20
GRAPHED = ("triton",)  # implementations also timed as a replayed CUDA graph
# The shape grid, fixed before measuring: (local experts, tokens, zipf routing), (sequences, context), rows.
MOE_CELLS = (
    *((n, b, False) for n in (6, 12, 48) for b in (1, 8, 32, 128, 256)),
    *((n, 32, True) for n in (6, 12, 48)),
    (6, 4096, False),
)
MOE_QUICK_CELLS = ((6, 1, False), (6, 32, False))
MLA_CELLS = ((1, 4096), (32, 4096), (128, 4096), (32, 32768), (8, 131072))
MLA_QUICK_CELLS = ((1, 4096), (32, 4096))
KV_WRITE_TOKENS = (128, 8192)


class Timer:
    """Interleaved CUDA-event timing of several implementations of one cell."""

    def __init__(self, warmup: int, reps: int, device: torch.device) -> None:
        self.warmup, self.reps = warmup, reps
        self.flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device)

    def run(self, fns: dict[str, Callable[[], object]]) -> dict[str, Timing]:
        for fn in fns.values():
            for _ in range(self.warmup):
                fn()
        samples: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(self.reps):
            for name, fn in fns.items():  # A B A B ...: drift hits every implementation alike
                self.flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end))
        return {name: _summary(times) for name, times in samples.items()}

    def graphed(self, fns: dict[str, Callable[[], object]]) -> dict[str, Callable[[], object]]:
        """One CUDA graph per function (captured after two calls on a side stream); returns the replays."""
        replays: dict[str, Callable[[], object]] = {}
        for name, fn in fns.items():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
                fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            replays[name] = graph.replay
        return replays


def _summary(times: list[float]) -> Timing:
    deciles = statistics.quantiles(times, n=10)
    return Timing(statistics.median(times), deciles[0], deciles[-1])


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.float(), ref.float()
    if not bool(torch.isfinite(ours).all()):
        return float("inf")
    scale = ref.abs().max().item()
    return (ours - ref).abs().max().item() / scale if scale > 0 else (ours - ref).abs().max().item()


def measure_denominators(timer: Timer, device: torch.device) -> Denominators:
    return Denominators(_copy_gbs(timer, device), _gemm_tflops(timer, device))


def _copy_gbs(timer: Timer, device: torch.device) -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    copy = timer.run({"copy": lambda: dst.copy_(src)})["copy"]
    return 2 * 2**30 / copy.median_ms / 1e6  # read + write, bytes per ms -> GB/s


def _gemm_tflops(timer: Timer, device: torch.device) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    gemm = timer.run({"gemm": lambda: a @ b})["gemm"]
    return 2 * 8192**3 / gemm.median_ms / 1e9


# ----------------------------------------------------------------------------------------- MoE


def packed_experts(num_experts: int, device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random packed INT4 experts at K2 shapes (every nibble value occurs) and bf16 scales ~ 1/(7.5·√K)."""
    out = []
    for rows, cols in ((2 * INTER, HIDDEN), (HIDDEN, INTER)):
        words = torch.randint(-(2**31), 2**31 - 1, (num_experts, rows, cols // 8), generator=gen, dtype=torch.int32)
        scale = torch.full((num_experts, rows, cols // GROUP), 1.0 / (7.5 * cols**0.5), dtype=DTYPE)
        out += [words.to(device), scale.to(device)]
    return tuple(out)


def _routing(
    num_tokens: int, num_experts: int, zipf: bool, gen: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8·B pairs as an EP rank receives them after dispatch: one row per (token, expert) pair,
    ids [8B, 1] over the local experts (uniform or Zipf s=1), combine weights in (0, 1)."""
    probs = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) if zipf else torch.ones(num_experts)
    ids = torch.multinomial(probs, TOP_K * num_tokens, replacement=True, generator=gen)[:, None]  # [8B, 1]
    weights = torch.rand(ids.shape, generator=gen)
    return ids.to(device), weights.to(device)


def _tinygemm_experts(*w: torch.Tensor, touched: list[int]) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """tinygemm layout of each touched expert: uint8 [N, K/2] (high nibble = even column) -> int4pack,
    scales_and_zeros [K/G, N, 2] with zero 0 (tinygemm dequantizes (q - 8)·s + z)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=w[0].device)
    packed = {}
    for e in touched:
        mats = []
        for words, scale in ((w[0][e], w[1][e]), (w[2][e], w[3][e])):
            nibbles = ((words[..., None] >> shifts) & 0xF).reshape(words.shape[0], -1)  # [N, K] 0..15
            as_uint8 = (nibbles[:, ::2] << 4 | nibbles[:, 1::2]).to(torch.uint8)
            weight = torch._convert_weight_to_int4pack(as_uint8.contiguous(), 8)
            scales_zeros = torch.stack((scale.t(), torch.zeros_like(scale.t())), dim=-1).contiguous()  # [K/G, N, 2]
            mats.append((weight, scales_zeros))
        packed[e] = mats
    return packed


def _looped(
    hidden: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    touched: list[int],
    expert_fn: Callable[[int, int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Σ_k w·Expert(x) with one call pair per touched expert (the peers' structure)."""
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for e in touched:
        rows, slot = (ids == e).nonzero(as_tuple=True)
        gate_up = expert_fn(e, 0, hidden[rows])
        gate, up = gate_up.split(INTER, dim=-1)
        out.index_add_(0, rows, expert_fn(e, 1, F.silu(gate) * up).float() * weights[rows, slot, None])
    return out.to(hidden.dtype)


def bench_moe(timer: Timer, device: torch.device, quick: bool) -> list[Row]:
    gen = torch.Generator().manual_seed(0)
    cells = MOE_QUICK_CELLS if quick else MOE_CELLS
    rows: list[Row] = []
    experts: dict[int, tuple[torch.Tensor, ...]] = {}
    for num_experts, num_tokens, zipf in cells:
        if num_experts not in experts:
            experts.clear()
            torch.cuda.empty_cache()
            experts[num_experts] = packed_experts(num_experts, device, gen)
        rows += _moe_cell(timer, experts[num_experts], num_tokens, zipf, gen, device)
    return rows


def moe_inputs(
    w: tuple[torch.Tensor, ...], num_tokens: int, zipf: bool, gen: torch.Generator, device: torch.device
) -> tuple[tuple[torch.Tensor, ...], list[int], float, float]:
    """Seeded ``fused_moe_w4a16`` arguments for the experts ``w`` (``packed_experts``): (hidden, ids,
    weights, *w), the touched experts, the least bytes a call moves and its FLOPs."""
    num_experts = w[0].shape[0]
    ids, weights = _routing(num_tokens, num_experts, zipf, gen, device)
    hidden = torch.randn(ids.shape[0], HIDDEN, generator=gen).to(device, DTYPE)  # one row per pair
    touched = sorted(set(ids.flatten().tolist()))
    per_expert = sum(t.numel() * t.element_size() for t in w) / num_experts
    moved = len(touched) * per_expert + 2 * hidden.numel() * hidden.element_size()
    flops = 6.0 * ids.numel() * HIDDEN * INTER
    return (hidden, ids, weights, *w), touched, moved, flops


def _moe_cell(
    timer: Timer, w: tuple[torch.Tensor, ...], num_tokens: int, zipf: bool, gen: torch.Generator, device: torch.device
) -> list[Row]:
    (hidden, ids, weights, *_), touched, moved, flops = moe_inputs(w, num_tokens, zipf, gen, device)
    routing = "zipf" if zipf else "uniform"
    shape = f"n={w[0].shape[0]} B={num_tokens} pairs={ids.numel()} {routing} touched={len(touched)}"
    ref = fused_moe_w4a16_reference(hidden, ids, weights, *w)
    fns: dict[str, Callable[[], object]] = {
        "triton": lambda: fused_moe_w4a16(hidden, ids, weights, *w, impl="triton"),
        "torch reference": lambda: fused_moe_w4a16_reference(hidden, ids, weights, *w),
    }
    notes: dict[str, str] = {}
    try:
        tiny = _tinygemm_experts(*w, touched=touched)

        def tinygemm(e: int, p: int, x: torch.Tensor) -> torch.Tensor:
            return torch._weight_int4pack_mm(x, tiny[e][p][0], GROUP, tiny[e][p][1])

        fns["tinygemm loop"] = lambda: _looped(hidden, ids, weights, touched, tinygemm)
    except (RuntimeError, TypeError) as exc:
        notes["tinygemm loop"] = f"not run: {type(exc).__name__}: {str(exc)[:80]}"
    dense = {
        e: tuple(dequantize_int4_reference(w[2 * p][e], w[2 * p + 1][e], GROUP, DTYPE) for p in (0, 1)) for e in touched
    }

    def cublas(e: int, p: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dense[e][p])

    fns["bf16 cuBLAS loop (dequantized)"] = lambda: _looped(hidden, ids, weights, touched, cublas)
    return _time_cell(timer, "moe_w4a16", shape, fns, ref, moved, flops, notes)


# ----------------------------------------------------------------------------------------- MLA


def bench_mla(timer: Timer, device: torch.device, quick: bool) -> list[Row]:
    gen = torch.Generator(device=device).manual_seed(1)
    cells = MLA_QUICK_CELLS if quick else MLA_CELLS
    rows: list[Row] = []
    for num_seqs, context in cells:
        rows += _mla_cell(timer, num_seqs, context, gen, device)
        torch.cuda.empty_cache()
    return rows


MlaTensors = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]  # q_lat, q_pe, cache, tables, lens


def mla_inputs(
    num_seqs: int, context: int, gen: torch.Generator, device: torch.device
) -> tuple[MlaTensors, float, float]:
    """Seeded ``mla_decode`` tensors at K2 shapes (full contexts, shuffled pages; the softmax scale is
    ``SOFTMAX_SCALE``), the least bytes a call moves, and its FLOPs."""
    blocks = num_seqs * context // PAGE
    cache = torch.randn(blocks, PAGE, RANK + ROPE, generator=gen, device=device).to(DTYPE)
    tables = torch.randperm(blocks, generator=gen, device=device).int().view(num_seqs, context // PAGE)
    seq_lens = torch.full((num_seqs,), context, dtype=torch.int32, device=device)
    q_lat = torch.randn(num_seqs, HEADS, RANK, generator=gen, device=device).to(DTYPE)
    q_pe = torch.randn(num_seqs, HEADS, ROPE, generator=gen, device=device).to(DTYPE)
    moved = num_seqs * context * (RANK + ROPE) * 2 + num_seqs * HEADS * (2 * RANK + ROPE) * 2
    flops = 2.0 * num_seqs * context * HEADS * (RANK + ROPE + RANK)
    return (q_lat, q_pe, cache, tables, seq_lens), moved, flops


def _mla_cell(timer: Timer, num_seqs: int, context: int, gen: torch.Generator, device: torch.device) -> list[Row]:
    tensors, moved, flops = mla_inputs(num_seqs, context, gen, device)
    ref = mla_decode_reference(*tensors, SOFTMAX_SCALE)
    fns: dict[str, Callable[[], object]] = {
        "triton": lambda: mla_decode(*tensors, SOFTMAX_SCALE, impl="triton"),
        "torch reference": lambda: mla_decode_reference(*tensors, SOFTMAX_SCALE),
    }
    return _time_cell(timer, "mla_decode", f"B={num_seqs} L={context}", fns, ref, moved, flops, {})


def bench_kv_write(timer: Timer, device: torch.device) -> list[Row]:
    rows: list[Row] = []
    for num_tokens in KV_WRITE_TOKENS:
        rows += _kv_write_cell(timer, num_tokens, device)
    return rows


def _kv_write_cell(timer: Timer, num_tokens: int, device: torch.device) -> list[Row]:
    cache = torch.zeros(2 * num_tokens // PAGE + 1, PAGE, RANK + ROPE, dtype=DTYPE, device=device)
    new = torch.randn(num_tokens, RANK + ROPE, device=device).to(DTYPE)
    slots = torch.randperm(cache.shape[0] * PAGE, device=device)[:num_tokens]
    expected, ours = cache.clone(), cache.clone()
    kv_cache_write_reference(expected, slots, new)
    kv_cache_write(ours, slots, new, impl="triton")
    moved = 2.0 * new.numel() * new.element_size()  # read the rows, write them
    shape = f"T={num_tokens}"
    if not torch.equal(ours.view(torch.int16), expected.view(torch.int16)):
        return [Row("kv_cache_write", shape, "triton", None, moved, 0.0, "NOT TIMED: not bit-exact")]
    fns: dict[str, Callable[[], object]] = {
        "triton": lambda: kv_cache_write(cache, slots, new, impl="triton"),
        "torch reference": lambda: kv_cache_write_reference(cache, slots, new),
    }
    timings = timer.run(fns)
    graphs = _graph_timings(timer, fns)
    return [Row("kv_cache_write", shape, name, t, moved, 0.0, graph=graphs.get(name)) for name, t in timings.items()]


def _time_cell(
    timer: Timer,
    kernel: str,
    shape: str,
    fns: dict[str, Callable[[], object]],
    ref: torch.Tensor,
    moved: float,
    flops: float,
    notes: dict[str, str],
) -> list[Row]:
    rows = [Row(kernel, shape, name, None, moved, flops, note) for name, note in notes.items()]
    checked: dict[str, Callable[[], object]] = {}
    for name, fn in fns.items():
        try:
            out = fn()
        except (RuntimeError, TypeError, ValueError) as exc:
            rows.append(Row(kernel, shape, name, None, moved, flops, f"not run: {type(exc).__name__}: {str(exc)[:80]}"))
            continue
        err = relative_error(out, ref) if isinstance(out, torch.Tensor) else 0.0
        if err > TOLERANCE:
            rows.append(Row(kernel, shape, name, None, moved, flops, f"NOT TIMED: relative error {err:.2e}"))
        else:
            checked[name] = fn
    timings = timer.run(checked) if checked else {}
    graphs = _graph_timings(timer, checked)
    return [Row(kernel, shape, name, t, moved, flops, graph=graphs.get(name)) for name, t in timings.items()] + rows


def _graph_timings(timer: Timer, fns: dict[str, Callable[[], object]]) -> dict[str, Timing]:
    """The ``GRAPHED`` implementations among ``fns``, each timed as a replayed CUDA graph."""
    return timer.run(timer.graphed({name: fn for name, fn in fns.items() if name in GRAPHED}))


def run_bench_kernels(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print(
            "k2serve bench kernels: a CUDA device is required (the kernels' GPU speed cannot be measured on CPU; "
            "their correctness is tested on CPU under TRITON_INTERPRET=1 by tests/test_kernels_*.py)",
            file=sys.stderr,
        )
        return 1
    args.warmup = max(getattr(args, "warmup", 5), 5)
    args.reps = max(getattr(args, "reps", 30), 30)
    args.quick = getattr(args, "quick", False)
    device = torch.device("cuda")
    env_before = environment(device)
    timer = Timer(args.warmup, args.reps, device)
    if getattr(args, "sweep", False):
        return _run_sweep(timer, device, env_before, args)
    denominators = measure_denominators(timer, device)
    with torch.no_grad():
        rows = (
            bench_moe(timer, device, args.quick) + bench_mla(timer, device, args.quick) + bench_kv_write(timer, device)
        )
    table = render(rows, denominators, env_before, environment(device), args)
    print(table)
    if args.write:
        write_section(Path(args.write), table)
    return 0


def _run_sweep(timer: Timer, device: torch.device, env: str, args: argparse.Namespace) -> int:
    from k2serve.kernels import bench_sweep

    seconds = args.sweep_seconds
    mla_cells = MLA_QUICK_CELLS if args.quick else bench_sweep.MLA_SWEEP_CELLS
    moe_cells = bench_sweep.MOE_SWEEP_CELLS[:2] if args.quick else bench_sweep.MOE_SWEEP_CELLS
    with torch.no_grad():
        results = bench_sweep.sweep_mla(timer, device, mla_cells, bench_sweep.MLA_GRID, seconds)
        results += bench_sweep.sweep_moe(timer, device, moe_cells, bench_sweep.MOE_TILES_NK, seconds)
    table = bench_sweep.render_sweep(results, env, seconds)
    print(table)
    if args.write:
        write_section(Path(args.write), table, name="kernel_sweep", heading="Kernel tile sweep")
    return 0
