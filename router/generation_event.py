"""The events ``Frontend`` streams for one request; every API adapter renders them in its own shape.

Lifecycle of one request's stream (n choices, interleaved, each choice in order):
``ChoiceStarted(i)`` when choice i's first token arrives (the OpenAI role chunk, TTFT), then any
number of ``TextDelta`` (token-level requests) or ``ChatDelta`` (chat requests), then exactly one
``ChoiceFinished(i)``; after every choice has finished, exactly one ``RequestFinished`` with the
usage of the whole request. A stream never ends without ``RequestFinished``; a failure after the
start is a ``ChoiceFinished`` with ``finish_reason="error"`` and the reason in ``error``.
"""

from __future__ import annotations

from dataclasses import dataclass

from k2serve.router.api_error import ApiError, ErrorKind
from k2serve.router.kimi_output import ContentDelta, ReasoningDelta, ToolCallArguments, ToolCallStart

ChatPiece = ReasoningDelta | ContentDelta | ToolCallStart | ToolCallArguments


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token_id: int
    token: str  # the token's text (may be a partial UTF-8 sequence shown as U+FFFD)
    token_bytes: bytes
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    token: str
    token_bytes: bytes
    logprob: float
    top: tuple[TopLogprob, ...]


@dataclass(frozen=True, slots=True)
class ChoiceStarted:
    index: int


@dataclass(frozen=True, slots=True)
class TextDelta:
    """Token-level output: new ids of one choice and their text (stop strings already applied)."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()  # one per id in ``token_ids`` when asked for


@dataclass(frozen=True, slots=True)
class ChatDelta:
    """Chat output: parsed pieces of one choice, in output order, with the ids that produced them."""

    index: int
    pieces: tuple[ChatPiece, ...]
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class ChoiceFinished:
    index: int
    finish_reason: str  # stop | length | tool_calls | abort | error
    stop_reason: str | int | None = None  # the matched stop string or stop token id
    error: str = ""
    completion_tokens: int = 0  # this choice's generated ids (reasoning included)
    reasoning_tokens: int = 0

    def failure(self) -> ApiError:
        """What a choice that ended in ``error`` or ``abort`` after its start is answered with: the
        workers went away or refused mid-request, so UNAVAILABLE (retryable) on every surface."""
        if self.finish_reason == "abort":
            return ApiError(ErrorKind.UNAVAILABLE, f"choice {self.index} was aborted by the server", retry_after_s=1)
        reason = self.error or "the request failed on the workers"
        return ApiError(ErrorKind.UNAVAILABLE, f"choice {self.index} failed: {reason}", retry_after_s=1)


@dataclass(frozen=True, slots=True)
class RequestUsage:
    prompt_tokens: int
    completion_tokens: int  # every choice, reasoning included
    cached_tokens: int  # prompt tokens served from a prefix cache
    reasoning_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class RequestFinished:
    usage: RequestUsage


GenerationEvent = ChoiceStarted | TextDelta | ChatDelta | ChoiceFinished | RequestFinished
