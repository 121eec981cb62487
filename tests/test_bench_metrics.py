"""``k2serve.loadtest`` without a server: arrival processes, vLLM's metric definitions on hand-made
records (every expected number below is worked out by hand), the TTFT / ITL clock over SSE chunks,
the datasets (seeded, length ranges, ShareGPT loading and filtering, agentic prefix growth) and the
sweep-point expansion."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import numpy as np
import pytest

from k2serve.loadtest.agentic import AgenticConversation, agentic_sessions
from k2serve.loadtest.arrivals import ConcurrencyCap, arrival_offsets
from k2serve.loadtest.bench_metrics import compute_metrics, parse_goodput, parse_percentiles
from k2serve.loadtest.bench_options import BenchOptions, sweep_points
from k2serve.loadtest.bench_request import BenchRequest, RequestRecord, ToolCallRecord
from k2serve.loadtest.client import apply_chunk
from k2serve.loadtest.dataset import DatasetOptions, build_workload, sharegpt_requests
from k2serve.loadtest.stream_recorder import StreamRecorder

# -- arrivals --------------------------------------------------------------------------------------


def _gaps(rate: float, burstiness: float, n: int = 20_000, seed: int = 7) -> np.ndarray:
    return np.diff(arrival_offsets(n, rate, burstiness, seed))


def test_poisson_arrivals_have_mean_gap_one_over_rate_and_cv_one() -> None:
    gaps = _gaps(rate=4.0, burstiness=1.0)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)
    assert arrival_offsets(5, 4.0, 1.0, seed=7)[0] == 0.0
    assert arrival_offsets(50, 4.0, 1.0, seed=7) == arrival_offsets(50, 4.0, 1.0, seed=7)
    assert arrival_offsets(50, 4.0, 1.0, seed=7) != arrival_offsets(50, 4.0, 1.0, seed=8)


@pytest.mark.parametrize(("burstiness", "cv"), [(0.25, 2.0), (4.0, 0.5)])
def test_gamma_burstiness_keeps_the_mean_and_sets_cv_to_one_over_sqrt_shape(burstiness: float, cv: float) -> None:
    gaps = _gaps(rate=2.0, burstiness=burstiness)
    assert gaps.mean() == pytest.approx(0.5, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.06)


def test_infinite_rate_sends_everything_at_once_and_bad_values_are_refused() -> None:
    assert arrival_offsets(4, math.inf) == [0.0, 0.0, 0.0, 0.0]
    assert arrival_offsets(0, 1.0) == []
    with pytest.raises(ValueError, match="request-rate"):
        arrival_offsets(3, 0.0)
    with pytest.raises(ValueError, match="burstiness"):
        arrival_offsets(3, 1.0, burstiness=0.0)


def test_concurrency_cap_never_lets_more_than_the_cap_run() -> None:
    async def run(cap: ConcurrencyCap) -> int:
        async def one() -> None:
            async with cap:
                await asyncio.sleep(0.01)

        await asyncio.gather(*(one() for _ in range(6)))
        return cap.peak

    assert asyncio.run(run(ConcurrencyCap(2))) == 2
    assert asyncio.run(run(ConcurrencyCap(None))) == 6


# -- metrics ---------------------------------------------------------------------------------------

R1 = RequestRecord(True, prompt_tokens=10, output_tokens=4, ttft=0.1, itl=(0.02, 0.03, 0.05), latency=0.2)
R2 = RequestRecord(True, prompt_tokens=20, output_tokens=3, ttft=0.3, itl=(0.1,), latency=0.5, start_time=0.05)
R3 = RequestRecord(True, prompt_tokens=5, output_tokens=1, ttft=0.05, latency=0.05, start_time=1.0)
R4 = RequestRecord(False, error="HTTP 500", latency=0.4, start_time=0.1)


def test_metrics_follow_vllm_definitions_on_hand_made_records() -> None:
    m = compute_metrics([R1, R2, R3, R4], duration_s=2.0, percentiles=(50, 99), goodput_slos={"ttft": 100, "tpot": 50})
    assert (m.completed, m.failed) == (3, 1)
    assert (m.total_input_tokens, m.total_output_tokens) == (35, 8)
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(4.0)
    assert m.total_token_throughput == pytest.approx(21.5)
    # TTFT [100, 300, 50] ms: population std sqrt(35000 / 3)
    assert (m.ttft.mean, m.ttft.median) == pytest.approx((150.0, 100.0))
    assert m.ttft.std == pytest.approx(math.sqrt(35000 / 3))
    # TPOT (200-100)/3 and (500-300)/2 ms; the 1-token request is left out
    assert m.tpot.mean == pytest.approx((100 / 3 + 100) / 2)
    assert m.tpot.p(99) == pytest.approx(100 / 3 + 0.99 * (100 - 100 / 3))
    # ITL pooled [20, 30, 50, 100] ms: p99 interpolates between 50 and 100 at 0.97
    assert (m.itl.mean, m.itl.median, m.itl.p(99)) == pytest.approx((50.0, 40.0, 98.5))
    assert m.e2el.median == pytest.approx(200.0)
    # goodput: R1 (ttft 100 = SLO, tpot 33) and R3 (ttft 50, tpot counts as 0) meet both SLOs
    assert m.request_goodput == pytest.approx(2 / 2.0)
    # [0, .2), [.05, .55), [.1, .5) overlap; [1, 1.05) does not
    assert m.max_concurrency == 3
    # token chunks at .1 .12 .15 .2 .35 .45 fall in second 0, 1.05 in second 1
    assert m.max_output_tokens_per_s == 6.0


def test_metric_json_uses_vllm_key_names_and_always_has_the_table_percentiles() -> None:
    m = compute_metrics([R1, R2], duration_s=1.0, percentiles=(99.9,))
    keys = m.to_json()
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert {f"mean_{name}_ms", f"median_{name}_ms", f"std_{name}_ms", f"p99.9_{name}_ms", f"p50_{name}_ms"} <= set(
            keys
        )
    assert keys["request_goodput"] is None and keys["completed"] == 2


def test_no_successful_request_reports_zeros_not_errors() -> None:
    m = compute_metrics([R4], duration_s=1.0)
    assert (m.completed, m.failed, m.ttft.p(99), m.output_throughput, m.max_concurrency) == (0, 1, 0.0, 0.0, 1)


def test_goodput_and_percentile_flags_are_parsed_and_checked() -> None:
    assert parse_goodput(["ttft:500", "tpot:50", "e2el:2000"]) == {"ttft": 500.0, "tpot": 50.0, "e2el": 2000.0}
    assert parse_percentiles("50, 90,99") == (50.0, 90.0, 99.0)
    for bad in (["ttft"], ["itl:5"], ["ttft:x"], ["tpot:-1"]):
        with pytest.raises(ValueError, match="goodput"):
            parse_goodput(bad)
    with pytest.raises(ValueError, match="percentiles"):
        parse_percentiles("50,101")


# -- the TTFT / ITL clock --------------------------------------------------------------------------


def _chunk(delta: dict[str, object] | None, finish: str | None = None, usage: dict[str, object] | None = None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"choices": choices, **({"usage": usage} if usage else {})}


def test_stream_clock_counts_the_role_chunk_and_ignores_finish_and_usage_chunks() -> None:
    recorder = StreamRecorder(BenchRequest(messages=(), max_tokens=8, session_id="s", turn=2), origin=0.0, start=1.0)
    stream = [
        (1.25, _chunk({"role": "assistant", "content": ""})),
        (1.26, _chunk({"reasoning_content": "hm", "reasoning": "hm"})),
        (1.30, _chunk({"content": "Hi"})),
        (
            1.36,
            _chunk({"tool_calls": [{"index": 0, "id": "functions.f:0", "function": {"name": "f", "arguments": ""}}]}),
        ),
        (1.40, _chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]})),
        (1.50, _chunk({}, finish="tool_calls")),
        (
            1.60,
            _chunk(
                None, usage={"prompt_tokens": 9, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 4}}
            ),
        ),
    ]
    for now, chunk in stream:
        assert apply_chunk(recorder, chunk, now) is None
    record = recorder.record()
    assert record.success and record.ttft == pytest.approx(0.25) and record.latency == pytest.approx(0.40)
    assert record.itl == pytest.approx((0.01, 0.04, 0.06, 0.04))
    assert (record.prompt_tokens, record.output_tokens, record.cached_tokens) == (9, 5, 4)
    assert (record.text, record.reasoning, record.finish_reason) == ("Hi", "hm", "tool_calls")
    assert record.tool_calls == (ToolCallRecord("functions.f:0", "f", "{}"),)
    assert (record.session_id, record.turn, record.start_time) == ("s", 2, 1.0)
    assert apply_chunk(recorder, {"error": {"message": "boom"}}, 2.0) == "boom"


def test_a_stream_without_tokens_is_a_failure() -> None:
    recorder = StreamRecorder(BenchRequest(messages=(), max_tokens=8), origin=0.0, start=0.0)
    apply_chunk(recorder, _chunk(None, usage={"prompt_tokens": 3, "completion_tokens": 0}), 0.1)
    assert not recorder.record().success


# -- datasets --------------------------------------------------------------------------------------


def test_random_dataset_is_seeded_and_respects_the_length_ranges() -> None:
    options = DatasetOptions(num_prompts=40, random_input_len=20, random_output_len=10, random_range_ratio=0.5)
    first, again = build_workload(options, seed=3), build_workload(options, seed=3)
    assert first == again and first != build_workload(options, seed=4)
    for r in first.requests:
        words = len(r.messages[0]["content"].split())
        assert 10 <= words <= 30 and words == r.prompt_len
        assert 5 <= r.max_tokens <= 15
    assert len({r.max_tokens for r in first.requests}) > 1


def test_random_prefix_is_shared_by_every_prompt() -> None:
    options = DatasetOptions(num_prompts=5, random_input_len=6, random_output_len=4, random_prefix_len=12)
    texts = [r.messages[0]["content"].split() for r in build_workload(options, seed=1).requests]
    assert all(t[:12] == texts[0][:12] for t in texts) and len({" ".join(t) for t in texts}) == 5
    assert all(len(t) == 18 for t in texts)


def _reply(text: str, calls: tuple[ToolCallRecord, ...] = ()) -> RequestRecord:
    return RequestRecord(True, output_tokens=3, text=text, reasoning="think", tool_calls=calls)


def test_agentic_rounds_grow_the_prompt_and_keep_every_earlier_message() -> None:
    sessions = agentic_sessions(
        num_sessions=3, num_rounds=4, tool_result_len=5, system_len=20, num_tools=2, output_len=7, seed=5
    )
    assert sessions == agentic_sessions(
        num_sessions=3, num_rounds=4, tool_result_len=5, system_len=20, num_tools=2, output_len=7, seed=5
    )
    assert len({s.session_id for s in sessions}) == 3
    assert len({(s.system, json.dumps(s.tools)) for s in sessions}) == 1  # the shared prefix
    conversation = AgenticConversation(sessions[0])
    replies = [_reply("a"), _reply("b", (ToolCallRecord("functions.search_code:1", "search_code", '{"query": "x"}'),))]
    replies += [_reply("c"), _reply("d")]
    previous: tuple[dict, ...] = ()
    for turn, reply in enumerate(replies):
        request = conversation.request(turn)
        assert request.session_id == sessions[0].session_id and request.turn == turn and request.max_tokens == 7
        assert request.messages[: len(previous)] == previous and len(request.messages) > len(previous)
        assert request.tools == sessions[0].tools
        previous = request.messages
        conversation.on_reply(turn, reply)
    roles = [m["role"] for m in previous]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant", "tool"]
    calls = [m["tool_calls"][0]["id"] for m in previous if m["role"] == "assistant"]
    answers = [m["tool_call_id"] for m in previous if m["role"] == "tool"]
    assert calls == answers == ["functions.read_file:0", "functions.search_code:1", "functions.read_file:2"]
    assert json.loads(previous[3]["content"])["status"] == "ok"
    with pytest.raises(ValueError, match="round 2"):
        AgenticConversation(sessions[1]).request(2)


def _write_sharegpt(path: Path) -> Path:
    def entry(*turns: tuple[str, str]) -> dict:
        return {"conversations": [{"from": who, "value": text} for who, text in turns]}

    data = [
        entry(("human", "one two three four five"), ("gpt", "a b c d e f g h i j")),
        entry(("human", "too short"), ("gpt", "a b c d e")),
        entry(("human", "no answer after this prompt")),
        entry(("system", "be brief"), ("human", "six seven eight nine ten"), ("gpt", "k l m n")),
        entry(("human", " ".join(["w"] * 1100)), ("gpt", "a b c d e")),
        entry(("human", "the answer is short here"), ("gpt", "ok")),
        {"id": "broken"},
    ]
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_sharegpt_takes_the_first_human_turn_and_filters_by_length(tmp_path: Path) -> None:
    path = _write_sharegpt(tmp_path / "sharegpt.json")
    requests = sharegpt_requests(path, DatasetOptions(name="sharegpt", num_prompts=10), seed=0)
    by_prompt = {r.messages[0]["content"]: r for r in requests}
    assert set(by_prompt) == {"one two three four five", "six seven eight nine ten"}
    assert by_prompt["one two three four five"].max_tokens == 13  # 10 words × 1.3
    assert (
        by_prompt["six seven eight nine ten"].max_tokens == 5 and by_prompt["six seven eight nine ten"].prompt_len == 5
    )
    fixed = sharegpt_requests(path, DatasetOptions(name="sharegpt", num_prompts=10, sharegpt_output_len=32), seed=0)
    assert len(fixed) == 3 and {r.max_tokens for r in fixed} == {32}  # the short answer no longer filters
    one = sharegpt_requests(path, DatasetOptions(name="sharegpt", num_prompts=1), seed=0)
    assert len(one) == 1 and one == sharegpt_requests(path, DatasetOptions(name="sharegpt", num_prompts=1), seed=0)
    with pytest.raises(ValueError, match="dataset-path"):
        build_workload(DatasetOptions(name="sharegpt"), seed=0)
    (tmp_path / "empty.json").write_text("[]", encoding="utf-8")
    with pytest.raises(ValueError, match="length filter"):
        sharegpt_requests(tmp_path / "empty.json", DatasetOptions(name="sharegpt"), seed=0)


def test_sweep_points_cross_rates_with_concurrency_caps() -> None:
    points = sweep_points(BenchOptions(request_rates=(1.0, math.inf), max_concurrencies=(None, 4)))
    assert [(p.label, p.file_stem) for p in points] == [
        ("rate=1", "point-00-rate1"),
        ("rate=1 conc=4", "point-01-rate1-conc4"),
        ("rate=inf", "point-02-rateinf"),
        ("rate=inf conc=4", "point-03-rateinf-conc4"),
    ]
    with pytest.raises(ValueError, match="backend"):
        BenchOptions(backend="http")
    with pytest.raises(ValueError, match="request-rate"):
        BenchOptions(request_rates=(0.0,))
    with pytest.raises(ValueError, match="max-concurrency"):
        BenchOptions(max_concurrencies=(0,))
