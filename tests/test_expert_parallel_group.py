"""Expert-parallel groups as real processes (``k2serve worker`` ranks, gloo on loopback) against the
greedy fp32 oracle of the tiny model: EP=2 and EP=4 with requests spread unevenly (ranks idle for a
while), EPLB replication on a skewed router, and a rank killed mid-stream.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file

from k2serve.tiny_model import make_tiny_model
from k2serve.workers.config import ModelConfig
from k2serve.workers.greedy import greedy_generate
from k2serve.workers.group_launcher import launch_group, tokens_by_request
from k2serve.workers.model_loader import load_model

MAX_TOKENS = 10
RUN_TIMEOUT_S = 150


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("ep") / "tiny", preset="tiny", seed=3)


def _requests(count: int, seed: int, max_tokens: int = MAX_TOKENS) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {
            "request_id": f"s{seed}-{i}",
            "prompt_token_ids": [rng.randrange(512) for _ in range(rng.randrange(2, 40))],
            "max_tokens": max_tokens,
            "ignore_eos": True,
        }
        for i in range(count)
    ]


def _oracle(model_dir: Path, requests: list[dict[str, Any]]) -> dict[str, list[int]]:
    model = load_model(model_dir, dtype=torch.float32, max_positions=128, progress=False)
    return {
        r["request_id"]: greedy_generate(model, r["prompt_token_ids"], max_tokens=r["max_tokens"]) for r in requests
    }


def _run(model_dir: Path, per_rank: list[list[dict[str, Any]]], workdir: Path, *args: str) -> Any:
    group = launch_group(model_dir, per_rank, workdir, worker_args=args, timeout_s=20.0)
    codes = group.wait(RUN_TIMEOUT_S)
    assert codes == [0] * group.size, "\n".join(group.log(r)[-3000:] for r in range(group.size))
    return group


@pytest.mark.parametrize("ep_size", [2, 4])
def test_group_matches_the_greedy_oracle_with_uneven_ranks(model_dir: Path, tmp_path: Path, ep_size: int) -> None:
    # rank 0 gets most of the work at once; rank 1 only joins late; the others stay idle or nearly
    busy, late, few = _requests(6, seed=1), _requests(2, seed=2), _requests(1, seed=3)
    per_rank: list[list[dict[str, Any]]] = [busy, [dict(r, arrival_step=15) for r in late]]
    per_rank += [[] for _ in range(ep_size - 2)]
    if ep_size > 2:
        per_rank[-1] = [dict(r, arrival_step=5) for r in few]
    everything = [r for rank in per_rank for r in rank]
    group = _run(model_dir, per_rank, tmp_path)

    served: dict[str, list[int]] = {}
    for rank in range(ep_size):
        records = group.records(rank)
        finals = [r for r in records if "finish_reason" in r]
        assert sorted(r["request_id"] for r in finals) == sorted(q["request_id"] for q in per_rank[rank])
        assert all(r["finish_reason"] == "length" for r in finals)
        served |= tokens_by_request(records)
    assert served == _oracle(model_dir, everything)

    stats = [group.stats(r) for r in range(ep_size)]
    assert len({s["steps"] for s in stats}) == 1  # lockstep: every rank stepped the same number of times
    assert all(
        s["dispatch_calls"] == s["steps"] * len(ModelConfig.from_model_dir(model_dir).moe_layer_ids) for s in stats
    )
    idle = stats[2] if ep_size > 2 else stats[1]
    assert idle["dispatch_bytes"] < stats[0]["dispatch_bytes"]


def _skew_router(src: Path, dst: Path, hot: dict[int, float]) -> Path:
    """Copy the model and bias its gates so that a few experts (all on rank 0 initially) win most tokens."""
    shutil.copytree(src, dst)
    for shard in dst.glob("*.safetensors"):
        tensors = load_file(shard)
        changed = False
        for name, tensor in tensors.items():
            if name.endswith("mlp.gate.e_score_correction_bias"):
                for expert, bias in hot.items():
                    tensor[expert] += bias
                changed = True
        if changed:
            save_file(tensors, shard, metadata={"format": "pt"})
    return dst


def test_eplb_replication_keeps_outputs_and_lowers_measured_imbalance(model_dir: Path, tmp_path: Path) -> None:
    skewed = _skew_router(model_dir, tmp_path / "skewed", {1: 0.6, 2: 0.5, 3: 0.4})
    per_rank = [_requests(6, seed=4, max_tokens=24), _requests(6, seed=5, max_tokens=24)]
    group = _run(
        skewed,
        per_rank,
        tmp_path / "run",
        "--redundant-experts",
        "2",
        "--rebalance-window",
        "4",
        "--measure-window",
        "4",
    )
    served = tokens_by_request(group.records(0) + group.records(1))
    assert served == _oracle(skewed, per_rank[0] + per_rank[1])

    stats = group.stats(0)
    assert stats["rebalances"] >= 1
    history = torch.tensor(stats["imbalance_history"])  # [windows, L] max/mean tokens per rank
    assert history[0].mean() > 1.5  # the skewed router piles the work onto rank 0
    assert history[-1].mean() < history[0].mean() - 0.3  # after replication the ranks share it
    assert group.stats(1)["placement"] == stats["placement"]  # both ranks computed the same placement

    # the exported metrics agree with the stats and with the number of routed tokens
    families = {f.name: f for f in text_string_to_metric_families(group.metrics_path(0).read_text())}
    assert families["k2serve_ep_dispatch_bytes"].samples[0].value == stats["dispatch_bytes"] > 0
    config = ModelConfig.from_model_dir(skewed)
    routed = sum(len(r["prompt_token_ids"]) + r["max_tokens"] - 1 for r in per_rank[0])
    per_expert = families["k2serve_expert_tokens"].samples
    assert sum(s.value for s in per_expert) == routed * config.num_experts_per_tok * len(config.moe_layer_ids)
    imbalance = families["k2serve_ep_imbalance_ratio"].samples
    assert {s.labels["layer"] for s in imbalance} == {str(layer) for layer in config.moe_layer_ids}


def test_killing_a_rank_fails_the_others_requests_with_a_clear_error(model_dir: Path, tmp_path: Path) -> None:
    per_rank = [_requests(n, seed=6 + r, max_tokens=1500) for r, n in enumerate((2, 1, 2, 1))]
    group = launch_group(model_dir, per_rank, tmp_path, worker_args=("--max-model-len", "1600"), timeout_s=20.0)
    try:
        deadline = time.monotonic() + 120
        while min(len(group.records(r)) for r in (0, 2, 3)) < 8:  # the survivors are mid-stream
            assert time.monotonic() < deadline, group.log(0)
            assert all(p.poll() is None for p in group.procs), group.log(0)
            time.sleep(0.05)
        killed_at = time.monotonic()
        group.kill(1)
        codes = group.wait(40)
        elapsed = time.monotonic() - killed_at
    finally:
        group.terminate()
    assert [codes[r] for r in (0, 2, 3)] == [3, 3, 3], (codes, group.log(0)[-2000:])
    assert elapsed < 25  # gloo sees the reset at once; the collective timeout (20 s) bounds the rest
    for rank in (0, 2, 3):
        finals = [r for r in group.records(rank) if "finish_reason" in r]
        assert sorted(r["request_id"] for r in finals) == sorted(q["request_id"] for q in per_rank[rank])
        for final in finals:
            assert final["finish_reason"] == "error"
            assert "peer rank is dead or stuck" in final["error"], json.dumps(final)


def test_worker_flags_are_checked_before_anything_starts(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from k2serve.cli import main

    requests = tmp_path / "r.jsonl"
    requests.write_text("")
    assert main(["worker", "--model", str(model_dir), "--ep-size", "2", "--requests", str(requests)]) == 2
    assert "rendezvous: required when ep_size > 1" in capsys.readouterr().err
    args = ["worker", "--model", str(model_dir), "--ep-size", "2", "--ep-rank", "2", "--rendezvous", "127.0.0.1:1"]
    assert main([*args, "--requests", str(requests)]) == 2
    assert "ep_rank: must be in [0, 2)" in capsys.readouterr().err
