"""The autoscaler on a real local Ray cluster: a queue grows the pool, quiet shrinks it back, no request lost.

Every rank emulates 4 ms of device time per scheduled token (``K2SERVE_FAULTS=step_ms_per_token``),
so one group serves about one 60-token prompt per 0.25 s whatever the CPU, and a second group adds
capacity as a second GPU would. Six clients in a closed loop keep more prompts waiting than one
group clears within the TTFT SLO: the queue-aware policy must add a group; when the clients stop,
the pool must drain back to one group after its stability and cooldown windows. Every request
must finish with the oracle's tokens (a scale-down drains its group first), and the controller's
/metrics must carry the decisions.
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from local_ray import local_ray

from k2serve.cluster.config import ClusterConfig
from k2serve.cluster.controller_handle import ControllerHandle
from k2serve.proto import worker_pb2, worker_pb2_grpc
from k2serve.tiny_model import make_tiny_model
from k2serve.workers.greedy import greedy_generate
from k2serve.workers.model_loader import load_model

NAMESPACE = "k2serve-autoscale-test"
MAX_TOKENS = 2
PROMPTS = [[(7 * i + 3 * j) % 900 + 5 for j in range(60)] for i in range(6)]
GROW_LIMIT_S = 60.0  # window + a decision round + a group start (tiny model) on a loaded 2-core box
SHRINK_LIMIT_S = 60.0  # down_stable_s + down_cooldown_s + drain and stop


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("autoscale") / "tiny", seed=5)


@pytest.fixture(scope="module")
def oracle(model_dir: Path) -> dict[tuple[int, ...], list[int]]:
    model = load_model(model_dir, dtype=torch.float32, max_positions=256, progress=False)
    return {tuple(p): greedy_generate(model, p, max_tokens=MAX_TOKENS) for p in PROMPTS}


@pytest.fixture(scope="module")
def ray_with_device_time() -> Iterator[None]:
    with local_ray(NAMESPACE, {"K2SERVE_FAULTS": "step_ms_per_token=4"}):
        yield


def _config(model_dir: Path) -> ClusterConfig:
    return ClusterConfig.from_dict(
        {
            "model": str(model_dir),
            "pools": {"colocated": {"groups": 1, "cpus_per_rank": 0.5, "kv_cache_blocks": 64, "max_model_len": 256}},
            "ray": {"namespace": NAMESPACE},
            "health": {"interval_s": 0.5, "timeout_s": 2.0, "failures": 3, "start_timeout_s": 90.0},
            "autoscaler": {
                "enabled": True,
                "interval_s": 1.0,
                "window_s": 4.0,
                "ttft_slo_s": 1.0,
                "itl_slo_s": 5.0,
                "up_cooldown_s": 3.0,
                "down_cooldown_s": 4.0,
                "down_stable_s": 3.0,
                "pools": {"colocated": {"min_groups": 1, "max_groups": 2}},
            },
        }
    )


class ClosedLoop:
    """``clients`` threads, each sending one prompt after another to the least busy ready rank."""

    def __init__(self, controller: ControllerHandle, clients: int) -> None:
        self.controller = controller
        self.results: list[tuple[tuple[int, ...], list[int] | str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]
        self._turn = 0

    def __enter__(self) -> ClosedLoop:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=90)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _client(self, index: int) -> None:
        n = index
        while not self._stop.is_set():
            ready = [w.address for w in self.controller.live_workers() if w.state == "ready" and w.address]
            if not ready:
                time.sleep(0.1)
                continue
            self._turn += 1
            prompt = PROMPTS[n % len(PROMPTS)]
            n += 1
            try:
                out: list[int] | str = asyncio.run(_generate(ready[self._turn % len(ready)], prompt))
            except grpc.aio.AioRpcError as exc:
                out = f"{exc.code().name}: {exc.details()}"
            self.results.append((tuple(prompt), out))


async def _generate(address: str, prompt: list[int]) -> list[int]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        sampling = worker_pb2.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        request = worker_pb2.GenerateRequest(request_id=f"a{time.monotonic_ns()}", prompt_token_ids=prompt, sampling=sampling)  # fmt: skip
        return [t async for delta in stub.Generate(request, timeout=60) for t in delta.token_ids]


def _until(what: str, done: object, timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if done():  # type: ignore[operator]
            return time.monotonic() - started
        time.sleep(0.25)
    raise AssertionError(f"{what}: not within {timeout_s:.0f} s")


def _ready_groups(controller: ControllerHandle) -> int:
    return sum(1 for g in controller.status() if g["state"] == "ready" and g["desired"])


def test_a_queue_grows_the_pool_and_quiet_shrinks_it_back_without_losing_a_request(
    ray_with_device_time: None, model_dir: Path, oracle: dict[tuple[int, ...], list[int]]
) -> None:
    controller = ControllerHandle.launch(_config(model_dir))
    try:
        assert controller.wait_ready(90)
        with ClosedLoop(controller, clients=6) as load:
            grew_in = _until("a second group", lambda: _ready_groups(controller) == 2, GROW_LIMIT_S)
            time.sleep(2.0)  # both groups serve for a while
            load.stop()
        shrank_in = _until("back to one group", lambda: controller.desired()["colocated"] == 1 and _ready_groups(controller) == 1, SHRINK_LIMIT_S)  # fmt: skip
        decisions = controller.autoscaler_decisions()
        metrics_address = _controller_metrics(controller)
    finally:
        controller.shutdown()
    ups = [d for d in decisions if d["direction"] == "up" and d["applied"]]
    downs = [d for d in decisions if d["direction"] == "down" and d["applied"]]
    assert ups and ups[0]["reason"] in {"queue", "ttft_slo", "utilization"}, decisions
    assert downs and downs[-1]["target"] == 1, decisions
    wrong = [(p, out) for p, out in load.results if out != oracle[p]]
    assert load.results and not wrong, f"{len(wrong)} of {len(load.results)} requests wrong or failed: {wrong[:3]}"
    assert metrics_address  # where the decisions are exported (checked in the next test)
    print(f"autoscaler: grew in {grew_in:.1f} s, shrank in {shrank_in:.1f} s, {len(load.results)} requests ok")


def test_the_controller_exports_the_autoscaler_series(ray_with_device_time: None, model_dir: Path) -> None:
    config = _config(model_dir)
    data = config.to_dict()
    data["metrics"] = {"controller_port": 0}
    controller = ControllerHandle.launch(ClusterConfig.from_dict(data))
    try:
        assert controller.wait_ready(90)
        _until("a decision round", lambda: len(controller.autoscaler_decisions()) >= 2, 20)
        address = _controller_metrics(controller)
        text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    finally:
        controller.shutdown()
    assert 'k2serve_autoscaler_decisions_total{direction="hold"' in text
    assert 'k2serve_autoscaler_signal{pool="colocated",signal="utilization"}' in text
    assert 'k2serve_autoscaler_target_groups{pool="colocated"} 1.0' in text


def _controller_metrics(controller: ControllerHandle) -> str:
    from k2serve.cluster.registry_client import RegistryClient

    snapshot = asyncio.run(RegistryClient(controller.registry_address).list(timeout_s=10))
    return snapshot.controller_metrics_address
