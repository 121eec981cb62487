"""A request inside one rank's engine: its tokens, its progress and its lifecycle state.

Lifecycle: ``WAITING`` (queued, no blocks) -> ``RUNNING`` (has blocks, scheduled each step) ->
exactly one terminal state: ``FINISHED_STOPPED`` (a stop id), ``FINISHED_LENGTH`` (max_tokens or
the context limit), ``FINISHED_ABORTED`` (client abort) or ``FINISHED_ERROR`` (the step failed).
A running request may be preempted: it loses its blocks, goes back to ``WAITING`` with
``num_computed_tokens = 0`` and later recomputes prompt + output so far (preemption by recompute),
which produces the same tokens.

The scheduler speaks tokens, not phases: ``num_tokens`` (prompt + output) is the target and
``num_computed_tokens`` how many of them have KV in the cache. A step that brings
``num_computed_tokens`` up to ``num_tokens`` samples the next token; a prefill chunk that stops
short does not.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from k2serve.workers.sampler import SamplingState
from k2serve.workers.sampling_params import SamplingParams

if TYPE_CHECKING:
    from k2serve.workers.kv_progress import LayerProgress


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's ``finish_reason`` for terminal states, else None."""
        return self.value if self.is_finished else None


class RequestValidationError(ValueError):
    """A request the engine refuses at admission; ``field`` names the offending field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass
class RequestTimes:
    """Monotonic seconds of a request's milestones on this rank, recorded by the engine's observer."""

    arrival: float = field(default_factory=time.monotonic)  # admitted to this engine
    scheduled: float | None = None  # first step that computed any of its tokens
    first_token: float | None = None  # first token sampled here (or, if sampled elsewhere, the first after it)
    last_token: float | None = None


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    max_tokens: int  # resolved: never past the context limit
    sampling: SamplingState
    stop_ids: frozenset[int]  # ids that end the request once min_tokens are out
    arrival: int  # admission order, the FCFS tie-break
    priority: int = 0  # lower runs first (vLLM's convention)
    cache_salt: str | None = None
    parent_id: str | None = None  # for the children of an n > 1 request
    index: int = 0  # which choice of the parent this is
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prompt tokens served from the prefix cache; -1 until first scheduled
    num_preemptions: int = 0
    hold_kv: bool = False  # prefill role: keep the prompt's blocks pinned when the request ends
    kv_progress: LayerProgress | None = None  # prefill role, pushed KV: the last forward announces its layers
    num_transferred_tokens: int = 0  # decode role: prompt tokens whose KV came from a prefill rank
    times: RequestTimes = field(default_factory=RequestTimes)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_slice(self, start: int, stop: int) -> list[int]:
        """Token ids ``[start, stop)`` of prompt + output without copying the whole sequence."""
        prompt = self.prompt_token_ids
        if stop <= len(prompt):
            return list(prompt[start:stop])
        head = list(prompt[start:]) if start < len(prompt) else []
        out_start = max(start - len(prompt), 0)
        return head + self.output_token_ids[out_start : stop - len(prompt)]

    def all_token_ids(self) -> list[int]:
        return [*self.prompt_token_ids, *self.output_token_ids]

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.sampling.output_token_ids.append(token_id)

    def check_stop(self, max_model_len: int) -> RequestStatus | None:
        """The terminal state the last appended token puts this request in, if any."""
        if self.output_token_ids and self.num_output_tokens >= self.params.min_tokens:
            if self.output_token_ids[-1] in self.stop_ids:
                return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= self.max_tokens or self.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
