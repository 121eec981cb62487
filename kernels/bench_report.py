"""The report of ``k2serve bench kernels``: result rows, the markdown table, the BENCHMARKS.md section.

Lifecycle: ``kernels/bench.py`` measures and fills ``Row``s; ``render`` turns them into a markdown
table with GB/s and the fraction of the same-run copy bandwidth; ``write_section`` replaces the
block between the kernel markers of docs/BENCHMARKS.md (adding a "Kernels" section if absent).
"""

from __future__ import annotations

import argparse
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
import triton


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float


@dataclass(frozen=True)
class Row:
    kernel: str
    shape: str
    impl: str
    timing: Timing | None  # None: not timed (see note)
    bytes_moved: float
    flops: float
    note: str = ""
    graph: Timing | None = None  # the same call replayed as a CUDA graph (kernels under test only)


@dataclass(frozen=True)
class Denominators:
    copy_gbs: float  # device-to-device copy, bytes read + written per second / 1e9
    gemm_tflops: float  # cuBLAS bf16 8192³


def environment(device: torch.device) -> str:
    query = "name,driver_version,clocks.sm,clocks.mem,clocks.max.sm"
    try:
        smi = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        smi = "nvidia-smi unavailable"
    return (
        f"GPU {torch.cuda.get_device_name(device)}; nvidia-smi ({query}): {smi or 'n/a'}; "
        f"torch {torch.__version__} (CUDA {torch.version.cuda}); Triton {triton.__version__}"
    )


def render(
    rows: list[Row], denominators: Denominators, env_before: str, env_after: str, args: argparse.Namespace
) -> str:
    lines = [
        f"Environment before: {env_before}.",
        f"Environment after: {env_after}.",
        f"Same-run denominators: device-to-device copy **{denominators.copy_gbs:.0f} GB/s** (read + write), "
        f"cuBLAS bf16 8192³ **{denominators.gemm_tflops:.0f} TFLOP/s**.",
        f"Method: {args.warmup} warm-ups, {args.reps} interleaved repetitions, median (p10–p90), L2 flushed, eager; "
        "graph µs: the same call captured once as a CUDA graph and replayed (GPU time without Python and launches). "
        f"Rerun: `k2serve bench kernels{' --quick' if args.quick else ''} --write docs/BENCHMARKS.md`.",
        "",
        "| kernel | shape | implementation | median µs | p10–p90 µs | min bytes (MB) | GB/s | of copy BW "
        "| graph µs | graph of copy BW | TFLOP/s (graph where timed) | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.timing is None:
            lines.append(
                f"| {r.kernel} | {r.shape} | {r.impl} | – | – | {r.bytes_moved / 1e6:.1f} | – | – | – | – | – | {r.note} |"
            )
            continue
        gbs = r.bytes_moved / (r.timing.median_ms / 1e3) / 1e9
        graph, graph_share = "–", "–"
        if r.graph is not None:
            graph = f"{r.graph.median_ms * 1e3:.1f}"
            graph_share = f"{r.bytes_moved / (r.graph.median_ms / 1e3) / 1e9 / denominators.copy_gbs:.2f}"
        seconds = (r.graph or r.timing).median_ms / 1e3
        tflops = f"{r.flops / seconds / 1e12:.1f}" if r.flops else "–"
        lines.append(
            f"| {r.kernel} | {r.shape} | {r.impl} | {r.timing.median_ms * 1e3:.1f} | "
            f"{r.timing.p10_ms * 1e3:.1f}–{r.timing.p90_ms * 1e3:.1f} | {r.bytes_moved / 1e6:.1f} | {gbs:.0f} | "
            f"{gbs / denominators.copy_gbs:.2f} | {graph} | {graph_share} | {tflops} | {r.note} |"
        )
    return "\n".join(lines)


def write_section(path: Path, body: str, *, name: str = "kernels", heading: str = "Kernels") -> None:
    """Replace the ``<!-- bench:{name}:start/end -->`` block of ``path`` (append it under ``heading``)."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    block = f"{start}\n{body}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## {heading}\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")
