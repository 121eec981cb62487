"""Kimi K2 Thinking reasoning split: generated token ids in, reasoning text plus the ids after it out.

Lifecycle: one ``ReasoningParser`` per request (never shared, never reused). Feed it the
*generated* ids as they are sampled with ``push`` (any split: one id, a few, or all at once), then
call ``finish`` once. ``push`` returns the reasoning text those ids complete and the ids that come
after the reasoning (content and tool-call markers), which go on to the tool-call parser. The
reasoning is always a prefix of the output, so within one ``push`` the returned text comes before
the returned ids, and once reasoning has ended it never resumes.

Rules (reference §5–6, anchors §4A items 4–5), on token ids (the markers are special tokens, looked
up by name in the tokenizer, never by number):
- With thinking disabled for the request (``enabled=False``) there is no reasoning: every id goes
  on, except ``<think>``/``</think>``, which are dropped.
- Otherwise the output starts in reasoning when ``start_in_reasoning`` (the prompt ended with an open
  ``<think>``: see ``prompt_opens_reasoning``; K2.5-style templates prefill it, so this is a
  per-request flag, never a per-model one) or when the first generated id is ``<think>`` (K2
  Thinking emits it itself); that leading ``<think>`` is consumed either way. Otherwise there is
  no reasoning.
- Reasoning ends at ``</think>`` (consumed) or at ``<|tool_calls_section_begin|>`` /
  ``<|tool_call_begin|>`` (the model sometimes skips ``</think>`` before a tool call; the marker is
  passed on so the tool-call parser sees it).
- Inside reasoning any other special id (a second ``<think>``, stray tool markers, ``<|im_end|>``)
  is dropped, never shown as text; after reasoning, stray ``<think>``/``</think>`` are dropped.
- Text is decoded with an incremental detokenizer, so a UTF-8 character split across tokens never
  shows up as U+FFFD mid-stream; at the end of the reasoning the held-back bytes are flushed (an
  incomplete character becomes U+FFFD, as a one-shot ``decode`` of the reasoning ids would).
Only generated ids belong here: the prompt's history holds earlier ``</think>`` tokens.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from k2serve.router.kimi_vocab import (
    IM_ASSISTANT,
    IM_END,
    THINK_BEGIN,
    THINK_END,
    TOOL_CALL_BEGIN,
    TOOL_CALLS_SECTION_BEGIN,
)
from k2serve.router.tokenizer import KimiTokenizer


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """A piece of reasoning text (``reasoning_content`` in the API)."""

    text: str


class _State(enum.Enum):
    START = "start"  # nothing generated yet
    REASONING = "reasoning"
    AFTER = "after"  # reasoning over (or never started): ids pass on


class ReasoningParser:
    """Splits one request's generated ids into reasoning text and the ids that follow it."""

    def __init__(self, tokenizer: KimiTokenizer, *, enabled: bool = True, start_in_reasoning: bool = False) -> None:
        special = tokenizer.special_tokens
        self._think_begin = special[THINK_BEGIN]
        self._think_end = special[THINK_END]
        self._enders = frozenset((special[TOOL_CALLS_SECTION_BEGIN], special[TOOL_CALL_BEGIN]))
        self._num_base = tokenizer.num_base_tokens
        self._detok = tokenizer.incremental_detokenizer()
        self._start_in_reasoning = start_in_reasoning
        self._state = _State.START if enabled else _State.AFTER
        self._reasoning_tokens = 0
        self._finished = False

    @property
    def in_reasoning(self) -> bool:
        """True while generated ids are reasoning (False before the first id unless it is implied)."""
        return self._state is _State.REASONING or (self._state is _State.START and self._start_in_reasoning)

    @property
    def reasoning_tokens(self) -> int:
        """Generated ids spent on reasoning, its ``<think>`` and ``</think>`` markers included."""
        return self._reasoning_tokens

    def push(self, ids: int | Iterable[int]) -> tuple[str, list[int]]:
        """Add generated ids; return (reasoning text they complete, ids after the reasoning)."""
        if self._finished:
            raise RuntimeError("ReasoningParser.push after finish")
        batch = [ids] if isinstance(ids, int) else list(ids)
        text: list[str] = []
        passed: list[int] = []
        run: list[int] = []  # consecutive reasoning text ids, decoded together
        for token_id in batch:
            if self._state is _State.START:
                if token_id == self._think_begin:
                    self._state = _State.REASONING
                    self._reasoning_tokens += 1
                    continue
                self._state = _State.REASONING if self._start_in_reasoning else _State.AFTER
            if self._state is _State.AFTER:
                if token_id != self._think_begin and token_id != self._think_end:
                    passed.append(token_id)
                continue
            # reasoning
            if token_id < self._num_base:
                run.append(token_id)
                self._reasoning_tokens += 1
                continue
            if run:
                text.append(self._detok.push(run))
                run = []
            if token_id == self._think_end:
                self._reasoning_tokens += 1
                text.append(self._detok.flush())
                self._state = _State.AFTER
            elif token_id in self._enders:
                text.append(self._detok.flush())
                self._state = _State.AFTER
                passed.append(token_id)
            else:
                self._reasoning_tokens += 1  # a stray special id inside reasoning: dropped
        if run:
            text.append(self._detok.push(run))
        return "".join(text), passed

    def finish(self) -> str:
        """End the stream: the reasoning text still held back (an incomplete character as U+FFFD)."""
        if self._finished:
            raise RuntimeError("ReasoningParser.finish called twice")
        self._finished = True
        return self._detok.flush() if self._state is _State.REASONING else ""


def prompt_opens_reasoning(tokenizer: KimiTokenizer, prompt_ids: Sequence[int]) -> bool:
    """True if the prompt's last assistant turn has an open ``<think>`` (e.g. a K2.5-style prefill).

    Scans back from the end: ``<think>`` opens; ``</think>``, ``<|im_end|>`` or the turn's
    ``<|im_assistant|>`` first means it is not open. K2 Thinking's own template does not prefill
    ``<think>`` (the model emits it), so its prompts give False.
    """
    special = tokenizer.special_tokens
    think_begin = special[THINK_BEGIN]
    closers = frozenset((special[THINK_END], special[IM_END], special[IM_ASSISTANT]))
    for token_id in reversed(prompt_ids):
        if token_id == think_begin:
            return True
        if token_id in closers:
            return False
    return False
