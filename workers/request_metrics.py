"""``RequestMetrics``: one rank's per-request Prometheus series, fed by the engine as its observer.

Lifecycle: the worker builds one on its own ``CollectorRegistry`` and sets it as
``engine.observer``; the engine then calls it from its step thread (``EngineObserver``), and every
scrape reads the series. Times follow vLLM's definitions, measured on this rank:

    arrival --queue--> scheduled --prefill--> first token --decode--> last token
    |<------------------------------ e2e ----------------------------->|
                       |<------------------- inference --------------->|

TTFT = arrival -> first token. A decode rank of a disaggregated pair receives the first token with
the KV: it observes no TTFT and no prefill time, and its decode time starts at its own first token.
``k2serve_prompt_tokens_by_source_total`` splits every finished request's prompt into tokens this
rank computed, found in its prefix cache, or received from a prefill rank.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram

from k2serve.workers.request import Request, RequestStatus
from k2serve.workers.scheduler import SchedulerOutput

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
REQUEST_TIME_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
STEP_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def token_buckets(max_model_len: int) -> tuple[int, ...]:
    """vLLM's 1-2-5 series up to the context limit: 1, 2, 5, 10, 20, 50, ..."""
    out: list[int] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * scale
            if value > max_model_len:
                return tuple(out)
            out.append(value)
        scale *= 10


class RequestMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry, max_model_len: int) -> None:
        self.model_name = model_name
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=registry)

        self._ttft = histogram("k2serve_time_to_first_token_seconds", "Arrival to the first token.", TTFT_BUCKETS)
        self._itl = histogram(
            "k2serve_inter_token_latency_seconds", "Gap between two tokens of a request.", ITL_BUCKETS
        )
        self._e2e = histogram("k2serve_e2e_request_latency_seconds", "Arrival to the last token.", REQUEST_TIME_BUCKETS)
        self._queue = histogram(
            "k2serve_request_queue_time_seconds", "Arrival to first scheduled.", REQUEST_TIME_BUCKETS
        )
        self._inference = histogram(
            "k2serve_request_inference_time_seconds", "First scheduled to the last token.", REQUEST_TIME_BUCKETS
        )
        self._prefill = histogram(
            "k2serve_request_prefill_time_seconds", "First scheduled to the first token.", REQUEST_TIME_BUCKETS
        )
        self._decode = histogram("k2serve_request_decode_time_seconds", "First to last token.", REQUEST_TIME_BUCKETS)
        self._tpot = histogram(
            "k2serve_request_time_per_output_token_seconds", "Decode time per token after the first.", ITL_BUCKETS
        )
        lengths = tuple(float(b) for b in token_buckets(max_model_len))
        self._prompt_len = histogram("k2serve_request_prompt_tokens", "Prompt tokens per request.", lengths)
        self._output_len = histogram("k2serve_request_generation_tokens", "Generated tokens per request.", lengths)
        self._step_tokens = histogram(
            "k2serve_iteration_tokens_total", "Tokens scheduled per engine step.", tuple(map(float, STEP_TOKEN_BUCKETS))
        )
        self._success = Counter(
            "k2serve_request_success", "Finished requests by reason.", [*labels, "finished_reason"], registry=registry
        )
        self._prompt_tokens = Counter("k2serve_prompt_tokens", "Prompt tokens.", labels, registry=registry)
        self._generation_tokens = Counter("k2serve_generation_tokens", "Generated tokens.", labels, registry=registry)
        self._by_source = Counter(
            "k2serve_prompt_tokens_by_source",
            "Prompt tokens by where their KV came from (computed, cached, transferred).",
            [*labels, "source"],
            registry=registry,
        )
        # touch every label value once so each series exists (at 0) from the first scrape: a rate over
        # a series that is there and flat reads 0, over a missing one "no data"
        for series in (self._ttft, self._itl, self._e2e, self._queue, self._inference, self._prefill, self._decode):
            series.labels(model_name)
        for series in (self._tpot, self._prompt_len, self._output_len, self._step_tokens):
            series.labels(model_name)
        for counter in (self._prompt_tokens, self._generation_tokens):
            counter.labels(model_name)
        for reason in ("stop", "length", "abort", "error"):
            self._success.labels(model_name, reason)
        for source in ("computed", "cached", "transferred"):
            self._by_source.labels(model_name, source)

    # ---- EngineObserver -------------------------------------------------------------------------------------

    def on_step(self, plan: SchedulerOutput) -> None:
        now = time.monotonic()
        self._step_tokens.labels(self.model_name).observe(plan.num_batched_tokens)
        for entry in plan.scheduled:
            if entry.request.times.scheduled is None:
                entry.request.times.scheduled = now

    def on_token(self, request: Request) -> None:
        now, times, m = time.monotonic(), request.times, self.model_name
        self._generation_tokens.labels(m).inc()
        if times.first_token is None:
            times.first_token = now
            if request.num_output_tokens == 1:  # sampled here (not handed over by a prefill rank)
                self._ttft.labels(m).observe(now - times.arrival)
                if times.scheduled is not None:
                    self._prefill.labels(m).observe(now - times.scheduled)
        elif times.last_token is not None:
            self._itl.labels(m).observe(now - times.last_token)
        times.last_token = now

    def on_finished(self, request: Request, status: RequestStatus) -> None:
        m, times = self.model_name, request.times
        self._success.labels(m, status.value).inc()
        prompt = request.num_prompt_tokens
        cached = max(request.num_cached_tokens, 0)
        transferred = request.num_transferred_tokens
        computed = prompt - cached - transferred if times.scheduled is not None else 0  # never ran: none computed
        self._prompt_tokens.labels(m).inc(prompt)
        self._by_source.labels(m, "cached").inc(cached)
        self._by_source.labels(m, "transferred").inc(transferred)
        self._by_source.labels(m, "computed").inc(max(computed, 0))
        self._prompt_len.labels(m).observe(prompt)
        self._output_len.labels(m).observe(request.num_output_tokens)
        if times.scheduled is not None:
            self._queue.labels(m).observe(times.scheduled - times.arrival)
        if times.first_token is None or times.last_token is None:  # ended before its first token here
            return
        self._e2e.labels(m).observe(times.last_token - times.arrival)
        if times.scheduled is not None:
            self._inference.labels(m).observe(times.last_token - times.scheduled)
        decode = times.last_token - times.first_token
        self._decode.labels(m).observe(decode)
        decoded_here = request.num_output_tokens - (1 if transferred == 0 else 2)  # tokens after the first one here
        if decoded_here > 0:
            self._tpot.labels(m).observe(decode / decoded_here)
