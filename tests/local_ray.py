"""``local_ray``: the local Ray instance of a test module, with environment variables its workers inherit.

Lifecycle: a context manager for module fixtures. It sets ``env`` in this process's environment
before Ray starts (the rank actors inherit it: a ``K2SERVE_FAULTS`` plan, a drain grace), and on exit
shuts Ray down and restores each variable as it was.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from k2serve.cluster.config import RaySettings
from k2serve.cluster.ray_runtime import RayRuntime


@contextmanager
def local_ray(namespace: str, env: Mapping[str, str] | None = None, num_cpus: int = 4) -> Iterator[RayRuntime]:
    saved = {name: os.environ.get(name) for name in env or {}}
    os.environ.update(env or {})
    runtime: RayRuntime | None = None
    try:
        runtime = RayRuntime.start(RaySettings(num_cpus=num_cpus, namespace=namespace))
        yield runtime
    finally:
        if runtime is not None:
            runtime.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
