"""``RequestProgress``: what the client already has of one request, and how the request goes on from there.

Lifecycle: the ``Dispatcher`` makes one per request before its first attempt. Each attempt starts
with ``next_attempt()``: the prompt and sampling to send, i.e. the original ones for the first, and
after a rank failed the original prompt + every token the client has, with the sampling continued
from there (``continued_sampling``). Every worker delta of the attempt passes ``event`` (the
prefill's first token ``first_event``), which numbers its tokens from the attempt's start and drops
any index the client already has, so the client's stream has no duplicate and, because every
attempt starts where the client is, no gap. Once the request was migrated, the final usage counts
the original prompt and every generated token (the last rank saw the extended prompt).
``failures`` and ``failed_ranks`` collect what went wrong, for the error that ends a request the
dispatcher could not keep going.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from k2serve.proto import worker_pb2
from k2serve.router.worker_client import TokenEvent


@dataclass
class RequestProgress:
    prompt: tuple[int, ...]  # the original prompt
    sampling: worker_pb2.SamplingParams  # the original sampling
    tracks: bool = True  # one choice: token indices are the request's (n > 1 interleaves choices)
    tokens: list[int] = field(default_factory=list)  # every token sent to the client, by index
    failures: list[str] = field(default_factory=list)  # "<role> rank <id>: <why>", in order
    failed_ranks: set[str] = field(default_factory=set)  # ranks this request must not go back to
    migrations: int = 0
    aborted: bool = False  # the router aborted it on the workers (``Dispatcher.abort``): no migration
    _next: int = 0  # the request index of the current attempt's next token

    @property
    def sent(self) -> bool:
        """Whether a token has reached the client (a later migration is then ``ongoing``)."""
        return bool(self.tokens)

    @property
    def spent(self) -> bool:
        """Every token the request may generate has been sent (its rank failed before saying so)."""
        return self.sampling.HasField("max_tokens") and len(self.tokens) >= self.sampling.max_tokens

    def next_attempt(self) -> tuple[tuple[int, ...], worker_pb2.SamplingParams]:
        """The prompt and sampling of the next attempt; its tokens are numbered from the client's count."""
        self._next = len(self.tokens)
        if not self.tokens:
            return self.prompt, self.sampling
        return (*self.prompt, *self.tokens), continued_sampling(self.sampling, self.tokens)

    def event(self, delta: worker_pb2.TokenDelta) -> TokenEvent:
        ids, logprobs = self._take(delta.token_ids, delta.logprobs)
        usage = self._usage(delta.usage) if delta.HasField("usage") else None
        return TokenEvent(ids, delta.finish_reason, delta.error, usage, logprobs)

    def first_event(self, first: worker_pb2.PrefillResponse) -> TokenEvent:
        """The prefill's first token; the whole request when that token already ended it."""
        ids, logprobs = self._take((first.first_token_id,), first.first_logprobs)
        usage = self._usage(first.usage) if first.finish_reason else None
        return TokenEvent(ids, first.finish_reason, usage=usage, logprobs=logprobs)

    def final_event(self, finish_reason: str) -> TokenEvent:
        """The end of a request whose last tokens were sent without their finish reason."""
        usage = worker_pb2.Usage(prompt_tokens=len(self.prompt), completion_tokens=len(self.tokens))
        return TokenEvent((), finish_reason, usage=usage)

    def _take(
        self, token_ids: Sequence[int], logprobs: Sequence[worker_pb2.TokenLogprob]
    ) -> tuple[tuple[int, ...], tuple[worker_pb2.TokenLogprob, ...]]:
        """The tokens (and their logprobs) whose index the client does not have yet."""
        if not self.tracks:
            return tuple(token_ids), tuple(logprobs)
        start, self._next = self._next, self._next + len(token_ids)
        skip = max(0, len(self.tokens) - start)  # indices below len(tokens) were sent by an earlier attempt
        new = tuple(token_ids[skip:])
        self.tokens.extend(new)
        return new, tuple(logprobs[skip:])

    def _usage(self, usage: worker_pb2.Usage) -> worker_pb2.Usage:
        if not self.migrations:
            return usage
        prompt = len(self.prompt)  # the last rank's prompt held generated tokens: count them as generated
        return worker_pb2.Usage(
            prompt_tokens=prompt,
            completion_tokens=len(self.tokens),
            cached_tokens=min(usage.cached_tokens, prompt),
            transferred_tokens=min(usage.transferred_tokens, prompt),
        )


def continued_sampling(sampling: worker_pb2.SamplingParams, sent: Sequence[int]) -> worker_pb2.SamplingParams:
    """``sampling`` for a request whose first ``len(sent)`` output tokens are now part of its prompt.

    The limits that count output tokens shrink by that many: ``max_tokens``, ``min_tokens`` (floor
    0), and the reasoning budget, which is dropped once ``sent`` holds a reasoning end (the engine
    counts the budget over its own output and would otherwise force a second ``</think>``). What the
    worker cannot be told: the seeded generator's position (a migrated sampled request draws from
    its seed again) and the presence / frequency penalties' history (they count output tokens
    only; the repetition penalty counts the prompt too, so it is unchanged)."""
    out = worker_pb2.SamplingParams()
    out.CopyFrom(sampling)
    done = len(sent)
    if out.HasField("max_tokens"):
        out.max_tokens = out.max_tokens - done
    out.min_tokens = max(0, out.min_tokens - done)
    if out.HasField("max_reasoning_tokens"):
        if set(out.reasoning_end_token_ids) & set(sent):
            out.ClearField("max_reasoning_tokens")
        else:
            out.max_reasoning_tokens = max(0, out.max_reasoning_tokens - done)
    return out
