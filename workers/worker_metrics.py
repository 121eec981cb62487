"""``WorkerMetrics``: every Prometheus series of one worker rank, in the rank's own registry.

Lifecycle: the worker service builds one per rank (``WorkerMetrics(model_name, max_model_len)``),
``attach``es it to the rank (the engine's observer, the scrape-time collector over the engine and the
lease table, the expert-parallel collector when the rank dispatches to peers), hands ``kv`` to its
KV transfer paths, and may ``serve(host, port)`` the registry over HTTP. The names and meanings are
listed in docs/METRICS.md.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from k2serve.workers.all_to_all_dispatcher import AllToAllDispatcher
from k2serve.workers.engine import Engine
from k2serve.workers.ep_metrics import ExpertParallelCollector
from k2serve.workers.expert_balancer import ExpertBalancer
from k2serve.workers.kv_lease import KvLeaseTable
from k2serve.workers.kv_transfer_metrics import KvTransferMetrics
from k2serve.workers.metrics_endpoint import MetricsEndpoint
from k2serve.workers.rank_collector import RankCollector
from k2serve.workers.request_metrics import RequestMetrics


class WorkerMetrics:
    def __init__(self, model_name: str, max_model_len: int) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.requests = RequestMetrics(model_name, self.registry, max_model_len)
        self.kv = KvTransferMetrics(self.registry)

    def attach(
        self,
        engine: Engine,
        leases: KvLeaseTable | None = None,
        dispatcher: AllToAllDispatcher | None = None,
        balancer: ExpertBalancer | None = None,
    ) -> None:
        engine.observer = self.requests
        self.registry.register(RankCollector(self.model_name, engine, leases))
        if dispatcher is not None:
            self.registry.register(ExpertParallelCollector(dispatcher, balancer, self.model_name))

    def serve(self, host: str, port: int = 0) -> MetricsEndpoint:
        return MetricsEndpoint.start(self.registry, host, port)
