"""Prefill on one engine, decode on another (the engine half of disaggregated serving): the prompt's
latent rows are copied from the prefill engine's pinned blocks into the decode engine's
reservation, and the decode engine continues. Greedy output equals the single-sequence oracle;
seeded sampling equals colocated seeded sampling; pinned and reserved blocks all come back."""

from __future__ import annotations

import random

import pytest
import torch

from k2serve.tiny_model import make_tiny_model
from k2serve.workers.engine import Engine, EngineConfig, RequestOutput
from k2serve.workers.greedy import greedy_generate
from k2serve.workers.model.kv_cache import allocate_kv_cache
from k2serve.workers.model.model import KimiK2ForCausalLM
from k2serve.workers.model_loader import load_model
from k2serve.workers.request import RequestValidationError
from k2serve.workers.sampling_params import SamplingParams
from k2serve.workers.scheduler import SchedulerConfig

BLOCK = 4
MAX_LEN = 96


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> KimiK2ForCausalLM:
    folder = make_tiny_model(tmp_path_factory.mktemp("pd") / "tiny", seed=5)
    return load_model(folder, max_positions=MAX_LEN)


def _engine(model: KimiK2ForCausalLM, num_blocks: int = 128) -> Engine:
    config = EngineConfig(block_size=BLOCK, max_model_len=MAX_LEN, scheduler=SchedulerConfig(max_num_batched_tokens=32))
    return Engine(model, allocate_kv_cache(model.config, num_blocks, BLOCK, model.dtype, model.device), config)


def _slots(block_ids: list[int] | tuple[int, ...], num_tokens: int) -> torch.Tensor:
    t = torch.arange(num_tokens)
    return torch.tensor(block_ids)[t // BLOCK] * BLOCK + t % BLOCK


def _step_all(engine: Engine, streams: dict[str, list[RequestOutput]], max_steps: int = 500) -> None:
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return
        for out in engine.step():
            streams.setdefault(out.request_id, []).append(out)
    raise AssertionError("engine did not finish")


def _disaggregated(
    model: KimiK2ForCausalLM, prompts: list[list[int]], params: SamplingParams
) -> tuple[dict[str, list[int]], Engine, Engine]:
    prefill, decode = _engine(model), _engine(model)
    first: dict[str, list[RequestOutput]] = {}
    for i, prompt in enumerate(prompts):
        prefill.add_request(f"r{i}", prompt, SamplingParams(**{**params.__dict__, "max_tokens": 1}), hold_kv=True)
    _step_all(prefill, first)
    streams: dict[str, list[RequestOutput]] = {}
    for i, prompt in enumerate(prompts):
        rid = f"r{i}"
        held = prefill.held_kv(rid)
        assert held is not None and held.num_tokens == len(prompt)
        assert first[rid][-1].new_token_ids == (held.first_token_id,)
        blocks = decode.reserve_kv(rid, len(prompt))
        assert blocks is not None
        src, dst = _slots(held.block_ids, len(prompt)), _slots(blocks, len(prompt))
        for layer_src, layer_dst in zip(prefill.kv_cache, decode.kv_cache, strict=True):  # what a transport moves
            layer_dst.view(-1, layer_dst.shape[-1])[dst] = layer_src.view(-1, layer_src.shape[-1])[src]
        assert prefill.release_kv(rid)
        decode.add_prefilled_request(rid, prompt, params, held.first_token_id, sampler_state=held.sampler_state)
        streams[rid] = [RequestOutput(rid, 0, (held.first_token_id,))]
    _step_all(decode, streams)
    tokens = {rid: [t for out in outs for t in out.new_token_ids] for rid, outs in streams.items()}
    return tokens, prefill, decode


def test_prefill_here_decode_there_matches_the_greedy_oracle(model: KimiK2ForCausalLM) -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(model.config.vocab_size) for _ in range(rng.randint(1, 30))] for _ in range(10)]
    greedy = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)
    tokens, prefill, decode = _disaggregated(model, prompts, greedy)
    for i, prompt in enumerate(prompts):
        assert tokens[f"r{i}"] == greedy_generate(model, prompt, max_tokens=9, block_size=BLOCK)
    for engine in (prefill, decode):
        assert engine.num_held_blocks == 0 and engine.num_reserved_requests == 0
        engine.pool.check_invariants()
        assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_seeded_sampling_continues_across_the_handoff(model: KimiK2ForCausalLM) -> None:
    prompts = [[5, 9, 200, 31, 7], [100, 3]]
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=12, ignore_eos=True)
    tokens, _, _ = _disaggregated(model, prompts, seeded)
    colocated = _engine(model)
    streams: dict[str, list[RequestOutput]] = {}
    for i, prompt in enumerate(prompts):
        colocated.add_request(f"r{i}", prompt, seeded)
    _step_all(colocated, streams)
    assert tokens == {rid: [t for out in outs for t in out.new_token_ids] for rid, outs in streams.items()}


def test_reservations_and_holds_are_checked_and_returned(model: KimiK2ForCausalLM) -> None:
    engine = _engine(model, num_blocks=8)
    assert engine.reserve_kv("big", 8 * BLOCK + 1) is None  # more than the cache: refused, nothing held
    blocks = engine.reserve_kv("a", 5)
    assert blocks is not None and len(blocks) == 2
    with pytest.raises(RequestValidationError, match="already running"):
        engine.reserve_kv("a", 5)
    with pytest.raises(RequestValidationError, match="no KV reservation"):
        engine.add_prefilled_request("b", [1, 2], SamplingParams(temperature=0.0), 3)
    with pytest.raises(RequestValidationError, match="first_token_id"):
        engine.add_prefilled_request("a", [1, 2, 3, 4, 5], SamplingParams(temperature=0.0, max_tokens=4), 10**6)
    assert engine.pool.num_free_blocks == engine.pool.num_blocks  # a refused admission frees its reservation
    engine.reserve_kv("c", 3)
    engine.cancel_reservation("c")
    assert engine.pool.num_free_blocks == engine.pool.num_blocks
    with pytest.raises(RequestValidationError, match="n = 1"):
        engine.add_request("d", [1, 2], SamplingParams(n=2, max_tokens=1), hold_kv=True)
    # an aborted prefill holds nothing
    engine.add_request("e", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=1), hold_kv=True)
    engine.abort("e")
    assert engine.held_kv("e") is None and engine.num_held_blocks == 0
