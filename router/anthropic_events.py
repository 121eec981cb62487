"""``MessageEvents``: one request's ``GenerationEvent``s in, Anthropic's message and stream events out.

Lifecycle: one per ``/v1/messages`` request, after ``Frontend.start`` succeeded.
- streaming: ``start()`` gives ``message_start`` and ``ping``; then ``push(event)`` for every
  generation event gives the ``content_block_*`` events (``ContentBlocks``) and, at the end,
  ``message_delta`` + ``message_stop``; ``sse(data)`` writes one named SSE event (the ``event:``
  name always equals ``data["type"]``; no ``[DONE]``);
- non-streaming: ``push`` every event, ignoring what it returns, then ``message()`` is the body.
A choice that fails after the start (``finish_reason`` ``error`` or ``abort``) sets ``failure``
(an ``ApiError``: 529 ``overloaded_error`` when the workers were overloaded, unavailable or the
request was aborted, else 500 ``api_error``) and ``push`` returns one ``error`` event; nothing
follows it, and a non-streaming request answers the error instead of half a message.

Stop reasons: ``stop`` -> ``end_turn`` (``stop_sequence`` when a stop string matched, with the
string), ``length`` -> ``max_tokens``, ``tool_calls`` -> ``tool_use``; a forced tool call (which
the frontend ends with ``stop``) is ``tool_use`` too. Usage follows Anthropic: ``input_tokens``
excludes the prompt tokens read from the prefix cache (``cache_read_input_tokens``), so their sum
is the prompt length; ``output_tokens`` counts reasoning. ``message_start`` carries the whole
prompt as ``input_tokens`` (the cache split is known at the end); ``message_delta`` carries the
final, cumulative counts.
"""

from __future__ import annotations

import json
from types import MappingProxyType
from typing import Any

from k2serve.router.anthropic_blocks import ContentBlocks, Event
from k2serve.router.api_error import ApiError
from k2serve.router.generation_event import ChatDelta, ChoiceFinished, GenerationEvent, RequestFinished, RequestUsage

STOP_REASONS = MappingProxyType({"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"})


def sse(data: Event) -> str:
    return f"event: {data['type']}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


class MessageEvents:
    def __init__(self, message_id: str, model: str, prompt_tokens: int, *, single_tool_call: bool = False) -> None:
        self.message_id, self.model, self.prompt_tokens = message_id, model, prompt_tokens
        self.blocks = ContentBlocks(single_tool_call=single_tool_call)
        self.failure: ApiError | None = None
        self.done = False  # message_stop or an error was produced: nothing follows
        self._stop: tuple[str, str | None] | None = None
        self._usage: RequestUsage | None = None

    def start(self) -> list[Event]:
        shell = self._shell(content=[], stop=(None, None))
        shell["usage"] = {
            "input_tokens": self.prompt_tokens,
            "output_tokens": 1,  # Anthropic's placeholder; message_delta has the real count
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }
        return [{"type": "message_start", "message": shell}, {"type": "ping"}]

    def push(self, event: GenerationEvent) -> list[Event]:
        if self.done:
            return []
        if isinstance(event, ChatDelta):
            return self.blocks.push(event.pieces)
        if isinstance(event, ChoiceFinished):
            return self._finish_choice(event)
        if isinstance(event, RequestFinished):
            self._usage, self.done = event.usage, True
            stop_reason, stop_sequence = self._stop or ("end_turn", None)
            delta = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
            return [
                {"type": "message_delta", "delta": delta, "usage": self._usage_body()},
                {"type": "message_stop"},
            ]
        return []  # ChoiceStarted (and TextDelta, which a chat request never produces)

    def message(self) -> dict[str, Any]:
        """The non-streaming body, once ``push`` saw ``RequestFinished``."""
        if self._stop is None or self._usage is None:
            raise RuntimeError("MessageEvents.message before the request finished")
        body = self._shell(content=self.blocks.content, stop=self._stop)
        body["usage"] = self._usage_body()
        return body

    # -- internals -------------------------------------------------------------------------------

    def _finish_choice(self, finished: ChoiceFinished) -> list[Event]:
        if finished.finish_reason in ("error", "abort"):
            self.failure, self.done = finished.failure(), True
            error = {"type": self.failure.kind.anthropic_type, "message": self.failure.message}
            return [{"type": "error", "error": error}]
        out = self.blocks.close()
        self._stop = self._stop_reason(finished)
        return out

    def _stop_reason(self, finished: ChoiceFinished) -> tuple[str, str | None]:
        if finished.finish_reason == "stop" and isinstance(finished.stop_reason, str):
            return "stop_sequence", finished.stop_reason
        if finished.finish_reason == "stop" and self.blocks.has_tool_use:
            return "tool_use", None
        return STOP_REASONS.get(finished.finish_reason, "end_turn"), None

    def _shell(self, *, content: list[Event], stop: tuple[str | None, str | None]) -> dict[str, Any]:
        return {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop[0],
            "stop_sequence": stop[1],
        }

    def _usage_body(self) -> dict[str, int]:
        usage = self._usage
        assert usage is not None
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        return {
            "input_tokens": usage.prompt_tokens - cached,
            "output_tokens": usage.completion_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached,
        }
