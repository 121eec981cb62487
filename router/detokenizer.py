"""Incremental detokenization: token ids in, complete text out, one stream per request.

Lifecycle: created per request (``KimiTokenizer.incremental_detokenizer()``), fed the ids as they
are sampled with ``push`` (one or a few at a time), and ``flush``-ed once at the end. A token may
end in the middle of a multi-byte UTF-8 character; those bytes are held back until the character
completes, so ``push`` never emits a broken character. Invariant: the concatenation of everything
returned equals ``tokenizer.decode(all_ids)`` (same ``errors="replace"`` rule, same skipping).
After ``flush`` the object starts a fresh stream.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence
from typing import Protocol


class BytesDecoder(Protocol):
    """Maps token ids to their bytes (``KimiTokenizer`` is one)."""

    def decode_bytes(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> bytes:
        """Concatenated bytes of ``ids``; with ``skip_special_tokens`` the special ones are dropped."""
        ...


class IncrementalDetokenizer:
    """Turns a stream of token ids into text without ever splitting a UTF-8 character."""

    def __init__(self, decoder: BytesDecoder, *, skip_special_tokens: bool = False) -> None:
        self._decoder = decoder
        self._skip_special_tokens = skip_special_tokens
        # CPython's stateful UTF-8 decoder keeps an incomplete trailing sequence for the next call
        # and replaces invalid bytes exactly as a one-shot decode would.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._num_tokens = 0

    @property
    def num_tokens(self) -> int:
        """Ids pushed since the stream started (skipped special ids included)."""
        return self._num_tokens

    def push(self, ids: int | Iterable[int]) -> str:
        """Add one id or a few; return the text they complete ("" while a character is pending)."""
        batch = [ids] if isinstance(ids, int) else list(ids)
        self._num_tokens += len(batch)
        data = self._decoder.decode_bytes(batch, skip_special_tokens=self._skip_special_tokens)
        return self._utf8.decode(data, final=False)

    def flush(self) -> str:
        """End the stream: return the held-back bytes (replaced if incomplete) and reset."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        self._num_tokens = 0
        return text

    @property
    def has_pending_bytes(self) -> bool:
        """True while an incomplete UTF-8 character is held back."""
        pending, _ = self._utf8.getstate()
        return bool(pending)
