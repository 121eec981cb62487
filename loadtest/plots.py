"""PNG plots of a sweep: latency against output throughput, and percentile bars per point.

Lifecycle: after a sweep, ``write_plots(result_dir, results)`` writes ``latency_vs_throughput.png``
(TTFT p50/p99 and TPOT p50/p99 against output tokens/s, one marker per sweep point, labelled with
its rate / concurrency: the standard serving curve) and ``percentiles.png`` (p50/p90/p99 bars of
TTFT, TPOT, ITL and E2E latency per point). Figures are built with matplotlib's object API on the
Agg canvas (no pyplot, no global backend switch, no display needed) and discarded after saving.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from k2serve.loadtest.bench_serve import PointResult

BAR_PERCENTILES = (50.0, 90.0, 99.0)
PANELS = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency"))
DPI = 110


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI, format="png")
    return path


def _latency_panel(ax: Axes, results: Sequence[PointResult], metric: str, title: str) -> None:
    ok = [r for r in results if r.metrics.completed]
    x = [r.metrics.output_throughput for r in ok]
    for p, style in ((50.0, "o-"), (99.0, "s--")):
        ax.plot(x, [r.metrics.distribution(metric).p(p) for r in ok], style, label=f"p{p:g}")
    for r in ok:
        ax.annotate(
            r.point.label, (r.metrics.output_throughput, r.metrics.distribution(metric).p(99.0)), fontsize=7, alpha=0.7
        )
    ax.set_xlabel("output throughput (tok/s)")
    ax.set_ylabel(f"{title} (ms)")
    ax.set_title(f"{title} vs output throughput")
    ax.grid(alpha=0.3)
    ax.legend()


def plot_latency_vs_throughput(results: Sequence[PointResult], path: Path) -> Path:
    figure = Figure(figsize=(11, 4.5))
    left, right = figure.subplots(1, 2)
    _latency_panel(left, results, "ttft", "TTFT")
    _latency_panel(right, results, "tpot", "TPOT")
    return _save(figure, path)


def plot_percentiles(results: Sequence[PointResult], path: Path) -> Path:
    figure = Figure(figsize=(12, 8))
    axes = figure.subplots(2, 2).ravel()
    labels = [r.point.label for r in results]
    positions = np.arange(len(results))
    width = 0.8 / len(BAR_PERCENTILES)
    for ax, (metric, title) in zip(axes, PANELS, strict=True):
        for i, p in enumerate(BAR_PERCENTILES):
            heights = [r.metrics.distribution(metric).p(p) for r in results]
            ax.bar(positions + (i - 1) * width, heights, width, label=f"p{p:g}")
        ax.set_xticks(positions, labels, rotation=20, fontsize=8)
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    return _save(figure, path)


def write_plots(result_dir: Path, results: Sequence[PointResult]) -> list[Path]:
    result_dir.mkdir(parents=True, exist_ok=True)
    return [
        plot_latency_vs_throughput(results, result_dir / "latency_vs_throughput.png"),
        plot_percentiles(results, result_dir / "percentiles.png"),
    ]
