"""Helpers of the kernel tests: where the Triton kernels run, tolerances, poisoned allocations.

Lifecycle: imported by ``test_kernels_*.py``. On a machine without CUDA, ``conftest.py`` has set
``TRITON_INTERPRET=1`` before any kernel module was imported, so the kernels run on CPU tensors
under the interpreter; with CUDA they run compiled on the GPU. (The ``poison_allocations`` fixture
lives in ``conftest.py``.)

Tolerances (reference performance.md §9): max |ours - ref| / max |ref| <= 1e-2 for 16-bit
floating point, 1e-5 for fp32 (same math, different summation order), bit-exact for data movement.
The interpreter cannot run ``tl.dot`` on bf16 (it multiplies the raw uint16 bit patterns), so the
interpreted GEMM tests use fp32 and fp16; bf16 GEMMs are checked by the ``gpu`` tests.
"""

from __future__ import annotations

import pytest
import torch

from k2serve.kernels.dispatch import is_interpreted

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def kernel_device(kernel: object) -> torch.device:
    """The device the Triton tests run on: CPU under the interpreter, else CUDA."""
    if is_interpreted(kernel):
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    pytest.fail("no CUDA device and the kernels were not decorated under TRITON_INTERPRET=1 (see tests/conftest.py)")


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref| in fp32 (0 when both are all zero); NaN anywhere gives inf."""
    ours, ref = ours.float(), ref.float()
    if not bool(torch.isfinite(ours).all()) or not bool(torch.isfinite(ref).all()):
        return float("inf")
    scale = ref.abs().max().item() if ref.numel() else 0.0
    diff = (ours - ref).abs().max().item() if ref.numel() else 0.0
    return diff / scale if scale > 0 else diff
