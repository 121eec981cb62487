"""``RouterMetrics``: the router's Prometheus series, in its own ``CollectorRegistry``.

Lifecycle: one per router process, handed to the ``Frontend`` (which times every request) and to
the REST app (``GET /metrics`` renders ``registry``). Names are ``k2serve_router_*`` with vLLM's
meanings (TTFT from arrival at the router to the first token, inter-token latency per streamed
step, end-to-end); labels are bounded (``model_name``, ``finish_reason``, never a request id).
Admission gauges are read at scrape time from the ``Admission`` object.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from k2serve.router.admission import Admission

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920, 7680)


class _AdmissionCollector(Collector):
    def __init__(self, admission: Admission, model_name: str) -> None:
        self._admission, self._model = admission, model_name

    def collect(self) -> Iterable[Metric]:
        running = GaugeMetricFamily(
            "k2serve_router_requests_running", "choices admitted and running", labels=["model_name"]
        )
        running.add_metric([self._model], self._admission.running)
        waiting = GaugeMetricFamily(
            "k2serve_router_requests_waiting", "requests queued for admission", labels=["model_name"]
        )
        waiting.add_metric([self._model], self._admission.waiting)
        rejected = GaugeMetricFamily(
            "k2serve_router_requests_rejected", "requests refused for overload since start", labels=["model_name"]
        )
        rejected.add_metric([self._model], self._admission.rejected)
        return [running, waiting, rejected]


class RouterMetrics:
    def __init__(self, model_name: str, admission: Admission, registry: CollectorRegistry | None = None) -> None:
        self.model_name = model_name
        self.registry = registry or CollectorRegistry()
        labels = ["model_name"]
        self.ttft = Histogram(
            "k2serve_router_time_to_first_token_seconds",
            "arrival at the router to the first token",
            labels,
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "k2serve_router_inter_token_latency_seconds",
            "time between two streamed steps of one choice",
            labels,
            buckets=ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "k2serve_router_e2e_request_latency_seconds",
            "arrival to the last token",
            labels,
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )
        self.finished = Counter(
            "k2serve_router_request_success",
            "choices finished, by reason",
            [*labels, "finished_reason"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "k2serve_router_prompt_tokens", "prompt tokens of finished requests", labels, registry=self.registry
        )
        self.cached_tokens = Counter(
            "k2serve_router_cached_prompt_tokens",
            "prompt tokens served from a prefix cache",
            labels,
            registry=self.registry,
        )
        self.generation_tokens = Counter(
            "k2serve_router_generation_tokens", "generated tokens of finished requests", labels, registry=self.registry
        )
        self.registry.register(_AdmissionCollector(admission, model_name))

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.labels(self.model_name).observe(seconds)

    def observe_token_gap(self, seconds: float) -> None:
        self.itl.labels(self.model_name).observe(seconds)

    def observe_choice(self, finish_reason: str) -> None:
        self.finished.labels(self.model_name, finish_reason).inc()

    def observe_request(self, seconds: float, prompt_tokens: int, cached_tokens: int, generated: int) -> None:
        self.e2e.labels(self.model_name).observe(seconds)
        self.prompt_tokens.labels(self.model_name).inc(prompt_tokens)
        self.cached_tokens.labels(self.model_name).inc(cached_tokens)
        self.generation_tokens.labels(self.model_name).inc(generated)
