"""``BenchOptions`` (one sweep's configuration) and ``SweepPoint`` (one request rate × concurrency cap).

Lifecycle: the ``k2serve bench serve`` entry point builds one frozen ``BenchOptions`` from its
flags (or a test builds it directly); ``sweep_points`` expands it into the points the runner runs
in order: every request rate × every concurrency cap (a rate sweep, a concurrency sweep, or both).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from k2serve.loadtest.dataset import DatasetOptions

BACKENDS = ("openai-chat", "grpc")
DEFAULT_PERCENTILES = (50.0, 90.0, 95.0, 99.0)


@dataclass(frozen=True)
class BenchOptions:
    base_url: str = "http://127.0.0.1:8000"
    backend: str = "openai-chat"
    grpc_target: str = "127.0.0.1:50051"
    endpoint: str = "/v1/chat/completions"
    model: str | None = None  # None: ask the server
    api_key: str | None = None
    dataset: DatasetOptions = field(default_factory=DatasetOptions)
    request_rates: tuple[float, ...] = (math.inf,)
    max_concurrencies: tuple[int | None, ...] = (None,)
    burstiness: float = 1.0
    seed: int = 0
    num_warmups: int = 0
    goodput: Mapping[str, float] = field(default_factory=dict)  # SLO name -> ms
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    request_timeout_s: float = 600.0
    point_timeout_s: float = 3600.0
    temperature: float | None = None
    ignore_eos: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not self.request_rates or not self.max_concurrencies:
            raise ValueError("at least one --request-rate and one --max-concurrency (or none) are needed")
        if any(not rate > 0 for rate in self.request_rates):
            raise ValueError(f"--request-rate values must be positive (or inf), got {self.request_rates}")
        if any(c is not None and c < 1 for c in self.max_concurrencies):
            raise ValueError(f"--max-concurrency values must be at least 1, got {self.max_concurrencies}")
        if not self.burstiness > 0:
            raise ValueError(f"--burstiness must be positive, got {self.burstiness}")
        if self.request_timeout_s <= 0 or self.point_timeout_s <= 0:
            raise ValueError("--request-timeout and --point-timeout must be positive")
        if self.num_warmups < 0:
            raise ValueError("--num-warmups must not be negative")

    @property
    def target(self) -> str:
        """Where the requests go: the base URL (REST) or the gRPC target."""
        return self.grpc_target if self.backend == "grpc" else self.base_url

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["api_key"] = "***" if self.api_key else None  # never written to a result file
        out["request_rates"] = [rate_text(r) for r in self.request_rates]
        out["goodput"] = dict(self.goodput)
        out["dataset"]["path"] = str(self.dataset.path) if self.dataset.path else None
        return out


@dataclass(frozen=True)
class SweepPoint:
    index: int
    request_rate: float
    max_concurrency: int | None

    @property
    def label(self) -> str:
        text = f"rate={rate_text(self.request_rate)}"
        return text if self.max_concurrency is None else f"{text} conc={self.max_concurrency}"

    @property
    def file_stem(self) -> str:
        conc = "" if self.max_concurrency is None else f"-conc{self.max_concurrency}"
        return f"point-{self.index:02d}-rate{rate_text(self.request_rate)}{conc}"

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "request_rate": rate_text(self.request_rate),
            "max_concurrency": self.max_concurrency,
        }


def sweep_points(options: BenchOptions) -> list[SweepPoint]:
    pairs = [(rate, conc) for rate in options.request_rates for conc in options.max_concurrencies]
    return [SweepPoint(i, rate, conc) for i, (rate, conc) in enumerate(pairs)]


def rate_text(rate: float) -> str:
    """``inf`` or the rate without a useless ``.0`` (vLLM writes ``"inf"`` as a string)."""
    return "inf" if math.isinf(rate) else f"{rate:g}"
