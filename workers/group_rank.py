"""``GroupRank``: everything one rank of an expert-parallel group runs, built from a ``RankSpec``.

Lifecycle: ``GroupRank.build(spec)`` joins the group (``ParallelContext`` from the rendezvous),
picks the expert placement (a JSON file, or ``ExpertPlacement.initial`` with the requested
redundant slots), builds the all-to-all dispatcher, loads only this rank's experts, allocates the
KV cache and wires ``Engine`` + ``Lockstep`` + ``ExpertBalancer``. EP=1 gets the local dispatcher
and no lockstep. The caller drives ``engine`` (the offline runner below, or the gRPC service of the
next layer) and calls ``close()`` at exit.

``run_offline`` is the Ray-free group driver for tests and benchmarks: each rank gets its own
request list with an ``arrival_step`` (the loop iteration at which it is added: iterations are
collective, so arrivals are deterministic across ranks), streams every delta as one JSON line,
and returns when every rank of the group is done — or when the group fails, after writing the
error delta of every request it still held.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from k2serve.workers.all_to_all_dispatcher import AllToAllDispatcher
from k2serve.workers.config import ModelConfig
from k2serve.workers.engine import Engine, EngineConfig, RequestOutput
from k2serve.workers.expert_balancer import ExpertBalancer
from k2serve.workers.expert_placement import ExpertPlacement
from k2serve.workers.lockstep import Lockstep
from k2serve.workers.model.experts import ExpertWeightFormat
from k2serve.workers.model.kv_cache import allocate_kv_cache
from k2serve.workers.model_loader import load_model
from k2serve.workers.parallel import DEFAULT_TIMEOUT_S, GroupError, ParallelContext, Rendezvous
from k2serve.workers.sampling_params import SamplingParams
from k2serve.workers.scheduler import SchedulerConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankSpec:
    model_dir: Path
    ep_size: int = 1
    ep_rank: int = 0
    rendezvous: str | None = None  # HOST:PORT of the group's store; required when ep_size > 1
    timeout_s: float = DEFAULT_TIMEOUT_S  # every collective
    join_timeout_s: float | None = None  # forming the group at start (None: see ParallelContext.create)
    redundant_experts: int = 0  # extra physical slots over the group (EPLB replicas)
    placement_file: Path | None = None  # an ExpertPlacement JSON instead of the initial one
    rebalance_window: int = 0  # group steps between EPLB rebalances; 0 = measure only, never move
    measure_window: int = 32  # group steps between load measurements when not rebalancing
    dtype: str = "float32"
    device: str = "cpu"
    expert_format: ExpertWeightFormat = "dense"
    num_blocks: int = 256
    block_size: int = 16
    max_model_len: int = 2048
    max_num_batched_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.ep_size > 1 and not self.rendezvous:
            raise ValueError("rendezvous: required when ep_size > 1 (HOST:PORT of the group's store)")
        if self.rendezvous:
            Rendezvous.parse(self.rendezvous)
        if self.redundant_experts < 0:
            raise ValueError(f"redundant_experts: must be >= 0, got {self.redundant_experts}")
        if self.rebalance_window < 0 or self.measure_window < 1:
            raise ValueError("rebalance_window must be >= 0 and measure_window >= 1")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: expected float32, bfloat16 or float16, got {self.dtype!r}")


@dataclass
class GroupRank:
    spec: RankSpec
    ctx: ParallelContext
    engine: Engine
    dispatcher: AllToAllDispatcher | None = None
    balancer: ExpertBalancer | None = None
    step_seconds: list[float] = field(default_factory=list)  # wall time of every step that ran a forward here
    serve_seconds: float = 0.0  # wall time of run_offline, first step to the group's end

    @classmethod
    def build(cls, spec: RankSpec) -> GroupRank:
        config = ModelConfig.from_model_dir(spec.model_dir)
        dtype = getattr(torch, spec.dtype)
        if spec.ep_size == 1:
            ctx = ParallelContext.single(spec.device)
        else:
            assert spec.rendezvous is not None
            ctx = ParallelContext.create(
                spec.rendezvous,
                spec.ep_rank,
                spec.ep_size,
                timeout_s=spec.timeout_s,
                join_timeout_s=spec.join_timeout_s,
                device=spec.device,
            )
        dispatcher: AllToAllDispatcher | None = None
        expert_ids: dict[int, tuple[int, ...]] | None = None
        if ctx.size > 1:
            placement = _placement(spec, config)
            dispatcher = AllToAllDispatcher(ctx, placement)
            expert_ids = {layer: placement.rank_experts(layer, ctx.rank) for layer in placement.layers}
        model = load_model(
            spec.model_dir,
            dtype=dtype,
            device=spec.device,
            expert_ids=expert_ids,
            max_positions=spec.max_model_len,
            progress=False,
            expert_format=spec.expert_format,
            dispatcher=dispatcher,
        )
        cache = allocate_kv_cache(config, spec.num_blocks, spec.block_size, dtype, spec.device)
        balancer: ExpertBalancer | None = None
        lockstep: Lockstep | None = None
        if dispatcher is not None:
            balancer = ExpertBalancer(
                model,
                dispatcher,
                spec.model_dir,
                window_steps=spec.rebalance_window or spec.measure_window,
                rebalance=spec.rebalance_window > 0,
            )
            lockstep = Lockstep(ctx, hooks=(balancer,))
        engine_config = EngineConfig(
            block_size=spec.block_size,
            max_model_len=spec.max_model_len,
            scheduler=SchedulerConfig(max_num_batched_tokens=spec.max_num_batched_tokens),
        )
        engine = Engine(model, cache, engine_config, lockstep=lockstep)
        return cls(spec, ctx, engine, dispatcher, balancer)

    def step(self) -> list[RequestOutput]:
        started, steps_before = time.perf_counter(), self.engine.num_steps
        outputs = self.engine.step()
        if self.engine.num_steps != steps_before:  # an all-idle group poll does not count
            self.step_seconds.append(time.perf_counter() - started)
        return outputs

    def stats(self) -> dict[str, Any]:
        """What the benchmark and the tests read: step times, dispatch/combine figures, expert load."""
        out: dict[str, Any] = {
            "rank": self.ctx.rank,
            "ep_size": self.ctx.size,
            "steps": len(self.step_seconds),
            "step_seconds_total": sum(self.step_seconds),
            "serve_seconds": self.serve_seconds,
        }
        if self.dispatcher is not None:
            s = self.dispatcher.stats
            out |= {
                "dispatch_calls": s.calls,
                "dispatch_seconds": s.dispatch_seconds,
                "combine_seconds": s.combine_seconds,
                "expert_seconds": s.expert_seconds,
                "dispatch_bytes": s.dispatch_bytes,
                "combine_bytes": s.combine_bytes,
                "metadata_bytes": s.metadata_bytes,
                "tokens_sent": s.tokens_sent,
                "physical_load": s.total_load.tolist(),
                "placement": json.loads(self.dispatcher.placement.to_json()),
            }
        if self.balancer is not None:
            out |= {
                "rebalances": self.balancer.rebalances,
                "imbalance_history": [v.tolist() for v in self.balancer.imbalance_history],
            }
        return out

    def close(self) -> None:
        self.ctx.close()


def _placement(spec: RankSpec, config: ModelConfig) -> ExpertPlacement:
    if spec.placement_file is not None:
        placement = ExpertPlacement.from_json(Path(spec.placement_file).read_text())
    else:
        placement = ExpertPlacement.initial(
            config.n_routed_experts, spec.ep_size, config.moe_layer_ids, spec.redundant_experts
        )
    if placement.num_ranks != spec.ep_size or placement.layers != config.moe_layer_ids:
        raise ValueError(
            f"placement_file: made for {placement.num_ranks} ranks and MoE layers {list(placement.layers)}; "
            f"this group has {spec.ep_size} ranks and MoE layers {list(config.moe_layer_ids)}"
        )
    return placement


# ---- the offline driver -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OfflineRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    arrival_step: int = 0

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> OfflineRequest:
        """{"request_id", "prompt_token_ids", "max_tokens", "arrival_step"?, "ignore_eos"?, "temperature"?, ...}."""
        params = {k: v for k, v in record.items() if k not in ("request_id", "prompt_token_ids", "arrival_step")}
        params.setdefault("temperature", 0.0)
        return cls(
            request_id=str(record["request_id"]),
            prompt_token_ids=tuple(int(t) for t in record["prompt_token_ids"]),
            params=SamplingParams(**params),
            arrival_step=int(record.get("arrival_step", 0)),
        )


def output_record(rank: int, output: RequestOutput) -> dict[str, Any]:
    record: dict[str, Any] = {
        "rank": rank,
        "request_id": output.request_id,
        "index": output.index,
        "new_token_ids": list(output.new_token_ids),
    }
    if output.finished:
        record["finish_reason"] = output.finish_reason
        record["error"] = output.error
    return record


def run_offline(rank: GroupRank, requests: Sequence[OfflineRequest], out: IO[str], *, max_steps: int = 100_000) -> int:
    """Serve ``requests`` on this rank in lockstep with the group; 0 when all finished, 3 on a group failure."""
    started = time.perf_counter()
    try:
        return _serve(rank, sorted(requests, key=lambda r: r.arrival_step), out, max_steps)
    finally:
        rank.serve_seconds = time.perf_counter() - started


def _serve(rank: GroupRank, pending: list[OfflineRequest], out: IO[str], max_steps: int) -> int:
    engine, lockstep = rank.engine, rank.engine.lockstep
    for iteration in range(max_steps):
        while pending and pending[0].arrival_step <= iteration:
            request = pending.pop(0)
            engine.add_request(request.request_id, request.prompt_token_ids, request.params)
        idle = not pending and not engine.has_unfinished_requests()
        if lockstep is None and idle:
            return 0
        if lockstep is not None:
            lockstep.stopping = idle
        try:
            outputs = rank.step()
        except GroupError as exc:
            logger.error("rank %d: %s", rank.ctx.rank, exc)
            _write(out, rank.ctx.rank, engine.drain_finished())
            never_admitted = [
                RequestOutput(r.request_id, 0, (), finish_reason="error", error=str(exc)) for r in pending
            ]
            _write(out, rank.ctx.rank, never_admitted)  # they fail too, exactly once
            return 3
        _write(out, rank.ctx.rank, outputs)
        if lockstep is not None and lockstep.last is not None and lockstep.last.all_done:
            return 0
    raise RuntimeError(f"rank {rank.ctx.rank}: not done after {max_steps} steps")


def _write(out: IO[str], rank: int, outputs: Sequence[RequestOutput]) -> None:
    for output in outputs:
        out.write(json.dumps(output_record(rank, output)) + "\n")
    out.flush()
