"""A small deterministic byte-level BPE trainer that produces Kimi-shaped test vocabularies.

Lifecycle: ``make-tiny-model`` calls ``train_byte_bpe(BUILTIN_CORPUS, preset.num_base_tokens)``
once and ``write_tokenizer_files(model_dir, ranks)``; the same corpus and size always give the
same ranks. Ranks 0..255 are the single bytes in byte order; rank 256+ are merges in the order
they were learnt (most frequent candidate first, ties broken by the smaller byte string).

Consistency with tiktoken: tiktoken does not replay a merge list, it repeatedly joins the adjacent
pair whose *concatenated bytes* have the lowest rank. The trainer therefore keeps each distinct
pre-tokenised word exactly as tiktoken would encode it under the ranks learnt so far (after adding a
token, the affected words are re-run through tiktoken's merge rule), and counts candidates by
their concatenated bytes. Every learnt token is thus produced by tiktoken's own merge rule, so
encoding a token's bytes yields that single token. Pair counts are updated incrementally: only
the words that contain the new token's bytes as an adjacent pair are re-encoded.
"""

from __future__ import annotations

import heapq
from collections import Counter

import regex

from k2serve.router.bpe_corpus import BUILTIN_CORPUS
from k2serve.router.kimi_vocab import PAT_STR
from k2serve.router.tokenizer_files import write_tokenizer_files

__all__ = [
    "BUILTIN_CORPUS",
    "NUM_BYTE_TOKENS",
    "PRETOKENIZE",
    "CorpusTooSmallError",
    "train_byte_bpe",
    "write_tokenizer_files",
]

NUM_BYTE_TOKENS = 256
# V1 enables `&&` class intersection, which the pattern needs; it then splits like tiktoken.
PRETOKENIZE = regex.compile(PAT_STR, flags=regex.V1)


class CorpusTooSmallError(ValueError):
    """The corpus ran out of pairs before ``num_base_tokens`` ranks were learnt."""


def train_byte_bpe(corpus: str, num_base_tokens: int) -> dict[bytes, int]:
    """Learn ``num_base_tokens - 256`` merges on ``corpus``; return tiktoken mergeable ranks."""
    if num_base_tokens < NUM_BYTE_TOKENS:
        raise ValueError(f"num_base_tokens must be >= {NUM_BYTE_TOKENS}, got {num_base_tokens}")
    ranks = {bytes([b]): b for b in range(NUM_BYTE_TOKENS)}
    # Lone surrogates become U+FFFD, exactly as tiktoken treats them when encoding.
    corpus = corpus.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    word_counts = Counter(piece.encode("utf-8") for piece in PRETOKENIZE.findall(corpus))
    words = [[bytes([b]) for b in word] for word in sorted(word_counts)]  # sorted: order-independent
    freqs = [word_counts[b"".join(parts)] for parts in words]
    counts = _CandidateCounts()
    for word_id, parts in enumerate(words):
        counts.add_word(word_id, parts, freqs[word_id])

    for rank in range(NUM_BYTE_TOKENS, num_base_tokens):
        token = counts.pop_best(ranks)
        if token is None:
            raise CorpusTooSmallError(
                f"corpus yields only {rank} ranks ({len(word_counts)} distinct words); {num_base_tokens} requested"
            )
        ranks[token] = rank
        for word_id in sorted(counts.words_with(token)):
            old = words[word_id]
            new = tiktoken_merge(old, ranks)
            if len(new) != len(old):
                counts.remove_word(word_id, old, freqs[word_id])
                counts.add_word(word_id, new, freqs[word_id])
                words[word_id] = new
    return ranks


def tiktoken_merge(parts: list[bytes], ranks: dict[bytes, int]) -> list[bytes]:
    """tiktoken's byte_pair_merge: join the leftmost lowest-ranked adjacent pair until none is a token."""
    parts = list(parts)
    while len(parts) > 1:
        best_rank, best_i = -1, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_i < 0 or rank < best_rank):
                best_rank, best_i = rank, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


class _CandidateCounts:
    """Weighted counts of adjacent-pair concatenations, a lazy max-heap over them, and an index
    from each candidate to the words that contain it."""

    def __init__(self) -> None:
        self._count: dict[bytes, int] = {}
        self._words: dict[bytes, set[int]] = {}
        self._heap: list[tuple[int, bytes]] = []  # (-count, candidate); stale entries are skipped

    def add_word(self, word_id: int, parts: list[bytes], freq: int) -> None:
        for candidate in _adjacent(parts):
            self._count[candidate] = self._count.get(candidate, 0) + freq
            self._words.setdefault(candidate, set()).add(word_id)
            heapq.heappush(self._heap, (-self._count[candidate], candidate))

    def remove_word(self, word_id: int, parts: list[bytes], freq: int) -> None:
        # The word's id stays in `_words` (a superset is harmless: re-encoding it is a no-op).
        for candidate in _adjacent(parts):
            self._count[candidate] -= freq
            if self._count[candidate] > 0:
                heapq.heappush(self._heap, (-self._count[candidate], candidate))

    def words_with(self, candidate: bytes) -> set[int]:
        return self._words.pop(candidate, set())

    def pop_best(self, ranks: dict[bytes, int]) -> bytes | None:
        while self._heap:
            neg_count, candidate = heapq.heappop(self._heap)
            if candidate not in ranks and self._count.get(candidate, 0) == -neg_count > 0:
                return candidate
        return None


def _adjacent(parts: list[bytes]) -> list[bytes]:
    return [parts[i] + parts[i + 1] for i in range(len(parts) - 1)]
