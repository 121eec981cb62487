"""Calibration: turn figures measured on the real machine into the planner's ``Efficiency``.

Lifecycle: ``k2serve plan --calibration FILE`` reads one YAML or JSON file once. Two forms, which may
be combined (``efficiency`` wins key by key)::

    measured:                    # what the machine did (e.g. `k2serve bench kernels`, DeepEP's tests)
      copy_gbs: 3010             # device-to-device copy, read + write (the bench's denominator)
      gemm_tflops: 798           # bf16 GEMM (FP8 checkpoints: the FP8 GEMM rate)
      mla_tflops: 540            # MLA decode kernel, or leave it out
      nic_gbs: 43                # all-to-all bandwidth across nodes per GPU (DeepEP internode)
      nvlink_gbs: 155            # all-to-all bandwidth inside a node per GPU (DeepEP intranode)
      collective_latency_us: 25  # one dispatch or combine at a small batch
    efficiency: {overlap: 0.5}   # shares of peak, directly (hbm, linear, attention, nic, nvlink, overlap)

Each measured figure becomes ``measured / datasheet peak`` of the chosen hardware (capped at 1).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from k2serve.cluster.planner.hardware import GB, TFLOP, Efficiency, Hardware

_MEASURED = {"copy_gbs", "gemm_tflops", "mla_tflops", "nic_gbs", "nvlink_gbs", "collective_latency_us"}
_DIRECT = {f.name for f in dataclasses.fields(Efficiency)} - {"source"}


def load_calibration(path: str | Path, hardware: Hardware, fp8_linear: bool = False) -> Efficiency:
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"calibration: {path} is not valid JSON/YAML: {exc}") from exc
    return calibrate(data, hardware, fp8_linear, source=str(path))


def calibrate(data: Any, hardware: Hardware, fp8_linear: bool = False, source: str = "calibration") -> Efficiency:
    if not isinstance(data, dict) or not set(data) <= {"measured", "efficiency"}:
        raise ValueError("calibration: expected a mapping with 'measured' and/or 'efficiency'")
    values: dict[str, float] = {}
    measured = _section(data, "measured", _MEASURED)
    ratios = {
        "copy_gbs": ("hbm", hardware.hbm_bw, GB),
        "gemm_tflops": ("linear", hardware.linear_flops(fp8_linear), TFLOP),
        "mla_tflops": ("attention", hardware.bf16_flops, TFLOP),
        "nic_gbs": ("nic", hardware.nic_bw, GB),
        "nvlink_gbs": ("nvlink", hardware.nvlink_bw, GB),
    }
    for key, value in measured.items():
        if key == "collective_latency_us":
            values["collective_latency_s"] = value * 1e-6
            continue
        name, peak, unit = ratios[key]
        values[name] = min(1.0, value * unit / peak)
    values.update(_section(data, "efficiency", _DIRECT))
    try:
        return dataclasses.replace(Efficiency(), **values, source=source)
    except ValueError as exc:
        raise ValueError(f"calibration: {exc}") from exc


def _section(data: dict[str, Any], key: str, allowed: set[str]) -> dict[str, float]:
    section = data.get(key) or {}
    if not isinstance(section, dict):
        raise ValueError(f"calibration.{key}: expected a mapping")
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ValueError(f"calibration.{key}.{unknown[0]}: unknown key (known: {', '.join(sorted(allowed))})")
    out: dict[str, float] = {}
    for name, value in section.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"calibration.{key}.{name}: expected a non-negative number, got {value!r}")
        if key == "measured" and name != "collective_latency_us" and value == 0:
            raise ValueError(f"calibration.{key}.{name}: must be > 0")
        out[name] = float(value)
    return out
