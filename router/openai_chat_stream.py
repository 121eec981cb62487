"""``chat_chunks``: a chat ``GenerationStream`` -> ``chat.completion.chunk`` objects (§1.4).

Lifecycle: one per streaming chat request, iterated by ``sse_response`` after ``frontend.start``
succeeded. Per choice: the role chunk (``{"role": "assistant", "content": ""}``) when its first
token arrives (``ChoiceStarted``); then, per ``ChatDelta``, one chunk per run of like pieces
(reasoning under both ``reasoning_content`` and ``reasoning``, content, the first delta of a tool
call with ``index``/``id``/``type``/``name`` and empty arguments, then argument pieces with
``index`` only), the delta's token ids and logprobs on its last chunk (a delta without pieces
only makes a chunk when those were asked for); one finish chunk (``delta: {}``,
``finish_reason``, ``stop_reason``). After every choice, the usage chunk (``choices: []``) when
``include_usage``. A choice that fails raises ``ApiError`` (``sse_response`` writes the error
event and ``[DONE]``). Every chunk carries the same ``id`` and ``created``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Any

from k2serve.router.frontend import GenerationStream
from k2serve.router.generation_event import (
    ChatDelta,
    ChoiceFinished,
    ChoiceStarted,
    GenerationEvent,
    RequestFinished,
)
from k2serve.router.generation_request import GenerationRequest
from k2serve.router.kimi_output import ContentDelta, ReasoningDelta, ToolCallArguments, ToolCallStart
from k2serve.router.openai_chat_answer import ToolCallFilter
from k2serve.router.openai_chat_request import ChatShape
from k2serve.router.openai_logprobs import chat_logprob_entries
from k2serve.router.openai_usage import RunningUsage, usage_body


async def chat_chunks(stream: GenerationStream, shape: ChatShape, model: str) -> AsyncGenerator[dict[str, Any], None]:
    chunks = ChatChunks(stream.request, shape, model)
    async for event in stream:
        for chunk in chunks.on(event):
            yield chunk


class ChatChunks:
    def __init__(self, request: GenerationRequest, shape: ChatShape, model: str) -> None:
        self._shape = shape
        self._head = {
            "id": request.request_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }
        self._prompt_ids = list(request.prompt_token_ids) if shape.return_token_ids else None
        self._filters = [ToolCallFilter(shape.parallel_tool_calls) for _ in range(request.n)]
        self._usage = RunningUsage(len(request.prompt_token_ids))

    def on(self, event: GenerationEvent) -> list[dict[str, Any]]:
        if isinstance(event, ChoiceStarted):
            chunk = self._chunk(event.index, {"role": "assistant", "content": ""})
            if self._prompt_ids is not None:  # on the first chunk only
                chunk["prompt_token_ids"], self._prompt_ids = self._prompt_ids, None
            return [chunk]
        if isinstance(event, ChatDelta):
            return self._deltas(event)
        if isinstance(event, ChoiceFinished):
            if event.finish_reason == "error":
                raise event.failure()
            choice = {"finish_reason": event.finish_reason, "stop_reason": event.stop_reason}
            return [self._chunk(event.index, {}, **choice)]
        if isinstance(event, RequestFinished) and self._shape.include_usage:
            return [{**self._head, "choices": [], "usage": usage_body(event.usage)}]
        return []

    def _deltas(self, event: ChatDelta) -> list[dict[str, Any]]:
        self._usage.add(len(event.token_ids))
        deltas = self._piece_deltas(event)
        extra: dict[str, Any] = {}
        if self._shape.return_token_ids:
            extra["token_ids"] = list(event.token_ids)
        if self._shape.logprobs and event.logprobs:
            extra["logprobs"] = {"content": chat_logprob_entries(event.logprobs)}
        if not deltas:
            return [self._chunk(event.index, {}, **extra)] if event.token_ids and extra else []
        out = [self._chunk(event.index, delta) for delta in deltas[:-1]]
        out.append(self._chunk(event.index, deltas[-1], **extra))
        return out

    def _piece_deltas(self, event: ChatDelta) -> list[dict[str, Any]]:
        """One delta per run of like pieces (reasoning, content, or one call's arguments)."""
        deltas: list[dict[str, Any]] = []
        runs: list[tuple[str, int]] = []  # (kind, call index) of each delta, to extend the last one
        keeps = self._filters[event.index].keeps
        for piece in event.pieces:
            if isinstance(piece, ReasoningDelta | ContentDelta):
                kind = "reasoning" if isinstance(piece, ReasoningDelta) else "content"
                keys = ("reasoning_content", "reasoning") if kind == "reasoning" else ("content",)
                if runs and runs[-1] == (kind, -1):
                    for key in keys:
                        deltas[-1][key] += piece.text
                else:
                    runs.append((kind, -1))
                    deltas.append(dict.fromkeys(keys, piece.text))
            elif not keeps(piece):
                continue
            elif isinstance(piece, ToolCallStart):
                runs.append(("start", piece.index))
                function = {"name": piece.name, "arguments": ""}
                deltas.append(
                    {"tool_calls": [{"index": piece.index, "id": piece.id, "type": "function", "function": function}]}
                )
            elif isinstance(piece, ToolCallArguments):
                if runs and runs[-1] == ("arguments", piece.index):
                    deltas[-1]["tool_calls"][0]["function"]["arguments"] += piece.text
                else:
                    runs.append(("arguments", piece.index))
                    deltas.append({"tool_calls": [{"index": piece.index, "function": {"arguments": piece.text}}]})
        return deltas

    def _chunk(self, index: int, delta: dict[str, Any], **fields: Any) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
        choice.update(fields)
        chunk: dict[str, Any] = {**self._head, "choices": [choice]}
        if self._shape.continuous_usage:
            chunk["usage"] = self._usage.body()
        return chunk
