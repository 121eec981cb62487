"""Runs and segments: where a request's rows lie contiguously in a paged cache, and how a KV transfer
cuts each layer into messages that each side sends from, or receives into, its cache without a copy.

A *run* is a maximal stretch of a request's tokens whose blocks have consecutive ids: blocks [b, b + k)
hold their tokens in one contiguous [n, row_dim] view of ``kv_cache[layer]`` (rows ``b * block_size``
onwards of ``kv_cache[layer].view(-1, row_dim)``). A side describes its runs by their token counts, in
token order (``run_lengths``): the compact form the two sides exchange in the p2p handshake. A fresh
``BlockPool`` hands a request ascending consecutive ids, i.e. one run.

The *segments* of a transfer are the common refinement of the runs of the sides that move rows
directly: every segment lies in one run of each such side, so a direct sender sends it straight from
its pages and a direct receiver receives it straight into its pages. A staged side (it gathers the
layer into, or scatters it from, one contiguous buffer) imposes no boundary: it slices its buffer at
the segments. Both sides staged is one message per layer.

The plan (``plan``), a cost model with one measured constant: every message beyond the first of a
layer costs as much as copying ``MESSAGE_COST_BYTES`` bytes; every staged side copies the layer once.
Of the four choices (each side direct or staged) the cheapest wins, ties in the order (both direct,
sender only, receiver only, neither); a choice with more than ``MAX_SEGMENTS`` segments per layer is
out. So one run per side is always direct, and a side whose runs are short stays staged.
``MESSAGE_COST_BYTES`` = 512 KiB, measured between two processes over loopback gloo on the 2-core
CPU host of docs/BENCHMARKS.md, each side's blocks in K equal runs, alternating the choices transfer by
transfer: a message cost 25-55 µs (both sides together), a gather or scatter ran at 10-12 GB/s, so a
message was worth 260-670 KB of copying; with Kimi-sized rows (576 bf16, 9.4 MB layers) both-direct
beat both-staged at K = 32 (24 vs 35 ms for 8 layers) and lost at K = 64 (57 vs 48 ms), sender-only
broke even with both-staged at K = 16; 512 KiB puts both crossovers there. ``MAX_SEGMENTS`` bounds
the tags a transfer uses and the size of the handshake.

Lifecycle: pure functions over immutable values. Each side computes the same plan from the same two
run lists (its own and the one its peer advertised), once per transfer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

MESSAGE_COST_BYTES = 512 * 1024
MAX_SEGMENTS = 64  # per layer

Runs = tuple[int, ...]  # token counts of a side's runs, in token order; they sum to num_tokens


@dataclass(frozen=True)
class Segment:
    """Tokens [first, first + count) of every layer: one message per layer."""

    first: int
    count: int


@dataclass(frozen=True)
class Plan:
    """How one transfer moves each layer: which sides go direct, and the message boundaries."""

    sender_direct: bool
    receiver_direct: bool
    segments: tuple[Segment, ...]


def run_lengths(block_ids: Sequence[int], num_tokens: int, block_size: int) -> Runs:
    """The runs of tokens [0, num_tokens) over ``block_ids`` (block j holds tokens [j * bs, (j + 1) * bs))."""
    needed = _blocks_needed(block_ids, num_tokens, block_size)
    breaks = [j for j in range(needed - 1) if block_ids[j + 1] != block_ids[j] + 1]
    return runs_from_breaks(breaks, num_tokens, block_size)


def runs_from_breaks(breaks: Sequence[int], num_tokens: int, block_size: int) -> Runs:
    """The runs, given the ascending block indexes j after which block j + 1 does not follow block j."""
    lengths, start = [], 0  # start: first token of the current run
    for j in breaks:
        end = (j + 1) * block_size
        lengths.append(end - start)
        start = end
    lengths.append(num_tokens - start)
    return tuple(lengths)


def _blocks_needed(block_ids: Sequence[int], num_tokens: int, block_size: int) -> int:
    if num_tokens < 1 or block_size < 1:
        raise ValueError(f"run_lengths: num_tokens {num_tokens} and block_size {block_size} must be >= 1")
    needed = -(-num_tokens // block_size)
    if len(block_ids) < needed:
        raise ValueError(f"block_ids: {num_tokens} tokens need {needed} blocks of {block_size}, got {len(block_ids)}")
    return needed


def parse_runs(value: Any, num_tokens: int, field: str) -> Runs | None:
    """A peer's advertised runs (JSON: null, or a list of positive ints summing to ``num_tokens``)."""
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or not value
        or len(value) > MAX_SEGMENTS
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value)
        or sum(value) != num_tokens
    ):
        raise ValueError(
            f"{field}: expected null or 1..{MAX_SEGMENTS} positive token counts summing to {num_tokens}, got "
            f"{str(value)[:80]}"
        )
    return tuple(value)


def advertised(runs: Runs) -> Runs | None:
    """What a side offers its peer: its runs, or None when it can only stage (too many runs)."""
    return runs if len(runs) <= MAX_SEGMENTS else None


def _cuts(runs: Runs | None, num_tokens: int) -> frozenset[int]:
    """The end of every run of one side (a staged side: just the end)."""
    cuts, at = {num_tokens}, 0
    for n in runs or ():
        at += n
        cuts.add(at)
    if runs is not None and at != num_tokens:
        raise ValueError(f"runs: they cover {at} tokens, expected {num_tokens}")
    return frozenset(cuts)


def refine(num_tokens: int, *sides: Runs | None) -> tuple[Segment, ...]:
    """The common refinement of the given sides' runs (None: a staged side, no boundary)."""
    bounds = sorted({0}.union(*(_cuts(runs, num_tokens) for runs in sides), {num_tokens}))
    return tuple(Segment(a, b - a) for a, b in pairwise(bounds))


def plan(sender: Runs | None, receiver: Runs | None, num_tokens: int, row_nbytes: int) -> Plan:
    """The cheapest way to move a layer of ``num_tokens`` rows (see the module docstring). ``sender`` /
    ``receiver``: the runs a side advertised, None for a side that can only stage."""
    layer_nbytes = num_tokens * row_nbytes
    ends = {"sender": _cuts(sender, num_tokens), "receiver": _cuts(receiver, num_tokens)}
    best: tuple[int, bool, bool] | None = None
    for sender_direct, receiver_direct in ((True, True), (True, False), (False, True), (False, False)):
        if (sender_direct and sender is None) or (receiver_direct and receiver is None):
            continue
        count = len(
            (ends["sender"] if sender_direct else {num_tokens}) | (ends["receiver"] if receiver_direct else set())
        )  # segments = their distinct end points
        if count > MAX_SEGMENTS:
            continue
        copies = (not sender_direct) + (not receiver_direct)
        cost = (count - 1) * MESSAGE_COST_BYTES + copies * layer_nbytes
        if best is None or cost < best[0]:
            best = (cost, sender_direct, receiver_direct)
    assert best is not None  # (False, False) is one segment: always a choice
    _, sender_direct, receiver_direct = best
    segments = refine(num_tokens, sender if sender_direct else None, receiver if receiver_direct else None)
    return Plan(sender_direct, receiver_direct, segments)
