"""The planner's roofline against the arithmetic of performance.md, its layout search, calibration and CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from k2serve.cli import main
from k2serve.cluster.planner.calibration import calibrate
from k2serve.cluster.planner.hardware import GB, Efficiency, hardware_preset
from k2serve.cluster.planner.model_spec import from_model_config, model_preset
from k2serve.cluster.planner.planner import PlanRequest, Workload, plan
from k2serve.cluster.planner.roofline import RankLayout, decode_step, max_decode_batch, memory, prefill_rate
from k2serve.workers.config import ModelConfig

K2 = model_preset("kimi-k2-thinking")
PEAK = Efficiency(hbm=1.0, linear=1.0, attention=1.0, nic=1.0, nvlink=1.0, collective_latency_s=0.0)


def test_k2_thinking_byte_and_flop_accounting_matches_performance_md() -> None:
    assert K2.attention_params == pytest.approx(101.14e6, rel=1e-3)
    assert K2.total_params == pytest.approx(1026.4e9, rel=1e-3)
    assert K2.active_params == pytest.approx(31.69e9, rel=1e-3)
    assert K2.expert_bytes == 24_772_608
    assert K2.replicated_read_bytes == pytest.approx(21.10e9, rel=2e-3)
    assert K2.checkpoint_bytes == pytest.approx(594.2e9, rel=1e-3)
    assert K2.kv_bytes_per_token == 70_272
    assert K2.decode_attention_flops_per_context_token == pytest.approx(8.495e6, rel=1e-3)
    assert K2.prefill_attention_flops_per_token(8192) / 8192 == pytest.approx(1.2493e6, rel=1e-3)
    assert K2.prefill_linear_flops_per_token == pytest.approx(61.03e9, rel=1e-3)


def test_the_real_config_json_gives_the_same_spec_as_the_preset() -> None:
    raw = json.loads((Path(__file__).parent / "data" / "kimi_k2_thinking_config.json").read_text())
    config = ModelConfig.from_dict(raw)
    spec = from_model_config(config)
    assert spec.total_params == K2.total_params
    assert spec.expert_bytes == K2.expert_bytes
    assert spec.kv_bytes_per_token == K2.kv_bytes_per_token
    assert spec.max_context == K2.max_context == raw["max_position_embeddings"]


@pytest.mark.parametrize(
    ("gpu", "ep", "kv_tokens"),
    [("h200", 8, 683e3), ("h100", 16, 262e3), ("h200", 16, 1.19e6), ("h100", 64, 643e3)],
)
def test_kv_room_per_gpu_matches_the_table_of_section_3(gpu: str, ep: int, kv_tokens: float) -> None:
    assert memory(K2, hardware_preset(gpu), RankLayout(ep)).kv_tokens_per_gpu == pytest.approx(kv_tokens, rel=0.01)


def test_dp_attention_with_ep8_does_not_fit_an_h100() -> None:
    assert not memory(K2, hardware_preset("h100"), RankLayout(8)).fits


@pytest.mark.parametrize(
    ("gpu", "ep", "batch", "t_hbm_ms"),
    [("h100", 16, 32, 19.7), ("h100", 64, 128, 20.0), ("h200", 16, 128, 19.5), ("h200", 64, 32, 8.2)],
)
def test_decode_hbm_time_matches_the_table_of_section_4(gpu: str, ep: int, batch: int, t_hbm_ms: float) -> None:
    est = decode_step(K2, hardware_preset(gpu), PEAK, RankLayout(ep), batch, 4096)
    assert est.bytes_read / hardware_preset(gpu).hbm_bw * 1000 == pytest.approx(t_hbm_ms, rel=0.03)


def test_internode_all_to_all_binds_decode_at_large_batch_and_short_context() -> None:
    est = decode_step(K2, hardware_preset("h200"), PEAK, RankLayout(64), 256, 4096)
    assert est.binding == "network"
    # 50 GB/s over 10.43 MB per token (fp8 dispatch), times the share of pairs that leave the node
    assert est.t_comm == pytest.approx(256 * 10.43e6 * (1 - 8 / 64) / 50e9, rel=0.02)


def test_prefill_ceiling_at_8k_matches_section_6() -> None:
    est = prefill_rate(K2, hardware_preset("h100"), PEAK, RankLayout(1), 8192)
    assert est.tokens_per_s == pytest.approx(13_879, rel=0.01)
    assert est.binding == "compute"


def test_the_largest_batch_meets_the_itl_slo_and_one_more_does_not() -> None:
    hw, layout = hardware_preset("h200"), RankLayout(16)
    best = max_decode_batch(K2, hw, Efficiency(), layout, 4096, itl_slo_s=0.03)
    assert best is not None and best.itl_s <= 0.03
    assert decode_step(K2, hw, Efficiency(), layout, best.batch + 1, 4096).itl_s > 0.03


def test_eight_h200_is_colocated_only_and_sixteen_h100_need_ep16() -> None:
    eight = plan(PlanRequest(K2, hardware_preset("h200"), 8))
    assert [lay.shape for lay in eight.layouts] == ["colocated"]
    assert eight.layouts[0].pools[0].ep_size == 8
    assert any("disaggregated" in why for why in eight.infeasible)
    sixteen = plan(PlanRequest(K2, hardware_preset("h100"), 16))
    assert sixteen.layouts and all(p.ep_size == 16 for lay in sixteen.layouts for p in lay.pools)


def test_eight_h100_cannot_serve_k2_and_says_why() -> None:
    result = plan(PlanRequest(K2, hardware_preset("h100"), 8))
    assert result.layouts == ()
    assert any("16 GPUs" in why for why in result.infeasible)


def test_a_two_pool_plan_meets_both_slos_and_balances_the_pools() -> None:
    w = Workload(prompt_len=2000, output_len=1000, ttft_slo_s=2.0, itl_slo_s=0.05)
    result = plan(PlanRequest(K2, hardware_preset("h200"), 128, w, shapes=("disaggregated",)))
    best = result.layouts[0]
    assert best.ttft_s <= w.ttft_slo_s and best.itl_s <= w.itl_slo_s
    assert best.gpus == 128 and all(p.gpus % 8 == 0 for p in best.pools)
    # the split is the best of its neighbours: moving a node either way serves fewer requests
    rates = {lay.pools[0].gpus: lay.requests_per_s for lay in result.layouts}
    p = best.pools[0].gpus
    assert all(rates.get(q, 0.0) <= best.requests_per_s for q in (p - 8, p + 8))


def test_a_longer_output_shifts_gpus_from_prefill_to_decode() -> None:
    def prefill_gpus(output_len: float) -> int:
        w = Workload(prompt_len=2000, output_len=output_len)
        return (
            plan(PlanRequest(K2, hardware_preset("h200"), 128, w, shapes=("disaggregated",))).layouts[0].pools[0].gpus
        )

    assert prefill_gpus(4000) < prefill_gpus(300)


def test_calibration_turns_measured_figures_into_shares_of_peak() -> None:
    hw = hardware_preset("h100")
    eff = calibrate({"measured": {"copy_gbs": 3015, "nic_gbs": 40}, "efficiency": {"overlap": 0.5}}, hw)
    assert eff.hbm == pytest.approx(3015 * GB / hw.hbm_bw)
    assert eff.nic == pytest.approx(0.8)
    assert eff.overlap == 0.5 and eff.linear == Efficiency().linear
    slower = decode_step(K2, hw, eff, RankLayout(64), 128, 4096)
    assert slower.step_s != decode_step(K2, hw, Efficiency(), RankLayout(64), 128, 4096).step_s


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"measured": {"copy_gbps": 1}}, "measured.copy_gbps"),
        ({"efficiency": {"hbm": 2.0}}, "hbm"),
        ({"x": 1}, "measured"),
    ],
)
def test_a_bad_calibration_names_the_field(data: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        calibrate(data, hardware_preset("h100"))


def test_plan_cli_prints_json_layouts_for_16_h100(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--hardware", "h100", "--gpus", "16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layouts"][0]["pools"][0]["ep_size"] == 16
    assert math.isfinite(out["layouts"][0]["output_tokens_per_s"])


def test_plan_cli_rejects_unknown_hardware(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--hardware", "a100"]) == 2
    assert "hardware" in capsys.readouterr().err
