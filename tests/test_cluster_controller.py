"""The controller on a real local Ray instance (token auth on) with the tiny model and gloo on loopback.

A colocated pool of one EP=2 group comes up, serves the greedy oracle on both ranks, is recreated
after one rank's actor is killed (the registry's Watch shows the new addresses), scales up and
down; the demo (one prefill and one decode group, EP=2 each) serves a disaggregated request and
drains a group into a fresh one. After every shutdown no actor, placement group or rank process
of ours is left. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import ray
import torch
from local_ray import local_ray

from k2serve.cluster.config import ClusterConfig, HealthSettings, RaySettings, RestartSettings
from k2serve.cluster.controller_handle import ControllerHandle
from k2serve.cluster.ray_runtime import RayRuntime
from k2serve.cluster.registry_client import RegistryClient
from k2serve.cluster.worker_group import ACTOR_NAME_PREFIX
from k2serve.cluster.worker_record import WorkerRecord, WorkerSnapshot
from k2serve.proto import worker_pb2, worker_pb2_grpc
from k2serve.tiny_model import make_tiny_model
from k2serve.workers.greedy import greedy_generate
from k2serve.workers.model_loader import load_model

MAX_TOKENS = 6
PROMPTS = [[5, 17, 300, 41, 8, 99, 2], [260, 3, 77, 150, 12, 9, 400, 33, 1, 64, 18]]
NAMESPACE = "k2serve-test"
FAST_HEALTH = {"interval_s": 0.5, "timeout_s": 2.0, "failures": 2, "start_timeout_s": 90.0}
FAST_RESTART = {"max_restarts": 3, "backoff_initial_s": 0.2, "backoff_max_s": 1.0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("cluster") / "tiny", seed=3)


@pytest.fixture(scope="module")
def oracle(model_dir: Path) -> list[list[int]]:
    model = load_model(model_dir, dtype=torch.float32, max_positions=256, progress=False)
    return [greedy_generate(model, p, max_tokens=MAX_TOKENS) for p in PROMPTS]


@pytest.fixture(scope="module")
def ray_runtime() -> Iterator[RayRuntime]:
    with local_ray(NAMESPACE) as runtime:
        yield runtime


def _config(model_dir: Path, pools: dict[str, object]) -> ClusterConfig:
    return ClusterConfig.from_dict(
        {
            "model": str(model_dir),
            "pools": pools,
            "ray": {"namespace": NAMESPACE},
            "health": FAST_HEALTH,
            "restart": FAST_RESTART,
        }
    )


@contextmanager
def _controller(config: ClusterConfig) -> Iterator[ControllerHandle]:
    controller = ControllerHandle.launch(config)
    pids: list[int] = []
    try:
        yield controller
    finally:
        pids = _rank_pids()
        controller.shutdown()
    _assert_nothing_left(pids)


def _rank_pids() -> list[int]:
    names = [
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(ACTOR_NAME_PREFIX)
    ]
    handles = [ray.get_actor(name, namespace=NAMESPACE) for name in names]
    return [int(pid) for pid in ray.get([h.pid.remote() for h in handles], timeout=30)]


def _assert_nothing_left(pids: list[int]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("k2serve")]
        groups = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
        alive = [pid for pid in pids if _alive(pid)]
        if not actors and not groups and not alive:
            return
        time.sleep(0.1)
    raise AssertionError(f"left behind: actors {actors}, placement groups {groups}, rank processes {alive}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _watch_until(address: str, done: Callable[[WorkerSnapshot], bool], timeout_s: float = 90.0) -> WorkerSnapshot:
    """Follow the registry's Watch until a snapshot satisfies ``done`` (bounded)."""

    async def follow() -> WorkerSnapshot:
        async for snapshot in RegistryClient(address, heartbeat_s=5.0).watch():
            if done(snapshot):
                return snapshot
        raise AssertionError("the watch ended")

    return asyncio.run(asyncio.wait_for(follow(), timeout_s))


def _sampling() -> worker_pb2.SamplingParams:
    return worker_pb2.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def _generate(address: str, prompt: list[int]) -> list[int]:
    async def call() -> list[int]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            request = worker_pb2.GenerateRequest(
                request_id=f"c{time.monotonic_ns()}", prompt_token_ids=prompt, sampling=_sampling()
            )
            return [t async for delta in stub.Generate(request, timeout=60) for t in delta.token_ids]

    return asyncio.run(call())


def _prefill_then_decode(prefill: str, decode: str, prompt: list[int]) -> list[int]:
    async def call() -> list[int]:
        async with grpc.aio.insecure_channel(prefill) as p_channel, grpc.aio.insecure_channel(decode) as d_channel:
            rid = f"pd{time.monotonic_ns()}"
            first = await worker_pb2_grpc.WorkerStub(p_channel).Prefill(
                worker_pb2.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=_sampling()), timeout=60
            )
            request = worker_pb2.DecodeRequest(
                request_id=rid,
                prompt_token_ids=prompt,
                sampling=_sampling(),
                first_token_id=first.first_token_id,
                kv=first.kv,
                sampler_state=first.sampler_state,
            )
            stream = worker_pb2_grpc.WorkerStub(d_channel).Decode(request, timeout=60)
            return [first.first_token_id, *[t async for delta in stream for t in delta.token_ids]]

    return asyncio.run(call())


def _by_id(workers: list[WorkerRecord]) -> dict[str, WorkerRecord]:
    return {w.worker_id: w for w in workers}


def test_colocated_group_serves_recovers_from_a_killed_rank_and_scales(
    ray_runtime: RayRuntime, model_dir: Path, oracle: list[list[int]]
) -> None:
    pool = {"colocated": {"ep_size": 2, "cpus_per_rank": 0.5, "kv_cache_blocks": 64, "max_model_len": 256}}
    config = _config(model_dir, pool)
    with _controller(config) as controller:
        assert controller.wait_ready(90), controller.status()
        workers = controller.live_workers()
        assert [(w.worker_id, w.role, w.group, w.rank, w.ep_size, w.state) for w in workers] == [
            ("colocated-g0-r0", "mixed", 0, 0, 2, "ready"),
            ("colocated-g0-r1", "mixed", 0, 1, 2, "ready"),
        ]
        assert all(w.address.startswith("127.0.0.1:") for w in workers)
        seen = _watch_until(controller.registry_address, lambda s: len(s.ready()) == 2)
        assert {w.address for w in seen.ready()} == {w.address for w in workers}
        assert [_generate(workers[i].address, PROMPTS[i]) for i in range(2)] == oracle  # EP=2 equals the oracle

        # an EP group cannot lose a rank: killing one actor recreates the whole group
        old = {w.address for w in workers}
        ray.kill(ray.get_actor(f"{ACTOR_NAME_PREFIX}:colocated-g0-r1:1", namespace=NAMESPACE))
        renewed = _watch_until(
            controller.registry_address, lambda s: len(s.ready()) == 2 and not {w.address for w in s.ready()} & old
        )
        (status,) = controller.status()
        assert (status["generation"], status["restarts"]) == (2, 1) and "died" in status["last_error"]
        assert _generate(renewed.ready()[1].address, PROMPTS[0]) == oracle[0]

        assert controller.scale("colocated", 2) == {"colocated": 2}
        assert controller.wait_ready(90), controller.status()
        scaled = _watch_until(controller.registry_address, lambda s: len(s.ready()) == 4)
        assert sorted(w.worker_id for w in scaled.ready()) == [f"colocated-g{g}-r{r}" for g in (0, 1) for r in (0, 1)]
        assert _generate(_by_id(controller.live_workers())["colocated-g1-r0"].address, PROMPTS[1]) == oracle[1]

        controller.scale("colocated", 1, grace_s=1.0)
        assert controller.wait_ready(60), controller.status()
        shrunk = _watch_until(controller.registry_address, lambda s: len(s.workers) == 2)
        assert {w.worker_id for w in shrunk.ready()} == {"colocated-g0-r0", "colocated-g0-r1"}


def test_demo_serves_prefill_then_decode_and_drains_a_group_into_a_fresh_one(
    ray_runtime: RayRuntime, model_dir: Path, oracle: list[list[int]]
) -> None:
    config = dataclasses.replace(
        ClusterConfig.demo(model_dir),
        ray=RaySettings(namespace=NAMESPACE),
        health=HealthSettings(**FAST_HEALTH),
        restart=RestartSettings(**FAST_RESTART),
    )
    with _controller(config) as controller:
        assert controller.wait_ready(120), controller.status()
        workers = _by_id(controller.live_workers())
        assert {k: (w.role, w.state) for k, w in workers.items()} == {
            "prefill-g0-r0": ("prefill", "ready"),
            "prefill-g0-r1": ("prefill", "ready"),
            "decode-g0-r0": ("decode", "ready"),
            "decode-g0-r1": ("decode", "ready"),
        }
        seen = _watch_until(controller.registry_address, lambda s: len(s.ready()) == 4)
        assert {w.worker_id for w in seen.ready("decode")} == {"decode-g0-r0", "decode-g0-r1"}
        prefill, decode = workers["prefill-g0-r0"].address, workers["decode-g0-r1"].address
        assert _prefill_then_decode(prefill, decode, PROMPTS[0]) == oracle[0]
        loads = controller.loads()
        assert len(loads) == 4 and all(int(load.get("leases", 0)) == 0 for load in loads.values())

        old = workers["prefill-g0-r0"].address
        assert controller.drain("prefill", 0, grace_s=1.0)
        assert controller.wait_ready(90), controller.status()
        fresh = _by_id(controller.live_workers())
        assert fresh["prefill-g0-r0"].address != old and fresh["decode-g0-r1"].address == decode
        prefill_status = next(s for s in controller.status() if s["pool"] == "prefill")
        assert (prefill_status["generation"], prefill_status["restarts"]) == (2, 0)  # planned, not a failure
        assert _prefill_then_decode(fresh["prefill-g0-r1"].address, decode, PROMPTS[1]) == oracle[1]


def test_ray_refuses_a_client_without_the_token(ray_runtime: RayRuntime, tmp_path: Path) -> None:
    assert ray_runtime.auth == "token" and ray_runtime.generated_token  # nothing was written under ~/.ray
    gcs = ray.get_runtime_context().gcs_address
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(tmp_path)}
    clean["RAY_gcs_server_port_wait_time_s"] = "2"  # Ray retries a refused connection for 20 s by default
    script = f"import ray; ray.init(address={gcs!r}); print('connected', ray.cluster_resources()['CPU'])"

    def connect(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )

    refused = connect(clean)
    assert refused.returncode != 0 and "InvalidAuthToken" in refused.stderr
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.environ["RAY_AUTH_TOKEN"]}
    admitted = connect(clean | token)
    assert admitted.returncode == 0 and "connected 4.0" in admitted.stdout, admitted.stderr[-2000:]


def test_groups_that_cannot_start_fail_for_good_with_the_reason_and_leave_nothing(ray_runtime: RayRuntime) -> None:
    config = ClusterConfig.from_dict(
        {
            "model": "/nonexistent/model",
            "pools": {
                "prefill": {"ep_size": 1, "cpus_per_rank": 0.5, "kv_cache_blocks": 8},  # the model is missing
                "decode": {"ep_size": 2, "cpus_per_rank": 3},  # 6 CPUs, one rank per node: never placeable
            },
            "ray": {"namespace": NAMESPACE},
            "health": FAST_HEALTH | {"start_timeout_s": 6.0},
            "restart": {"max_restarts": 0},
        }
    )
    with _controller(config) as controller:
        assert not controller.wait_ready(60)  # returns as soon as a group has failed for good
        deadline = time.monotonic() + 30
        while any(s["state"] != "failed" for s in controller.status()) and time.monotonic() < deadline:
            time.sleep(0.2)
        errors = {s["pool"]: (s["state"], s["last_error"]) for s in controller.status()}
        assert errors["prefill"][0] == "failed" and "nonexistent" in errors["prefill"][1]
        assert errors["decode"][0] == "failed" and "cannot hold it at all" in errors["decode"][1]
        final = _watch_until(controller.registry_address, lambda s: all(w.state == "failed" for w in s.workers))
        assert len(final.workers) == 3 and not final.ready()
