"""``Hardware`` (one GPU kind and its node) and ``Efficiency`` (the achieved share of each peak).

Lifecycle: a preset (``HARDWARE_PRESETS``) or a custom figure set from the command line is built once
per ``k2serve plan`` run; ``Efficiency`` starts from the defaults below and may be replaced by a
calibration (``calibration.py``) measured on the real machine. Units are SI: bytes, bytes/s, FLOP/s.

Sources of the presets (../shared/reference/performance.md "Method"): H100 SXM and H200 datasheet
peaks (HBM 3.35 / 4.8 TB/s, 989 dense bf16 TFLOP/s, 1,979 FP8, NVLink 450 GB/s per direction);
capacities as nvidia-smi reports them (85.5 GB / 150.8 GB); H800 = H100 compute and HBM with
NVLink cut to 200 GB/s per direction (DeepSeek's deployment); B200 from NVIDIA's DGX B200 datasheet
(180 GB and 8 TB/s per GPU, 2.25 PFLOP/s dense bf16, 4.5 FP8, NVLink 5 at 900 GB/s per direction).
Every preset has one 400 Gb/s NIC per GPU (50 GB/s), the ConnectX-7 rail of these systems.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GB = 1e9
TB = 1e12
TFLOP = 1e12


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_bytes: float  # per GPU, as the driver reports it
    hbm_bw: float  # bytes/s per GPU
    bf16_flops: float  # dense FLOP/s per GPU
    fp8_flops: float
    nvlink_bw: float  # bytes/s per GPU per direction inside a node
    nic_bw: float  # bytes/s per GPU across nodes
    gpus_per_node: int = 8
    reserve_bytes: float = 8 * GB  # CUDA context, activations, graphs, all-to-all buffers (an assumption)

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "hbm_bw", "bf16_flops", "fp8_flops", "nvlink_bw", "nic_bw"):
            if not getattr(self, name) > 0:
                raise ValueError(f"hardware.{name}: must be > 0, got {getattr(self, name)}")
        if self.gpus_per_node < 1:
            raise ValueError(f"hardware.gpus_per_node: must be >= 1, got {self.gpus_per_node}")
        if not 0 <= self.reserve_bytes < self.memory_bytes:
            raise ValueError("hardware.reserve_bytes: must be in [0, memory)")

    def linear_flops(self, fp8: bool) -> float:
        return self.fp8_flops if fp8 else self.bf16_flops

    def with_overrides(self, **values: float | int | str | None) -> Hardware:
        """A custom variant: ``None`` values keep the preset's figure."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})  # type: ignore[arg-type]


HARDWARE_PRESETS: dict[str, Hardware] = {
    "h100": Hardware("h100", 85.5 * GB, 3.35 * TB, 989 * TFLOP, 1979 * TFLOP, 450 * GB, 50 * GB),
    "h200": Hardware("h200", 150.8 * GB, 4.8 * TB, 989 * TFLOP, 1979 * TFLOP, 450 * GB, 50 * GB),
    "h800": Hardware("h800", 85.5 * GB, 3.35 * TB, 989 * TFLOP, 1979 * TFLOP, 200 * GB, 50 * GB),
    "b200": Hardware("b200", 180 * GB, 8.0 * TB, 2250 * TFLOP, 4500 * TFLOP, 900 * GB, 50 * GB),
}


def hardware_preset(name: str) -> Hardware:
    try:
        return HARDWARE_PRESETS[name.lower()]
    except KeyError:
        raise ValueError(f"hardware: unknown preset {name!r}; presets: {', '.join(HARDWARE_PRESETS)}") from None


@dataclass(frozen=True)
class Efficiency:
    """The share of each datasheet peak a serving system reaches. Defaults, each from a published
    measurement (performance.md §8): ``hbm`` 0.9 (H100 copy 3.0 of 3.35 TB/s, H200 4.3 of 4.8);
    ``linear`` 0.6 (whole-layer GEMMs in serving; a lone bf16 8192^3 GEMM reaches 0.8, DeepGEMM FP8
    ~0.68); ``attention`` 0.67 (FlashMLA 660 of 989 TFLOP/s); ``nic`` 0.85 (DeepEP 39-58 GB/s on
    50 GB/s); ``nvlink`` 0.75 (DeepEP 153-158 GB/s on H800's ~200); ``collective_latency_s`` 20 us per
    dispatch or combine per MoE layer (DeepEP low-latency floor); ``overlap`` 0 = communication in
    series with compute (1 = fully hidden, as two-batch overlap aims for)."""

    hbm: float = 0.9
    linear: float = 0.6
    attention: float = 0.67
    nic: float = 0.85
    nvlink: float = 0.75
    collective_latency_s: float = 20e-6
    overlap: float = 0.0
    source: str = "defaults (published kernel figures)"

    def __post_init__(self) -> None:
        for name in ("hbm", "linear", "attention", "nic", "nvlink"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"efficiency.{name}: must be in (0, 1], got {value}")
        if not 0 <= self.overlap <= 1:
            raise ValueError(f"efficiency.overlap: must be in [0, 1], got {self.overlap}")
        if self.collective_latency_s < 0:
            raise ValueError(f"efficiency.collective_latency_s: must be >= 0, got {self.collective_latency_s}")
