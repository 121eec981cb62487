"""``WorkerOptions``: how one rank's Worker service runs (its role, interface, KV transfer and lease
settings, metrics, the cluster token, test-only faults). The controller builds them from the cluster YAML
(``cluster/rank_plan.py``); ``WorkerServer`` and its two handoff sides read them.

Lifecycle: an immutable value, validated on construction (``ValueError`` naming the field).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from k2serve.workers.fault_plan import FaultPlan
from k2serve.workers.kv_pair_group import DEFAULT_LANES, MAX_LANES

Role = Literal["prefill", "decode", "mixed"]
Transport = Literal["p2p", "grpc"]


@dataclass(frozen=True)
class WorkerOptions:
    worker_id: str
    role: Role
    host: str = "127.0.0.1"  # interface for the gRPC server and the KV transfer store
    port: int = 0  # 0 = any free port
    transport: Transport = "p2p"
    lease_ttl_s: float = 30.0
    transfer_timeout_s: float = 30.0
    handoff_wait_s: float = 30.0  # longest a Decode waits for free KV blocks (or its deadline, if sooner)
    checksum: bool = False
    kv_lanes: int = DEFAULT_LANES  # p2p transfers this rank (decode) runs at once with one prefill rank
    stop_token_ids: tuple[int, ...] = ()
    model_name: str = ""  # the model_name label of its metrics
    metrics_port: int | None = None  # serve /metrics over HTTP on host (0 = any free port); None = no endpoint
    max_step_failures: int = 3  # failed engine steps in a row after which the engine is dead (NOT_SERVING)
    faults: FaultPlan = field(default_factory=FaultPlan)  # test-only fault hooks (K2SERVE_FAULTS via the actor)
    # the shared secret of the cluster's internal calls (``proto/cluster_token.py``): this rank's server
    # requires it and its calls to other ranks carry it; None = no check (a rank started on its own)
    cluster_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode", "mixed"):
            raise ValueError(f"role: expected prefill, decode or mixed, got {self.role!r}")
        if self.max_step_failures < 1:
            raise ValueError(f"max_step_failures: must be >= 1, got {self.max_step_failures}")
        if not 1 <= self.kv_lanes <= MAX_LANES:
            raise ValueError(f"kv_lanes: expected 1..{MAX_LANES}, got {self.kv_lanes}")
        if self.transport not in ("p2p", "grpc"):
            raise ValueError(f"transport: expected p2p or grpc, got {self.transport!r}")
