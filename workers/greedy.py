"""Single-sequence greedy decoding over a private paged cache: the correctness oracle.

Lifecycle: each call allocates a cache just large enough for one sequence, prefills the prompt in
one expanded pass, then decodes one token per step in the weight-absorbed form until a stop id or
``max_tokens``. Every serving path (batching, chunked prefill, prefix cache, preemption, expert
parallelism, disaggregation, migration) must reproduce its output token for token in fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from k2serve.workers.model.forward_batch import blocks_needed, make_forward_batch
from k2serve.workers.model.kv_cache import allocate_kv_cache
from k2serve.workers.model.model import KimiK2ForCausalLM

DEFAULT_BLOCK_SIZE = 16


def greedy_stream(
    model: KimiK2ForCausalLM,
    prompt_ids: Sequence[int],
    *,
    max_tokens: int,
    stop_token_ids: Sequence[int] = (),
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Iterator[int]:
    """Yield greedy token ids one at a time; a stop id is yielded and ends the stream."""
    if not prompt_ids:
        raise ValueError("prompt_ids: the prompt is empty")
    if max_tokens < 1:
        raise ValueError(f"max_tokens: must be >= 1, got {max_tokens}")
    vocab = model.config.vocab_size
    bad = [t for t in prompt_ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt_ids: {bad[:5]} outside the vocabulary of {vocab}")
    total = len(prompt_ids) + max_tokens
    table = list(range(blocks_needed(total, block_size)))
    cache = allocate_kv_cache(model.config, len(table), block_size, model.dtype, model.device)
    stops = set(stop_token_ids)

    def step(new_ids: list[int], context: int) -> int:
        batch = make_forward_batch(
            [new_ids],
            block_size=block_size,
            context_lens=[context],
            block_tables=[table],
            logits="last",
            device=model.device,
        )
        logits = model(batch, cache)  # [1, V] fp32
        return int(torch.argmax(logits[0]).item())

    token = step(list(prompt_ids), 0)
    for generated in range(max_tokens):
        yield token
        if token in stops or generated + 1 == max_tokens:
            return
        token = step([token], len(prompt_ids) + generated)


def greedy_generate(
    model: KimiK2ForCausalLM,
    prompt_ids: Sequence[int],
    *,
    max_tokens: int,
    stop_token_ids: Sequence[int] = (),
    block_size: int = DEFAULT_BLOCK_SIZE,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    out = []
    for token in greedy_stream(
        model, prompt_ids, max_tokens=max_tokens, stop_token_ids=stop_token_ids, block_size=block_size
    ):
        out.append(token)
        if on_token is not None:
            on_token(token)
    return out
