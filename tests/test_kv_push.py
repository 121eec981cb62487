"""Pushed KV handoff: the prefill rank sends the KV layer by layer while its last forward computes
(DESIGN.md §2, issue 6 "send layer by layer as the prefill finishes each layer").

- The engine announces a pushed prefill's last forward (its final blocks) and every layer it wrote,
  only for the final chunk of a chunked prefill; an aborted prefill fails its waiters.
- Over the real p2p transport the receiver has layer 0 before the prefill wrote its last layer
  (the transfer overlaps compute), and every row equals the prefill's cache.
- Through real ranks and the router's dispatcher: pushed requests equal the greedy oracle, every push
  is claimed by its Decode (no pull), and everything is given back; a decode rank that cannot take a
  push refuses it and the request is pulled instead, still equal to the oracle; a push that fails
  mid-transfer (an injected drop) is pulled by its Decode, still equal to the oracle.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from k2serve.proto import worker_pb2
from k2serve.router.dispatcher import Dispatcher
from k2serve.router.worker_client import WorkerEndpoint
from k2serve.tiny_model import make_tiny_model
from k2serve.workers.engine import Engine, EngineConfig, RequestOutput
from k2serve.workers.fault_plan import FaultPlan
from k2serve.workers.greedy import greedy_generate
from k2serve.workers.group_rank import GroupRank, RankSpec
from k2serve.workers.kv_pages import CacheKvSink, CacheKvSource
from k2serve.workers.kv_progress import LayerProgress, ProgressKvSource
from k2serve.workers.kv_push_receiver import PushedKv, PushReceiver
from k2serve.workers.kv_transfer import TransferError, TransferState
from k2serve.workers.kv_transfer_metrics import KvTransferMetrics
from k2serve.workers.kv_transport_p2p import P2pKvClient, P2pKvServer
from k2serve.workers.model.kv_cache import allocate_kv_cache
from k2serve.workers.model.model import KimiK2ForCausalLM
from k2serve.workers.model_loader import load_model
from k2serve.workers.request import RequestValidationError
from k2serve.workers.sampling_params import SamplingParams
from k2serve.workers.scheduler import SchedulerConfig
from k2serve.workers.service import WorkerOptions, WorkerServer

BLOCK = 16
MAX_LEN = 256
TOKENS = 12
DEADLINE_S = 60.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("push") / "tiny", seed=31)


@pytest.fixture(scope="module")
def model(model_dir: Path) -> KimiK2ForCausalLM:
    return load_model(model_dir, dtype=torch.float32, max_positions=MAX_LEN, progress=False)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(4)
    return [[rng.randrange(512) for _ in range(rng.randint(20, 70))] for _ in range(6)]


@pytest.fixture(scope="module")
def oracle(model: KimiK2ForCausalLM, prompts: list[list[int]]) -> list[list[int]]:
    return [greedy_generate(model, p, max_tokens=TOKENS) for p in prompts]


def _engine(model: KimiK2ForCausalLM, chunk: int = 2048) -> Engine:
    config = EngineConfig(
        block_size=BLOCK, max_model_len=MAX_LEN, scheduler=SchedulerConfig(max_num_batched_tokens=chunk)
    )
    return Engine(model, allocate_kv_cache(model.config, 64, BLOCK, model.dtype, model.device), config)


def _first_token(engine: Engine, max_steps: int = 50) -> list[RequestOutput]:
    outputs: list[RequestOutput] = []
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return outputs
        outputs.extend(engine.step())
    raise AssertionError("the prefill did not finish")


# ---- the engine announces the last forward ------------------------------------------------------------


def test_a_chunked_prefill_announces_only_its_last_forward_with_the_held_blocks_and_every_layer(
    model: KimiK2ForCausalLM,
) -> None:
    engine = _engine(model, chunk=16)  # a 40-token prompt: chunks of 16, 16, 8
    progress = LayerProgress(model.config.num_hidden_layers)
    prompt = list(range(3, 43))
    engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=1), hold_kv=True, kv_progress=progress)
    engine.step()
    engine.step()
    assert progress.begun_at is None and not progress.wait(-1, 0.0)  # earlier chunks are not announced
    _first_token(engine)
    held = engine.held_kv("r")
    assert held is not None
    assert progress.block_ids == held.block_ids
    assert progress.complete and len(progress.done_at) == model.config.num_hidden_layers
    assert progress.done_at == sorted(progress.done_at)
    rows = ProgressKvSource(progress, engine.kv_cache, len(prompt))
    assert rows.ready(model.config.num_hidden_layers - 1, 0.0)
    expected = CacheKvSource(engine.kv_cache, held.block_ids, len(prompt))
    for layer in range(model.config.num_hidden_layers):
        assert torch.equal(rows.layer(layer), expected.layer(layer))


def test_an_aborted_prefill_fails_whoever_waits_for_its_layers(model: KimiK2ForCausalLM) -> None:
    engine = _engine(model, chunk=16)
    progress = LayerProgress(model.config.num_hidden_layers)
    engine.add_request("r", list(range(40)), SamplingParams(max_tokens=1), hold_kv=True, kv_progress=progress)
    engine.step()
    engine.abort("r")
    with pytest.raises(TransferError, match="the prefill failed"):
        progress.wait(0, 1.0)
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_progress_needs_a_held_prefill(model: KimiK2ForCausalLM) -> None:
    engine = _engine(model)
    with pytest.raises(RequestValidationError, match="kv_progress"):
        engine.add_request("r", [1, 2, 3], SamplingParams(), kv_progress=LayerProgress(3))


# ---- the transfer overlaps the forward ------------------------------------------------------------------


class _SlowLayers(LayerProgress):
    """Each layer takes LAYER_S longer: what a real model's layers cost next to the transfer."""

    LAYER_S = 0.15

    def layer_done(self, layer: int) -> None:
        time.sleep(self.LAYER_S)
        super().layer_done(layer)


def test_the_receiver_has_layer_zero_before_the_prefill_wrote_its_last_layer(model: KimiK2ForCausalLM) -> None:
    prefill, decode = _engine(model), _engine(model)
    layers = model.config.num_hidden_layers
    progress = _SlowLayers(layers)
    prompt = list(range(5, 60))
    server, client = P2pKvServer("p0", "127.0.0.1", timeout_s=20.0), P2pKvClient("d0", timeout_s=20.0)
    arrived: dict[int, float] = {}
    try:
        prefill.add_request("r", prompt, SamplingParams(max_tokens=1), hold_kv=True, kv_progress=progress)
        sender = server.start_send("t", "d0", ProgressKvSource(progress, prefill.kv_cache, len(prompt)))
        blocks = decode.reserve_kv("r", len(prompt))
        assert blocks is not None
        sink = CacheKvSink(decode.kv_cache, blocks, len(prompt))
        receiver = client.start_receive(
            "t", "p0", server.rendezvous, sink, on_wire=lambda layer, _: arrived.setdefault(layer, time.monotonic())
        )
        stepper = threading.Thread(target=_first_token, args=(prefill,), daemon=True)
        stepper.start()
        assert receiver.wait(30.0) is TransferState.SUCCESS, receiver.error
        assert sender.wait(5.0) is TransferState.SUCCESS, sender.error
        stepper.join(5.0)
        assert arrived[0] < progress.done_at[-1], (arrived, progress.done_at)  # overlapped with compute
        held = prefill.held_kv("r")
        assert held is not None
        source = CacheKvSource(prefill.kv_cache, held.block_ids, len(prompt))
        received = CacheKvSource(decode.kv_cache, blocks, len(prompt))
        for layer in range(layers):
            assert torch.equal(received.layer(layer), source.layer(layer))
        cache = decode.kv_cache
        assert receiver.bytes_moved == cache[0].shape[-1] * cache[0].element_size() * layers * len(prompt)
    finally:
        server.close()
        client.close()


# ---- real ranks, the router's dispatcher ----------------------------------------------------------------


@asynccontextmanager
async def _rank(
    model_dir: Path, worker_id: str, role: str, num_blocks: int, faults: FaultPlan | None = None
) -> AsyncIterator[WorkerServer]:
    spec = RankSpec(model_dir=model_dir, num_blocks=num_blocks, block_size=BLOCK, max_model_len=MAX_LEN)
    rank = await asyncio.to_thread(GroupRank.build, spec)
    options = WorkerOptions(worker_id, role, faults=faults or FaultPlan())  # type: ignore[arg-type]
    server = await WorkerServer.start(rank, options)
    try:
        yield server
    finally:
        await server.stop(grace_s=1.0)


@asynccontextmanager
async def _pd(
    model_dir: Path, prefill_faults: FaultPlan | None = None
) -> AsyncIterator[tuple[WorkerServer, WorkerServer, Dispatcher]]:
    """A prefill rank, a decode rank (64 blocks each) and a router dispatcher over them (push on)."""
    async with (
        _rank(model_dir, "p0", "prefill", 64, prefill_faults) as prefill,
        _rank(model_dir, "d0", "decode", 64) as decode,
    ):
        dispatcher = Dispatcher(request_timeout_s=DEADLINE_S)
        await dispatcher.update(
            WorkerEndpoint(s.options.worker_id, s.options.role, s.address) for s in (prefill, decode)
        )
        try:
            yield prefill, decode, dispatcher
        finally:
            await dispatcher.close()


async def _generate(dispatcher: Dispatcher, rid: str, prompt: list[int]) -> list[int]:
    sampling = worker_pb2.SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True)
    tokens: list[int] = []
    async for event in dispatcher.generate(rid, prompt, sampling):
        assert event.finish_reason != "error", event.error
        tokens.extend(event.token_ids)
    return tokens


def _sample(server: WorkerServer, name: str, **labels: str) -> float:
    value = server.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def _quiescent(*servers: WorkerServer, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        state = [
            (len(s.leases), s.engine.num_held_blocks, s.engine.num_reserved_requests, len(s.handoff.pushes))
            for s in servers
        ]
        free = [s.engine.pool.num_free_blocks == s.engine.pool.num_blocks for s in servers]
        if all(st == (0, 0, 0, 0) for st in state) and all(free):
            return
        assert time.monotonic() < deadline, f"not quiescent: (leases, pinned, reserved, pushes) = {state}, {free}"
        await asyncio.sleep(0.02)


def test_pushed_requests_equal_the_oracle_and_every_push_is_claimed(
    model_dir: Path, prompts: list[list[int]], oracle: list[list[int]]
) -> None:
    async def main() -> None:
        async with _pd(model_dir) as (prefill, decode, dispatcher):
            outs = await asyncio.wait_for(
                asyncio.gather(*(_generate(dispatcher, f"r{i}", p) for i, p in enumerate(prompts))), DEADLINE_S
            )
            assert outs == oracle
            n = len(prompts)
            assert _sample(decode, "k2serve_kv_pushes_total", outcome="claimed") == n
            assert _sample(decode, "k2serve_kv_handoffs_total", outcome="pushed") == n
            assert _sample(decode, "k2serve_kv_pushes_total", outcome="fell_back") == 0
            assert decode.metrics.kv.received_bytes == sum(len(p) for p in prompts) * _row_bytes(decode)
            await _quiescent(prefill, decode)

    asyncio.run(main())


def _row_bytes(server: WorkerServer) -> int:
    """row_dim × dtype size × layers: the bytes one prompt token moves."""
    cache = server.engine.kv_cache
    return len(cache) * cache[0].shape[-1] * cache[0].element_size()


def test_a_decode_rank_that_cannot_take_a_push_refuses_it_and_the_request_is_pulled(
    model_dir: Path, prompts: list[list[int]], oracle: list[list[int]]
) -> None:
    async def main() -> None:
        async with _pd(model_dir) as (prefill, decode, dispatcher):
            free = decode.engine.pool.num_free_blocks
            assert await decode.loop.call(lambda e: e.reserve_kv("ballast", free * BLOCK)) is not None
            task = asyncio.ensure_future(_generate(dispatcher, "r0", prompts[0]))
            deadline = time.monotonic() + 10.0
            while _sample(decode, "k2serve_kv_pushes_total", outcome="refused") < 1:
                assert time.monotonic() < deadline, "the push was never refused"
                await asyncio.sleep(0.01)
            await decode.loop.call(lambda e: e.cancel_reservation("ballast"))
            decode.handoff.notify()
            assert await asyncio.wait_for(task, DEADLINE_S) == oracle[0]
            assert _sample(decode, "k2serve_kv_pushes_total", outcome="accepted") == 0
            pulled = sum(_sample(decode, "k2serve_kv_handoffs_total", outcome=o) for o in ("immediate", "waited"))
            assert pulled == 1 and _sample(decode, "k2serve_kv_handoffs_total", outcome="pushed") == 0
            await _quiescent(prefill, decode)

    asyncio.run(main())


def test_a_push_that_fails_mid_transfer_is_pulled_instead_and_equals_the_oracle(
    model_dir: Path, prompts: list[list[int]], oracle: list[list[int]]
) -> None:
    async def main() -> None:
        drops = FaultPlan(kv_drop_every=2)  # sends 2, 4, ... fail: the second push, then every other one
        async with _pd(model_dir, drops) as (prefill, decode, dispatcher):
            outs = [
                await asyncio.wait_for(_generate(dispatcher, f"r{i}", p), DEADLINE_S) for i, p in enumerate(prompts[:3])
            ]
            assert outs == oracle[:3]
            # r0 pushed (send 1); r1's push dropped (send 2), pulled (send 3); r2's push dropped (send 4), pulled
            assert _sample(decode, "k2serve_kv_pushes_total", outcome="claimed") == 1
            # a failed push ends in its Decode's claim (fell_back) or, if the sweep saw it first, as failed
            failed = sum(_sample(decode, "k2serve_kv_pushes_total", outcome=o) for o in ("fell_back", "failed"))
            assert failed == 2 and decode.metrics.kv.failed == 2
            assert prefill.faults.kv_dropped == 2
            await _quiescent(prefill, decode)

    asyncio.run(main())


def test_a_request_that_ends_with_its_first_token_leaves_no_push_behind(
    model_dir: Path, prompts: list[list[int]], oracle: list[list[int]]
) -> None:
    async def main() -> None:
        async with _pd(model_dir) as (prefill, decode, dispatcher):
            # the first greedy token is a stop token: the prefill ends the request, nothing is decoded
            sampling = worker_pb2.SamplingParams(temperature=0.0, max_tokens=TOKENS, stop_token_ids=[oracle[0][0]])
            events = [e async for e in dispatcher.generate("r0", prompts[0], sampling)]
            assert events[-1].finish_reason == "stop"
            assert _sample(decode, "k2serve_kv_handoffs_total", outcome="pushed") == 0
            await _quiescent(prefill, decode, timeout_s=2.0)  # a push it took is gone, not held to its expiry

    asyncio.run(main())


class _FailedReceiver:
    """A push receiver whose transfer failed (a checksum mismatch, a dropped connection)."""

    bytes_moved, seconds = 4096, 0.01

    def __init__(self) -> None:
        self.cancelled: list[str] = []

    def poll(self) -> TransferState:
        return TransferState.FAILED

    def cancel(self, reason: str) -> None:
        self.cancelled.append(reason)


def test_a_push_that_failed_before_its_decode_came_counts_as_a_failed_receive() -> None:
    """Whichever comes first, the expiry sweep or the claim (``settle``), a failed push is one failed
    receive in the metrics: the sweep used to count only the push outcome."""

    async def main() -> tuple[KvTransferMetrics, _FailedReceiver, list[str]]:
        metrics = KvTransferMetrics(CollectorRegistry())
        freed: list[str] = []

        async def cancel_reservation(request_id: str) -> None:
            freed.append(request_id)

        async def reserve(request_id: str, num_tokens: int) -> list[int] | None:
            return None

        pushes = PushReceiver(
            None,  # type: ignore[arg-type]  # the sweep never touches the engine
            metrics,
            lambda: None,
            reserve,
            cancel_reservation,
            lambda request_id: None,
            transfer_timeout_s=1.0,
        )
        receiver = _FailedReceiver()
        pushes._pushes["lease-1"] = PushedKv("r1", "lease-1", [3, 4], receiver, time.monotonic() + 60)  # type: ignore[arg-type]
        await pushes.expire()
        assert len(pushes) == 0 and pushes.claim("lease-1", "r1") is None
        return metrics, receiver, freed

    metrics, receiver, freed = asyncio.run(main())
    assert (metrics.failed, metrics.ok, metrics.received_bytes) == (1, 0, 4096)
    assert receiver.cancelled and freed == ["r1"]
