"""``Frontend``: the transport-free core of the router: a validated request in, typed events out.

Lifecycle: one per router process, built by the server entry point from the dispatcher (the live
workers), the tokenizer, the chat template, the served model's facts and the admission queue;
shared by the REST (OpenAI, Anthropic) and gRPC surfaces, which only translate wire formats.
Per request: the adapter validates and builds a ``GenerationRequest`` (``chat_request`` helps with
chat), then ``stream = await frontend.start(request)`` admits it (429 when the queue is full) and
waits for its first token, so every failure before any output is an ``ApiError`` the adapter
answers with a status code; then ``async for event in stream`` (``generation_event`` has the
order) and ``await stream.aclose()`` in a ``finally``: closing early (client gone, stop string
matched) cancels the workers' calls, which aborts the request on every rank that holds it.
One request with n choices runs n worker requests (``<id>-<i>``, seed + i when seeded).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from k2serve.proto import worker_pb2
from k2serve.router.admission import Admission
from k2serve.router.api_error import ApiError, ErrorKind, invalid, public_text
from k2serve.router.chat_template import ChatInputError, ChatTemplate, ChatTemplateError
from k2serve.router.choice_output import ChoiceOutput
from k2serve.router.dispatcher import Dispatcher
from k2serve.router.generation_event import (
    ChatDelta,
    ChoiceFinished,
    ChoiceStarted,
    GenerationEvent,
    RequestFinished,
    RequestUsage,
    TextDelta,
)
from k2serve.router.generation_request import GenerationRequest
from k2serve.router.kimi_vocab import THINK_END, TOOL_CALLS_SECTION_BEGIN
from k2serve.router.router_metrics import RouterMetrics
from k2serve.router.sampling_check import RequestLimits
from k2serve.router.scrape_targets import ScrapeTargets
from k2serve.router.tokenizer import KimiTokenizer
from k2serve.router.worker_client import NoWorkerError, TokenEvent

CONTEXT_PHRASE = "This model's maximum context length is"
CLOSE_LIMIT_S = 30.0  # closing a request waits this long for its choice tasks' cleanup, then logs and goes on

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    name: str  # what clients send as ``model``
    root: str  # where the weights come from (the model folder)
    max_model_len: int


@dataclass(frozen=True)
class _Failed:
    """A choice that failed before its first token (becomes the ``ApiError`` of ``start``)."""

    index: int
    error: ApiError


class Frontend:
    def __init__(
        self,
        dispatcher: Dispatcher,
        tokenizer: KimiTokenizer,
        template: ChatTemplate,
        model: ServedModel,
        admission: Admission,
        limits: RequestLimits | None = None,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self.dispatcher, self.tokenizer, self.template = dispatcher, tokenizer, template
        self.model, self.admission = model, admission
        self.limits = limits or RequestLimits()
        self.metrics = metrics or RouterMetrics(model.name, admission, dispatcher)
        self.scrape_targets = ScrapeTargets()  # the workers' /metrics endpoints, kept by the set's follower
        self._running: dict[str, GenerationStream] = {}

    # -- helpers for the adapters ----------------------------------------------------------------

    @staticmethod
    def new_request_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    def check_model(self, name: str | None, param: str = "model") -> None:
        """None or "" means the served model; any other name is a 404."""
        if name and name != self.model.name:
            raise ApiError(ErrorKind.NOT_FOUND, f"The model `{name}` does not exist.", param=param)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
    ) -> list[int]:
        """The prompt ids of a conversation (OpenAI-shaped messages and tools)."""
        try:
            text = self.template.render(messages, tools=tools, add_generation_prompt=True)
        except ChatInputError as exc:
            raise invalid(exc.field, exc.reason) from None
        except ChatTemplateError as exc:
            raise invalid("messages", f"the chat template rejected the conversation: {exc}") from None
        return self.tokenizer.encode(text)

    def check_prompt(self, prompt: Sequence[int], max_tokens: int | None, *, param: str = "prompt") -> int:
        """Validate prompt ids against the vocabulary and the context; returns the max_tokens to use."""
        if not prompt:
            raise invalid(param, "must not be empty")
        vocab = self.tokenizer.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise invalid(param, f"token ids must be in [0, {vocab}); got {bad[:4]}")
        limit, n = self.model.max_model_len, len(prompt)
        if n >= limit:
            raise ApiError(
                ErrorKind.INVALID,
                f"{CONTEXT_PHRASE} {limit} tokens. However, your prompt contains {n} input tokens, "
                "which leaves no room for output. Please reduce the length of the prompt.",
                param=param,
            )
        if max_tokens is None:
            return limit - n
        if n + max_tokens > limit:
            raise ApiError(
                ErrorKind.INVALID,
                f"{CONTEXT_PHRASE} {limit} tokens. However, you requested {max_tokens} output tokens and "
                f"your prompt contains {n} input tokens, for a total of {n + max_tokens} tokens. "
                "Please reduce the length of the prompt or of max_tokens.",
                param="max_tokens",
            )
        return max_tokens

    # -- running requests ------------------------------------------------------------------------

    async def start(self, request: GenerationRequest) -> GenerationStream:
        """Admit ``request`` and wait for its first token; raises ``ApiError`` when it cannot start."""
        stream = GenerationStream(self, request)
        try:
            await stream.begin()
        except BaseException:
            await stream.aclose()
            raise
        self._running[request.request_id] = stream
        return stream

    def running_ids(self) -> list[str]:
        """Ids of the requests streaming now (``abort`` takes each)."""
        return list(self._running)

    async def abort(self, request_id: str) -> bool:
        """Abort a running request by the server's id (the explicit Abort RPC)."""
        stream = self._running.get(request_id)
        if stream is None:
            return False
        await stream.aclose()
        return True

    def _forget(self, request_id: str) -> None:
        self._running.pop(request_id, None)

    def worker_sampling(self, request: GenerationRequest, index: int) -> worker_pb2.SamplingParams:
        s, eos = request.sampling, self.tokenizer.stop_token_ids
        out = worker_pb2.SamplingParams(
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            min_p=s.min_p,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            repetition_penalty=s.repetition_penalty,
            min_tokens=s.min_tokens,
            ignore_eos=s.ignore_eos,
            stop_token_ids=list(dict.fromkeys((*s.stop_token_ids, *(() if s.ignore_eos else eos)))),
        )
        if s.max_tokens is not None:
            out.max_tokens = s.max_tokens
        if s.seed is not None:
            out.seed = (s.seed + index) % 2**64
        if s.top_logprobs is not None:
            out.logprobs = s.top_logprobs
        if request.chat is not None and s.max_reasoning_tokens is not None:
            special = self.tokenizer.special_tokens
            out.max_reasoning_tokens = s.max_reasoning_tokens
            out.reasoning_end_token_ids.extend([special[THINK_END], special[TOOL_CALLS_SECTION_BEGIN]])
        return out


class GenerationStream:
    """One admitted request's events; iterate once, then ``aclose`` (idempotent)."""

    def __init__(self, frontend: Frontend, request: GenerationRequest) -> None:
        self.request = request
        self._frontend = frontend
        self._queue: asyncio.Queue[GenerationEvent | _Failed] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._slot: contextlib.AbstractAsyncContextManager[None] | None = None
        self._first: GenerationEvent | None = None
        self._finished: dict[int, ChoiceFinished] = {}  # handed out
        self._ended: set[int] = set()  # queued a ChoiceFinished or a _Failed
        self._cached_tokens = 0
        self._closing: asyncio.Future[None] | None = None
        self._arrival = time.monotonic()
        self._last_step: dict[int, float] = {}  # choice -> when its last tokens were yielded

    @property
    def request_id(self) -> str:
        return self.request.request_id

    async def begin(self) -> None:
        request = self.request
        slot = self._frontend.admission.slot(request.n, deadline_s=request.deadline_s)
        await slot.__aenter__()
        self._slot = slot
        self._frontend.metrics.observe_admitted(time.monotonic() - self._arrival)
        for i in range(request.n):
            self._tasks.append(asyncio.create_task(self._choice(i), name=f"{request.request_id}-choice-{i}"))
        first = await self._queue.get()
        if isinstance(first, _Failed):
            raise first.error
        self._first = first

    def __aiter__(self) -> AsyncIterator[GenerationEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[GenerationEvent]:
        if self._first is not None:
            first, self._first = self._first, None
            self._note(first)
            yield first
        while len(self._finished) < self.request.n:
            item = await self._queue.get()  # every choice task ends with a ChoiceFinished
            event = ChoiceFinished(item.index, "error", error=item.error.message) if isinstance(item, _Failed) else item
            self._note(event)
            yield event
        finished = self._finished.values()
        usage = RequestUsage(
            prompt_tokens=len(self.request.prompt_token_ids),
            completion_tokens=sum(f.completion_tokens for f in finished),
            cached_tokens=self._cached_tokens,
            reasoning_tokens=sum(f.reasoning_tokens for f in finished),
        )
        self._frontend.metrics.observe_request(
            time.monotonic() - self._arrival, usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens
        )
        yield RequestFinished(usage)
        await self.aclose()

    def _note(self, event: GenerationEvent) -> None:
        """Bookkeeping and metrics for each event as it is handed out."""
        metrics, now = self._frontend.metrics, time.monotonic()
        if isinstance(event, ChoiceFinished):
            self._finished[event.index] = event
            metrics.observe_choice(event.finish_reason)
        elif isinstance(event, ChoiceStarted):
            if not self._last_step:
                metrics.observe_first_token(now - self._arrival)
            self._last_step[event.index] = now
        elif isinstance(event, TextDelta | ChatDelta) and event.token_ids:
            last = self._last_step.get(event.index)
            if last is not None and now > last:
                metrics.observe_token_gap(now - last)
            self._last_step[event.index] = now

    async def aclose(self) -> None:
        """End the request: its choice tasks are cancelled (closing their worker calls aborts it on
        every rank, and their cleanup releases a lease or a push), then its admission slot is given
        back. Idempotent and safe to cancel: the closing is one task that every call awaits shielded,
        so a caller cancelled on the way (a client gone inside a cancelled scope) neither skips the
        slot's release nor lets a second call return early. Each choice task is cancelled once: a
        second cancel would cut its cleanup short (an awaited release RPC) and leave blocks behind."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        self._frontend._forget(self.request_id)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=CLOSE_LIMIT_S)
            if pending:
                logger.error(
                    "%s: %d choice task(s) still running %gs after the cancel",
                    self.request_id,
                    len(pending),
                    CLOSE_LIMIT_S,
                )
        for task in self._tasks:
            error = task.exception() if task.done() and not task.cancelled() else None
            if error is not None:
                logger.error("%s: a choice task failed", self.request_id, exc_info=error)
        for index in range(self.request.n):  # a consumer still iterating (an Abort by id) ends, too
            if index not in self._ended:
                self._put(ChoiceFinished(index, "abort"))
        if self._slot is not None:
            slot, self._slot = self._slot, None
            await slot.__aexit__(None, None, None)

    async def _choice(self, index: int) -> None:
        """Run choice ``index`` on the workers; always ends with one ``ChoiceFinished`` or ``_Failed``."""
        frontend, request = self._frontend, self.request
        worker_id = request.request_id if request.n == 1 else f"{request.request_id}-{index}"
        prompt = (*request.prompt_token_ids, *(request.chat.forced_prefix_ids if request.chat else ()))
        output = ChoiceOutput(frontend.tokenizer, request, index)
        events = frontend.dispatcher.generate(
            worker_id,
            prompt,
            frontend.worker_sampling(request, index),
            cache_salt=request.routing.cache_salt or "",
            timeout_s=request.deadline_s,
            session_key=request.routing.session_key,
        )
        started = False
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    if not started:
                        started = True
                        self._put(ChoiceStarted(index))
                    self._take_usage(event)
                    for out in output.push(event):
                        self._put(out)
                    if output.finished:
                        return  # a stop string matched: closing the stream aborts the workers' request
            if not output.finished:
                for out in output.end("error", "the worker ended the stream without a finish reason"):
                    self._put(out)
        except (NoWorkerError, grpc.aio.AioRpcError) as exc:
            error = _api_error(exc)
            if not started:
                self._put(_Failed(index, error))
            else:
                for out in output.end("error", error.message):
                    self._put(out)

    def _put(self, item: GenerationEvent | _Failed) -> None:
        if isinstance(item, ChoiceFinished | _Failed):
            self._ended.add(item.index)
        self._queue.put_nowait(item)

    def _take_usage(self, event: TokenEvent) -> None:
        if event.usage is not None:
            self._cached_tokens = max(self._cached_tokens, event.usage.cached_tokens)


def _api_error(exc: NoWorkerError | grpc.aio.AioRpcError) -> ApiError:
    if isinstance(exc, NoWorkerError):
        return ApiError(ErrorKind.UNAVAILABLE, public_text(f"no worker can take the request: {exc}"), retry_after_s=1)
    code = exc.code()
    details = exc.details() or code.name
    kinds = {
        grpc.StatusCode.INVALID_ARGUMENT: ErrorKind.INVALID,
        grpc.StatusCode.RESOURCE_EXHAUSTED: ErrorKind.OVERLOADED,
        grpc.StatusCode.DEADLINE_EXCEEDED: ErrorKind.TIMEOUT,
    }
    kind = kinds.get(code, ErrorKind.UNAVAILABLE)
    retry = 1 if kind in (ErrorKind.OVERLOADED, ErrorKind.UNAVAILABLE) else None
    return ApiError(kind, public_text(f"worker: {code.name}: {details}"), retry_after_s=retry)
