"""``KvTransferMetrics``: the KV cache moves of one rank, as Prometheus series and as plain totals.

Lifecycle: the worker service builds one on its rank's registry and calls ``finished`` once per
transfer when it ends (a p2p sender's done callback, the end of a gRPC ``PullKv`` stream, a decode
rank's pull); ``GetLoad`` reads the totals (``sent_bytes``, ``received_bytes``, ``ok``,
``failed``). ``direction`` is ``send`` on the prefill rank and ``receive`` on the decode rank;
bytes are the latent rows moved (576 values × dtype size × layers × tokens for Kimi K2).
"""

from __future__ import annotations

import threading
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Histogram

Direction = Literal["send", "receive"]
TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class KvTransferMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["direction", "transport"]
        self._bytes = Counter("k2serve_kv_transfer_bytes", "KV cache bytes moved.", labels, registry=registry)
        self._seconds = Histogram(
            "k2serve_kv_transfer_seconds",
            "Duration of each successful KV transfer.",
            labels,
            buckets=TRANSFER_BUCKETS,
            registry=registry,
        )
        self._failures = Counter(
            "k2serve_kv_transfer_failures", "KV transfers that failed or were cancelled.", labels, registry=registry
        )
        for direction in ("send", "receive"):  # every series exists (at 0) from the first scrape
            for transport in ("p2p", "grpc"):
                for series in (self._bytes, self._seconds, self._failures):
                    series.labels(direction, transport)
        self._lock = threading.Lock()  # p2p senders finish on their own threads
        self.sent_bytes = 0
        self.received_bytes = 0
        self.ok = 0
        self.failed = 0

    def finished(self, direction: Direction, transport: str, nbytes: int, seconds: float, ok: bool) -> None:
        with self._lock:
            if direction == "send":
                self.sent_bytes += nbytes
            else:
                self.received_bytes += nbytes
            if ok:
                self.ok += 1
            else:
                self.failed += 1
        self._bytes.labels(direction, transport).inc(nbytes)
        if ok:
            self._seconds.labels(direction, transport).observe(seconds)
        else:
            self._failures.labels(direction, transport).inc()
