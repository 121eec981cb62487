"""``KvTransferMetrics``: the KV cache moves of one rank, as Prometheus series and as plain totals.

Lifecycle: the worker service builds one on its rank's registry and calls ``finished`` once per
transfer when it ends (a p2p sender's done callback, the end of a gRPC ``PullKv`` stream, a decode
rank's pull); ``GetLoad`` reads the totals (``sent_bytes``, ``received_bytes``, ``ok``,
``failed``). ``direction`` is ``send`` on the prefill rank and ``receive`` on the decode rank;
bytes are the latent rows moved (576 values × dtype size × layers × tokens for Kimi K2).

The decode side of the handoff also lands here: ``handoff_ended`` once per ``Decode`` call when its
wait for KV blocks ends (``HANDOFF_OUTCOMES``; the wait is observed when there was one), and
``watch_handoff_queue`` makes the queue-depth gauge read the live queue at scrape time. The prefill
side counts the lease renewals it answered (``lease_renewed``). Pushed handoffs count their steps on the
decode rank (``push_ended``, ``PUSH_OUTCOMES``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

Direction = Literal["send", "receive"]
# how a Decode call's wait for KV blocks ended: admitted at once, admitted after waiting, the wait ran
# out, larger than the whole pool, its lease was lost, aborted, or the caller left / it failed; or
# its KV had been pushed here during the prefill (no wait, no pull)
HANDOFF_OUTCOMES = ("immediate", "waited", "timed_out", "too_large", "lease_lost", "aborted", "left", "pushed")
# how a pushed KV ended on the decode rank: taken, refused, claimed by its Decode, failed after the claim
# (the Decode pulled instead), failed before any claim, never claimed, aborted
PUSH_OUTCOMES = ("accepted", "refused", "claimed", "fell_back", "failed", "expired", "aborted")
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
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
        self._handoffs = Counter(
            "k2serve_kv_handoffs",
            "Decode handoffs by how their wait for KV blocks ended.",
            ["outcome"],
            registry=registry,
        )
        for outcome in HANDOFF_OUTCOMES:
            self._handoffs.labels(outcome)
        self._handoff_wait = Histogram(
            "k2serve_kv_handoff_wait_seconds",
            "Time a Decode call waited in the queue for KV blocks (calls that waited).",
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self._handoffs_waiting = Gauge(
            "k2serve_kv_handoffs_waiting", "Decode calls waiting for free KV blocks now.", registry=registry
        )
        self._pushes = Counter(
            "k2serve_kv_pushes",
            "Pushed KV handoffs (layer by layer during the prefill) by outcome, on the decode rank.",
            ["outcome"],
            registry=registry,
        )
        for outcome in PUSH_OUTCOMES:
            self._pushes.labels(outcome)
        self._renewals = Counter(
            "k2serve_kv_lease_renewals", "Lease renewals answered (heartbeats of decode ranks).", registry=registry
        )
        self.handoff_waits = 0  # Decode calls that had to wait for blocks (whatever the outcome)
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

    def handoff_ended(self, outcome: str, waited_s: float | None) -> None:
        """One Decode call's wait ended; ``waited_s`` is None when it did not queue."""
        self._handoffs.labels(outcome).inc()
        if waited_s is not None:
            self.handoff_waits += 1
            self._handoff_wait.observe(waited_s)

    def push_ended(self, outcome: str) -> None:
        self._pushes.labels(outcome).inc()

    def lease_renewed(self) -> None:
        self._renewals.inc()

    def watch_handoff_queue(self, depth: Callable[[], int]) -> None:
        self._handoffs_waiting.set_function(depth)
