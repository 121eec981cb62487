"""The router in front of a prefill rank and a decode rank (real servers on loopback, tiny model).

Greedy REST output through the disaggregated path equals the fp32 oracle; a client that leaves a
stream mid-way gets its request aborted on both ranks: within a second nothing runs, no lease or
pinned block is left on the prefill rank and every block is free again on both; the router's
``/metrics`` shows the requests it served.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from router_fixtures import LiveRouter, live_router

from k2serve.tiny_model import make_tiny_model
from k2serve.workers.greedy import greedy_generate
from k2serve.workers.model_loader import load_model

LONG_PROMPT = [7, 8, 9]  # the tiny model (seed 11) runs 250 tokens from here without an end token


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("pd") / "tiny", seed=11)


@pytest.fixture(scope="module")
def live(model_dir: Path) -> Iterator[LiveRouter]:
    with live_router(model_dir, roles=("prefill", "decode"), num_blocks=256) as router:
        yield router


def _idle(live: LiveRouter) -> bool:
    loads = live.loads()
    return all(
        load.running == 0
        and load.waiting == 0
        and load.leases == 0
        and load.pinned_blocks == 0
        and load.free_blocks == load.num_blocks
        for load in loads
    )


def test_greedy_rest_output_through_prefill_and_decode_equals_the_oracle(live: LiveRouter, model_dir: Path) -> None:
    model = load_model(model_dir, dtype=torch.float32, max_positions=256, progress=False)
    prompts = [[5, 6, 7, 8, 9, 10], [300, 301, 302, 303] * 5, [42]]
    with httpx.Client(base_url=live.http_url, timeout=60) as client:
        for prompt in prompts:
            body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
            answer = client.post("/v1/completions", json=body).json()
            assert answer["choices"][0]["token_ids"] == greedy_generate(model, prompt, max_tokens=8)
            assert answer["choices"][0]["finish_reason"] == "length"
        metrics = client.get("/metrics").text
    assert 'k2serve_router_request_success_total{finished_reason="length",model_name="tiny"} 3.0' in metrics
    assert "k2serve_router_time_to_first_token_seconds_count" in metrics


def test_a_client_that_leaves_a_stream_frees_the_request_on_both_ranks_within_a_second(live: LiveRouter) -> None:
    body = {"prompt": LONG_PROMPT, "max_tokens": 250, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=live.http_url, timeout=60) as client:
        started = time.monotonic()
        assert client.post("/v1/completions", json=body).json()["usage"]["completion_tokens"] == 250
        full_run_s = time.monotonic() - started
        started = time.monotonic()
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            next(line for line in response.iter_lines() if line.startswith("data: {"))
        left = time.monotonic()  # leaving the `with` closes the connection
    while not _idle(live):
        assert time.monotonic() - left < 1.0, [str(load) for load in live.loads()]
        time.sleep(0.02)
    idle_after_s = time.monotonic() - started
    assert idle_after_s < 0.7 * full_run_s, (idle_after_s, full_run_s)  # cut short, not run to the end
    assert live.frontend.admission.running == 0


def test_the_reasoning_budget_holds_across_the_prefill_decode_handoff(live: LiveRouter, model_dir: Path) -> None:
    """``max_reasoning_tokens`` = 3: the decode rank forces ``</think>`` as the 4th token, then the model goes on."""
    model = load_model(model_dir, dtype=torch.float32, max_positions=256, progress=False)
    think_end = live.frontend.tokenizer.special_tokens["</think>"]
    body = {
        "messages": [{"role": "user", "content": "Think briefly."}],
        "max_completion_tokens": 8,
        "max_reasoning_tokens": 3,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    with httpx.Client(base_url=live.http_url, timeout=60) as client:
        answer = client.post("/v1/chat/completions", json=body).json()
    prompt, output = answer["prompt_token_ids"], answer["choices"][0]["token_ids"]
    thought = greedy_generate(model, prompt, max_tokens=3)
    assert think_end not in thought  # otherwise the budget would not be what ended the reasoning
    rest = greedy_generate(model, [*prompt, *thought, think_end], max_tokens=4)
    assert output == [*thought, think_end, *rest]
