"""``ChoiceOutput``: one choice's worker token events in, its ``GenerationEvent``s out.

Lifecycle: one per choice, fed by ``GenerationStream`` in order: ``push(event)`` for every worker
``TokenEvent`` (the last one carries the finish reason), or ``end(reason, error)`` when the worker
stream broke off; both return the events to emit and, once the choice is over, ``finished`` is
True and the last event returned was its ``ChoiceFinished``.
- token level (``request.chat`` None): an incremental detokenizer, then the stop strings;
- chat: the Kimi parsers (``KimiOutputStream``) first (fed the forced prefix before any output),
  then the stop strings on the content only (reasoning and tool calls are never cut).
A matched stop string ends the choice at once (``finish_reason`` "stop", ``stop_reason`` the
string); the caller closes the worker stream, which aborts the request there.
``tool_choice`` "none" drops parsed calls; a named choice ends with "stop" (as vLLM does).
"""

from __future__ import annotations

from k2serve.proto import worker_pb2
from k2serve.router.api_error import public_text
from k2serve.router.detokenizer import IncrementalDetokenizer
from k2serve.router.generation_event import (
    ChatDelta,
    ChatPiece,
    ChoiceFinished,
    GenerationEvent,
    TextDelta,
    TokenLogprob,
    TopLogprob,
)
from k2serve.router.generation_request import GenerationRequest
from k2serve.router.kimi_output import ContentDelta, KimiOutputStream, ToolCallArguments, ToolCallStart
from k2serve.router.stop_matcher import StopMatcher
from k2serve.router.tokenizer import KimiTokenizer
from k2serve.router.worker_client import TokenEvent


class ChoiceOutput:
    def __init__(self, tokenizer: KimiTokenizer, request: GenerationRequest, index: int) -> None:
        self._tokenizer, self._request, self.index = tokenizer, request, index
        self._stop = StopMatcher(request.stop, include=request.include_stop_str_in_output)
        self._chat: KimiOutputStream | None = None
        self._detok: IncrementalDetokenizer | None = None
        chat = request.chat
        if chat is None:
            self._detok = tokenizer.incremental_detokenizer(skip_special_tokens=request.skip_special_tokens)
        else:
            self._chat = KimiOutputStream(
                tokenizer,
                start_in_reasoning=chat.start_in_reasoning,
                first_tool_index=chat.first_tool_index,
            )
        self._primed = False  # the forced prefix went through the parser
        self._forced_reasoning_tokens = 0
        self.completion_tokens = 0
        self.finished = False

    def push(self, event: TokenEvent) -> list[GenerationEvent]:
        if self.finished:
            return []
        ids = event.token_ids
        self.completion_tokens += len(ids)
        logprobs = tuple(self._logprob(lp) for lp in event.logprobs)
        out: list[GenerationEvent] = []
        if self._chat is not None:
            pieces = self._prime() + self._pieces(self._chat.push(ids))
            if pieces or ids:
                out.append(ChatDelta(self.index, tuple(pieces), ids, logprobs))
        else:
            assert self._detok is not None
            text = self._stop.push(self._detok.push(ids))
            out.append(TextDelta(self.index, text, ids, logprobs))
        if self._stop.done:
            out.append(self._finished("stop", stop_reason=self._stop.matched))
        elif event.finish_reason:
            out.extend(self._tail(event.finish_reason))
            stop_reason = self._stop_token(ids) if event.finish_reason == "stop" else None
            out.append(self._finished(event.finish_reason, stop_reason=stop_reason, error=public_text(event.error)))
        return out

    def end(self, finish_reason: str, error: str) -> list[GenerationEvent]:
        """The worker stream broke off: what was held back, then the choice's end."""
        if self.finished:
            return []
        return [*self._tail(finish_reason), self._finished(finish_reason, error=public_text(error))]

    # -- internals -------------------------------------------------------------------------------

    def _prime(self) -> list[ChatPiece]:
        if self._primed or self._chat is None or self._request.chat is None:
            return []
        self._primed = True
        forced = self._request.chat.forced_prefix_ids
        pieces = self._pieces(self._chat.push(forced)) if forced else []
        self._forced_reasoning_tokens = self._chat.reasoning_tokens  # the prefilled <think></think>
        return pieces

    def _pieces(self, pieces: list[ChatPiece]) -> list[ChatPiece]:
        """Stop strings on content; tool calls dropped under tool_choice none."""
        out: list[ChatPiece] = []
        chat = self._request.chat
        for piece in pieces:
            if self._stop.done:
                break
            if isinstance(piece, ContentDelta):
                text = self._stop.push(piece.text)
                if text:
                    out.append(ContentDelta(text))
                continue
            if isinstance(piece, ToolCallStart | ToolCallArguments) and chat is not None and chat.tool_choice == "none":
                continue
            held = self._stop.flush()  # content before a reasoning piece or a call cannot continue a stop string
            if held:
                out.append(ContentDelta(held))
            out.append(piece)
        return out

    def _tail(self, finish_reason: str) -> list[GenerationEvent]:
        """Flush the parser / detokenizer and the stop matcher at the end of the output."""
        if self._chat is not None:
            pieces = self._prime() + self._pieces(self._chat.finish(finish_reason))
            held = self._stop.flush()
            if held:
                pieces.append(ContentDelta(held))
            return [ChatDelta(self.index, tuple(pieces), ())] if pieces else []
        assert self._detok is not None
        text = self._stop.push(self._detok.flush()) + self._stop.flush()
        return [TextDelta(self.index, text, ())] if text else []

    def _finished(self, reason: str, *, stop_reason: str | int | None = None, error: str = "") -> ChoiceFinished:
        self.finished = True
        chat, stream = self._request.chat, self._chat
        reasoning_tokens = 0
        if stream is not None and chat is not None:
            reasoning_tokens = stream.reasoning_tokens - self._forced_reasoning_tokens
            if reason == "stop" and stream.finished and stream.finish_reason == "tool_calls":
                reason = "stop" if chat.tool_choice in ("none", "function") else "tool_calls"
        return ChoiceFinished(self.index, reason, stop_reason, error, self.completion_tokens, reasoning_tokens)

    def _stop_token(self, ids: tuple[int, ...]) -> int | None:
        """The user's stop token that ended the choice (None for the model's own end of turn)."""
        user_stops = self._request.sampling.stop_token_ids
        return ids[-1] if ids and ids[-1] in user_stops else None

    def _logprob(self, lp: worker_pb2.TokenLogprob) -> TokenLogprob:
        top = tuple(TopLogprob(t.token_id, *self._text(t.token_id), t.logprob) for t in lp.top)
        return TokenLogprob(lp.token_id, *self._text(lp.token_id), lp.logprob, top)

    def _text(self, token_id: int) -> tuple[str, bytes]:
        data = self._tokenizer.id_to_bytes(token_id)
        return data.decode("utf-8", errors="replace"), data
