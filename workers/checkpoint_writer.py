"""Random checkpoints in the real Kimi K2 Thinking layout, for tests and benchmarks.

Lifecycle: ``write_random_checkpoint(config, out_dir, seed=...)`` lists the tensors the config
implies (``checkpoint_layout.expected_tensors``, the same list the loader checks), plans shards in
that order, generates each shard's tensors and writes ``model-0000i-of-0000N.safetensors`` plus
``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes}, "weight_map": {...}}``).
``config.json`` is the caller's job.

Storage follows the real checkpoint: unquantized tensors in ``torch_dtype`` (BF16),
``e_score_correction_bias`` fp32, quantized Linears (the routed experts under Kimi's ignore list) as
``weight_packed`` int32 / ``weight_scale`` BF16 / ``weight_shape`` int64 produced by ``int4``: the
dequantized values ARE the model's weights.

Reproducibility: every tensor (every quantized module) draws from its own ``torch.Generator``
seeded from ``(seed, name)``, so the weights depend only on the seed and the config, not on shard
sizes or generation order.

Initialisation keeps a forward pass healthy through all layers: projections ~ N(0, 1/fan_in) so
RMS-normalised inputs give unit-scale outputs, norm weights 1 + N(0, 0.02²), embeddings N(0, 1),
router bias ±U(0.05, 0.1) (same order as the spread of sigmoid scores, so biased selection and
unbiased weighting really differ), and an LM head scaled to give logits of std ~LM_HEAD_LOGIT_STD.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from k2serve.workers.checkpoint_layout import TensorSpec, expected_tensors
from k2serve.workers.checkpoint_reader import INDEX_FILE
from k2serve.workers.config import ModelConfig
from k2serve.workers.int4 import pack_int4, quantize_int4

DEFAULT_NUM_SHARDS = 4  # when max_shard_bytes is None: every generated model is really sharded
NORM_WEIGHT_NOISE = 0.02
ROUTER_BIAS_RANGE = (0.05, 0.1)
LM_HEAD_LOGIT_STD = 4.0  # logits std for a unit-RMS final hidden state; keeps greedy decoding varied


def write_random_checkpoint(
    config: ModelConfig, out_dir: str | Path, *, seed: int, max_shard_bytes: int | None = None
) -> None:
    """Write random weights for ``config`` into ``out_dir`` (created if needed).

    ``max_shard_bytes``: shard size limit (a tensor larger than it gets a shard of its own);
    default: the total split into about ``DEFAULT_NUM_SHARDS`` shards. Refuses a folder that
    already holds safetensors files, so stale shards can never mix with new ones.
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stale = sorted(p.name for p in folder.glob("*.safetensors")) + (
        [INDEX_FILE] if (folder / INDEX_FILE).exists() else []
    )
    if stale:
        raise FileExistsError(f"{folder} already holds a checkpoint ({stale[:3]}); write into an empty folder")
    units = _units(expected_tensors(config))
    total = sum(spec.nbytes for unit in units for spec in unit)
    limit = max_shard_bytes if max_shard_bytes is not None else math.ceil(total / DEFAULT_NUM_SHARDS)
    if limit <= 0:
        raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    shards = _plan_shards(units, limit)
    weight_map: dict[str, str] = {}
    for i, shard_units in enumerate(shards, start=1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for unit in shard_units:
            tensors.update(_generate(unit, config, seed))
        save_file(tensors, str(folder / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file_name))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    index_path = folder / INDEX_FILE
    index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    for file_name in set(weight_map.values()):  # safetensors creates 0600 files; match the umask like the index
        (folder / file_name).chmod(index_path.stat().st_mode & 0o777)


def _units(specs: list[TensorSpec]) -> list[list[TensorSpec]]:
    """Group a quantized module's packed/scale/shape triple (generated together, never split)."""
    units: list[list[TensorSpec]] = []
    for spec in specs:
        if spec.kind in ("scale", "shape") and units and units[-1][0].module == spec.module:
            units[-1].append(spec)
        else:
            units.append([spec])
    return units


def _plan_shards(units: list[list[TensorSpec]], limit: int) -> list[list[list[TensorSpec]]]:
    """Greedy, in checkpoint order: start a new shard when the next unit would pass ``limit``."""
    shards: list[list[list[TensorSpec]]] = [[]]
    size = 0
    for unit in units:
        unit_bytes = sum(spec.nbytes for spec in unit)
        if shards[-1] and size + unit_bytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(unit)
        size += unit_bytes
    return shards


def _generator(seed: int, key: str) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _generate(unit: list[TensorSpec], config: ModelConfig, seed: int) -> Iterable[tuple[str, torch.Tensor]]:
    head = unit[0]
    gen = _generator(seed, head.module if head.kind == "packed" else head.name)
    if head.kind == "packed":
        return _quantized_linear(unit, config, gen).items()
    return [(head.name, _plain(head, config, gen))]


def _plain(spec: TensorSpec, config: ModelConfig, gen: torch.Generator) -> torch.Tensor:
    if spec.kind == "embedding":
        values = torch.randn(spec.shape, generator=gen)
    elif spec.kind == "norm":
        values = 1.0 + NORM_WEIGHT_NOISE * torch.randn(spec.shape, generator=gen)
    elif spec.kind == "score_bias":
        low, high = ROUTER_BIAS_RANGE
        magnitude = low + (high - low) * torch.rand(spec.shape, generator=gen)
        sign = torch.randint(0, 2, spec.shape, generator=gen) * 2 - 1
        values = magnitude * sign
    elif spec.kind in ("linear", "router"):
        std = spec.shape[1] ** -0.5
        if spec.name == "lm_head.weight":
            std *= LM_HEAD_LOGIT_STD
        values = std * torch.randn(spec.shape, generator=gen)
    else:
        raise ValueError(f"{spec.name}: no generator for kind {spec.kind!r}")
    return values.to(spec.dtype)


def _quantized_linear(unit: list[TensorSpec], config: ModelConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    packed_spec, scale_spec, shape_spec = unit
    if config.quantization is None or [s.kind for s in unit] != ["packed", "scale", "shape"]:
        raise ValueError(f"{packed_spec.module}: malformed quantized module {[s.name for s in unit]}")
    out_features, in_features = packed_spec.logical_shape
    weight = in_features**-0.5 * torch.randn(out_features, in_features, generator=gen)  # [out, in]
    q, scale = quantize_int4(weight, config.quantization.group_size, scale_dtype=scale_spec.dtype)
    return {
        packed_spec.name: pack_int4(q),
        scale_spec.name: scale,
        shape_spec.name: torch.tensor(packed_spec.logical_shape, dtype=shape_spec.dtype),
    }
