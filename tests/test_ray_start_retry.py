"""The embedded Ray start's one retry (``ray_runtime._init_embedded``): which failures get it, and that
what a failed start left running under this process is stopped first (real child processes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from k2serve.cluster import ray_runtime
from k2serve.cluster.config import RaySettings

RAYLET_TIMEOUT = "The current node timed out during startup. This could happen because some of the raylet failed"


class _FlakyInit:
    def __init__(self, failures: list[BaseException]) -> None:
        self.failures, self.calls, self.shutdowns, self.stops = failures, 0, 0, 0

    def init(self, **_: Any) -> None:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)

    def shutdown(self) -> None:
        self.shutdowns += 1

    def stop(self) -> None:
        self.stops += 1


def _patched(monkeypatch: pytest.MonkeyPatch, failures: list[BaseException]) -> _FlakyInit:
    flaky = _FlakyInit(failures)
    monkeypatch.setattr(ray_runtime.ray, "init", flaky.init)
    monkeypatch.setattr(ray_runtime.ray, "shutdown", flaky.shutdown)
    monkeypatch.setattr(ray_runtime, "_stop_ray_children", flaky.stop)
    return flaky


@pytest.mark.parametrize("message", [RAYLET_TIMEOUT, "Timed out waiting for file /tmp/ray/gcs_server_port_x"])
def test_a_start_that_times_out_gets_one_more_try_after_a_cleanup(
    monkeypatch: pytest.MonkeyPatch, message: str
) -> None:
    flaky = _patched(monkeypatch, [Exception(message)])
    ray_runtime._init_embedded(RaySettings(), None)
    assert (flaky.calls, flaky.shutdowns, flaky.stops) == (2, 1, 1)


def test_a_second_timeout_and_any_other_failure_are_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    flaky = _patched(monkeypatch, [Exception(RAYLET_TIMEOUT), Exception(RAYLET_TIMEOUT)])
    with pytest.raises(Exception, match="timed out during startup"):
        ray_runtime._init_embedded(RaySettings(), None)
    assert flaky.calls == 2
    flaky = _patched(monkeypatch, [RuntimeError("AuthenticationError: bad token")])
    with pytest.raises(RuntimeError, match="bad token"):
        ray_runtime._init_embedded(RaySettings(), None)
    assert (flaky.calls, flaky.stops) == (1, 0)


def test_stopping_ray_children_stops_rays_helpers_and_nothing_else(tmp_path: Path) -> None:
    helper = tmp_path / "site-packages" / "ray" / "_private" / "log_monitor.py"
    helper.parent.mkdir(parents=True)
    helper.write_text("import time\ntime.sleep(60)\n")
    ours = tmp_path / "ours.py"
    ours.write_text("import time\ntime.sleep(60)\n")
    ray_like = subprocess.Popen([sys.executable, "-u", str(helper)])
    other = subprocess.Popen([sys.executable, "-u", str(ours)])
    try:
        ray_runtime._stop_ray_children(grace_s=5.0)
        assert ray_like.wait(5.0) is not None
        assert other.poll() is None and psutil.pid_exists(other.pid)
    finally:
        for proc in (ray_like, other):
            proc.kill()
            proc.wait(5.0)
