"""Kimi K2 Thinking output: generated token ids in, reasoning, content, tool calls and finish reason out.

Lifecycle: per request, either
- non-streaming: ``parse_output(tokenizer, token_ids, finish_reason=engine_reason, ...)`` once the
  engine is done, giving a ``ParsedOutput``; or
- streaming: ``stream = KimiOutputStream(tokenizer, ...)``, then ``stream.push(new_ids)`` for every
  batch of sampled ids and ``stream.finish(engine_reason)`` once at the end; each returns a list of
  ``Delta`` (reasoning piece, content piece, tool-call start, tool-call arguments piece) in output
  order. After ``finish``, ``stream.finish_reason``, ``stream.tool_calls`` and ``stream.result()``
  give the outcome.
``parse_output`` is the stream fed everything at once, and the stream's result does not depend on
how the ids are split into pushes: concatenating the deltas of any split equals the non-streaming
result (the pieces themselves may differ). The tokenizer is shared read-only; the stream holds the
request's state (a ``ReasoningParser`` feeding a ``ToolCallParser``; rules in those modules).

Per-request options (never per model, anchors §4A item 5): ``thinking`` (False: no reasoning, all
text is content), ``start_in_reasoning`` (the prompt opened ``<think>``: ``prompt_opens_reasoning``)
and ``first_tool_index`` (calls already in the conversation: ``count_history_tool_calls``).
``finish_reason`` is ``"tool_calls"`` when at least one complete call was parsed, else the engine's
reason (``"stop"``, ``"length"``, ...).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from k2serve.router.reasoning_parser import ReasoningDelta, ReasoningParser, prompt_opens_reasoning
from k2serve.router.tokenizer import KimiTokenizer, TokenIdError
from k2serve.router.tool_call_parser import (
    ContentDelta,
    ToolCall,
    ToolCallArguments,
    ToolCallParser,
    ToolCallStart,
    count_history_tool_calls,
    parse_tool_call_id,
    tool_call_id,
)

__all__ = [
    "ContentDelta",
    "Delta",
    "KimiOutputStream",
    "ParsedOutput",
    "ReasoningDelta",
    "ToolCall",
    "ToolCallArguments",
    "ToolCallStart",
    "count_history_tool_calls",
    "parse_output",
    "parse_tool_call_id",
    "prompt_opens_reasoning",
    "tool_call_id",
]

TOOL_CALLS_FINISH_REASON = "tool_calls"

Delta = ReasoningDelta | ContentDelta | ToolCallStart | ToolCallArguments


@dataclass(frozen=True, slots=True)
class ParsedOutput:
    """The whole output of one request, split the way the API returns it."""

    reasoning: str
    content: str
    tool_calls: tuple[ToolCall, ...]
    finish_reason: str
    reasoning_tokens: int  # generated ids spent on reasoning (usage's ``reasoning_tokens``)


class KimiOutputStream:
    """Streams one request's generated ids into API deltas."""

    def __init__(
        self,
        tokenizer: KimiTokenizer,
        *,
        thinking: bool = True,
        start_in_reasoning: bool = False,
        first_tool_index: int = 0,
    ) -> None:
        self._vocab_size = tokenizer.vocab_size
        self._reasoning = ReasoningParser(tokenizer, enabled=thinking, start_in_reasoning=start_in_reasoning)
        self._tools = ToolCallParser(tokenizer, first_index=first_tool_index)
        self._reasoning_parts: list[str] = []
        self._content_parts: list[str] = []
        self._finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self._finish_reason is not None

    @property
    def finish_reason(self) -> str | None:
        """None until ``finish``; then ``"tool_calls"`` or the engine's reason."""
        return self._finish_reason

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        """Every call reported so far (arguments so far, ``complete`` as known now)."""
        return self._tools.tool_calls

    @property
    def reasoning_tokens(self) -> int:
        return self._reasoning.reasoning_tokens

    def push(self, ids: int | Iterable[int]) -> list[Delta]:
        """Add newly generated ids; return the deltas they complete (possibly none)."""
        if self.finished:
            raise RuntimeError("KimiOutputStream.push after finish")
        batch = [ids] if isinstance(ids, int) else list(ids)
        for token_id in batch:
            if not 0 <= token_id < self._vocab_size:
                raise TokenIdError(token_id, self._vocab_size)
        reasoning, rest = self._reasoning.push(batch)
        out: list[Delta] = []
        self._add_reasoning(reasoning, out)
        if rest:
            self._add(self._tools.push(rest), out)
        return out

    def finish(self, finish_reason: str = "stop") -> list[Delta]:
        """End the stream with the engine's reason; return the last deltas."""
        if self.finished:
            raise RuntimeError("KimiOutputStream.finish called twice")
        out: list[Delta] = []
        self._add_reasoning(self._reasoning.finish(), out)
        self._add(self._tools.finish(), out)
        self._finish_reason = TOOL_CALLS_FINISH_REASON if self._tools.has_complete_call else finish_reason
        return out

    def result(self) -> ParsedOutput:
        """The whole output so far; after ``finish`` it is final."""
        return ParsedOutput(
            reasoning="".join(self._reasoning_parts),
            content="".join(self._content_parts),
            tool_calls=self._tools.tool_calls,
            finish_reason=self._finish_reason or "",
            reasoning_tokens=self._reasoning.reasoning_tokens,
        )

    def _add_reasoning(self, text: str, out: list[Delta]) -> None:
        if text:
            self._reasoning_parts.append(text)
            out.append(ReasoningDelta(text))

    def _add(self, deltas: Sequence[ContentDelta | ToolCallStart | ToolCallArguments], out: list[Delta]) -> None:
        for delta in deltas:
            if isinstance(delta, ContentDelta):
                self._content_parts.append(delta.text)
            out.append(delta)


def parse_output(
    tokenizer: KimiTokenizer,
    token_ids: Sequence[int],
    *,
    finish_reason: str = "stop",
    thinking: bool = True,
    start_in_reasoning: bool = False,
    first_tool_index: int = 0,
) -> ParsedOutput:
    """Non-streaming: parse one request's generated ids (the prompt's ids never belong here)."""
    stream = KimiOutputStream(
        tokenizer, thinking=thinking, start_in_reasoning=start_in_reasoning, first_tool_index=first_tool_index
    )
    stream.push(token_ids)
    stream.finish(finish_reason)
    return stream.result()
