"""``ScrapeTargets``: the live worker ranks' and the controller's ``/metrics`` endpoints, for Prometheus.

Lifecycle: one per router (``frontend.scrape_targets``); whoever follows the worker set (the
registry follower of ``k2serve router``/``serve``) calls ``update`` with every new set, and
``GET /metrics/targets`` answers ``http_sd()``: Prometheus' HTTP service-discovery format, one
group per endpoint with the labels ``worker``, ``pool``, ``role``, ``group`` (or ``role`` =
``controller``), so a scrape config needs only ``http_sd_configs: [{url: .../metrics/targets}]``.
Every rank is listed whatever its state: a starting or failing rank's series matter most.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ScrapeTarget:
    address: str  # host:port
    labels: dict[str, str] = field(default_factory=dict)


class ScrapeTargets:
    def __init__(self) -> None:
        self._targets: tuple[ScrapeTarget, ...] = ()

    def update(self, targets: Iterable[ScrapeTarget]) -> None:
        self._targets = tuple(t for t in targets if t.address)

    def http_sd(self) -> list[dict[str, object]]:
        return [{"targets": [t.address], "labels": dict(t.labels)} for t in self._targets]
