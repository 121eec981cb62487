"""What the controller asks one ``WorkerActor`` to run: a ``RankSpec`` and ``WorkerOptions`` as plain dicts.

Lifecycle: the controller calls ``rank_spec_dict`` and ``worker_options_dict`` for every rank of a
group it starts (on the head node, which may not hold the model); the actor, on the rank's node,
turns them back into objects with ``build_rank_spec`` (which resolves a KV memory budget into
``num_blocks`` from the model's config.json there) and ``build_worker_options``. Plain dicts keep
the actor's interface independent of the dataclasses' pickled form.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from k2serve.cluster.config import ClusterConfig
from k2serve.cluster.pool_config import PoolConfig
from k2serve.workers.cache_budget import capacity_for_kv_cache_memory, dtype_num_bytes
from k2serve.workers.config import ModelConfig

if TYPE_CHECKING:
    from k2serve.workers.group_rank import RankSpec

NODE_IP = "node"  # network.interface_host value meaning "this node's Ray IP address"


def rank_spec_dict(config: ClusterConfig, pool: PoolConfig, rank: int, rendezvous: str | None) -> dict[str, Any]:
    return {
        "model_dir": str(config.model),
        "ep_size": pool.ep_size,
        "ep_rank": rank,
        "rendezvous": rendezvous,
        "timeout_s": pool.collective_timeout_s,
        "join_timeout_s": max(pool.collective_timeout_s, config.health.start_timeout_s),
        "redundant_experts": pool.redundant_experts,
        "dtype": pool.dtype,
        "device": pool.device,
        "num_blocks": pool.kv_cache_blocks,
        "kv_cache_memory": pool.kv_cache_memory,
        "block_size": pool.block_size,
        "max_model_len": pool.max_model_len,
        "max_num_batched_tokens": pool.max_num_batched_tokens,
    }


def worker_options_dict(
    config: ClusterConfig, pool: PoolConfig, worker_id: str, cluster_token: str | None = None
) -> dict[str, Any]:
    """``host`` is ``network.interface_host`` as configured; the actor resolves ``"node"``. Holds the
    cluster token: never log it."""
    return {
        "worker_id": worker_id,
        "role": pool.role,
        "host": config.network.interface_host,
        "port": 0,
        "transport": config.kv_transfer.transport,
        "lease_ttl_s": config.kv_transfer.lease_ttl_s,
        "handoff_wait_s": config.kv_transfer.handoff_wait_s,
        "checksum": config.kv_transfer.checksum,
        "transfer_timeout_s": config.kv_transfer.timeout_s,
        "kv_lanes": config.kv_transfer.lanes,
        "model_name": config.served_model_name,
        "metrics_port": config.metrics.worker_port,
        "cluster_token": cluster_token,
    }


def build_rank_spec(spec: Mapping[str, Any]) -> RankSpec:
    """The ``RankSpec`` of a ``rank_spec_dict``; a KV memory budget becomes whole blocks here."""
    from k2serve.workers.group_rank import RankSpec  # torch: only in the actor's process

    fields = dict(spec)
    memory = fields.pop("kv_cache_memory", None)
    fields["model_dir"] = Path(fields["model_dir"])
    if memory is not None:
        model = ModelConfig.from_model_dir(fields["model_dir"])
        capacity = capacity_for_kv_cache_memory(model, fields["block_size"], dtype_num_bytes(fields["dtype"]), memory)
        fields["num_blocks"] = capacity.num_blocks
    return RankSpec(**fields)


def resolve_host(configured: str, node_ip: str) -> str:
    """The address to bind: the configured interface, or this node's IP for ``"node"``."""
    if configured == NODE_IP:
        return node_ip
    return configured
