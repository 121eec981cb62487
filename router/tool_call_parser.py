"""Kimi K2 tool-call parsing: the ids after the reasoning in, content text and tool-call deltas out.

Lifecycle: one ``ToolCallParser`` per request (never shared, never reused). Feed it the generated
ids that follow the reasoning (``ReasoningParser.push`` returns them) with ``push``, in any split,
then call ``finish`` once. Each call returns ``ContentDelta``, ``ToolCallStart`` and
``ToolCallArguments`` in output order; ``tool_calls`` is the state of every reported call so far.
The id helpers (``tool_call_id``, ``parse_tool_call_id``, ``count_history_tool_calls``) are pure.

Format (reference §5–6), on token ids; the markers are special tokens looked up by name:
``<|tool_calls_section_begin|>`` then per call ``<|tool_call_begin|>functions.NAME:IDX
<|tool_call_argument_begin|>{JSON}<|tool_call_end|>``, then ``<|tool_calls_section_end|>``.
Rules:
- Several calls per section, and several sections, are parsed. ``<|tool_call_begin|>`` outside a
  section opens one implicitly: the model is unambiguously calling, and dropping the call (or
  showing the marker as text, anchors §4A item 3) is the failure to avoid.
- The name is the model id's part between ``functions.`` and the last ``:`` (the prefix and the
  index are optional; whitespace around the id is ignored). The model's own IDX is not used: the
  returned id is ``functions.NAME:(first_index + n)``, n counting the calls this output reports,
  where ``first_index`` is the number of calls already in the conversation
  (``count_history_tool_calls``), as SGLang does; ids must stay ``functions.NAME:IDX`` because the
  model imitates whatever ids it sees in its history. A call whose id names no function (empty,
  or a bare number) is dropped.
- Arguments are the raw text between ``<|tool_call_argument_begin|>`` and ``<|tool_call_end|>``,
  streamed in pieces, never re-serialized (invalid JSON passes through); only the whitespace
  around them is removed (trailing whitespace is held back until more text follows it).
- A call ends at ``<|tool_call_end|>``, or, tolerantly, at the next ``<|tool_call_begin|>`` or at
  ``<|tool_calls_section_end|>``: it is then ``complete``. A call cut off (``max_tokens``, abort)
  after its name is known is reported with the arguments so far and ``complete=False`` instead of
  being dropped (anchors §4A item 6); the name is known once ``<|tool_call_argument_begin|>`` or,
  at the cut, a ``:`` after the name has arrived. A call cut inside its name is dropped.
- Text inside a section but outside a call is dropped; text after the section end is content.
- Stray markers (argument begin / call end / section end outside a call or section) and every
  other special id (``<|im_end|>``, think markers, ...) are dropped, never shown as text.
- Text is decoded per segment with an incremental detokenizer (no U+FFFD mid-stream; an
  incomplete character at a segment's end becomes U+FFFD, as a one-shot ``decode`` would).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from k2serve.router.kimi_vocab import (
    TOOL_CALL_ARGUMENT_BEGIN,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_SECTION_BEGIN,
    TOOL_CALLS_SECTION_END,
)
from k2serve.router.tokenizer import KimiTokenizer

TOOL_CALL_ID_PREFIX = "functions."
_TOOL_CALL_ID = re.compile(r"functions\.(?P<name>[^\s:]+):(?P<index>[0-9]+)")


# -- ids -------------------------------------------------------------------------------------------


def tool_call_id(name: str, index: int) -> str:
    """The id K2 is trained on: ``functions.NAME:INDEX``, INDEX counting calls in the conversation."""
    if not name:
        raise ValueError("a tool-call id needs a non-empty function name")
    if index < 0:
        raise ValueError(f"a tool-call index is >= 0, got {index}")
    return f"{TOOL_CALL_ID_PREFIX}{name}:{index}"


def parse_tool_call_id(call_id: str) -> tuple[str, int] | None:
    """(name, index) of a ``functions.NAME:INDEX`` id, or None for any other id (client ids, UUIDs)."""
    match = _TOOL_CALL_ID.fullmatch(call_id)
    if match is None:
        return None
    return match["name"], int(match["index"])


def count_history_tool_calls(messages: Sequence[Mapping[str, Any]]) -> int:
    """Tool calls already made in the conversation: the ``first_index`` for the next output."""
    count = 0
    for message in messages:
        calls = message.get("tool_calls") if message.get("role") == "assistant" else None
        if isinstance(calls, list | tuple):
            count += len(calls)
    return count


def name_from_model_id(raw: str, *, terminated: bool = True) -> str | None:
    """The function name in an id the model emitted, or None if it names none.

    ``terminated`` says the id is whole (its ``<|tool_call_argument_begin|>`` arrived); a cut-off id
    names a function only once a ``:`` follows the name, since ``functions.get_wea`` may be cut.
    """
    text = raw.strip()
    if text.startswith(TOOL_CALL_ID_PREFIX):
        text = text[len(TOOL_CALL_ID_PREFIX) :]
    head, colon, _ = text.rpartition(":")
    if colon:
        name = head.strip()
    elif terminated:
        name = text
    else:
        return None
    if not name or name.isdigit():
        return None
    return name


# -- deltas and results ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContentDelta:
    """A piece of the answer text (``content``)."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    """A new tool call: ``index`` is its position in this output (OpenAI's ``tool_calls[].index``)."""

    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class ToolCallArguments:
    """A piece of the arguments (raw JSON text) of the call ``index``."""

    index: int
    text: str


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One parsed call. ``complete`` is False for a call cut off before its end."""

    index: int
    id: str
    name: str
    arguments: str
    complete: bool


ToolCallDelta = ContentDelta | ToolCallStart | ToolCallArguments


@dataclass
class _Call:
    index: int
    id: str
    name: str
    arguments: list[str] = field(default_factory=list)
    complete: bool = False
    seen_text: bool = False  # leading whitespace is stripped until the first other character
    pending_space: str = ""  # trailing whitespace, emitted only if more text follows

    def add(self, text: str) -> str:
        """Record an arguments piece; return the part that can be emitted now."""
        if not self.seen_text:
            text = text.lstrip()
            if not text:
                return ""
            self.seen_text = True
        text = self.pending_space + text
        body = text.rstrip()
        self.pending_space = text[len(body) :]
        if body:
            self.arguments.append(body)
        return body

    def frozen(self) -> ToolCall:
        return ToolCall(self.index, self.id, self.name, "".join(self.arguments), self.complete)


class _State(enum.Enum):
    CONTENT = "content"
    SECTION = "section"  # inside a section, between calls
    CALL_ID = "call_id"  # after <|tool_call_begin|>: the model's id
    CALL_ARGS = "call_args"  # after <|tool_call_argument_begin|>


class ToolCallParser:
    """Parses one request's post-reasoning ids into content and tool calls."""

    def __init__(self, tokenizer: KimiTokenizer, *, first_index: int = 0) -> None:
        if first_index < 0:
            raise ValueError(f"first_index is >= 0, got {first_index}")
        special = tokenizer.special_tokens
        self._section_begin = special[TOOL_CALLS_SECTION_BEGIN]
        self._section_end = special[TOOL_CALLS_SECTION_END]
        self._call_begin = special[TOOL_CALL_BEGIN]
        self._argument_begin = special[TOOL_CALL_ARGUMENT_BEGIN]
        self._call_end = special[TOOL_CALL_END]
        self._num_base = tokenizer.num_base_tokens
        self._first_index = first_index
        self._content = tokenizer.incremental_detokenizer()
        self._id_text = tokenizer.incremental_detokenizer()
        self._args_text = tokenizer.incremental_detokenizer()
        self._state = _State.CONTENT
        self._raw_id: list[str] = []
        self._calls: list[_Call] = []
        self._current: _Call | None = None  # the reported call receiving arguments, if any
        self._finished = False

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        """Every call reported so far (arguments so far, ``complete`` as known now)."""
        return tuple(call.frozen() for call in self._calls)

    @property
    def has_complete_call(self) -> bool:
        return any(call.complete for call in self._calls)

    def push(self, ids: int | Iterable[int]) -> list[ToolCallDelta]:
        """Add ids (those after the reasoning); return the deltas they complete, in order."""
        if self._finished:
            raise RuntimeError("ToolCallParser.push after finish")
        batch = [ids] if isinstance(ids, int) else list(ids)
        out: list[ToolCallDelta] = []
        run: list[int] = []  # consecutive text ids, decoded together (the state changes only at markers)
        for token_id in batch:
            if token_id < self._num_base:
                run.append(token_id)
                continue
            if run:
                self._text(run, out)
                run = []
            self._marker(token_id, out)
        if run:
            self._text(run, out)
        return out

    def finish(self) -> list[ToolCallDelta]:
        """End the stream: flush held-back text and report a call cut off after its name."""
        if self._finished:
            raise RuntimeError("ToolCallParser.finish called twice")
        self._finished = True
        out: list[ToolCallDelta] = []
        if self._state is _State.CONTENT:
            _emit(out, ContentDelta(self._content.flush()))
        elif self._state is _State.CALL_ID:
            self._raw_id.append(self._id_text.flush())
            self._start_call(name_from_model_id("".join(self._raw_id), terminated=False), out)
        elif self._state is _State.CALL_ARGS:
            self._arguments(self._args_text.flush(), out)
        self._current = None  # a call still open here stays complete=False
        return out

    # -- state machine ---------------------------------------------------------------------------

    def _text(self, run: list[int], out: list[ToolCallDelta]) -> None:
        if self._state is _State.CONTENT:
            _emit(out, ContentDelta(self._content.push(run)))
        elif self._state is _State.CALL_ID:
            self._raw_id.append(self._id_text.push(run))
        elif self._state is _State.CALL_ARGS:
            self._arguments(self._args_text.push(run), out)
        # SECTION: text between calls is dropped

    def _marker(self, token_id: int, out: list[ToolCallDelta]) -> None:
        state = self._state
        if token_id == self._section_begin:
            if state is _State.CONTENT:
                _emit(out, ContentDelta(self._content.flush()))
                self._state = _State.SECTION
        elif token_id == self._call_begin:
            if state is _State.CONTENT:
                _emit(out, ContentDelta(self._content.flush()))
            elif state in (_State.CALL_ID, _State.CALL_ARGS):
                self._close_call(out)
            self._raw_id = []
            self._state = _State.CALL_ID
        elif token_id == self._argument_begin:
            if state is _State.CALL_ID:
                self._raw_id.append(self._id_text.flush())
                self._start_call(name_from_model_id("".join(self._raw_id)), out)
                self._state = _State.CALL_ARGS
        elif token_id == self._call_end:
            if state in (_State.CALL_ID, _State.CALL_ARGS):
                self._close_call(out)
                self._state = _State.SECTION
        elif token_id == self._section_end:
            if state in (_State.CALL_ID, _State.CALL_ARGS):
                self._close_call(out)
            if state is not _State.CONTENT:
                self._state = _State.CONTENT
        # any other special id is dropped

    def _start_call(self, name: str | None, out: list[ToolCallDelta]) -> None:
        self._current = None
        if name is None:
            return  # names no function: the call (and its arguments) is dropped
        index = len(self._calls)
        call = _Call(index, tool_call_id(name, self._first_index + index), name)
        self._calls.append(call)
        self._current = call
        out.append(ToolCallStart(index, call.id, name))

    def _arguments(self, text: str, out: list[ToolCallDelta]) -> None:
        if self._current is not None and text:
            piece = self._current.add(text)
            if piece:
                out.append(ToolCallArguments(self._current.index, piece))

    def _close_call(self, out: list[ToolCallDelta]) -> None:
        """End the open call at a marker: it is complete (a call without arguments gets none)."""
        if self._state is _State.CALL_ID:
            self._raw_id.append(self._id_text.flush())
            self._start_call(name_from_model_id("".join(self._raw_id)), out)
        else:
            self._arguments(self._args_text.flush(), out)
        if self._current is not None:
            self._current.complete = True
            self._current = None


def _emit(out: list[ToolCallDelta], delta: ContentDelta) -> None:
    if delta.text:
        out.append(delta)
