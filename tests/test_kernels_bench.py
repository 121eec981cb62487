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
from k2serve.kernels import bench, bench_report
from k2serve.kernels.moe_w4a16 import _moe_w4a16_gemm_kernel

DEVICE = kernel_device(_moe_w4a16_gemm_kernel)


class CallOnceTimer:
    """Runs every implementation once (as the real timer would) and reports a fixed time."""

    def run(self, fns: dict[str, Callable[[], object]]) -> dict[str, bench_report.Timing]:
        for fn in fns.values():
            fn()
        return {name: bench_report.Timing(1.0, 0.9, 1.1) for name in fns}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_without_cuda_it_says_so_and_exits_non_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "kernels"]) == 1
    assert "CUDA device is required" in capsys.readouterr().err


def test_cells_and_report_at_toy_shapes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
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
    args = argparse.Namespace(warmup=5, reps=30, quick=False)
    table = bench_report.render(rows, bench_report.Denominators(3000.0, 800.0), "before", "after", args)
    assert table.count("\n| moe_w4a16 |") >= 6
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n## Kernels\n\n<!-- bench:kernels:start -->\nold\n<!-- bench:kernels:end -->\n")
    bench_report.write_section(out, table)
    text = out.read_text()
    assert "old" not in text and text.count("<!-- bench:kernels:start -->") == 1 and "of copy BW" in text
