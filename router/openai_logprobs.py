"""OpenAI logprob shapes: the chat ``{"content": [...]}`` entries and the legacy completions object.

Lifecycle: pure functions over the ``TokenLogprob``s of ``TextDelta`` / ``ChatDelta`` events
(non-finite values written as ``MIN_LOGPROB``);
the chat shape is built per delta (streaming) or over the whole choice (non-streaming), the legacy
shape with a running ``text_offset`` (``LegacyLogprobs`` keeps it, one per choice).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from k2serve.router.generation_event import TokenLogprob

MIN_LOGPROB = -9999.0  # what -inf (and NaN) is written as: JSON has no infinities (vLLM does the same)


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


def chat_logprob_entries(logprobs: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """``logprobs.content`` items: ``{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}``."""
    return [
        {
            "token": lp.token,
            "logprob": finite(lp.logprob),
            "bytes": list(lp.token_bytes),
            "top_logprobs": [
                {"token": t.token, "logprob": finite(t.logprob), "bytes": list(t.token_bytes)} for t in lp.top
            ],
        }
        for lp in logprobs
    ]


class LegacyLogprobs:
    """One completions choice's ``{tokens, token_logprobs, top_logprobs, text_offset}``, offset carried on."""

    def __init__(self, start_offset: int = 0) -> None:
        self._offset = start_offset  # characters of choice text before the next token

    def shape(self, logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
        offsets = []
        for lp in logprobs:
            offsets.append(self._offset)
            self._offset += len(lp.token)
        return {
            "tokens": [lp.token for lp in logprobs],
            "token_logprobs": [finite(lp.logprob) for lp in logprobs],
            "top_logprobs": [{t.token: finite(t.logprob) for t in lp.top} for lp in logprobs],
            "text_offset": offsets,
        }


def merge_legacy(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The non-streaming legacy object: the per-delta objects of one choice, concatenated."""
    merged: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for part in parts:
        for key, items in merged.items():
            items.extend(part[key])
    return merged
