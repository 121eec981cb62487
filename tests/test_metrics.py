"""After traffic, every process's ``/metrics`` holds the series of docs/METRICS.md with the counts the
traffic implies: a real router in front of a real prefill rank and a real decode rank (each rank
serving its own ``/metrics`` over HTTP), scraped over HTTP and parsed with prometheus_client.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from router_fixtures import LiveRouter, live_router

from k2serve.proto import serving_pb2, serving_pb2_grpc
from k2serve.tiny_model import make_tiny_model
from k2serve.workers.config import ModelConfig

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("metrics") / "tiny", seed=11)


@pytest.fixture(scope="module")
def live(model_dir: Path) -> Iterator[LiveRouter]:
    with live_router(model_dir, roles=("prefill", "decode"), num_blocks=256, metrics_port=0, model_name="tiny") as r:
        yield r


@pytest.fixture(scope="module")
def traffic(live: LiveRouter) -> list[dict[str, int]]:
    """Three streamed chat completions and one gRPC Generate; the usage of each."""
    usages = []
    with httpx.Client(base_url=live.http_url, timeout=60) as client:
        for text in ("hello there", "a longer question about the weather in Paris", "ok"):
            body = {
                "model": live.model_name,
                "messages": [{"role": "user", "content": text}],
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                chunks = [line for line in response.iter_lines() if line.startswith("data: {")]
            usages.append(httpx.Response(200, content=chunks[-1].removeprefix("data: ")).json()["usage"])
        assert client.get("/v1/no-such-route").status_code == 404
    with grpc.insecure_channel(live.grpc_target) as channel:
        stub = serving_pb2_grpc.ServingStub(channel)
        request = serving_pb2.GenerateRequest(
            token_ids=serving_pb2.TokenIds(ids=[5, 6, 7, 8]),
            sampling=serving_pb2.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
        )
        responses = list(stub.Generate(request, timeout=60))
    assert responses[-1].usage.completion_tokens == MAX_TOKENS
    usages.append({"prompt_tokens": 4, "completion_tokens": MAX_TOKENS})
    return usages


def scrape(url: str) -> Samples:
    text = httpx.get(url, timeout=10).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and wanted <= ls]
    assert found, f"{name}{labels} is not exposed"
    return sum(found)


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def documented(section: str) -> set[str]:
    """The series names of one section of docs/METRICS.md, as scraped (histograms as ``_count``)."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "METRICS.md").read_text()
    part = text.split(f"## {section}")[1].split("\n## ")[0]
    out = set()
    for row in part.splitlines():
        if not row.startswith("| `"):
            continue
        kind = row.split("|")[2].strip()
        for name in re.findall(r"`(k2serve_[a-z0-9_]+)", row.split("|")[1]):
            out.add(f"{name}_count" if kind == "histogram" else name)
    return out


def test_the_router_counts_every_request_as_clients_saw_it(live: LiveRouter, traffic: list[dict[str, int]]) -> None:
    router = scrape(f"{live.http_url}/metrics")
    missing = documented("Router") - names(router)
    assert not missing, f"documented router series not exposed: {sorted(missing)}"
    n, generated = len(traffic), sum(u["completion_tokens"] for u in traffic)
    assert value(router, "k2serve_router_time_to_first_token_seconds_count") == n
    assert value(router, "k2serve_router_request_queue_time_seconds_count") == n
    assert value(router, "k2serve_router_e2e_request_latency_seconds_count") == n
    assert value(router, "k2serve_router_inter_token_latency_seconds_count") > 0
    assert value(router, "k2serve_router_request_success_total", finished_reason="length") == n
    assert value(router, "k2serve_router_generation_tokens_total") == generated
    assert value(router, "k2serve_router_prompt_tokens_total") == sum(u["prompt_tokens"] for u in traffic)
    chat = {"route": "/v1/chat/completions", "method": "POST", "status": "200"}
    assert value(router, "k2serve_router_http_requests_total", **chat) == n - 1
    assert value(router, "k2serve_router_http_requests_total", route="other", status="404") == 1
    assert value(router, "k2serve_router_grpc_requests_total", method="Generate", code="OK") == 1
    for role in ("prefill", "decode"):
        assert value(router, "k2serve_router_routing_decisions_total", role=role) == n
        assert value(router, "k2serve_router_workers", role=role) == 1


def test_each_rank_exports_its_share_with_the_kv_transfer_bytes_of_the_formula(
    live: LiveRouter, traffic: list[dict[str, int]], model_dir: Path
) -> None:
    prefill, decode = (scrape(f"http://{w.metrics_address}/metrics") for w in live.workers)
    n = len(traffic)
    prompts = sum(u["prompt_tokens"] for u in traffic)
    config = ModelConfig.from_model_dir(model_dir)
    row_dim = config.kv_lora_rank + config.qk_rope_head_dim  # 576 for Kimi K2 (512 + 64)
    kv_bytes = row_dim * 4 * config.num_hidden_layers * prompts  # fp32 latent rows of every prompt token and layer
    # EP=1 here: no all-to-all series (the Prometheus test covers EP=2)
    documented_rank = documented("Worker rank")
    expected = {name for name in documented_rank if not name.startswith(("k2serve_ep_", "k2serve_expert_"))}
    leases = {"k2serve_kv_leases", "k2serve_kv_pinned_blocks", "k2serve_kv_leases_ended_total"}  # prefill side only
    for rank, wanted in ((prefill, expected), (decode, expected - leases)):
        assert not wanted - names(rank), sorted(wanted - names(rank))
    # the prefill rank computed every prompt, sampled every first token and sent every prompt's KV
    assert value(prefill, "k2serve_time_to_first_token_seconds_count") == n
    assert value(prefill, "k2serve_request_prefill_time_seconds_count") == n
    assert (
        value(prefill, "k2serve_prompt_tokens_by_source_total", source="computed")
        + value(prefill, "k2serve_prompt_tokens_by_source_total", source="cached")
        == prompts
    )
    assert value(prefill, "k2serve_kv_transfer_bytes_total", direction="send") == kv_bytes
    assert value(prefill, "k2serve_kv_transfer_seconds_count", direction="send") == n
    assert value(prefill, "k2serve_kv_leases_ended_total", outcome="released") == n
    assert value(prefill, "k2serve_kv_leases") == 0 and value(prefill, "k2serve_kv_pinned_blocks") == 0
    # the decode rank received the KV, computed no prompt token and generated the rest
    assert value(decode, "k2serve_kv_transfer_bytes_total", direction="receive") == kv_bytes
    assert value(decode, "k2serve_kv_transfer_failures_total") == 0
    assert value(decode, "k2serve_prompt_tokens_by_source_total", source="transferred") == prompts
    assert value(decode, "k2serve_prompt_tokens_by_source_total", source="computed") == 0
    assert value(decode, "k2serve_generation_tokens_total") == n * (MAX_TOKENS - 1)
    assert value(decode, "k2serve_inter_token_latency_seconds_count") == n * (MAX_TOKENS - 2)
    assert value(decode, "k2serve_time_to_first_token_seconds_count") == 0  # the first token came with the KV
    assert value(decode, "k2serve_request_decode_time_seconds_count") == n
    assert value(decode, "k2serve_request_success_total", finished_reason="length") == n
    assert value(decode, "k2serve_iteration_tokens_total_count") >= MAX_TOKENS - 1
    assert value(decode, "k2serve_num_requests_running") == 0 and value(decode, "k2serve_kv_cache_usage_perc") == 0
    info = [labels for name, labels in decode if name == "k2serve_cache_config_info"]
    assert info and ("num_blocks", "256") in info[0]


def test_metric_labels_stay_bounded(live: LiveRouter, traffic: list[dict[str, int]]) -> None:
    """No label value is a request id or a prompt: every label set comes from a fixed vocabulary."""
    allowed = {"model_name", "finished_reason", "source", "direction", "transport", "outcome", "role", "policy"}
    allowed |= {
        "reason",
        "route",
        "method",
        "status",
        "code",
        "le",
        "block_size",
        "num_blocks",
        "expert",
        "layer",
        "kind",
    }
    for url in [f"{live.http_url}/metrics", *(f"http://{w.metrics_address}/metrics" for w in live.workers)]:
        for _, labels in scrape(url):
            for key, label in labels:
                assert key in allowed, (url, key)
                assert "chatcmpl" not in label and "cmpl-" not in label and len(label) < 64, (url, key, label)
