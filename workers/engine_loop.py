"""``EngineLoop``: the asyncio driver of an ``Engine`` for the gRPC service and the demo server.

Lifecycle: ``start()`` creates the background task; ``generate(...)`` queues a request and returns
an async iterator of its ``RequestOutput`` deltas that ends after the terminal delta; ``abort`` and
a consumer that stops iterating (client disconnect) both abort in the engine; ``stop()`` aborts
whatever is left and ends the task. The engine is touched only from the loop's own task, between
steps: ``generate``/``abort`` enqueue commands, the task applies them, then runs ``step()`` in a
worker thread so the event loop keeps serving while the model computes.

Every wait is bounded: an idle loop sleeps on an event with a timeout, and a step that raises
fails the requests it held (``finish_reason`` ``error``) instead of hanging their streams.

In an expert-parallel group the loop steps even without requests (each step is a collective its
peers need; an all-idle step costs one small all-gather, then a short sleep), and ``stop()``
leaves only when every rank of the group wants to stop. After a group failure the engine has
already failed every request; the loop then serves like an idle engine and refuses new ones.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from k2serve.workers.engine import Engine, EngineFailedError, RequestOutput
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
    def __init__(self, engine: Engine, *, idle_poll_s: float = 0.05, group_idle_poll_s: float = 0.005) -> None:
        self.engine = engine
        self._idle_poll_s = idle_poll_s
        self._group_idle_poll_s = group_idle_poll_s
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
        engine = self.engine
        while True:
            self._apply_commands()
            idle = not engine.has_unfinished_requests()
            lockstep = engine.lockstep if engine.steps_with_group else None
            if lockstep is not None:
                lockstep.stopping = self._stopping and idle
                if lockstep.last is not None and lockstep.last.all_done:
                    return
            elif self._stopping and idle:
                return
            if idle and lockstep is None:
                await self._sleep(self._idle_poll_s)
                continue
            try:
                outputs = await asyncio.to_thread(engine.step)
            except Exception:  # the step's requests were failed with finish_reason "error"
                logger.exception("engine step failed")
                outputs = engine.drain_finished()
            self._deliver(outputs)
            if lockstep is not None and lockstep.last is not None and lockstep.last.all_idle:
                await self._sleep(self._group_idle_poll_s)

    async def _sleep(self, timeout_s: float) -> None:
        """Wait for a command or the timeout, whichever comes first."""
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout_s)
        except TimeoutError:
            pass

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
            except (ValueError, EngineFailedError) as exc:
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
