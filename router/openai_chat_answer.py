"""``chat_answer``: a chat ``GenerationStream`` read to the end -> the ``chat.completion`` body (§1.3).

Lifecycle: one per non-streaming chat request, awaited under ``until_done_or_gone`` (a client
that leaves cancels it, and the ``finally`` closes the stream, which aborts the workers' request).
Each choice gathers its reasoning, content and tool calls (``ChoiceText``); a choice that ends
with ``finish_reason`` "error" makes the whole answer an ``ApiError``: never a 200 with half an
answer.
"""

from __future__ import annotations

import time
from typing import Any

from k2serve.router.frontend import GenerationStream
from k2serve.router.generation_event import ChatDelta, ChoiceFinished, RequestFinished, TokenLogprob
from k2serve.router.kimi_output import ContentDelta, ReasoningDelta, ToolCallArguments, ToolCallStart
from k2serve.router.openai_chat_request import ChatShape
from k2serve.router.openai_logprobs import chat_logprob_entries
from k2serve.router.openai_usage import usage_body


class ToolCallFilter:
    """``parallel_tool_calls: false``: only the first call of a choice goes out."""

    def __init__(self, parallel: bool) -> None:
        self._parallel = parallel
        self._first: int | None = None

    def keeps(self, piece: ToolCallStart | ToolCallArguments) -> bool:
        if self._parallel:
            return True
        if self._first is None and isinstance(piece, ToolCallStart):
            self._first = piece.index
        return piece.index == self._first


class ChoiceText:
    """One choice's output so far, in the non-streaming shape."""

    def __init__(self, index: int, shape: ChatShape) -> None:
        self.index = index
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._calls: dict[int, tuple[str, str, list[str]]] = {}  # call index -> (id, name, argument pieces)
        self._filter = ToolCallFilter(shape.parallel_tool_calls)
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.finished: ChoiceFinished | None = None

    def add(self, delta: ChatDelta) -> None:
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        for piece in delta.pieces:
            if isinstance(piece, ReasoningDelta):
                self._reasoning.append(piece.text)
            elif isinstance(piece, ContentDelta):
                self._content.append(piece.text)
            elif not self._filter.keeps(piece):
                continue
            elif isinstance(piece, ToolCallStart):
                self._calls[piece.index] = (piece.id, piece.name, [])
            elif piece.index in self._calls:
                self._calls[piece.index][2].append(piece.text)

    def message(self) -> dict[str, Any]:
        content = "".join(self._content)
        reasoning = "".join(self._reasoning) or None
        message: dict[str, Any] = {
            "role": "assistant",
            "content": None if self._calls and not content else content,
            "reasoning_content": reasoning,
            "reasoning": reasoning,
        }
        if self._calls:
            message["tool_calls"] = [
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": "".join(args)}}
                for call_id, name, args in (self._calls[i] for i in sorted(self._calls))
            ]
        return message


async def chat_answer(stream: GenerationStream, shape: ChatShape, model: str) -> dict[str, Any]:
    request = stream.request
    created = int(time.time())
    choices = {i: ChoiceText(i, shape) for i in range(request.n)}
    usage: dict[str, Any] = {}
    try:
        async for event in stream:
            if isinstance(event, ChatDelta):
                choices[event.index].add(event)
            elif isinstance(event, ChoiceFinished):
                if event.finish_reason == "error":
                    raise event.failure()
                choices[event.index].finished = event
            elif isinstance(event, RequestFinished):
                usage = usage_body(event.usage)
    finally:
        await stream.aclose()
    body: dict[str, Any] = {
        "id": request.request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [_choice(choice, shape) for choice in choices.values()],
        "usage": usage,
    }
    if shape.return_token_ids:
        body["prompt_token_ids"] = list(request.prompt_token_ids)
    return body


def _choice(choice: ChoiceText, shape: ChatShape) -> dict[str, Any]:
    finished = choice.finished
    out: dict[str, Any] = {
        "index": choice.index,
        "message": choice.message(),
        "logprobs": {"content": chat_logprob_entries(choice.logprobs)} if shape.logprobs else None,
        "finish_reason": finished.finish_reason if finished else None,
        "stop_reason": finished.stop_reason if finished else None,
    }
    if shape.return_token_ids:
        out["token_ids"] = choice.token_ids
    return out
