"""``/v1/completions`` answers: started prompt streams -> the ``text_completion`` body or its chunks.

Lifecycle: per request, after ``parse_completion``: ``streams = await start_all(frontend, job)``
(every prompt admitted and at its first token, or none: a failure closes the others and raises),
then either ``completion_answer`` (non-streaming, under ``until_done_or_gone``) or
``completion_chunks`` (streaming, through ``sse_response``). Both read ``merged(streams)``: the
prompts' events interleaved as they come, tagged with the prompt index; choice ``i`` of prompt
``p`` is ``p * n + i``. The usage is the sum over prompts. A choice that ends with "error" makes
the answer an ``ApiError`` (mid-stream: the error event).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any

from k2serve.router.frontend import Frontend, GenerationStream
from k2serve.router.generation_event import (
    ChoiceFinished,
    ChoiceStarted,
    GenerationEvent,
    RequestFinished,
    RequestUsage,
    TextDelta,
)
from k2serve.router.openai_completion_request import CompletionJob
from k2serve.router.openai_logprobs import LegacyLogprobs, merge_legacy
from k2serve.router.openai_usage import RunningUsage, usage_body


async def start_all(frontend: Frontend, job: CompletionJob) -> list[GenerationStream]:
    tasks = [asyncio.ensure_future(frontend.start(request)) for request in job.requests]
    started = False
    try:
        await asyncio.wait(tasks)
        for task in tasks:
            error = task.exception()
            if error is not None:
                raise error
        started = True
        return [task.result() for task in tasks]
    finally:
        if not started:  # failed or cancelled: nothing may keep running or hold admission slots
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is None:
                    await task.result().aclose()


async def close_all(streams: Sequence[GenerationStream]) -> None:
    for stream in streams:
        await stream.aclose()


async def merged(streams: Sequence[GenerationStream]) -> AsyncGenerator[tuple[int, GenerationEvent], None]:
    """Every stream's events as they come, as (prompt index, event)."""
    if len(streams) == 1:
        async for event in streams[0]:
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, GenerationEvent | BaseException | None]] = asyncio.Queue()

    async def pump(p: int, stream: GenerationStream) -> None:
        try:
            async for event in stream:
                queue.put_nowait((p, event))
            queue.put_nowait((p, None))
        except Exception as exc:
            queue.put_nowait((p, exc))

    tasks = [asyncio.create_task(pump(p, stream)) for p, stream in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            p, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield p, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finished: ChoiceFinished | None = None


def _sum(usages: Sequence[RequestUsage]) -> RequestUsage:
    return RequestUsage(
        prompt_tokens=sum(u.prompt_tokens for u in usages),
        completion_tokens=sum(u.completion_tokens for u in usages),
        cached_tokens=sum(u.cached_tokens for u in usages),
        reasoning_tokens=sum(u.reasoning_tokens for u in usages),
    )


async def completion_answer(job: CompletionJob, streams: Sequence[GenerationStream], model: str) -> dict[str, Any]:
    shape, n = job.shape, job.n
    created = int(time.time())
    choices = [_Choice() for _ in range(len(streams) * n)]
    legacy = [LegacyLogprobs(len(job.prompt_texts[i // n])) for i in range(len(choices))]
    usages: list[RequestUsage] = []
    try:
        async for p, event in merged(streams):
            if isinstance(event, TextDelta):
                choice = choices[p * n + event.index]
                choice.text.append(event.text)
                choice.token_ids.extend(event.token_ids)
                if shape.logprobs:
                    choice.logprobs.append(legacy[p * n + event.index].shape(event.logprobs))
            elif isinstance(event, ChoiceFinished):
                if event.finish_reason == "error":
                    raise event.failure()
                choices[p * n + event.index].finished = event
            elif isinstance(event, RequestFinished):
                usages.append(event.usage)
    finally:
        await close_all(streams)
    out = []
    for i, choice in enumerate(choices):
        finished = choice.finished
        body: dict[str, Any] = {
            "index": i,
            "text": job.prompt_texts[i // n] + "".join(choice.text),
            "logprobs": merge_legacy(choice.logprobs) if shape.logprobs else None,
            "finish_reason": finished.finish_reason if finished else None,
            "stop_reason": finished.stop_reason if finished else None,
        }
        if shape.return_token_ids:
            body["prompt_token_ids"] = list(job.requests[i // n].prompt_token_ids)
            body["token_ids"] = choice.token_ids
        out.append(body)
    return {
        "id": job.response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": out,
        "usage": usage_body(_sum(usages)),
    }


async def completion_chunks(
    job: CompletionJob, streams: Sequence[GenerationStream], model: str
) -> AsyncGenerator[dict[str, Any], None]:
    shape, n = job.shape, job.n
    head = {"id": job.response_id, "object": "text_completion", "created": int(time.time()), "model": model}
    legacy = [LegacyLogprobs(len(job.prompt_texts[i // n])) for i in range(len(streams) * n)]
    running = RunningUsage(sum(len(r.prompt_token_ids) for r in job.requests))
    usages: list[RequestUsage] = []

    def chunk(index: int, text: str, **fields: Any) -> dict[str, Any]:
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": None, **fields}
        out: dict[str, Any] = {**head, "choices": [choice]}
        if shape.continuous_usage:
            out["usage"] = running.body()
        return out

    async for p, event in merged(streams):
        if isinstance(event, ChoiceStarted):
            index = p * n + event.index
            extra: dict[str, Any] = {}
            if shape.return_token_ids:
                extra["prompt_token_ids"] = list(job.requests[p].prompt_token_ids)
            if job.prompt_texts[p] or extra:
                yield chunk(index, job.prompt_texts[p], **extra)
        elif isinstance(event, TextDelta):
            index = p * n + event.index
            running.add(len(event.token_ids))
            extra = {}
            if shape.return_token_ids:
                extra["token_ids"] = list(event.token_ids)
            if shape.logprobs and event.logprobs:
                extra["logprobs"] = legacy[index].shape(event.logprobs)
            if event.text or (event.token_ids and extra):
                yield chunk(index, event.text, **extra)
        elif isinstance(event, ChoiceFinished):
            if event.finish_reason == "error":
                raise event.failure()
            yield chunk(p * n + event.index, "", finish_reason=event.finish_reason, stop_reason=event.stop_reason)
        elif isinstance(event, RequestFinished):
            usages.append(event.usage)
    if shape.include_usage:
        yield {**head, "choices": [], "usage": usage_body(_sum(usages))}
