"""Triton kernels, each with a checked wrapper and a torch reference (the MoE GEMM and MLA decode
attention arrive with the kernels issue). Imports nothing else from k2serve."""
