"""``RouterMetrics``: the router's Prometheus series, in its own ``CollectorRegistry``.

Lifecycle: one per router process, built by the ``Frontend`` (which times every request); the REST
app renders ``registry`` at ``GET /metrics`` and counts every answer (``HttpCounter``), the gRPC
server counts every call (``GrpcCounter``). Names are ``k2serve_router_*`` with vLLM's meanings,
measured at the router, i.e. what clients see: TTFT from arrival to the first token streamed,
inter-token latency per streamed step, end-to-end, time queued for admission. Admission gauges,
rejections, routing decisions and the ready ranks are read at scrape time from their owners
(``Admission``, ``Dispatcher``), as are request migrations (``Dispatcher.migrations``). Labels are bounded: ``model_name``, ``finished_reason``, route
templates, gRPC method names and codes, policy/role/reason names; never a request id or a user.
The full list is in docs/METRICS.md.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from k2serve.router.admission import Admission
from k2serve.router.dispatcher import Dispatcher

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920, 7680)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.3, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
FINISH_REASONS = ("stop", "length", "tool_calls", "abort", "error")
ROLES = ("mixed", "prefill", "decode")
MIGRATION_KINDS = ("ongoing", "new")  # after / before the first token reached the client


class _StateCollector(Collector):
    """Admission queue, rejections, routing decisions and ready ranks, read when scraped."""

    def __init__(self, model_name: str, admission: Admission, dispatcher: Dispatcher) -> None:
        self._model, self._admission, self._dispatcher = model_name, admission, dispatcher

    def collect(self) -> Iterable[Metric]:
        m = [self._model]
        running = GaugeMetricFamily(
            "k2serve_router_requests_running", "Admitted choices running.", labels=["model_name"]
        )
        running.add_metric(m, self._admission.running)
        waiting = GaugeMetricFamily("k2serve_router_requests_waiting", "Requests queued for admission.", labels=["model_name"])  # fmt: skip
        waiting.add_metric(m, self._admission.waiting)
        rejected = CounterMetricFamily(
            "k2serve_router_requests_rejected", "Requests refused for overload.", labels=["model_name"]
        )
        rejected.add_metric(m, self._admission.rejected)
        decisions = CounterMetricFamily(
            "k2serve_router_routing_decisions", "Worker picks by reason.", labels=["policy", "role", "reason"]
        )
        policy = self._dispatcher.policy.name
        for (role, reason), count in sorted(self._dispatcher.decisions.items()):
            decisions.add_metric([policy, role, reason], count)
        workers = GaugeMetricFamily("k2serve_router_workers", "Ready ranks this router routes to.", labels=["role"])
        endpoints = self._dispatcher.endpoints
        for role in ROLES:
            workers.add_metric([role], sum(1 for e in endpoints if e.role == role))
        migrations = CounterMetricFamily(
            "k2serve_router_migrations", "Requests re-issued on another rank after theirs failed.", labels=["kind"]
        )
        for kind in MIGRATION_KINDS:
            migrations.add_metric([kind], self._dispatcher.migrations[kind])
        return [running, waiting, rejected, decisions, workers, migrations]


class RouterMetrics:
    def __init__(
        self, model_name: str, admission: Admission, dispatcher: Dispatcher, registry: CollectorRegistry | None = None
    ) -> None:
        self.model_name = model_name
        self.registry = registry or CollectorRegistry()
        r, labels = self.registry, ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r)

        self.ttft = histogram("k2serve_router_time_to_first_token_seconds", "Arrival to the first token.", TTFT_BUCKETS)
        self.itl = histogram("k2serve_router_inter_token_latency_seconds", "Between two streamed steps.", ITL_BUCKETS)
        self.e2e = histogram("k2serve_router_e2e_request_latency_seconds", "Arrival to the last token.", E2E_BUCKETS)
        self.queue = histogram("k2serve_router_request_queue_time_seconds", "Waiting for admission.", QUEUE_BUCKETS)
        self.finished = Counter(
            "k2serve_router_request_success", "Choices finished, by reason.", [*labels, "finished_reason"], registry=r
        )
        self.prompt_tokens = Counter("k2serve_router_prompt_tokens", "Prompt tokens.", labels, registry=r)
        self.cached_tokens = Counter(
            "k2serve_router_cached_prompt_tokens", "Prompt tokens served from a prefix cache.", labels, registry=r
        )
        self.generation_tokens = Counter("k2serve_router_generation_tokens", "Generated tokens.", labels, registry=r)
        self.http_requests = Counter(
            "k2serve_router_http_requests", "REST answers.", ["route", "method", "status"], registry=r
        )
        self.grpc_requests = Counter("k2serve_router_grpc_requests", "gRPC calls.", ["method", "code"], registry=r)
        for reason in FINISH_REASONS:
            self.finished.labels(model_name, reason)
        self.registry.register(_StateCollector(model_name, admission, dispatcher))

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.labels(self.model_name).observe(seconds)

    def observe_token_gap(self, seconds: float) -> None:
        self.itl.labels(self.model_name).observe(seconds)

    def observe_admitted(self, waited_s: float) -> None:
        self.queue.labels(self.model_name).observe(waited_s)

    def observe_choice(self, finish_reason: str) -> None:
        self.finished.labels(self.model_name, finish_reason).inc()

    def observe_request(self, seconds: float, prompt_tokens: int, cached_tokens: int, generated: int) -> None:
        self.e2e.labels(self.model_name).observe(seconds)
        self.prompt_tokens.labels(self.model_name).inc(prompt_tokens)
        self.cached_tokens.labels(self.model_name).inc(cached_tokens)
        self.generation_tokens.labels(self.model_name).inc(generated)
