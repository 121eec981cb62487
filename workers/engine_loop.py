"""``EngineLoop``: the asyncio driver of an ``Engine`` for the gRPC service and the demo server.

Lifecycle: ``start()`` creates the background task; ``generate(...)`` queues a request and returns
an async iterator of its ``RequestOutput`` deltas that ends after the terminal delta; ``abort`` and
a consumer that stops iterating (client disconnect) both abort in the engine; ``stop()`` aborts
whatever is left and ends the task. The engine is touched only from the loop's own task, between
steps: ``generate``/``abort`` enqueue commands, the task applies them, then runs ``step()`` in a
worker thread so the event loop keeps serving while the model computes.

Every wait is bounded: an idle loop sleeps on an event with a timeout, and a step that raises
fails the requests it held (``finish_reason`` ``error``) instead of hanging their streams.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from k2serve.workers.engine import Engine, RequestOutput
from k2serve.workers.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    priority: int
    cache_salt: str | None


class EngineLoop:
    def __init__(self, engine: Engine, *, idle_poll_s: float = 0.05) -> None:
        self.engine = engine
        self._idle_poll_s = idle_poll_s
        self._commands: list[_Add | str] = []
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="engine-loop")

    async def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        for request_id in list(self._streams):
            self._commands.append(request_id)
        self._wake.set()
        if self._task is not None:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            self._task = None

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the deltas of one request. Validation errors raise here, before the first delta."""
        if self._stopping or self._task is None:
            raise RuntimeError("the engine loop is not running")
        if request_id in self._streams:
            raise ValueError(f"request_id: {request_id!r} is already running")
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = queue
        self._commands.append(_Add(request_id, tuple(prompt_token_ids), params, priority, cache_salt))
        self._wake.set()
        return self._drain(request_id, queue, params.n)

    async def _drain(
        self, request_id: str, queue: asyncio.Queue[RequestOutput | BaseException], num_choices: int
    ) -> AsyncIterator[RequestOutput]:
        remaining = num_choices
        try:
            while remaining:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    remaining -= 1
                yield item
        finally:
            if remaining:  # the consumer went away (disconnect) or failed: abort in the engine
                self.abort(request_id)
            self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        self._commands.append(request_id)
        self._wake.set()

    async def _run(self) -> None:
        while True:
            self._apply_commands()
            if self._stopping and not self.engine.has_unfinished_requests():
                return
            if not self.engine.has_unfinished_requests():
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self._idle_poll_s)
                except TimeoutError:
                    pass
                continue
            try:
                outputs = await asyncio.to_thread(self.engine.step)
            except Exception:  # the step's requests were failed with finish_reason "error"
                logger.exception("engine step failed")
                outputs = self.engine.drain_finished()
            self._deliver(outputs)

    def _apply_commands(self) -> None:
        commands, self._commands = self._commands, []
        for command in commands:
            if isinstance(command, str):
                self.engine.abort(command)
                continue
            try:
                self.engine.add_request(
                    command.request_id,
                    command.prompt_token_ids,
                    command.params,
                    priority=command.priority,
                    cache_salt=command.cache_salt,
                )
            except ValueError as exc:
                self._fail(command.request_id, exc)
        self._deliver(self.engine.drain_finished())

    def _deliver(self, outputs: Sequence[RequestOutput]) -> None:
        for output in outputs:
            queue = self._streams.get(output.request_id)
            if queue is not None:
                queue.put_nowait(output)

    def _fail(self, request_id: str, exc: BaseException) -> None:
        queue = self._streams.get(request_id)
        if queue is not None:
            queue.put_nowait(exc)
