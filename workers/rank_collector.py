"""``RankCollector``: the gauges and running totals of one rank, read from its engine at scrape time.

Lifecycle: registered once on the rank's registry by ``WorkerMetrics.attach``; every scrape reads the
scheduler's queues, the block pool's usage and prefix-cache counters, the preemption count, whether
the engine failed, and (prefill and mixed ranks) the lease table. Reads are of plain ints and floats
the engine thread updates; a scrape may see a step half applied, never a torn value.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from k2serve.workers.engine import Engine
from k2serve.workers.kv_lease import KvLeaseTable


class RankCollector(Collector):
    def __init__(self, model_name: str, engine: Engine, leases: KvLeaseTable | None = None) -> None:
        self.model_name = model_name
        self.engine = engine
        self.leases = leases

    def collect(self) -> Iterator[Metric]:
        engine, m = self.engine, [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(m, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(m, value)
            return family

        stats = engine.kv.stats()
        yield gauge("k2serve_num_requests_running", "Requests in the running batch.", engine.scheduler.num_running)
        yield gauge("k2serve_num_requests_waiting", "Requests waiting to be scheduled.", engine.scheduler.num_waiting)
        yield gauge("k2serve_kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).", stats.usage)
        yield counter("k2serve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", stats.prefix_cache_queries)  # fmt: skip
        yield counter("k2serve_prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.prefix_cache_hits)
        yield counter("k2serve_num_preemptions", "Requests preempted.", engine.scheduler.num_preemptions)
        yield counter("k2serve_engine_busy_seconds", "Seconds in steps that ran this rank's requests (rate = utilization).", engine.busy_s)  # fmt: skip
        yield gauge("k2serve_engine_failed", "1 once this rank's engine failed (its expert-parallel group broke, or too many steps failed in a row).", float(engine.failure is not None))  # fmt: skip
        info = GaugeMetricFamily(
            "k2serve_cache_config_info", "The KV cache of this rank.", labels=["model_name", "block_size", "num_blocks"]
        )
        info.add_metric([self.model_name, str(engine.config.block_size), str(engine.pool.num_blocks)], 1.0)
        yield info
        if self.leases is not None:
            yield gauge("k2serve_kv_leases", "Leases this prefill rank holds for decode ranks.", len(self.leases))
            yield gauge("k2serve_kv_pinned_blocks", "KV blocks pinned by leases.", self.leases.pinned_blocks)
            ended = CounterMetricFamily("k2serve_kv_leases_ended", "Leases ended, by outcome.", labels=["outcome"])
            ended.add_metric(["released"], self.leases.num_released)
            ended.add_metric(["expired"], self.leases.num_expired)
            yield ended
