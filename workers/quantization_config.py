"""compressed-tensors ``quantization_config`` of a checkpoint (Kimi K2 Thinking: W4A16, group 32).

Lifecycle: parsed once from config.json by ``ModelConfig.from_dict``; frozen afterwards. It answers
one question for the loader, ``is_ignored(module_name)``, and writes itself back with ``to_dict``
for the tiny-model generator.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from k2serve.workers.config_error import ConfigError


@dataclass(frozen=True)
class QuantizationConfig:
    """compressed-tensors ``pack-quantized`` weight-only INT groups (W4A16 in Kimi K2 Thinking).

    ``ignore`` holds exact module names and ``re:`` regular expressions matched against module
    names with ``re.match``, as compressed-tensors does. Only ``Linear`` modules are targeted.
    """

    num_bits: int
    group_size: int
    symmetric: bool
    ignore: tuple[str, ...]
    targets: tuple[str, ...] = ("Linear",)
    quant_method: str = "compressed-tensors"
    format: str = "pack-quantized"
    _patterns: tuple[re.Pattern[str], ...] = field(default=(), repr=False, compare=False)

    @staticmethod
    def from_dict(raw: Mapping[str, Any]) -> QuantizationConfig:
        method = raw.get("quant_method")
        if method != "compressed-tensors":
            raise ConfigError(
                "quantization_config.quant_method",
                f"unsupported {method!r}; k2serve reads 'compressed-tensors' (pack-quantized INT4)",
            )
        fmt = raw.get("format")
        if fmt != "pack-quantized":
            raise ConfigError("quantization_config.format", f"unsupported {fmt!r}; only 'pack-quantized'")
        status = raw.get("quantization_status", "compressed")
        if status != "compressed":
            raise ConfigError("quantization_config.quantization_status", f"expected 'compressed', got {status!r}")
        groups = raw.get("config_groups")
        if not isinstance(groups, Mapping) or len(groups) != 1:
            raise ConfigError("quantization_config.config_groups", "expected exactly one config group")
        ((group_name, group),) = groups.items()
        prefix = f"quantization_config.config_groups.{group_name}"
        if group.get("input_activations") is not None or group.get("output_activations") is not None:
            raise ConfigError(f"{prefix}.input_activations", "activation quantization is not supported (W4A16 only)")
        weights = group.get("weights")
        if not isinstance(weights, Mapping):
            raise ConfigError(f"{prefix}.weights", "missing")
        checks = {"type": "int", "strategy": "group", "num_bits": 4, "symmetric": True, "dynamic": False}
        for key, expected in checks.items():
            if weights.get(key, expected) != expected:
                raise ConfigError(f"{prefix}.weights.{key}", f"unsupported {weights.get(key)!r}; expected {expected!r}")
        if weights.get("actorder") not in (None, False):
            raise ConfigError(f"{prefix}.weights.actorder", "activation ordering (g_idx) is not supported")
        group_size = weights.get("group_size")
        if not isinstance(group_size, int) or group_size <= 0 or group_size % 8:
            raise ConfigError(f"{prefix}.weights.group_size", f"must be a positive multiple of 8, got {group_size!r}")
        targets = tuple(group.get("targets", ["Linear"]))
        if targets != ("Linear",):
            raise ConfigError(f"{prefix}.targets", f"unsupported {list(targets)}; only ['Linear']")
        ignore = tuple(raw.get("ignore") or ())
        patterns: list[re.Pattern[str]] = []
        for entry in ignore:
            if entry.startswith("re:"):
                try:
                    patterns.append(re.compile(entry[3:]))
                except re.error as exc:
                    raise ConfigError("quantization_config.ignore", f"bad regex {entry!r}: {exc}") from exc
        return QuantizationConfig(
            num_bits=4, group_size=group_size, symmetric=True, ignore=ignore, targets=targets, _patterns=tuple(patterns)
        )

    def is_ignored(self, module_name: str) -> bool:
        """True when ``module_name`` (e.g. ``model.layers.3.self_attn.q_a_proj``) stays unquantized."""
        if module_name in self.ignore:
            return True
        return any(p.match(module_name) for p in self._patterns)

    def to_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` block exactly as Kimi K2 Thinking's config.json writes it."""
        weights: dict[str, Any] = {
            "actorder": None,
            "block_structure": None,
            "dynamic": False,
            "group_size": self.group_size,
            "num_bits": self.num_bits,
            "observer": "minmax",
            "observer_kwargs": {},
            "strategy": "group",
            "symmetric": self.symmetric,
            "type": "int",
        }
        group = {
            "input_activations": None,
            "output_activations": None,
            "targets": list(self.targets),
            "weights": weights,
        }
        return {
            "config_groups": {"group_0": group},
            "format": self.format,
            "ignore": list(self.ignore),
            "kv_cache_scheme": None,
            "quant_method": self.quant_method,
            "quantization_status": "compressed",
        }


KIMI_K2_IGNORE = ("lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*")


def kimi_k2_quantization(group_size: int = 32) -> QuantizationConfig:
    """The quantization block of Kimi K2 Thinking (routed experts INT4, group 32, symmetric)."""
    return QuantizationConfig.from_dict(
        QuantizationConfig(num_bits=4, group_size=group_size, symmetric=True, ignore=KIMI_K2_IGNORE).to_dict()
    )
