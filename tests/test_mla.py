"""MLA over the paged latent cache: the two forms agree, and paging/chunking do not change results.

The oracle in each test is the same model run a simpler way (one expanded pass, contiguous blocks,
one-shot prefill); the HF comparison lives in test_model_vs_hf.py.
"""

from __future__ import annotations

import random

import pytest
import torch
from model_fixtures import batched_greedy, build_model, random_state_dict

from k2serve.workers.config import ModelConfig
from k2serve.workers.model.forward_batch import blocks_needed, make_forward_batch
from k2serve.workers.model.kv_cache import allocate_kv_cache
from k2serve.workers.model.model import KimiK2ForCausalLM

BLOCK = 4


@pytest.fixture(scope="module")
def model(tiny: ModelConfig) -> KimiK2ForCausalLM:
    return build_model(tiny, random_state_dict(tiny, 0))


def _tokens(config: ModelConfig, n: int, seed: int) -> list[int]:
    return torch.randint(0, config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _cache(model: KimiK2ForCausalLM, num_blocks: int) -> list[torch.Tensor]:
    return allocate_kv_cache(model.config, num_blocks, BLOCK, model.dtype, "cpu")


def _one_pass(model: KimiK2ForCausalLM, tokens: list[int], form: str = "expanded") -> torch.Tensor:
    batch = make_forward_batch([tokens], block_size=BLOCK)
    return model(batch, _cache(model, blocks_needed(len(tokens), BLOCK)), attention_form=form)  # [T, V]


def test_absorbed_decode_token_by_token_matches_one_expanded_pass_over_240_tokens(model: KimiK2ForCausalLM) -> None:
    tokens = _tokens(model.config, 240, seed=3)
    expected = _one_pass(model, tokens, "expanded")
    table = [list(range(blocks_needed(len(tokens), BLOCK)))]
    cache = _cache(model, len(table[0]))
    rows = []
    for k, token in enumerate(tokens):
        batch = make_forward_batch([[token]], block_size=BLOCK, context_lens=[k], block_tables=table)
        rows.append(model(batch, cache))  # one new token: the absorbed form
    assert (torch.cat(rows) - expected).abs().max().item() <= 1e-4


def test_forced_absorbed_prefill_matches_expanded_prefill(model: KimiK2ForCausalLM) -> None:
    tokens = _tokens(model.config, 57, seed=4)
    absorbed = _one_pass(model, tokens, "absorbed")
    expanded = _one_pass(model, tokens, "expanded")
    assert (absorbed - expanded).abs().max().item() <= 1e-4


def test_forced_expanded_decode_matches_absorbed_decode(model: KimiK2ForCausalLM) -> None:
    prompts = [_tokens(model.config, n, seed=n) for n in (5, 12, 1)]
    model.attention_form = "expanded"
    try:
        expanded = batched_greedy(model, prompts, 12, block_size=BLOCK)
    finally:
        model.attention_form = "auto"
    assert expanded == batched_greedy(model, prompts, 12, block_size=BLOCK)


def test_shuffled_block_tables_match_contiguous_blocks(model: KimiK2ForCausalLM) -> None:
    prompts = [_tokens(model.config, n, seed=10 + n) for n in (9, 14, 3)]
    new = 10
    contiguous = batched_greedy(model, prompts, new, block_size=BLOCK)
    needed = [blocks_needed(len(p) + new, BLOCK) for p in prompts]
    blocks = list(range(sum(needed) + 5))  # a few blocks nobody uses
    random.Random(0).shuffle(blocks)
    tables, start = [], 0
    for n in needed:
        tables.append(blocks[start : start + n])
        start += n
    assert batched_greedy(model, prompts, new, block_size=BLOCK, block_tables=tables) == contiguous

    # Same logits too, not only the same argmax, for a prefill over permuted blocks.
    batch = make_forward_batch(prompts, block_size=BLOCK, block_tables=tables)
    shuffled_logits = model(batch, _cache(model, len(blocks)))
    plain_logits = model(make_forward_batch(prompts, block_size=BLOCK), _cache(model, sum(needed)))
    torch.testing.assert_close(shuffled_logits, plain_logits, rtol=0, atol=1e-6)


def test_chunked_prefill_mixed_with_decodes_matches_one_shot_prefill(model: KimiK2ForCausalLM) -> None:
    long = _tokens(model.config, 50, seed=20)
    short = _tokens(model.config, 6, seed=21)
    expected_long = _one_pass(model, long, "expanded")
    expected_short = _one_pass(model, short, "expanded")
    tables = [list(range(13)), list(range(13, 15))]
    cache = _cache(model, 15)
    # step 1: first chunk of the long prompt + the first 5 tokens of the short one
    # step 2: second chunk (context 20 in cache) + the short sequence's 6th token as a decode step
    # step 3: last chunk alone
    got_long, got_short = [], []
    steps = [([long[:20], short[:5]], [0, 0]), ([long[20:37], short[5:]], [20, 5]), ([long[37:]], [37])]
    for new_tokens, contexts in steps:
        batch = make_forward_batch(
            new_tokens, block_size=BLOCK, context_lens=contexts, block_tables=tables[: len(new_tokens)]
        )
        logits = model(batch, cache)
        got_long.append(logits[: len(new_tokens[0])])
        if len(new_tokens) > 1:
            got_short.append(logits[len(new_tokens[0]) :])
    assert (torch.cat(got_long) - expected_long).abs().max().item() <= 1e-4
    assert (torch.cat(got_short) - expected_short).abs().max().item() <= 1e-4


def test_chunked_prefill_in_absorbed_form_matches_one_shot(model: KimiK2ForCausalLM) -> None:
    tokens = _tokens(model.config, 30, seed=22)
    expected = _one_pass(model, tokens, "expanded")
    table = [list(range(8))]
    cache = _cache(model, 8)
    first = model(make_forward_batch([tokens[:11]], block_size=BLOCK, block_tables=table), cache, "absorbed")
    second = model(
        make_forward_batch([tokens[11:]], block_size=BLOCK, context_lens=[11], block_tables=table), cache, "absorbed"
    )
    assert (torch.cat([first, second]) - expected).abs().max().item() <= 1e-4


def test_cache_holds_normalized_latent_then_rotated_k_pe(model: KimiK2ForCausalLM) -> None:
    tokens = _tokens(model.config, 6, seed=23)
    cache = _cache(model, 2)
    model(make_forward_batch([tokens], block_size=BLOCK), cache)
    layer0 = cache[0].view(-1, model.config.kv_cache_dim)[:6]  # [6, 576-equivalent]
    assert layer0.shape[-1] == model.config.kv_lora_rank + model.config.qk_rope_head_dim
    attn = model.model.layers[0].self_attn
    x = model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.tensor(tokens)))
    c_kv, k_pe = attn.kv_a_proj_with_mqa(x).split([model.config.kv_lora_rank, model.config.qk_rope_head_dim], -1)
    torch.testing.assert_close(layer0[:, : model.config.kv_lora_rank], attn.kv_a_layernorm(c_kv))
    assert torch.allclose(layer0[0, model.config.kv_lora_rank :], k_pe[0])  # position 0: rotation by angle 0
    assert not torch.allclose(layer0[5, model.config.kv_lora_rank :], k_pe[5])


def test_bf16_runs_and_stays_close_to_fp32(tiny: ModelConfig) -> None:
    """bf16 logits stay near fp32 on most rows; a few rows may move a lot where a near-tie in the
    gate's s + bias picks another expert (HF's bf16 model does the same on the same weights)."""
    state = random_state_dict(tiny, 1)
    fp32 = build_model(tiny, state)
    bf16_state = {k: v if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16) for k, v in state.items()}
    bf16 = build_model(tiny, bf16_state, dtype=torch.bfloat16)
    assert bf16.model.layers[0].self_attn.kv_b_proj.weight.dtype == torch.bfloat16
    prompts = [_tokens(tiny, n, seed=30 + n) for n in (16, 7, 25, 40)]
    batch = make_forward_batch(prompts, block_size=BLOCK)
    ref = fp32(batch, _cache(fp32, 32))
    for form in ("auto", "absorbed"):
        got = bf16(batch, allocate_kv_cache(tiny, 32, BLOCK, torch.bfloat16, "cpu"), form)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        # error per row relative to the spread of that row's fp32 logits (about 4 for the tiny preset)
        row_error = (got - ref).abs().amax(dim=-1) / ref.std(dim=-1)  # [T]
        assert row_error.median().item() <= 0.1
        assert (row_error <= 0.3).float().mean().item() >= 0.8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_in_fp32_and_bf16(tiny: ModelConfig) -> None:
    state = random_state_dict(tiny, 1)
    prompts = [_tokens(tiny, n, seed=40 + n) for n in (9, 1, 30)]
    cpu = build_model(tiny, state)
    expected = batched_greedy(cpu, prompts, 16)
    for dtype in (torch.float32, torch.bfloat16):
        gpu = KimiK2ForCausalLM(tiny, dtype=dtype, device="cuda", max_positions=4096)
        gpu.load_state_dict(state, strict=True)
        batch = make_forward_batch(prompts, block_size=BLOCK, device="cuda")
        logits = gpu(batch, allocate_kv_cache(tiny, 16, BLOCK, dtype, "cuda"))
        ref = cpu(make_forward_batch(prompts, block_size=BLOCK), _cache(cpu, 16))
        row_error = (logits.cpu() - ref).abs().amax(dim=-1)
        if dtype == torch.float32:
            assert row_error.max().item() <= 1e-3  # TF32 may be on for CUDA matmuls
            assert batched_greedy(gpu, prompts, 16) == expected
        else:
            assert (row_error <= 0.3).float().mean().item() >= 0.9


def test_forward_batch_addresses_slots_through_block_tables() -> None:
    batch = make_forward_batch(
        [[1, 2, 3], [4]], block_size=4, context_lens=[2, 6], block_tables=[[7, 3], [5, 0, 9]], logits="last"
    )
    assert batch.positions.tolist() == [2, 3, 4, 6]
    assert batch.slot_mapping.tolist() == [7 * 4 + 2, 7 * 4 + 3, 3 * 4 + 0, 0 * 4 + 2]
    assert batch.query_start_loc.tolist() == [0, 3, 4]
    assert batch.seq_lens.tolist() == [5, 7]
    assert batch.block_tables.tolist() == [[7, 3, 0], [5, 0, 9]]
    assert batch.logits_indices.tolist() == [2, 3]
    assert batch.context_lens_cpu == (2, 6)
    with pytest.raises(ValueError, match="do not fit"):
        make_forward_batch([[1, 2, 3]], block_size=4, context_lens=[6], block_tables=[[0, 1]])


def test_an_empty_batch_runs_for_an_idle_expert_parallel_rank(model: KimiK2ForCausalLM) -> None:
    batch = make_forward_batch([], block_size=BLOCK)
    assert model(batch, _cache(model, 1)).shape == (0, model.config.vocab_size)
