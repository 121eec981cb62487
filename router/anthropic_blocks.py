"""``ContentBlocks``: one choice's parsed chat pieces in, Anthropic content blocks out.

Lifecycle: one per ``/v1/messages`` request. ``push(pieces)`` for every ``ChatDelta`` and
``close()`` once at the end each return the ``content_block_*`` stream events (as JSON-ready
dicts) those pieces complete; afterwards ``content`` is the response's ``content`` list. The
streamed events and the final list come from the same state, so a client that accumulates the
stream gets exactly the non-streaming message.

Rules (Anthropic's streaming contract):
- a new block opens whenever the kind of piece changes (reasoning -> ``thinking``, answer text ->
  ``text``, each tool call -> its own ``tool_use``), and the previous one closes; ``index`` is the
  block's position in ``content``; every block is start -> >= 1 delta -> stop;
- a thinking block ends with one ``signature_delta`` just before its stop. The signature is a
  deterministic digest of the thinking text (clients echo it back; we accept and ignore it);
- a tool call's arguments are sent as one ``input_json_delta`` when its block closes, holding the
  JSON of ``input``: the model's arguments when they parse as a JSON object, else ``{}`` (a
  malformed or cut-off call). Streaming the raw text piece by piece would break clients that
  parse the partial JSON as it arrives (the Anthropic SDKs do) whenever the model's text is not
  valid JSON, and the streamed ``input`` would differ from the non-streaming one;
- ``single_tool_call`` (``disable_parallel_tool_use``): calls after the first are dropped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from k2serve.router.generation_event import ChatPiece
from k2serve.router.kimi_output import ContentDelta, ReasoningDelta, ToolCallArguments, ToolCallStart

Event = dict[str, Any]
SIGNATURE_HEX_CHARS = 32


def thinking_signature(thinking: str) -> str:
    return hashlib.sha256(thinking.encode("utf-8")).hexdigest()[:SIGNATURE_HEX_CHARS]


def tool_input(arguments: str) -> dict[str, Any]:
    """The ``input`` of a ``tool_use`` block: the arguments as a JSON object, or ``{}``."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


@dataclass
class _Open:
    kind: str  # thinking | text | tool_use
    index: int
    parts: list[str] = field(default_factory=list)
    call: ToolCallStart | None = None


class ContentBlocks:
    def __init__(self, *, single_tool_call: bool = False) -> None:
        self._single_tool_call = single_tool_call
        self._content: list[Event] = []  # closed blocks, final shape
        self._open: _Open | None = None
        self._num_calls = 0
        self._dropping_call = False  # inside a call dropped by ``single_tool_call``

    @property
    def content(self) -> list[Event]:
        return list(self._content)

    @property
    def has_tool_use(self) -> bool:
        return self._num_calls > 0

    def push(self, pieces: Iterable[ChatPiece]) -> list[Event]:
        out: list[Event] = []
        for piece in pieces:
            if isinstance(piece, ReasoningDelta):
                self._text_piece("thinking", piece.text, out)
            elif isinstance(piece, ContentDelta):
                self._text_piece("text", piece.text, out)
            elif isinstance(piece, ToolCallStart):
                self._call_start(piece, out)
            elif isinstance(piece, ToolCallArguments) and self._in_call(piece.index):
                assert self._open is not None
                self._open.parts.append(piece.text)
        return out

    def close(self) -> list[Event]:
        out: list[Event] = []
        self._close(out)
        return out

    # -- internals -------------------------------------------------------------------------------

    def _in_call(self, index: int) -> bool:
        call = self._open.call if self._open is not None else None
        return not self._dropping_call and call is not None and call.index == index

    def _text_piece(self, kind: str, text: str, out: list[Event]) -> None:
        if not text:
            return
        self._dropping_call = False
        if self._open is None or self._open.kind != kind:
            self._start(_Open(kind, len(self._content)), {"type": kind, kind: ""}, out)
        assert self._open is not None
        self._open.parts.append(text)
        delta = {"type": f"{kind}_delta", kind: text}
        out.append({"type": "content_block_delta", "index": self._open.index, "delta": delta})

    def _call_start(self, call: ToolCallStart, out: list[Event]) -> None:
        if self._single_tool_call and self._num_calls:
            self._close(out)
            self._dropping_call = True
            return
        self._dropping_call = False
        self._num_calls += 1
        block = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
        self._start(_Open("tool_use", len(self._content), call=call), block, out)

    def _start(self, block: _Open, shape: Event, out: list[Event]) -> None:
        self._close(out)
        self._open = block
        self._content.append(shape)  # placeholder until the block closes (keeps ``index`` right)
        out.append({"type": "content_block_start", "index": block.index, "content_block": shape})

    def _close(self, out: list[Event]) -> None:
        block, self._open = self._open, None
        if block is None:
            return
        text = "".join(block.parts)
        final: Event
        if block.kind == "thinking":
            signature = thinking_signature(text)
            delta: Event = {"type": "signature_delta", "signature": signature}
            final = {"type": "thinking", "thinking": text, "signature": signature}
        elif block.kind == "text":
            delta, final = {}, {"type": "text", "text": text}
        else:
            assert block.call is not None
            arguments = tool_input(text)
            delta = {"type": "input_json_delta", "partial_json": json.dumps(arguments, ensure_ascii=False)}
            final = {"type": "tool_use", "id": block.call.id, "name": block.call.name, "input": arguments}
        if delta:
            out.append({"type": "content_block_delta", "index": block.index, "delta": delta})
        out.append({"type": "content_block_stop", "index": block.index})
        self._content[block.index] = final
