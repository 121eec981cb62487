"""``k2serve bench kv-transfer`` end to end at a tiny size: two processes, every method, requests in
flight at once on the pair's lanes; each method's received rows are checked (CRC32) by the bench itself,
and the table it writes has one row per case."""

from __future__ import annotations

from pathlib import Path

import pytest

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
