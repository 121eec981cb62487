"""``PoolConfig``: one pool of the cluster (prefill, decode or colocated): groups × expert-parallel ranks.

Lifecycle: ``read_pool`` validates one ``pools.<name>`` section of the cluster YAML (against the
model's config.json when it is readable on this machine: EP size divides the expert count, the
redundant slots split evenly, a KV memory budget holds at least one block) and returns the frozen
``PoolConfig`` the controller expands into groups and ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

from k2serve.cluster.config_error import ClusterConfigError
from k2serve.cluster.config_reader import ConfigReader
from k2serve.workers.cache_budget import CacheBudgetError, cache_capacity, dtype_num_bytes, parse_memory_size
from k2serve.workers.config import ModelConfig

PoolName = Literal["prefill", "decode", "colocated"]
Role = Literal["prefill", "decode", "mixed"]
Dtype = Literal["float32", "bfloat16", "float16"]
DEFAULT_KV_CACHE_BLOCKS = 256
_ROLES: dict[str, Role] = {"prefill": "prefill", "decode": "decode", "colocated": "mixed"}


@dataclass(frozen=True)
class PoolConfig:
    name: PoolName
    groups: int = 1  # expert-parallel groups in the pool (0 = none for now; scale up later)
    ep_size: int = 1  # ranks per group; divides the model's routed experts
    gpus_per_rank: float = 0.0  # 0 on CPU
    cpus_per_rank: float = 1.0
    kv_cache_blocks: int | None = DEFAULT_KV_CACHE_BLOCKS  # per rank; exactly one of this and kv_cache_memory
    kv_cache_memory: int | None = None  # per rank, bytes (the YAML may say "2GiB")
    block_size: int = 16
    max_model_len: int = 2048
    max_num_batched_tokens: int = 2048
    redundant_experts: int = 0  # extra expert slots over a group (EPLB replicas)
    dtype: Dtype = "float32"  # the YAML default is bfloat16 when gpus_per_rank > 0
    collective_timeout_s: float = 30.0  # every collective of the group

    @property
    def role(self) -> Role:
        return _ROLES[self.name]

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_rank > 0 else "cpu"

    def rank_resources(self) -> dict[str, float]:
        """One rank's Ray resources: its actor options and its placement-group bundle."""
        out = {"CPU": self.cpus_per_rank, "GPU": self.gpus_per_rank}
        return {k: v for k, v in out.items() if v > 0}


def read_pool(name: str, r: ConfigReader, model: ModelConfig | None) -> PoolConfig:
    """Validate ``pools.<name>``; ``model`` is None when the model folder is not readable here."""
    gpus = r.number("gpus_per_rank", 0.0, minimum=0.0)
    cpus = r.number("cpus_per_rank", 1.0, minimum=0.0)
    if gpus > 1 and not gpus.is_integer():
        raise ClusterConfigError(r.where("gpus_per_rank"), f"above 1 it must be a whole number, got {gpus}")
    if gpus == 0 and cpus == 0:
        raise ClusterConfigError(r.where("cpus_per_rank"), "a rank needs some CPU or GPU (both are 0)")
    ep_size = r.integer("ep_size", 1, minimum=1)
    if model is not None and model.n_routed_experts % ep_size:
        raise ClusterConfigError(
            r.where("ep_size"), f"must divide the model's {model.n_routed_experts} routed experts, got {ep_size}"
        )
    redundant = _redundant_experts(r, ep_size, model)
    dtype = cast(Dtype, r.choice("dtype", ("float32", "bfloat16", "float16"), "bfloat16" if gpus > 0 else "float32"))
    block_size = r.integer("block_size", 16, minimum=1)
    blocks, memory = _kv_budget(r, model, block_size, dtype)
    pool = PoolConfig(
        name=cast(PoolName, name),
        groups=r.integer("groups", 1, minimum=0),
        ep_size=ep_size,
        gpus_per_rank=gpus,
        cpus_per_rank=cpus,
        kv_cache_blocks=blocks,
        kv_cache_memory=memory,
        block_size=block_size,
        max_model_len=r.integer("max_model_len", 2048, minimum=1),
        max_num_batched_tokens=r.integer("max_num_batched_tokens", 2048, minimum=1),
        redundant_experts=redundant,
        dtype=dtype,
        collective_timeout_s=r.number("collective_timeout_s", 30.0, positive=True),
    )
    r.finish()
    return pool


def _redundant_experts(r: ConfigReader, ep_size: int, model: ModelConfig | None) -> int:
    redundant = r.integer("redundant_experts", 0, minimum=0)
    where = r.where("redundant_experts")
    if redundant and ep_size == 1:
        raise ClusterConfigError(where, f"must be 0 with ep_size 1 (a rank would hold duplicates), got {redundant}")
    if redundant % ep_size:
        raise ClusterConfigError(where, f"{redundant} slots do not split evenly over ep_size {ep_size}")
    if model is not None and redundant > model.n_routed_experts:
        raise ClusterConfigError(where, f"at most the model's {model.n_routed_experts} experts, got {redundant}")
    return redundant


def _kv_budget(
    r: ConfigReader, model: ModelConfig | None, block_size: int, dtype: str
) -> tuple[int | None, int | None]:
    if r.has("kv_cache_blocks") and r.has("kv_cache_memory"):
        raise ClusterConfigError(r.where("kv_cache_memory"), "give kv_cache_blocks or kv_cache_memory, not both")
    if not r.has("kv_cache_memory"):
        r.raw("kv_cache_memory", None)  # an explicit null
        return r.integer("kv_cache_blocks", DEFAULT_KV_CACHE_BLOCKS, minimum=1), None
    r.raw("kv_cache_blocks", None)
    where = r.where("kv_cache_memory")
    try:
        memory = parse_memory_size(r.raw("kv_cache_memory"), where)
        if model is not None:
            cache_capacity(model, block_size, dtype_num_bytes(dtype), memory, where)
    except CacheBudgetError as exc:
        raise ClusterConfigError(where, str(exc).removeprefix(f"{where}: ")) from exc
    return None, memory
