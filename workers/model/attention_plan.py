"""``AttentionPlan``: what every attention layer of one step shares, built once per forward.

Lifecycle: the model builds the plan once per forward from the ``ForwardBatch`` (host lengths only,
no device sync) and every attention layer reuses it, so rotary angles, index and mask tensors are
built once per step, not once per layer. It holds the cos/sin of each new token, the cache slots
they write, and the attention groups below.

Grouping rule: all sequences with one new token (decode steps) form one group and are attended in
one batched computation; every sequence with several new tokens (prefill or a prefill chunk over
cached context) is its own group. Form rule (``AttentionForm``): ``"auto"`` uses the
weight-absorbed form over the latent cache for the decode group and the expanded form for the
others; ``"absorbed"``/``"expanded"`` force one form everywhere (tests compare the two).

Legend: T = new tokens in the batch, Rp = qk_rope_head_dim, S = sequences in a group, Q = new tokens per sequence of the group, L = keys per sequence
(padded to the longest), B = max blocks per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from k2serve.workers.model.forward_batch import ForwardBatch

AttentionForm = Literal["auto", "absorbed", "expanded"]
ATTENTION_FORMS: tuple[AttentionForm, ...] = ("auto", "absorbed", "expanded")


@dataclass(frozen=True)
class AttentionGroup:
    """S sequences with Q new tokens each, attending over up to L cached keys (new ones included)."""

    absorbed: bool  # weight-absorbed form over the latents, else expanded K/V
    num_seqs: int  # S
    query_len: int  # Q
    query_rows: torch.Tensor  # [S*Q] int64 batch rows of the group's new tokens, sequence-major
    key_slots: torch.Tensor  # [S, L] int64 cache slot of key l of sequence s (padding reads a valid slot)
    mask: torch.Tensor  # [S, Q, L] bool: query q of sequence s may see key l (causal, within its length)
    block_tables: torch.Tensor  # [S, B] int32 the group's rows of the batch's block tables
    seq_lens: torch.Tensor  # [S] int32 keys of each sequence after this step


@dataclass(frozen=True)
class AttentionPlan:
    slot_mapping: torch.Tensor  # [T] int64 cache slot each new token writes
    cos: torch.Tensor  # [T, Rp/2] fp32 rotary angles of each new token
    sin: torch.Tensor  # [T, Rp/2] fp32
    groups: tuple[AttentionGroup, ...]  # every new token belongs to exactly one group


def plan_attention(
    batch: ForwardBatch, block_size: int, form: AttentionForm, rope: tuple[torch.Tensor, torch.Tensor]
) -> AttentionPlan:
    """Group the batch's sequences (rule above); ``rope`` is (cos, sin) [T, Rp/2] from ``RotaryEmbedding``."""
    if form not in ATTENTION_FORMS:
        raise ValueError(f"attention form {form!r}; expected one of {ATTENTION_FORMS}")
    starts = batch.query_starts_cpu
    decode = [s for s, q in enumerate(batch.query_lens_cpu) if q == 1]
    groups = []
    if decode:
        groups.append(_group(batch, block_size, decode, starts, absorbed=form != "expanded"))
    for s, q in enumerate(batch.query_lens_cpu):
        if q > 1:
            groups.append(_group(batch, block_size, [s], starts, absorbed=form == "absorbed"))
    cos, sin = rope
    return AttentionPlan(slot_mapping=batch.slot_mapping, cos=cos, sin=sin, groups=tuple(groups))


def _group(
    batch: ForwardBatch, block_size: int, seq_ids: list[int], starts: tuple[int, ...], *, absorbed: bool
) -> AttentionGroup:
    device = batch.device
    query_len = batch.query_lens_cpu[seq_ids[0]]
    num_keys = max(batch.seq_lens_cpu[s] for s in seq_ids)  # L
    rows = [starts[s] + q for s in seq_ids for q in range(query_len)]
    context_lens = batch.context_lens_cpu
    contexts = torch.tensor([context_lens[s] for s in seq_ids], dtype=torch.int64, device=device)  # [S]

    key_idx = torch.arange(num_keys, device=device)  # [L]
    seq_index = torch.tensor(seq_ids, device=device)
    tables = batch.block_tables[seq_index].long()  # [S, B]
    blocks = tables[:, key_idx // block_size].clamp_min(0)  # [S, L]
    key_slots = blocks * block_size + key_idx % block_size  # [S, L]

    # New token q of a sequence with c cached tokens is key c+q; it sees keys 0..c+q.
    last_visible = contexts[:, None] + torch.arange(query_len, device=device)[None, :]  # [S, Q]
    mask = key_idx[None, None, :] <= last_visible[:, :, None]  # [S, Q, L]
    return AttentionGroup(
        absorbed=absorbed,
        num_seqs=len(seq_ids),
        query_len=query_len,
        query_rows=torch.tensor(rows, dtype=torch.int64, device=device),
        key_slots=key_slots,
        mask=mask,
        block_tables=batch.block_tables[seq_index],
        seq_lens=batch.seq_lens[seq_index],
    )
