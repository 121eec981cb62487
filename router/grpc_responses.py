"""The router's ``GenerationEvent``s -> the public gRPC API's response messages (``k2serve.v1``).

Lifecycle: pure functions, called by the ``Serving`` servicer for every event of a stream, in
order; each returns the messages to send for that event (possibly none):
- ``generate_responses``: one ``GenerateResponse`` per ``TextDelta`` (ids, text, logprobs) and per
  ``ChoiceFinished`` (finish reason, stop reason as text, error); ``ChoiceStarted`` sends nothing;
- ``chat_responses``: ``role: "assistant"`` on ``ChoiceStarted``; a ``ChatDelta``'s pieces
  combined into as few ``ChatResponse``s as keep their order (within one message reasoning comes
  before content before tool calls, so a piece of an earlier kind starts a new message; a call's
  start and its arguments share one ``ToolCallDelta``); ``ChoiceFinished`` as for Generate;
- both: ``RequestFinished`` -> a last message carrying only the id and the usage.
"""

from __future__ import annotations

from k2serve.proto import serving_pb2
from k2serve.router.generation_event import (
    ChatDelta,
    ChatPiece,
    ChoiceFinished,
    ChoiceStarted,
    GenerationEvent,
    RequestFinished,
    RequestUsage,
    TextDelta,
    TokenLogprob,
)
from k2serve.router.kimi_output import ContentDelta, ReasoningDelta, ToolCallArguments, ToolCallStart

ASSISTANT = "assistant"


def generate_responses(request_id: str, event: GenerationEvent) -> list[serving_pb2.GenerateResponse]:
    if isinstance(event, TextDelta):
        if not event.token_ids and not event.text:
            return []
        return [
            serving_pb2.GenerateResponse(
                id=request_id,
                index=event.index,
                token_ids=event.token_ids,
                text=event.text,
                logprobs=[_logprob(lp) for lp in event.logprobs],
            )
        ]
    if isinstance(event, ChoiceFinished):
        return [
            serving_pb2.GenerateResponse(
                id=request_id,
                index=event.index,
                finish_reason=event.finish_reason,
                stop_reason=_stop_reason(event),
                error=event.error,
            )
        ]
    if isinstance(event, RequestFinished):
        return [serving_pb2.GenerateResponse(id=request_id, usage=_usage(event.usage))]
    return []


def chat_responses(request_id: str, event: GenerationEvent) -> list[serving_pb2.ChatResponse]:
    if isinstance(event, ChoiceStarted):
        return [serving_pb2.ChatResponse(id=request_id, index=event.index, role=ASSISTANT)]
    if isinstance(event, ChatDelta):
        return _chat_pieces(request_id, event.index, event.pieces)
    if isinstance(event, ChoiceFinished):
        return [
            serving_pb2.ChatResponse(
                id=request_id,
                index=event.index,
                finish_reason=event.finish_reason,
                stop_reason=_stop_reason(event),
                error=event.error,
            )
        ]
    if isinstance(event, RequestFinished):
        return [serving_pb2.ChatResponse(id=request_id, usage=_usage(event.usage))]
    return []


def _order(piece: ChatPiece) -> int:
    """Where a piece sits inside one ChatResponse: reasoning, then content, then tool calls."""
    if isinstance(piece, ReasoningDelta):
        return 0
    if isinstance(piece, ContentDelta):
        return 1
    return 2


def _chat_pieces(request_id: str, index: int, pieces: tuple[ChatPiece, ...]) -> list[serving_pb2.ChatResponse]:
    out: list[serving_pb2.ChatResponse] = []
    current: serving_pb2.ChatResponse | None = None
    last_order = -1
    for piece in pieces:
        order = _order(piece)
        if current is None or order < last_order:
            current = serving_pb2.ChatResponse(id=request_id, index=index)
            out.append(current)
        last_order = order
        if isinstance(piece, ReasoningDelta):
            current.reasoning_content += piece.text
        elif isinstance(piece, ContentDelta):
            current.content += piece.text
        elif isinstance(piece, ToolCallStart):
            current.tool_calls.add(index=piece.index, id=piece.id, name=piece.name)
        elif isinstance(piece, ToolCallArguments):
            calls = current.tool_calls
            if calls and calls[-1].index == piece.index:
                calls[-1].arguments += piece.text
            else:
                calls.add(index=piece.index, arguments=piece.text)
    return out


def _stop_reason(event: ChoiceFinished) -> str:
    return "" if event.stop_reason is None else str(event.stop_reason)


def _usage(usage: RequestUsage) -> serving_pb2.Usage:
    return serving_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
        reasoning_tokens=usage.reasoning_tokens,
    )


def _logprob(lp: TokenLogprob) -> serving_pb2.TokenLogprob:
    return serving_pb2.TokenLogprob(
        token_id=lp.token_id,
        token=lp.token,
        logprob=lp.logprob,
        top=[serving_pb2.TopLogprob(token_id=t.token_id, token=t.token, logprob=t.logprob) for t in lp.top],
    )
