"""``k2serve bench kernels``: refuses to run without CUDA, and its cells (correctness check, peers,
table, markdown section) work end to end at toy shapes with a stand-in timer, so the GPU run does
not meet its first bug on the GPU."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from kernel_fixtures import kernel_device

from k2serve.cli import main
from k2serve.kernels import bench, bench_report, bench_sweep
from k2serve.kernels.moe_w4a16 import _moe_w4a16_gemm_kernel

DEVICE = kernel_device(_moe_w4a16_gemm_kernel)


class CallOnceTimer:
    """Runs every implementation once (as the real timer would) and reports a fixed time."""

    def run(self, fns: dict[str, Callable[[], object]]) -> dict[str, bench_report.Timing]:
        for fn in fns.values():
            fn()
        return {name: bench_report.Timing(1.0, 0.9, 1.1) for name in fns}

    def graphed(self, fns: dict[str, Callable[[], object]]) -> dict[str, Callable[[], object]]:
        return dict(fns)  # no capture: the stand-in times the calls themselves


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_without_cuda_it_says_so_and_exits_non_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "kernels"]) == 1
    assert "CUDA device is required" in capsys.readouterr().err


@pytest.fixture
def toy_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "HIDDEN": 64,
        "INTER": 32,
        "TOP_K": 2,
        "HEADS": 4,
        "RANK": 32,
        "ROPE": 64,
        "PAGE": 4,
        "MOE_CELLS": ((3, 2, False), (3, 4, True)),
        "MLA_CELLS": ((2, 12),),
        "KV_WRITE_TOKENS": (8,),
        # the interpreter cannot run tl.dot on bf16 (kernel_fixtures.py); fp16 exercises the same code
        "DTYPE": torch.float16 if DEVICE.type == "cpu" else torch.bfloat16,
    }.items():
        monkeypatch.setattr(bench, name, value)


def test_cells_and_report_at_toy_shapes(toy_shapes: None, tmp_path: Path) -> None:
    timer = CallOnceTimer()
    with torch.no_grad():
        rows = (
            bench.bench_moe(timer, DEVICE, quick=False)  # type: ignore[arg-type]
            + bench.bench_mla(timer, DEVICE, quick=False)  # type: ignore[arg-type]
            + bench.bench_kv_write(timer, DEVICE)  # type: ignore[arg-type]
        )
    timed = {(r.kernel, r.impl) for r in rows if r.timing is not None}
    assert {
        ("moe_w4a16", "triton"),
        ("moe_w4a16", "torch reference"),
        ("moe_w4a16", "bf16 cuBLAS loop (dequantized)"),
    } <= timed
    assert {("mla_decode", "triton"), ("kv_cache_write", "triton")} <= timed
    assert not [r for r in rows if r.note.startswith("NOT TIMED")]  # every kernel passed its check
    graphed = {(r.kernel, r.impl) for r in rows if r.graph is not None}
    assert graphed == {("moe_w4a16", "triton"), ("mla_decode", "triton"), ("kv_cache_write", "triton")}
    args = argparse.Namespace(warmup=5, reps=30, quick=False)
    table = bench_report.render(rows, bench_report.Denominators(3000.0, 800.0), "before", "after", args)
    assert table.count("\n| moe_w4a16 |") >= 6
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n## Kernels\n\n<!-- bench:kernels:start -->\nold\n<!-- bench:kernels:end -->\n")
    bench_report.write_section(out, table)
    text = out.read_text()
    assert "old" not in text and text.count("<!-- bench:kernels:start -->") == 1 and "graph of copy BW" in text


class ByNameTimer:
    """Stand-in timer: each configuration's time is looked up by name (µs / 1000 = ms)."""

    def __init__(self, microseconds: dict[str, float]) -> None:
        self.microseconds = microseconds

    def run(self, fns: dict[str, Callable[[], object]]) -> dict[str, bench_report.Timing]:
        return {name: bench_report.Timing(self.microseconds[name] / 1e3, 0.0, 0.0) for name in fns}

    def graphed(self, fns: dict[str, Callable[[], object]]) -> dict[str, Callable[[], object]]:
        return dict(fns)


def test_a_sweep_cell_times_the_right_configurations_and_reports_the_others() -> None:
    ref = torch.ones(4)

    def fails() -> torch.Tensor:
        raise ValueError("tile too large")

    configs = [("default", lambda: ref.clone()), ("wrong", lambda: ref * 2), ("fails", fails), ("fast", ref.clone)]
    timer = ByNameTimer({"default": 30.0, "fast": 10.0})
    result = bench_sweep._sweep_cell(timer, "k", "cell", configs, ref, seconds=60)
    assert result.timed == {"default": 30.0, "fast": 10.0}
    assert result.failed["wrong"].startswith("wrong") and "tile too large" in result.failed["fails"]
    row = bench_sweep.render_sweep([result], "env", 60).splitlines()[-1]
    assert "| default | 30.0 | fast (10.0), default (30.0) | 0.33 | 4 / 4 | 2 |" in row
    # no time left: the default alone is measured, the rest counted as planned
    only_default = bench_sweep._sweep_cell(timer, "k", "cell", configs, ref, seconds=0)
    assert only_default.timed == {"default": 30.0} and only_default.planned == 4


def test_sweep_runs_every_configuration_of_toy_grids(toy_shapes: None) -> None:
    timer = CallOnceTimer()
    with torch.no_grad():
        mla = bench_sweep.sweep_mla(timer, DEVICE, ((2, 12),), ((16, 16, 4, 2), (16, 32, 4, 1)), seconds=600)
        moe = bench_sweep.sweep_moe(timer, DEVICE, ((3, 2),), ((16, 32, 4, 3),), seconds=600)
    # the default and each grid entry, all checked against the reference and timed
    assert [len(r.timed) for r in mla + moe] == [3, 2] and not any(r.failed for r in mla + moe)
    assert mla[0].default == "h16 n64 w8 s3" and moe[0].default == "m16 n64 k128 w4 s3"
