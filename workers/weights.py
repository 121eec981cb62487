"""Loading a checkpoint folder into the tensors the model reads (the MODEL naming contract).

Lifecycle: ``load_weights(model_dir, config, ...)`` opens the folder (safetensors only, see
``checkpoint_reader``), lists the tensors the config implies (``checkpoint_layout``), checks every
needed tensor's header (presence, shard, shape, dtype) before reading any data, then reads tensor
by tensor: one routed expert at a time, written into preallocated stacks, so peak memory is the
output plus one expert. Only the experts in ``expert_ids`` are read.

Output names:
- every non-expert tensor under its checkpoint name (``model.layers.0.self_attn.kv_b_proj.weight``,
  ``model.layers.1.mlp.gate.weight``, ``lm_head.weight``, ...), converted to ``dtype``; a quantized
  non-expert Linear (none in Kimi K2) is dequantized into ``{module}.weight``;
  ``mlp.gate.e_score_correction_bias`` is always fp32;
- routed experts of MoE layer L stacked over ``expert_ids`` in that order (E = len(expert_ids),
  I = moe_intermediate_size, H = hidden_size, gs = group_size):
  ``model.layers.{L}.mlp.experts.gate_up_proj`` [E, 2I, H] (gate rows, then up rows) and
  ``model.layers.{L}.mlp.experts.down_proj`` [E, H, I], dequantized to ``dtype``;
  with ``keep_packed=True``, for projections stored packed, instead
  ``...experts.gate_up_proj_packed`` int32 [E, 2I, H/8], ``...gate_up_proj_scale`` [E, 2I, H/gs],
  ``...down_proj_packed`` int32 [E, H, I/8], ``...down_proj_scale`` [E, H, I/gs]; scales are converted
  to ``dtype`` (lossless from BF16 to fp32/BF16). Unquantized expert projections stay dense.
- with ``tie_word_embeddings``, ``lm_head.weight`` is the embedding tensor itself.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from k2serve.workers.checkpoint_layout import (
    TensorSpec,
    expected_tensors,
    expert_module,
    expert_weight_shapes,
)
from k2serve.workers.checkpoint_reader import CheckpointError, CheckpointReader
from k2serve.workers.config import ExpertIds, ModelConfig
from k2serve.workers.int4 import dequantize_int4, num_groups, packed_cols

__all__ = ["CheckpointError", "load_expert_stacks", "load_weights"]

logger = logging.getLogger(__name__)

# Output projection of the MoE layer -> the checkpoint projections stacked into it, in row order.
FUSED_EXPERT_PROJECTIONS = (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",)))


def load_weights(
    model_dir: str | Path,
    config: ModelConfig,
    *,
    dtype: torch.dtype = torch.float32,
    expert_ids: ExpertIds | None = None,
    keep_packed: bool = False,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Read the tensors of ``config`` from ``model_dir`` (see the module docstring for names).

    ``expert_ids``: the routed experts this rank owns, in slot order (default all; a repeated id is
    a replica and gets a copy), the same for every MoE layer or given per MoE layer id.
    ``progress``: a tqdm bar, by default when stderr is a terminal.
    Raises ``CheckpointError`` for anything wrong with the files.
    """
    per_layer = config.experts_per_layer(expert_ids)
    specs = expected_tensors(config, sorted({e for ids in per_layer.values() for e in ids}))
    show = sys.stderr.isatty() if progress is None else progress
    with CheckpointReader.open(model_dir) as reader:
        for spec in specs:
            _check_header(reader, spec)
        _log_unexpected(reader, config, specs, all_experts=expert_ids is None)
        with tqdm(total=len(specs), desc="loading weights", unit="tensor", disable=not show) as bar:
            loader = _WeightLoader(reader, config, {s.name: s for s in specs}, dtype, torch.device(device), bar)
            weights = loader.non_expert_tensors(specs)
            for layer in config.moe_layer_ids:
                weights.update(loader.expert_stacks(layer, per_layer[layer], keep_packed))
    if config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return weights


def load_expert_stacks(
    model_dir: str | Path,
    config: ModelConfig,
    expert_ids: Mapping[int, Sequence[int]],
    *,
    dtype: torch.dtype = torch.float32,
    keep_packed: bool = False,
    device: str | torch.device = "cpu",
) -> dict[int, dict[str, torch.Tensor]]:
    """Only the routed-expert stacks of the given MoE layers (EPLB moving experts between ranks).

    Returns {layer: {short name: stack}} with the short names of ``LocalExperts`` (``gate_up_proj``,
    ``down_proj``, or ``*_packed``/``*_scale`` with ``keep_packed``), stacked in ``expert_ids[layer]`` order.
    """
    per_layer = {layer: tuple(int(e) for e in ids) for layer, ids in expert_ids.items()}
    unknown = sorted(set(per_layer) - set(config.moe_layer_ids))
    if unknown:
        raise ValueError(f"expert_ids: layers {unknown} are not MoE layers of this model")
    wanted = {e for ids in per_layer.values() for e in ids}
    specs = [s for s in expected_tensors(config, sorted(wanted)) if s.expert is not None and s.layer in per_layer]
    out: dict[int, dict[str, torch.Tensor]] = {}
    with CheckpointReader.open(model_dir) as reader:
        for spec in specs:
            _check_header(reader, spec)
        with tqdm(total=len(specs), disable=True) as bar:
            loader = _WeightLoader(reader, config, {s.name: s for s in specs}, dtype, torch.device(device), bar)
            for layer, ids in per_layer.items():
                prefix = f"model.layers.{layer}.mlp.experts."
                stacks = loader.expert_stacks(layer, ids, keep_packed)
                out[layer] = {name.removeprefix(prefix): t for name, t in stacks.items()}
    return out


def _check_header(reader: CheckpointReader, spec: TensorSpec) -> None:
    shape, dtype = reader.header(spec.name, spec.shape)
    if shape != spec.shape:
        raise CheckpointError(
            f"tensor {spec.name}: expected shape {list(spec.shape)}, found {list(shape)} (in {reader.weight_map[spec.name]})",
            tensor=spec.name,
            expected=spec.shape,
            found=shape,
            path=reader.model_dir / reader.weight_map[spec.name],
        )
    if spec.kind == "packed":
        ok, wanted = dtype == torch.int32, "int32"
    elif spec.kind == "shape":
        ok, wanted = dtype in (torch.int64, torch.int32), "int64 or int32"
    else:
        ok, wanted = isinstance(dtype, torch.dtype) and dtype.is_floating_point, "a floating-point dtype"
    if not ok:
        raise CheckpointError(
            f"tensor {spec.name}: expected {wanted}, found {dtype}", tensor=spec.name, expected=wanted, found=dtype
        )


def _log_unexpected(reader: CheckpointReader, config: ModelConfig, specs: list[TensorSpec], all_experts: bool) -> None:
    known = {s.name for s in (specs if all_experts else expected_tensors(config))}
    extra = sorted(set(reader.weight_map) - known)
    if extra:
        logger.info("ignoring %d checkpoint tensors the config does not use, e.g. %s", len(extra), extra[:5])


class _WeightLoader:
    """Reads validated tensors one at a time and converts them to the output contract."""

    def __init__(
        self,
        reader: CheckpointReader,
        config: ModelConfig,
        specs: dict[str, TensorSpec],
        dtype: torch.dtype,
        device: torch.device,
        bar: tqdm,
    ) -> None:
        self.reader = reader
        self.config = config
        self.specs = specs
        self.dtype = dtype
        self.device = device
        self.bar = bar

    def non_expert_tensors(self, specs: list[TensorSpec]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for spec in specs:
            if spec.expert is not None or spec.kind in ("scale", "shape"):
                continue  # experts are stacked per layer; scale/shape are read with their packed weight
            if spec.kind == "packed":
                out[f"{spec.module}.weight"] = self.linear_weight(spec.module)
            elif spec.kind == "score_bias":
                out[spec.name] = self._read(spec.name).to(device=self.device, dtype=torch.float32)
            else:
                out[spec.name] = self._read(spec.name).to(device=self.device, dtype=self.dtype)
        return out

    def expert_stacks(self, layer: int, expert_ids: tuple[int, ...], keep_packed: bool) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for fused, parts in FUSED_EXPERT_PROJECTIONS:
            prefix = f"model.layers.{layer}.mlp.experts.{fused}"
            modules = [expert_module(layer, e, p) for e in set(expert_ids) for p in parts]
            quant = self.config.quantization
            if keep_packed and quant is not None and all(self.config.is_quantized(m) for m in modules):
                stacks = self._packed_stack(layer, expert_ids, parts, quant.group_size)
                out[f"{prefix}_packed"], out[f"{prefix}_scale"] = stacks
            else:
                if keep_packed:
                    logger.info("layer %d %s: experts are not all quantized; returning them dense", layer, fused)
                out[prefix] = self._dense_stack(layer, expert_ids, parts)
        return out

    def linear_weight(self, module: str) -> torch.Tensor:
        """``module``'s [out, in] weight in ``dtype`` on ``device``, dequantized if stored packed."""
        if f"{module}.weight" in self.specs:
            return self._read(f"{module}.weight").to(device=self.device, dtype=self.dtype)
        packed, scale, shape = self.packed_parts(module)
        return dequantize_int4(packed.to(self.device), scale.to(self.device), shape, self.dtype)

    def packed_parts(self, module: str) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """(weight_packed int32 [out, in/8], weight_scale [out, in/gs], [out, in]) of a packed module."""
        packed = self._read(f"{module}.weight_packed")
        scale = self._read(f"{module}.weight_scale")
        name = f"{module}.weight_shape"
        expected = self.specs[name].logical_shape
        found = tuple(int(v) for v in self._read(name).tolist())
        if found != expected:
            raise CheckpointError(
                f"tensor {name}: config implies weight shape {list(expected)}, checkpoint says {list(found)}",
                tensor=name,
                expected=expected,
                found=found,
            )
        return packed, scale, found

    def _dense_stack(self, layer: int, expert_ids: tuple[int, ...], parts: tuple[str, ...]) -> torch.Tensor:
        shapes = [expert_weight_shapes(self.config)[p] for p in parts]
        rows, cols = sum(s[0] for s in shapes), shapes[0][1]
        stack = torch.empty(len(expert_ids), rows, cols, dtype=self.dtype, device=self.device)  # [E, rows, cols]
        first_slot: dict[int, int] = {}
        for slot, expert in enumerate(expert_ids):
            if expert in first_slot:  # a replica: copy instead of reading again
                stack[slot] = stack[first_slot[expert]]
                continue
            first_slot[expert] = slot
            row = 0
            for proj, (out_features, _) in zip(parts, shapes, strict=True):
                stack[slot, row : row + out_features] = self.linear_weight(expert_module(layer, expert, proj))
                row += out_features
        return stack

    def _packed_stack(
        self, layer: int, expert_ids: tuple[int, ...], parts: tuple[str, ...], group_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        shapes = [expert_weight_shapes(self.config)[p] for p in parts]
        rows, cols = sum(s[0] for s in shapes), shapes[0][1]
        words, groups = packed_cols(cols), num_groups(cols, group_size)
        packed = torch.empty(len(expert_ids), rows, words, dtype=torch.int32, device=self.device)  # [E, rows, C/8]
        scale = torch.empty(len(expert_ids), rows, groups, dtype=self.dtype, device=self.device)  # [E, rows, C/gs]
        first_slot: dict[int, int] = {}
        for slot, expert in enumerate(expert_ids):
            if expert in first_slot:
                packed[slot], scale[slot] = packed[first_slot[expert]], scale[first_slot[expert]]
                continue
            first_slot[expert] = slot
            row = 0
            for proj in parts:
                part_packed, part_scale, (out_features, _) = self.packed_parts(expert_module(layer, expert, proj))
                packed[slot, row : row + out_features] = part_packed
                scale[slot, row : row + out_features] = part_scale.to(self.dtype)
                row += out_features
        return packed, scale

    def _read(self, name: str) -> torch.Tensor:
        tensor = self.reader.read(name, self.specs[name].shape)
        self.bar.update(1)
        return tensor
