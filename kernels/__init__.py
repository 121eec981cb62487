"""Triton kernels, each with a checked wrapper and a torch reference beside it: MoE alignment and
the W4A16 grouped GEMM (``moe_align``, ``moe_w4a16``), paged MLA decode attention (``mla_decode``),
the latent cache write (``kv_cache_write``); ``dispatch`` picks Triton on CUDA tensors and the
reference elsewhere; ``bench`` is ``k2serve bench kernels``. Imports nothing else from k2serve."""
