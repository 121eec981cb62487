"""``k2serve bench kv-transfer`` end to end at a tiny size: two processes, every method, requests in
flight at once on the pair's lanes; each method's received rows are checked (CRC32) by the bench itself,
and the table it writes has one row per case."""

from __future__ import annotations

from pathlib import Path

import pytest

from k2serve.bench_kv_case import Case
from k2serve.bench_kv_report import ratio_text
from k2serve.bench_kv_transfer import FLOOR_TAG_BASE, floor_tags
from k2serve.cli import main


def test_the_kv_transfer_bench_moves_every_case_and_writes_its_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the peer process starts here, not in the checkout
    out = tmp_path / "BENCHMARKS.md"
    argv = ["bench", "kv-transfer", "--presets", "tiny", "--tokens", "40", "--in-flight", "1", "3", "--reps", "5"]
    assert main([*argv, "--timeout", "60", "--write", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| preset tiny |")]
    assert [row.split(" | ")[3:5] for row in rows] == [
        ["contiguous", "1"],
        ["contiguous", "3"],
        ["shuffled", "1"],
        ["shuffled", "3"],
    ]
    assert "--in-flight 1 3" in out.read_text()
    header = next(line for line in out.read_text().splitlines() if line.startswith("| model |"))
    columns = header.split(" | ")
    for name in ("**push / raw**", "**pull / raw**", "push floor / raw", "pull floor / raw"):
        assert all(float(row.split(" | ")[columns.index(name)].strip("*")) > 0 for row in rows), name


def test_the_floor_methods_messages_never_share_a_tag() -> None:
    """Every message of the two floor methods (per request: the offer, one per layer, the acknowledgement)
    has a tag of its own across both methods, the warm-up and the repetitions, above the raw method's
    (2 * (rep + 2), + 1)."""
    case = Case("m", num_layers=3, row_dim=8, num_tokens=16, dtype="bfloat16", block_size=4, in_flight=3)
    tags = [
        base + j
        for rep in range(-1, 20)
        for variant in (0, 1)
        for base in floor_tags(case, rep, variant)
        for j in range(case.num_layers + 2)
    ]
    assert len(set(tags)) == len(tags)
    assert min(tags) >= FLOOR_TAG_BASE > 2 * (20 + 2) + 1
    assert max(tags) < 2**31 - 1


def test_a_ratio_just_under_the_goal_never_reads_as_the_goal() -> None:
    assert [ratio_text(r) for r in (0.797, 0.7949, 0.8, 0.8049, 1.234)] == ["0.797", "0.79", "0.80", "0.80", "1.23"]
