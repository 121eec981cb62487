"""One rank of a worker group: config, model, weights, cache, scheduler, engine, KV transfer.

Imports ``k2serve.kernels`` and ``k2serve.proto`` only (DESIGN.md §3).
"""
