"""The gRPC ``Worker`` service on real servers (loopback): colocated ``Generate``, disaggregated
``Prefill`` → ``Decode`` over both KV transports, status codes for bad input and wrong roles,
health and drain, lease expiry. Greedy outputs equal the single-process oracle; every lease and
pinned block is back at the end."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from k2serve.proto import worker_pb2, worker_pb2_grpc
from k2serve.tiny_model import make_tiny_model
from k2serve.workers.config import ModelConfig
from k2serve.workers.greedy import greedy_generate
from k2serve.workers.group_rank import GroupRank, RankSpec
from k2serve.workers.model_loader import load_model
from k2serve.workers.service import WorkerOptions, WorkerServer

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("svc") / "tiny", seed=11)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(4)
    return [[rng.randrange(512) for _ in range(rng.randint(1, 40))] for _ in range(5)]


@pytest.fixture(scope="module")
def oracle(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    model = load_model(model_dir, dtype=torch.float32, max_positions=256, progress=False)
    return [greedy_generate(model, p, max_tokens=MAX_TOKENS) for p in prompts]


def _greedy(max_tokens: int = MAX_TOKENS) -> worker_pb2.SamplingParams:
    return worker_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


@asynccontextmanager
async def _servers(model_dir: Path, *roles: str, **options: Any) -> AsyncIterator[list[WorkerServer]]:
    started: list[WorkerServer] = []
    try:
        for i, role in enumerate(roles):
            rank = await asyncio.to_thread(
                GroupRank.build, RankSpec(model_dir=model_dir, num_blocks=128, block_size=4, max_model_len=256)
            )
            started.append(await WorkerServer.start(rank, WorkerOptions(f"{role}-{i}", role, **options)))  # type: ignore[arg-type]
        yield started
    finally:
        for server in started:
            await server.stop(grace_s=2.0)


def _run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), 120))


def _stub(server: WorkerServer) -> tuple[grpc.aio.Channel, worker_pb2_grpc.WorkerStub]:
    channel = grpc.aio.insecure_channel(server.address)
    return channel, worker_pb2_grpc.WorkerStub(channel)


async def _disaggregated(
    prefill: worker_pb2_grpc.WorkerStub, decode: worker_pb2_grpc.WorkerStub, rid: str, prompt: list[int]
) -> list[int]:
    first = await prefill.Prefill(
        worker_pb2.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=_greedy()), timeout=30
    )
    assert first.kv.num_tokens == len(prompt) and first.finish_reason == ""
    tokens = [first.first_token_id]
    request = worker_pb2.DecodeRequest(
        request_id=rid,
        prompt_token_ids=prompt,
        sampling=_greedy(),
        first_token_id=first.first_token_id,
        kv=first.kv,
        sampler_state=first.sampler_state,
    )
    last = None
    async for delta in decode.Decode(request, timeout=30):
        tokens.extend(delta.token_ids)
        last = delta
    assert last is not None and last.finish_reason == "length"
    assert last.usage.transferred_tokens == len(prompt) and last.usage.completion_tokens == MAX_TOKENS
    return tokens


def test_colocated_generate_matches_the_oracle(
    model_dir: Path, prompts: list[list[int]], oracle: list[list[int]]
) -> None:
    async def body() -> None:
        async with _servers(model_dir, "mixed") as (server,):
            channel, stub = _stub(server)
            async with channel:

                async def one(i: int) -> list[int]:
                    request = worker_pb2.GenerateRequest(
                        request_id=f"g{i}", prompt_token_ids=prompts[i], sampling=_greedy()
                    )
                    return [t async for d in stub.Generate(request, timeout=30) for t in d.token_ids]

                assert await asyncio.gather(*(one(i) for i in range(len(prompts)))) == oracle
                health = health_pb2_grpc.HealthStub(channel)
                status = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                assert status.status == health_pb2.HealthCheckResponse.SERVING

    _run(body)


@pytest.mark.parametrize("transport", ["p2p", "grpc"])
def test_prefill_then_decode_matches_the_oracle_and_returns_every_block(
    model_dir: Path, prompts: list[list[int]], oracle: list[list[int]], transport: str
) -> None:
    async def body() -> None:
        async with _servers(model_dir, "prefill", "decode", transport=transport) as (prefill, decode):
            p_channel, p_stub = _stub(prefill)
            d_channel, d_stub = _stub(decode)
            async with p_channel, d_channel:
                results = await asyncio.gather(
                    *(_disaggregated(p_stub, d_stub, f"pd{i}", p) for i, p in enumerate(prompts))
                )
                assert results == oracle
                config = ModelConfig.from_model_dir(model_dir)
                row_bytes = (config.kv_lora_rank + config.qk_rope_head_dim) * 4  # fp32 cache
                expected = sum(row_bytes * config.num_hidden_layers * len(p) for p in prompts)
                loads = [await stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=5) for stub in (p_stub, d_stub)]
                for load in loads:
                    assert (load.leases, load.pinned_blocks, load.running, load.waiting) == (0, 0, 0, 0)
                    assert load.free_blocks == load.num_blocks
                    assert load.kv_transfers_failed == 0
                assert loads[1].kv_bytes_received == expected and loads[1].kv_transfers_ok == len(prompts)
                for _ in range(100):  # the sender counts its bytes when its side completes
                    if loads[0].kv_bytes_sent == expected:
                        break
                    await asyncio.sleep(0.02)
                    loads[0] = await p_stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
                assert loads[0].kv_bytes_sent == expected

    _run(body)


def test_bad_input_and_wrong_roles_get_status_codes(model_dir: Path) -> None:
    async def body() -> None:
        async with _servers(model_dir, "prefill", "decode") as (prefill, decode):
            p_channel, p_stub = _stub(prefill)
            d_channel, d_stub = _stub(decode)
            async with p_channel, d_channel:
                bad = worker_pb2.PrefillRequest(
                    request_id="b", prompt_token_ids=[1, 2], sampling=worker_pb2.SamplingParams(top_p=1.5)
                )
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await p_stub.Prefill(bad, timeout=10)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in str(info.value.details())
                empty = worker_pb2.PrefillRequest(request_id="e", prompt_token_ids=[], sampling=_greedy())
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await p_stub.Prefill(empty, timeout=10)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "prompt_token_ids" in str(info.value.details())
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    request = worker_pb2.GenerateRequest(request_id="w", prompt_token_ids=[1], sampling=_greedy())
                    async for _ in d_stub.Generate(request, timeout=10):
                        pass
                assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                no_handle = worker_pb2.DecodeRequest(request_id="n", prompt_token_ids=[1], sampling=_greedy())
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in d_stub.Decode(no_handle, timeout=10):
                        pass
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "kv" in str(info.value.details())
                unknown = worker_pb2.StartKvSendRequest(lease_id="nope", receiver_id="x")
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await p_stub.StartKvSend(unknown, timeout=10)
                assert info.value.code() == grpc.StatusCode.NOT_FOUND

    _run(body)


def test_unclaimed_lease_expires_and_drain_refuses_new_work(model_dir: Path) -> None:
    async def body() -> None:
        async with _servers(model_dir, "prefill", lease_ttl_s=1.0) as (prefill,):
            channel, stub = _stub(prefill)
            async with channel:
                first = await stub.Prefill(
                    worker_pb2.PrefillRequest(request_id="x", prompt_token_ids=list(range(1, 30)), sampling=_greedy()),
                    timeout=30,
                )
                load = await stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
                assert load.leases == 1 and load.pinned_blocks == -(-29 // 4)
                for _ in range(100):  # the expiry check runs every second
                    load = await stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
                    if (load.leases, load.pinned_blocks) == (0, 0):
                        break
                    await asyncio.sleep(0.05)
                assert (load.leases, load.pinned_blocks) == (0, 0)
                release = await stub.ReleaseKv(worker_pb2.ReleaseKvRequest(lease_id=first.kv.lease_id), timeout=5)
                assert not release.released  # already expired
                await prefill.drain(grace_s=1.0)
                health = health_pb2_grpc.HealthStub(channel)
                status = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Prefill(
                        worker_pb2.PrefillRequest(request_id="y", prompt_token_ids=[1], sampling=_greedy()), timeout=5
                    )
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    _run(body)


def test_a_failed_kv_pull_is_prefilled_again_on_another_rank(
    model_dir: Path, prompts: list[list[int]], oracle: list[list[int]]
) -> None:
    from k2serve.router.dispatcher import Dispatcher
    from k2serve.router.worker_client import WorkerEndpoint

    async def body() -> None:
        spec = RankSpec(model_dir=model_dir, num_blocks=128, block_size=4, max_model_len=256)
        servers = []
        try:
            # the first prefill rank's leases are dead on arrival: every pull from it fails
            for worker_id, role, ttl in (
                ("p-broken", "prefill", 1e-6),
                ("p-good", "prefill", 30.0),
                ("d", "decode", 30.0),
            ):
                rank = await asyncio.to_thread(GroupRank.build, spec)
                servers.append(await WorkerServer.start(rank, WorkerOptions(worker_id, role, lease_ttl_s=ttl)))  # type: ignore[arg-type]
            decode = servers[2]
            for retries in (1, 0):
                dispatcher = Dispatcher(pull_retries=retries, kv_push=False)  # the pull's failure path
                await dispatcher.update(WorkerEndpoint(s.options.worker_id, s.options.role, s.address) for s in servers)
                failed_pulls = decode.metrics.kv.failed
                finishes = []
                for i in range(2):  # the two prefill ranks take turns: one request hits the broken one first
                    events = [e async for e in dispatcher.generate(f"retry{retries}-{i}", prompts[i], _greedy())]
                    finishes.append(events[-1].finish_reason)
                    if retries:
                        assert [t for e in events for t in e.token_ids] == oracle[i]
                    elif events[-1].finish_reason == "error":
                        assert "prefill rank p-broken" in events[-1].error
                assert decode.metrics.kv.failed == failed_pulls + 1  # exactly one pull hit the broken rank
                assert finishes.count("error") == (0 if retries else 1)
                await dispatcher.close()
            for server in servers:
                load = server.load()
                assert (load.pinned_blocks, load.running) == (0, 0)
        finally:
            for server in servers:
                await server.stop(grace_s=2.0)

    _run(body)
