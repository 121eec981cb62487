"""What both locustfiles share: settings from the environment, the prompt set, custom metric rows.

Lifecycle: imported by a locustfile (after locust, so gevent has patched the standard library);
``LocustSettings.from_env()`` once per user; ``next_request`` per task; after each streamed answer
``report_stream`` turns its ``RequestRecord`` into locust "requests" of type ``METRIC`` (vLLM's
definitions, see ``stream_recorder``), so they get percentiles in the UI and the ``--csv`` files:

- ``time_to_first_token``: TTFT (ms), length = prompt tokens;
- ``inter_token_latency``: the mean gap between token chunks of the request (ms);
- ``time_per_output_token``: (latency − TTFT) / (output − 1) (ms), for 2+ output tokens;
- ``total_latency``: send -> last token (ms), length = output tokens (usage.completion_tokens).

Environment: ``K2SERVE_MODEL`` (default: unset, the router's served model), ``K2SERVE_API_KEY``,
``K2SERVE_MAX_TOKENS`` (default 64), ``K2SERVE_GRPC_TARGET`` (gRPC file; default: ``--host``).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from k2serve.loadtest.bench_request import BenchRequest, RequestRecord

if TYPE_CHECKING:  # importing locust monkey-patches the process with gevent: only a locustfile may
    from locust.event import EventHook

METRIC = "METRIC"
DEFAULT_MAX_TOKENS = 64
PROMPTS = (
    "Explain in two sentences what a prefix cache does in an LLM server.",
    "Write a haiku about load balancers.",
    "List three causes of high tail latency in a web service.",
    "What is the difference between throughput and latency?",
    "Summarize the rules of chess in one paragraph.",
    "Give a short Python function that reverses a string.",
)


@dataclass(frozen=True)
class LocustSettings:
    model: str
    api_key: str | None
    max_tokens: int
    grpc_target: str | None

    @classmethod
    def from_env(cls) -> LocustSettings:
        max_tokens = int(os.environ.get("K2SERVE_MAX_TOKENS", DEFAULT_MAX_TOKENS))
        if max_tokens < 1:
            raise ValueError(f"K2SERVE_MAX_TOKENS must be at least 1, got {max_tokens}")
        return cls(
            model=os.environ.get("K2SERVE_MODEL", ""),
            api_key=os.environ.get("K2SERVE_API_KEY") or None,
            max_tokens=max_tokens,
            grpc_target=os.environ.get("K2SERVE_GRPC_TARGET") or None,
        )


def prompt_cycle(settings: LocustSettings, offset: int = 0) -> Iterator[BenchRequest]:
    """The prompt set as requests, endlessly, starting at ``offset`` (users start at different prompts)."""
    start = offset % len(PROMPTS)
    ordered = PROMPTS[start:] + PROMPTS[:start]
    return itertools.cycle(
        BenchRequest(
            messages=({"role": "user", "content": p},), max_tokens=settings.max_tokens, prompt_len=len(p.split())
        )
        for p in ordered
    )


def fire_metric(request_event: EventHook, name: str, value_ms: float, length: int = 0) -> None:
    request_event.fire(
        request_type=METRIC,
        name=name,
        response_time=value_ms,
        response_length=length,
        response=None,
        context={},
        exception=None,
    )


def report_stream(request_event: EventHook, record: RequestRecord) -> None:
    """The custom metric rows of one successful streamed answer."""
    fire_metric(request_event, "time_to_first_token", record.ttft * 1000.0, record.prompt_tokens)
    if record.itl:
        fire_metric(request_event, "inter_token_latency", 1000.0 * sum(record.itl) / len(record.itl))
    tpot = record.tpot
    if tpot is not None:
        fire_metric(request_event, "time_per_output_token", tpot * 1000.0)
    fire_metric(request_event, "total_latency", record.latency * 1000.0, record.output_tokens)
