"""The sampler's batched logits transforms: pure tensor functions, one per sampling parameter.

Lifecycle: none; every function takes tensors for a batch of rows and returns new tensors (inputs
are never modified), so the sampler can apply each one to exactly the rows that ask for it. The
sampler runs them in this order: stop-id masking for ``min_tokens`` -> penalties -> (greedy argmax)
-> temperature -> ``apply_top_k`` -> softmax -> ``apply_top_p`` -> ``apply_min_p``.

Shape legend: ``R`` rows (sequences) of the batch being transformed, ``V`` vocabulary size,
``T`` token ids flattened over the rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def mask_token_ids(logits: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``logits`` with ``-inf`` at each (row, token) pair, e.g. stop ids before ``min_tokens``."""
    # logits [R, V]; rows [T], token_ids [T]
    masked = logits.clone()
    masked[rows, token_ids] = float("-inf")
    return masked


def token_counts(token_ids: Sequence[torch.Tensor], vocab_size: int, device: torch.device) -> torch.Tensor:
    """How often each vocabulary id occurs in each row's token list, as float32 ``[R, V]``."""
    lengths = torch.tensor([len(ids) for ids in token_ids], dtype=torch.int64)  # [R]
    flat = torch.cat([ids.to(torch.int64) for ids in token_ids]) if token_ids else lengths[:0]  # [T]
    rows = torch.repeat_interleave(torch.arange(len(token_ids)), lengths)  # [T]
    counts = torch.zeros(len(token_ids), vocab_size, dtype=torch.float32, device=device)  # [R, V]
    if flat.numel():
        ones = torch.ones(flat.numel(), dtype=torch.float32, device=device)
        counts.index_put_((rows.to(device), flat.to(device)), ones, accumulate=True)
    return counts


def apply_penalties(
    logits: torch.Tensor,
    output_counts: torch.Tensor,
    prompt_mask: torch.Tensor | None,
    repetition_penalty: torch.Tensor,
    presence_penalty: torch.Tensor,
    frequency_penalty: torch.Tensor,
) -> torch.Tensor:
    """vLLM's / HF's penalties, in their order.

    Repetition (on prompt + output tokens): a positive logit is divided by the penalty, a negative
    one multiplied, so a penalty > 1 always makes a seen token less likely. Then, on output tokens
    only, ``logit -= frequency_penalty * count + presence_penalty * (count > 0)`` (OpenAI).
    Neutral values (1, 0, 0) leave a row bit-exact.
    """
    # logits [R, V]; output_counts [R, V] float; prompt_mask [R, V] bool or None; penalties [R]
    generated = output_counts > 0  # [R, V]
    seen = generated if prompt_mask is None else generated | prompt_mask
    rep = repetition_penalty[:, None]  # [R, 1]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - frequency_penalty[:, None] * output_counts
    return logits - presence_penalty[:, None] * generated.to(logits.dtype)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, k_max: int | None = None) -> torch.Tensor:
    """Keep each row's ``top_k`` largest logits (ties at the k-th value are kept), ``-inf`` the rest.

    A ``top_k`` of 0 or less, or at least ``V``, leaves the row unchanged. ``k_max`` (the largest
    active ``top_k``, when the caller knows it) saves a device-to-host sync.
    """
    # logits [R, V]; top_k [R] int
    vocab = logits.shape[-1]
    active = (top_k > 0) & (top_k < vocab)  # [R]
    if k_max is None:
        k_max = int(top_k[active].max().item()) if bool(active.any()) else 0
    k_max = min(k_max, vocab)
    if k_max <= 0:
        return logits.clone()
    k = torch.where(active, top_k, 1).clamp(max=k_max).to(torch.int64)  # [R]
    top_values = torch.topk(logits, k_max, dim=-1).values  # [R, k_max], descending
    threshold = top_values.gather(-1, (k - 1)[:, None])  # [R, 1]
    threshold = torch.where(active[:, None], threshold, float("-inf"))
    return logits.masked_fill(logits < threshold, float("-inf"))


def apply_top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's smallest set of most likely tokens whose mass reaches ``top_p``; zero the rest.

    A token is kept when the mass of the tokens strictly more likely than it is below ``top_p``,
    so the most likely token always survives. Rows with ``top_p >= 1`` are left unchanged (a
    cumulative sum that rounds to 1 early must not cut the tail). Probabilities are not
    renormalised; the sampler's draw does not need it.
    """
    # probs [R, V]; top_p [R]
    p = torch.where(top_p >= 1, float("inf"), top_p)[:, None]  # [R, 1]
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # [R, V]
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [R, V]
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)  # back to vocabulary order
    return probs.masked_fill(drop, 0.0)


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero the tokens whose probability is below ``min_p`` x the row's top probability."""
    # probs [R, V]; min_p [R]
    threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)  # [R, 1]
    return probs.masked_fill(probs < threshold, 0.0)
