"""Result files of a sweep: one JSON per point, the combined ``results.json`` and ``summary.md``.

Lifecycle: after ``run_sweep`` returns, ``write_report(result_dir, results, options)`` writes
``point-NN-rateR[-concC].json`` (config, point, metrics with vLLM's key names, every record's
measurements), ``results.json`` (the same without records, all points) and ``summary.md`` (the
sweep table of ``summary_table``: one row per point). ``results.json`` and the point files carry
the date, the k2serve version, the target and the dataset. Pure apart from the writes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from k2serve.loadtest.bench_options import BenchOptions, rate_text
from k2serve.loadtest.bench_serve import PointResult

COLUMNS = (
    "rate (req/s)",
    "max conc.",
    "completed",
    "failed",
    "req/s",
    "output tok/s",
    "TTFT p50 (ms)",
    "TTFT p99 (ms)",
    "TPOT p50 (ms)",
    "TPOT p99 (ms)",
    "ITL p99 (ms)",
    "E2E p99 (ms)",
    "goodput (req/s)",
)


def k2serve_version() -> str:
    try:
        return metadata.version("k2serve")
    except metadata.PackageNotFoundError:
        return "unknown"


def _header(options: BenchOptions, model: str) -> dict[str, Any]:
    return {
        "k2serve_version": k2serve_version(),
        "backend": options.backend,
        "base_url": options.base_url,
        "grpc_target": options.grpc_target if options.backend == "grpc" else None,
        "model": model,
        "dataset": options.dataset.name,
        "config": options.to_json(),
    }


def point_json(result: PointResult, options: BenchOptions, *, with_records: bool = True) -> dict[str, Any]:
    out = {
        "date": result.started_at,
        **_header(options, result.model),
        "point": result.point.to_json(),
        "request_rate": rate_text(result.point.request_rate),
        "burstiness": options.burstiness,
        "max_concurrency": result.point.max_concurrency,
        "num_prompts": result.num_requests,
        "metrics": result.metrics.to_json(),
    }
    if with_records:
        out["records"] = [r.to_json() for r in result.records]
    return out


def sweep_json(results: Sequence[PointResult], options: BenchOptions) -> dict[str, Any]:
    model = results[0].model if results else options.model or ""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        **_header(options, model),
        "points": [point_json(r, options, with_records=False) for r in results],
    }


def _ms(value: float) -> str:
    return f"{value:.1f}"


def summary_table(results: Sequence[PointResult]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---:" for _ in COLUMNS) + "|"]
    for r in results:
        m = r.metrics
        latencies = [m.ttft.p(50), m.ttft.p(99), m.tpot.p(50), m.tpot.p(99), m.itl.p(99), m.e2el.p(99)]
        cells = [
            rate_text(r.point.request_rate),
            "-" if r.point.max_concurrency is None else str(r.point.max_concurrency),
            str(m.completed),
            str(m.failed),
            f"{m.request_throughput:.2f}",
            f"{m.output_throughput:.1f}",
            *(_ms(v) if m.completed else "-" for v in latencies),
            "-" if m.request_goodput is None else f"{m.request_goodput:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_markdown(results: Sequence[PointResult], options: BenchOptions) -> str:
    model = results[0].model if results else options.model or ""
    slos = ", ".join(f"{k} ≤ {v:g} ms" for k, v in options.goodput.items()) or "none"
    return (
        f"# k2serve bench serve — {options.dataset.name} dataset\n\n"
        f"- target: `{options.target}` ({options.backend}), model `{model}`, k2serve {k2serve_version()}\n"
        f"- date: {datetime.now(UTC).isoformat(timespec='seconds')}, seed {options.seed}, "
        f"burstiness {options.burstiness:g}, goodput SLOs: {slos}\n\n" + summary_table(results)
    )


def write_report(result_dir: Path, results: Sequence[PointResult], options: BenchOptions) -> list[Path]:
    result_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for result in results:
        path = result_dir / f"{result.point.file_stem}.json"
        path.write_text(json.dumps(point_json(result, options), indent=2) + "\n", encoding="utf-8")
        written.append(path)
    combined = result_dir / "results.json"
    combined.write_text(json.dumps(sweep_json(results, options), indent=2) + "\n", encoding="utf-8")
    summary = result_dir / "summary.md"
    summary.write_text(summary_markdown(results, options), encoding="utf-8")
    return [*written, combined, summary]
