"""``local_ray_with_faults``: a local Ray whose workers inherit a ``K2SERVE_FAULTS`` plan.

Lifecycle: a context manager for module fixtures; it sets ``K2SERVE_FAULTS`` in this process's
environment before Ray starts (the rank actors inherit it), and on exit shuts Ray down and restores
the variable as it was.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from k2serve.cluster.config import RaySettings
from k2serve.cluster.ray_runtime import RayRuntime


@contextmanager
def local_ray_with_faults(faults: str, namespace: str, num_cpus: int = 4) -> Iterator[RayRuntime]:
    saved = os.environ.get("K2SERVE_FAULTS")
    os.environ["K2SERVE_FAULTS"] = faults
    runtime: RayRuntime | None = None
    try:
        runtime = RayRuntime.start(RaySettings(num_cpus=num_cpus, namespace=namespace))
        yield runtime
    finally:
        if runtime is not None:
            runtime.shutdown()
        if saved is None:
            os.environ.pop("K2SERVE_FAULTS", None)
        else:
            os.environ["K2SERVE_FAULTS"] = saved
