"""The engine reproduces the fp32 greedy oracle on every path: batching, chunked prefill, prefix
cache, preemption, n > 1; aborts free every block; bad requests are refused with the field name."""

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
from k2serve.workers.sampling_params import SamplingParams, SamplingParamsError
from k2serve.workers.scheduler import SchedulerConfig

BLOCK = 4
MAX_LEN = 96
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> KimiK2ForCausalLM:
    folder = make_tiny_model(tmp_path_factory.mktemp("engine") / "tiny", seed=3)
    return load_model(folder, max_positions=MAX_LEN)


def _engine(
    model: KimiK2ForCausalLM,
    *,
    num_blocks: int = 256,
    budget: int = 64,
    chunked: bool = True,
    max_num_seqs: int = 64,
    prefix_caching: bool = True,
    policy: str = "fcfs",
) -> Engine:
    config = EngineConfig(
        block_size=BLOCK,
        max_model_len=MAX_LEN,
        enable_prefix_caching=prefix_caching,
        scheduler=SchedulerConfig(
            max_num_batched_tokens=budget,
            max_num_seqs=max_num_seqs,
            enable_chunked_prefill=chunked,
            policy=policy,  # type: ignore[arg-type]
        ),
    )
    cache = allocate_kv_cache(model.config, num_blocks, BLOCK, model.dtype, model.device)
    return Engine(model, cache, config)


def _prompts(model: KimiK2ForCausalLM, count: int, seed: int, max_len: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(model.config.vocab_size) for _ in range(rng.randint(1, max_len))] for _ in range(count)]


def _oracle(model: KimiK2ForCausalLM, prompt: list[int], max_tokens: int = 8) -> list[int]:
    return greedy_generate(model, prompt, max_tokens=max_tokens, block_size=BLOCK)


def _run(engine: Engine, max_steps: int = 2000) -> dict[str, list[RequestOutput]]:
    streams: dict[str, list[RequestOutput]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return streams
        for out in engine.step():
            streams.setdefault(f"{out.request_id}/{out.index}", []).append(out)
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


def _tokens(stream: list[RequestOutput]) -> list[int]:
    return [t for out in stream for t in out.new_token_ids]


def _assert_all_blocks_free(engine: Engine) -> None:
    engine.pool.check_invariants()
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


@pytest.mark.parametrize(("chunked", "budget"), [(True, 8), (False, 64)])
def test_staggered_batch_matches_single_sequence_greedy(model: KimiK2ForCausalLM, chunked: bool, budget: int) -> None:
    prompts = _prompts(model, 32, seed=1)
    engine = _engine(model, chunked=chunked, budget=budget)
    streams: dict[str, list[RequestOutput]] = {}
    pending = list(enumerate(prompts))
    for _ in range(2000):
        for _ in range(3):  # three new arrivals per step while any are left
            if pending:
                i, prompt = pending.pop(0)
                engine.add_request(f"r{i}", prompt, GREEDY)
        if not pending and not engine.has_unfinished_requests():
            break
        for out in engine.step():
            streams.setdefault(out.request_id, []).append(out)
    assert len(streams) == 32
    for i, prompt in enumerate(prompts):
        stream = streams[f"r{i}"]
        assert _tokens(stream) == _oracle(model, prompt), f"request {i} (prompt of {len(prompt)})"
        assert [o.finished for o in stream].count(True) == 1 and stream[-1].finish_reason == "length"
        assert stream[-1].usage is not None and stream[-1].usage.completion_tokens == 8
    _assert_all_blocks_free(engine)


def test_shared_prefix_is_served_from_cache_and_gives_the_same_tokens(model: KimiK2ForCausalLM) -> None:
    prefix = _prompts(model, 1, seed=2, max_len=3 * BLOCK)[0]
    prefix = (prefix * 12)[: 3 * BLOCK]  # exactly three full blocks
    first, second = [*prefix, 7, 8], [*prefix, 9, 10, 11]
    engine = _engine(model)
    engine.add_request("a", first, GREEDY)
    _run(engine)
    engine.add_request("b", second, GREEDY)
    schedule = engine.scheduler.schedule
    computed: list[int] = []
    engine.scheduler.schedule = lambda: (plan := schedule(), computed.append(plan.num_batched_tokens))[0]  # type: ignore[method-assign]
    stream = _run(engine)["b/0"]
    assert computed[0] == len(second) - 3 * BLOCK  # the prefill computed only the tail
    assert stream[-1].usage is not None and stream[-1].usage.cached_tokens == 3 * BLOCK
    assert _tokens(stream) == _oracle(model, second)


def test_different_cache_salt_never_shares_blocks(model: KimiK2ForCausalLM) -> None:
    prompt = _prompts(model, 1, seed=4, max_len=30)[0] + list(range(20))
    engine = _engine(model)
    engine.add_request("a", prompt, GREEDY, cache_salt="tenant-a")
    _run(engine)
    engine.add_request("b", prompt, GREEDY, cache_salt="tenant-b")
    engine.add_request("c", prompt, GREEDY, cache_salt="tenant-a")
    streams = _run(engine)
    usage_b, usage_c = streams["b/0"][-1].usage, streams["c/0"][-1].usage
    assert usage_b is not None and usage_b.cached_tokens == 0
    assert usage_c is not None and usage_c.cached_tokens > 0
    assert _tokens(streams["b/0"]) == _tokens(streams["c/0"]) == _oracle(model, prompt)


def test_preemption_under_a_small_pool_keeps_outputs_and_leaks_nothing(model: KimiK2ForCausalLM) -> None:
    prompts = _prompts(model, 10, seed=5, max_len=30)
    engine = _engine(model, num_blocks=24, budget=32)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=12))
    streams = _run(engine)
    assert engine.scheduler.num_preemptions > 0
    for i, prompt in enumerate(prompts):
        assert _tokens(streams[f"r{i}/0"]) == _oracle(model, prompt, 12)
    _assert_all_blocks_free(engine)


def test_preemption_with_priority_policy_also_matches(model: KimiK2ForCausalLM) -> None:
    prompts = _prompts(model, 8, seed=6, max_len=30)
    engine = _engine(model, num_blocks=20, budget=32, policy="priority")
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=10), priority=i % 3)
    streams = _run(engine)
    for i, prompt in enumerate(prompts):
        assert _tokens(streams[f"r{i}/0"]) == _oracle(model, prompt, 10)
    _assert_all_blocks_free(engine)


@pytest.mark.parametrize("abort_after_steps", [0, 1, 2, 5, 30])
def test_abort_at_any_point_frees_every_block(model: KimiK2ForCausalLM, abort_after_steps: int) -> None:
    engine = _engine(model, budget=8)  # long prompts take several chunked steps
    prompts = _prompts(model, 4, seed=7, max_len=40)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=6, n=2 if i == 0 else 1))
    finals: dict[str, int] = {}
    for _ in range(abort_after_steps):
        for out in engine.step():
            finals[out.request_id] = finals.get(out.request_id, 0) + out.finished
    for i in range(4):
        engine.abort(f"r{i}")
    for out in _run(engine).values():
        for o in out:
            finals[o.request_id] = finals.get(o.request_id, 0) + o.finished
    assert finals == {"r0": 2, "r1": 1, "r2": 1, "r3": 1}  # exactly one terminal delta per choice
    assert engine.abort("r1") is False
    _assert_all_blocks_free(engine)


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(model: KimiK2ForCausalLM) -> None:
    prompt = _prompts(model, 1, seed=8)[0]
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12)
    alone = _engine(model)
    alone.add_request("x", prompt, params)
    solo = _tokens(_run(alone)["x/0"])
    batched = _engine(model)
    for i, other in enumerate(_prompts(model, 5, seed=9)):
        batched.add_request(f"o{i}", other, SamplingParams(temperature=1.0, seed=i, max_tokens=12))
    batched.add_request("x", prompt, params)
    batched.add_request("y", prompt, SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=12))
    streams = _run(batched)
    assert _tokens(streams["x/0"]) == solo
    assert _tokens(streams["y/0"]) != solo


def test_n_choices_share_the_prompt_and_each_matches_greedy(model: KimiK2ForCausalLM) -> None:
    prompt = _prompts(model, 1, seed=10, max_len=3)[0] + list(range(30))
    engine = _engine(model)
    engine.add_request("n", prompt, SamplingParams(temperature=0.0, max_tokens=8, n=3))
    streams = _run(engine)
    expected = _oracle(model, prompt)
    for i in range(3):
        assert _tokens(streams[f"n/{i}"]) == expected
    usage = streams["n/1"][-1].usage
    assert usage is not None and usage.cached_tokens >= (len(prompt) - 1) // BLOCK * BLOCK
    _assert_all_blocks_free(engine)


def test_stop_token_ends_the_request_after_min_tokens(model: KimiK2ForCausalLM) -> None:
    prompt = _prompts(model, 1, seed=11)[0]
    expected = _oracle(model, prompt, 8)
    stop = expected[2]
    engine = _engine(model)
    engine.add_request("s", prompt, SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=(stop,)))
    stream = _run(engine)["s/0"]
    assert _tokens(stream) == expected[: expected.index(stop) + 1]
    assert stream[-1].finish_reason == "stop"


def test_logprobs_come_with_each_token_when_asked(model: KimiK2ForCausalLM) -> None:
    engine = _engine(model)
    engine.add_request("l", _prompts(model, 1, seed=12)[0], SamplingParams(temperature=0.0, max_tokens=4, logprobs=3))
    stream = _run(engine)["l/0"]
    assert all(out.logprobs is not None and len(out.logprobs) == len(out.new_token_ids) for out in stream)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: SamplingParams(temperature=-1.0), "temperature"),
        (lambda: SamplingParams(top_p=1.5), "top_p"),
        (lambda: SamplingParams(top_p=0.0), "top_p"),
        (lambda: SamplingParams(top_k=-2), "top_k"),
        (lambda: SamplingParams(max_tokens=0), "max_tokens"),
    ],
)
def test_bad_sampling_parameters_raise_a_typed_error_naming_the_field(make: object, field: str) -> None:
    with pytest.raises(SamplingParamsError) as info:
        make()  # type: ignore[operator]
    assert info.value.field == field


@pytest.mark.parametrize(
    ("prompt_len", "params", "field"),
    [
        (MAX_LEN, GREEDY, "prompt_token_ids"),
        (0, GREEDY, "prompt_token_ids"),
        (10, SamplingParams(max_tokens=MAX_LEN), "max_tokens"),
    ],
)
def test_bad_requests_are_refused_before_any_step(
    model: KimiK2ForCausalLM, prompt_len: int, params: SamplingParams, field: str
) -> None:
    engine = _engine(model)
    with pytest.raises(RequestValidationError) as info:
        engine.add_request("bad", [1] * prompt_len, params)
    assert info.value.field == field
    assert not engine.has_unfinished_requests()


def test_out_of_vocabulary_ids_and_duplicate_ids_are_refused(model: KimiK2ForCausalLM) -> None:
    engine = _engine(model)
    with pytest.raises(RequestValidationError, match="prompt_token_ids"):
        engine.add_request("v", [model.config.vocab_size], GREEDY)
    engine.add_request("d", [1, 2], GREEDY)
    with pytest.raises(RequestValidationError, match="request_id"):
        engine.add_request("d", [1, 2], GREEDY)


def test_a_failing_step_ends_its_requests_with_error_and_the_engine_goes_on(
    model: KimiK2ForCausalLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine(model)
    engine.add_request("boom", [1, 2, 3], GREEDY)

    def explode(*args: object) -> torch.Tensor:
        raise RuntimeError("injected forward failure")

    monkeypatch.setattr(engine, "_forward", explode)
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    failed = engine.drain_finished()
    assert [(o.request_id, o.finish_reason) for o in failed] == [("boom", "error")]
    monkeypatch.undo()
    engine.add_request("ok", [1, 2, 3], GREEDY)
    assert _tokens(_run(engine)["ok/0"]) == _oracle(model, [1, 2, 3])
    _assert_all_blocks_free(engine)
