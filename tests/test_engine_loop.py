"""The asyncio driver: concurrent streams equal the oracle, a vanished consumer aborts its request,
admission errors reach the caller, and stop() ends the loop. Every wait is bounded."""

from __future__ import annotations

import asyncio

import pytest

from k2serve.tiny_model import make_tiny_model
from k2serve.workers.engine import Engine, EngineConfig, RequestOutput
from k2serve.workers.engine_loop import EngineLoop
from k2serve.workers.greedy import greedy_generate
from k2serve.workers.model.kv_cache import allocate_kv_cache
from k2serve.workers.model.model import KimiK2ForCausalLM
from k2serve.workers.model_loader import load_model
from k2serve.workers.request import RequestValidationError
from k2serve.workers.sampling_params import SamplingParams

BLOCK, MAX_LEN, TIMEOUT_S = 4, 64, 30.0


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> KimiK2ForCausalLM:
    return load_model(make_tiny_model(tmp_path_factory.mktemp("loop") / "tiny", seed=5), max_positions=MAX_LEN)


def _engine(model: KimiK2ForCausalLM) -> Engine:
    cache = allocate_kv_cache(model.config, 128, BLOCK, model.dtype, model.device)
    return Engine(model, cache, EngineConfig(block_size=BLOCK, max_model_len=MAX_LEN))


async def _collect(stream_coro: object) -> list[RequestOutput]:
    stream = await stream_coro  # type: ignore[misc]
    return [out async for out in stream]


def test_concurrent_streams_match_the_oracle(model: KimiK2ForCausalLM) -> None:
    prompts = [[(7 * i + j) % 500 for j in range(3 + 5 * i)] for i in range(6)]

    async def main() -> list[list[RequestOutput]]:
        loop = EngineLoop(_engine(model))
        loop.start()
        params = SamplingParams(temperature=0.0, max_tokens=6)
        tasks = [_collect(loop.generate(f"r{i}", p, params)) for i, p in enumerate(prompts)]
        results = await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT_S)
        await loop.stop()
        return results

    for prompt, stream in zip(prompts, asyncio.run(main()), strict=True):
        assert [t for out in stream for t in out.new_token_ids] == greedy_generate(
            model, prompt, max_tokens=6, block_size=BLOCK
        )
        assert stream[-1].finish_reason == "length"


def test_a_consumer_that_goes_away_aborts_its_request(model: KimiK2ForCausalLM) -> None:
    engine = _engine(model)

    async def main() -> None:
        loop = EngineLoop(engine)
        loop.start()
        stream = await loop.generate("gone", list(range(20)), SamplingParams(temperature=0.0, max_tokens=40))
        async for _ in stream:
            break
        await stream.aclose()  # what a server does when the client disconnects
        for _ in range(200):  # bounded wait for the loop to apply the abort
            if not engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        await loop.stop()

    asyncio.run(main())
    assert not engine.has_unfinished_requests()
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_admission_errors_reach_the_caller(model: KimiK2ForCausalLM) -> None:
    async def main() -> None:
        loop = EngineLoop(_engine(model))
        loop.start()
        with pytest.raises(RequestValidationError, match="prompt_token_ids"):
            await asyncio.wait_for(_collect(loop.generate("long", [1] * MAX_LEN, SamplingParams())), TIMEOUT_S)
        await loop.stop()

    asyncio.run(main())
