"""``k2serve bench load-step``'s pure parts: its cluster YAML is a valid config, and the summary that
docs/PLANNING.md quotes (settle time, p90 TTFT after the scale-up settled, per phase, decisions)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from k2serve.bench_load_step import cluster_yaml, summarize
from k2serve.cluster.config import ClusterConfig

PHASES = [{"rate": 1.0, "start": 0.0, "end": 10.0}, {"rate": 5.0, "start": 10.0, "end": 40.0}, {"rate": 1.0, "start": 40.0, "end": 60.0}]  # fmt: skip


def test_the_bench_cluster_yaml_is_a_valid_config_with_the_autoscaler_on(tmp_path: Path) -> None:
    args = argparse.Namespace(ttft_slo=2.0, max_prefill_groups=3)
    config = ClusterConfig.from_dict(cluster_yaml(tmp_path, args, 8000, 9000))
    assert config.autoscaler.enabled and config.autoscaler.pool("prefill").max_groups == 3
    assert config.metrics.controller_port == 9000 and config.router.port == 8000


def test_the_summary_measures_ttft_after_the_prefill_pool_reached_its_peak() -> None:
    groups = [
        {"t": 5.0, "prefill_ready": 1, "decode_ready": 1},
        {"t": 15.0, "prefill_ready": 2, "decode_ready": 1},
        {"t": 20.0, "prefill_ready": 3, "decode_ready": 1, "prefill up (queue)": 1.0},
        {"t": 50.0, "prefill_ready": 1, "decode_ready": 1, "prefill up (queue)": 1.0, "prefill down (idle)": 2.0},
    ]
    slow = [{"t": 12.0 + i * 0.1, "ttft": 8.0, "ok": True, "error": ""} for i in range(10)]  # before the settle
    fast = [{"t": 26.0 + i, "ttft": 0.5 + i / 100, "ok": True, "error": ""} for i in range(10)]  # after settle + 5 s
    low = [{"t": 45.0, "ttft": 0.3, "ok": True, "error": ""}, {"t": 46.0, "ttft": 0.0, "ok": False, "error": "x"}]
    s = summarize(slow + fast + low, PHASES, groups, 2.0)["summary"]
    assert s["scale_up_settled_at_s"] == 20.0 and s["prefill_groups_peak"] == 3 and s["prefill_groups_end"] == 1
    assert s["ttft_p90_after_settle_s"] == pytest.approx(0.581)  # the slow requests before the settle are out
    assert [p["requests"] for p in s["phases"]] == [0, 20, 1] and s["phases"][0]["ttft_p90_s"] is None
    assert s["failed"] == 1 and s["scale_decisions"] == {"prefill up (queue)": 1.0, "prefill down (idle)": 2.0}
