"""Prometheus export of expert parallelism: dispatch/combine traffic and time, expert load, imbalance.

Lifecycle: a rank that runs an ``AllToAllDispatcher`` registers one ``ExpertParallelCollector`` on
its own ``CollectorRegistry`` (never the global one); every scrape reads the dispatcher's counters
and the balancer's last measurement at that moment, so nothing is copied on the hot path.

Series (label ``model_name`` on each; bounded by the model: ``expert`` < n_routed_experts, ``layer`` < num_hidden_layers):
- ``k2serve_ep_dispatch_bytes_total`` / ``k2serve_ep_combine_bytes_total``: hidden-state bytes sent to
  / received back from other ranks (tokens × hidden × dtype size, once per token per remote rank);
  ``k2serve_ep_dispatch_metadata_bytes_total``: the expert-id and weight rows sent with them;
- ``k2serve_ep_dispatch_seconds_total`` / ``k2serve_ep_combine_seconds_total`` /
  ``k2serve_ep_expert_seconds_total``: host time in each phase; ``k2serve_ep_dispatch_calls_total``;
- ``k2serve_expert_tokens_total{expert}``: token assignments this rank routed to each logical expert,
  summed over layers (this rank's view; the sum over ranks is the group's load);
- ``k2serve_ep_imbalance_ratio{layer}``: max/mean tokens per rank over the group in the last
  measured window (1.0 = balanced); ``k2serve_ep_rebalances_total``.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from k2serve.workers.all_to_all_dispatcher import AllToAllDispatcher
from k2serve.workers.expert_balancer import ExpertBalancer


class ExpertParallelCollector(Collector):
    def __init__(
        self, dispatcher: AllToAllDispatcher, balancer: ExpertBalancer | None = None, model_name: str = ""
    ) -> None:
        self.dispatcher = dispatcher
        self.balancer = balancer
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        s, m = self.dispatcher.stats, [self.model_name]
        for name, doc, value in (
            ("k2serve_ep_dispatch_bytes", "Hidden-state bytes dispatched to other ranks.", s.dispatch_bytes),
            ("k2serve_ep_combine_bytes", "Hidden-state bytes combined back from other ranks.", s.combine_bytes),
            (
                "k2serve_ep_dispatch_metadata_bytes",
                "Expert-id and weight bytes sent with dispatched tokens.",
                s.metadata_bytes,
            ),
            ("k2serve_ep_dispatch_seconds", "Seconds in the dispatch all-to-alls.", s.dispatch_seconds),
            (
                "k2serve_ep_combine_seconds",
                "Seconds in the combine all-to-all and the per-token sum.",
                s.combine_seconds,
            ),
            (
                "k2serve_ep_expert_seconds",
                "Seconds in this rank's expert GEMMs on dispatched tokens.",
                s.expert_seconds,
            ),
            ("k2serve_ep_dispatch_calls", "MoE-layer dispatch calls (one per MoE layer per step).", s.calls),
        ):
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(m, value)
            yield family
        placement = self.dispatcher.placement
        per_expert = placement.logical_load(s.total_load).sum(dim=0)  # [E]
        tokens = CounterMetricFamily(
            "k2serve_expert_tokens",
            "Token assignments this rank routed to each logical expert.",
            labels=["model_name", "expert"],
        )
        for expert, count in enumerate(per_expert.tolist()):
            tokens.add_metric([self.model_name, str(expert)], count)
        yield tokens
        if self.balancer is None:
            return
        rebalances = CounterMetricFamily(
            "k2serve_ep_rebalances", "Expert placements applied by EPLB.", labels=["model_name"]
        )
        rebalances.add_metric(m, self.balancer.rebalances)
        yield rebalances
        ratio = GaugeMetricFamily(
            "k2serve_ep_imbalance_ratio",
            "Max/mean tokens per rank in the last measured window.",
            labels=["model_name", "layer"],
        )
        if self.balancer.imbalance_history:
            for layer, value in zip(placement.layers, self.balancer.imbalance_history[-1].tolist(), strict=True):
                ratio.add_metric([self.model_name, str(layer)], value)
        yield ratio
