"""``ForwardBatch``: what one model step needs to know about its sequences, flattened, never padded.

Lifecycle: the engine (or a test) builds one per step from its scheduled sequences; the model reads
it and never changes it. Each sequence contributes its *new* tokens (one for a decode step, many
for a prefill chunk) and may already have *context* tokens in the paged KV cache (earlier chunks,
earlier decode steps, a prefix-cache hit). The new tokens of all sequences are concatenated in
sequence order into T rows.

Legend: T = new tokens in the batch, S = sequences, N = rows that get logits, B = max blocks per
sequence. Device tensors feed the math; the ``*_cpu`` tuples carry the same lengths on the host so
that the torch path plans its work without a device sync.

Cache addressing: token ``k`` (0-based index in its sequence, cached or new) lives in cache slot
``block_tables[s, k // block_size] * block_size + k % block_size``; ``slot_mapping[t]`` is that slot
for each new token, where the step writes its latent row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, rotary position of each new token (= its index in its sequence)
    query_start_loc: torch.Tensor  # [S+1] int32, cumulative count of new tokens; seq s owns rows [q[s], q[s+1])
    seq_lens: torch.Tensor  # [S] int32, context + new tokens of each sequence after this step
    slot_mapping: torch.Tensor  # [T] int64, cache slot written by each new token
    block_tables: torch.Tensor  # [S, B] int32, cache block ids of each sequence; entries past its blocks ignored
    query_lens_cpu: tuple[int, ...]  # [S] new tokens per sequence, on the host
    seq_lens_cpu: tuple[int, ...]  # [S] == seq_lens, on the host
    logits_indices: torch.Tensor | None = None  # [N] int64 rows that get logits; None = all T rows

    def __post_init__(self) -> None:
        num_seqs = len(self.query_lens_cpu)
        if len(self.seq_lens_cpu) != num_seqs:
            raise ValueError(f"seq_lens_cpu has {len(self.seq_lens_cpu)} entries for {num_seqs} sequences")
        for s, (q, n) in enumerate(zip(self.query_lens_cpu, self.seq_lens_cpu, strict=True)):
            if not 0 < q <= n:
                raise ValueError(f"sequence {s}: {q} new tokens with seq_len {n}; need 0 < new <= seq_len")
        t = sum(self.query_lens_cpu)
        for name, tensor, shape in (
            ("input_ids", self.input_ids, (t,)),
            ("positions", self.positions, (t,)),
            ("slot_mapping", self.slot_mapping, (t,)),
            ("query_start_loc", self.query_start_loc, (num_seqs + 1,)),
            ("seq_lens", self.seq_lens, (num_seqs,)),
        ):
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
        if self.block_tables.dim() != 2 or self.block_tables.shape[0] != num_seqs:
            raise ValueError(f"block_tables has shape {tuple(self.block_tables.shape)}, expected [{num_seqs}, B]")

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_cpu)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_cpu, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu, default=0)

    @property
    def context_lens_cpu(self) -> tuple[int, ...]:
        """Tokens of each sequence already in the cache before this step."""
        return tuple(n - q for q, n in zip(self.query_lens_cpu, self.seq_lens_cpu, strict=True))

    @property
    def query_starts_cpu(self) -> tuple[int, ...]:
        """First row of each sequence's new tokens (host copy of ``query_start_loc[:-1]``)."""
        starts, total = [], 0
        for q in self.query_lens_cpu:
            starts.append(total)
            total += q
        return tuple(starts)

    @property
    def device(self) -> torch.device:
        return self.input_ids.device


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def contiguous_block_tables(capacities: Sequence[int], block_size: int) -> list[list[int]]:
    """Block tables giving sequence s room for ``capacities[s]`` tokens in consecutive blocks, in order."""
    tables, next_block = [], 0
    for capacity in capacities:
        n = blocks_needed(capacity, block_size)
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
    return tables


def make_forward_batch(
    new_token_ids: Sequence[Sequence[int]],
    *,
    block_size: int,
    context_lens: Sequence[int] | None = None,
    block_tables: Sequence[Sequence[int]] | None = None,
    logits: Literal["all", "last"] = "all",
    device: torch.device | str = "cpu",
) -> ForwardBatch:
    """A batch from token lists, for tests and the single-process demo.

    ``new_token_ids[s]`` are the new tokens of sequence s; ``context_lens[s]`` (default 0) tokens of it
    are already cached. ``block_tables`` defaults to ``contiguous_block_tables`` over the sequence
    lengths. ``logits="last"`` asks logits for the last new token of each sequence only.
    """
    num_seqs = len(new_token_ids)
    contexts = list(context_lens) if context_lens is not None else [0] * num_seqs
    query_lens = [len(tokens) for tokens in new_token_ids]
    seq_lens = [c + q for c, q in zip(contexts, query_lens, strict=True)]
    tables = (
        [list(t) for t in block_tables] if block_tables is not None else contiguous_block_tables(seq_lens, block_size)
    )
    if len(tables) != num_seqs:
        raise ValueError(f"{len(tables)} block tables for {num_seqs} sequences")
    positions, slots = [], []
    for s in range(num_seqs):
        if blocks_needed(seq_lens[s], block_size) > len(tables[s]):
            raise ValueError(
                f"sequence {s}: {seq_lens[s]} tokens do not fit in {len(tables[s])} blocks of {block_size}"
            )
        for k in range(contexts[s], seq_lens[s]):
            positions.append(k)
            slots.append(tables[s][k // block_size] * block_size + k % block_size)
    width = max((len(t) for t in tables), default=0)
    padded = [t + [0] * (width - len(t)) for t in tables]
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    logits_indices = None
    if logits == "last":
        logits_indices = torch.tensor([end - 1 for end in starts[1:]], dtype=torch.int64, device=device)

    def as_tensor(values: list[int] | list[list[int]], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    return ForwardBatch(
        input_ids=as_tensor([t for tokens in new_token_ids for t in tokens], torch.int64),
        positions=as_tensor(positions, torch.int64),
        query_start_loc=as_tensor(starts, torch.int32),
        seq_lens=as_tensor(seq_lens, torch.int32),
        slot_mapping=as_tensor(slots, torch.int64),
        block_tables=as_tensor(padded, torch.int32).reshape(num_seqs, width),
        query_lens_cpu=tuple(query_lens),
        seq_lens_cpu=tuple(seq_lens),
        logits_indices=logits_indices,
    )
