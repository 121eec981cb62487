"""``EngineLoop``: the asyncio driver of an ``Engine`` for the gRPC service and the demo server.

Lifecycle: ``start()`` creates the background task; ``generate(...)`` queues a request and returns
an async iterator of its ``RequestOutput`` deltas that ends after the terminal delta; ``abort`` and
a consumer that stops iterating (client disconnect) both abort in the engine; ``stop()`` aborts
whatever is left and ends the task. The engine is touched only from the loop's own task, between
steps: ``generate``/``abort`` enqueue commands, the task applies them, then runs ``step()`` in a
worker thread so the event loop keeps serving while the model computes.

Every wait is bounded: an idle loop sleeps on an event with a timeout, and a step that raises
fails the requests it held (``finish_reason`` ``error``) instead of hanging their streams.

Engine death: after ``max_step_failures`` failed steps in a row (a step that succeeds resets the
count) the loop declares the engine dead (``Engine.fail``): every request in flight or queued ends
with ``error`` and "engine dead: ...", new ones are refused (``EngineFailedError``). A group failure
stops the engine the same way. Either way the loop then awaits ``on_failed(reason)`` once (the
service turns its health NOT_SERVING there) and keeps serving like an idle engine (aborts, calls:
the owner still releases held KV through it) until it is stopped and the rank restarted.

Fault hooks (tests only, ``FaultInjector``): the injector's ``before_forward`` becomes the engine's
hook, and before a step with requests the loop waits at the injector's barrier, applying commands
(aborts, calls, new requests) while it waits, so a request held there can be aborted.

In an expert-parallel group the loop steps even without requests (each step is a collective its
peers need; an all-idle step costs one small all-gather, then a short sleep), and ``stop()``
leaves only when every rank of the group wants to stop. After a group failure the engine has
already failed every request; the loop then serves like an idle engine and refuses new ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from k2serve.workers.engine import Engine, EngineFailedError, RequestOutput
from k2serve.workers.fault_plan import FaultInjector
from k2serve.workers.kv_progress import LayerProgress
from k2serve.workers.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    priority: int
    cache_salt: str | None
    hold_kv: bool = False  # prefill role
    kv_progress: LayerProgress | None = None  # prefill role, pushed KV
    first_token_id: int | None = None  # decode role: admitted with its prompt KV already in place
    sampler_state: bytes = b""


@dataclass(frozen=True)
class _Call:
    fn: Callable[[Engine], Any]
    done: asyncio.Future[Any]


class EngineLoop:
    def __init__(
        self,
        engine: Engine,
        *,
        idle_poll_s: float = 0.05,
        group_idle_poll_s: float = 0.005,
        max_step_failures: int = 3,
        on_failed: Callable[[str], Awaitable[None]] | None = None,
        faults: FaultInjector | None = None,
    ) -> None:
        if max_step_failures < 1:
            raise ValueError(f"max_step_failures: must be >= 1, got {max_step_failures}")
        self.engine = engine
        self._idle_poll_s = idle_poll_s
        self._group_idle_poll_s = group_idle_poll_s
        self.max_step_failures = max_step_failures
        self._on_failed = on_failed
        self._faults = faults if faults is not None and faults.active else None
        if self._faults is not None and self._faults.fails_forwards:
            engine.before_forward = self._faults.before_forward
        if self._faults is not None and self._faults.emulates_device:
            engine.device_delay = self._faults.device_delay
        self.failed_steps_in_a_row = 0
        self._failure_reported = False
        self._commands: list[_Add | _Call | str] = []
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
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self._task)
            self._task = None

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        hold_kv: bool = False,
        kv_progress: LayerProgress | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the deltas of one request; a refused request raises on the first iteration.
        ``hold_kv``, ``kv_progress``: the prefill role (``Engine.add_request``)."""
        add = _Add(
            request_id, tuple(prompt_token_ids), params, priority, cache_salt, hold_kv=hold_kv, kv_progress=kv_progress
        )
        return self._submit(add)

    async def generate_prefilled(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        first_token_id: int,
        *,
        sampler_state: bytes = b"",
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the tokens after ``first_token_id`` of a request whose prompt KV is in its reservation
        (``Engine.add_prefilled_request``)."""
        add = _Add(
            request_id,
            tuple(prompt_token_ids),
            params,
            priority,
            cache_salt,
            first_token_id=first_token_id,
            sampler_state=sampler_state,
        )
        return self._submit(add)

    async def call(self, fn: Callable[[Engine], T], timeout_s: float = 30.0) -> T:
        """Run ``fn(engine)`` on the loop's task between two steps and return its result (or raise its error)."""
        if self._task is None:
            raise RuntimeError("the engine loop is not running")
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._commands.append(_Call(fn, done))
        self._wake.set()
        async with asyncio.timeout(timeout_s):  # expiry cancels ``done``: a late result is dropped
            return await done

    def _submit(self, add: _Add) -> AsyncIterator[RequestOutput]:
        if self._stopping or self._task is None:
            raise RuntimeError("the engine loop is not running")
        if add.request_id in self._streams:
            raise ValueError(f"request_id: {add.request_id!r} is already running")
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[add.request_id] = queue
        self._commands.append(add)
        self._wake.set()
        return self._drain(add.request_id, queue, add.params.n)

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
            if not idle and self._faults is not None and await self._faults.barrier(self._held_at_barrier):
                if lockstep is None and not engine.has_unfinished_requests():
                    continue  # everything it held was aborted meanwhile
            try:
                outputs = await asyncio.to_thread(engine.step)
                self.failed_steps_in_a_row = 0
            except Exception as exc:  # the step's requests were failed with finish_reason "error"
                logger.exception("engine step failed")
                outputs = engine.drain_finished()
                self._step_failed(exc)
                outputs.extend(engine.drain_finished())
            self._deliver(outputs)
            if engine.failure is not None and not self._failure_reported:
                await self._report_failure(engine.failure)
            if lockstep is not None and lockstep.last is not None and lockstep.last.all_idle:
                await self._sleep(self._group_idle_poll_s)

    def _held_at_barrier(self) -> bool:
        """Between two polls of the fault barrier: apply commands; keep waiting while a step would run."""
        self._apply_commands()
        return self.engine.has_unfinished_requests()

    def _step_failed(self, exc: Exception) -> None:
        self.failed_steps_in_a_row += 1
        if self.engine.failure is None and self.failed_steps_in_a_row >= self.max_step_failures:
            self.engine.fail(f"engine dead: {self.failed_steps_in_a_row} steps failed in a row, the last with: {exc}")

    async def _report_failure(self, reason: str) -> None:
        self._failure_reported = True
        logger.error("the engine takes no more requests: %s", reason)
        if self._on_failed is not None:
            try:
                await self._on_failed(reason)
            except Exception:  # the loop must go on serving aborts and calls
                logger.exception("on_failed raised")

    async def _sleep(self, timeout_s: float) -> None:
        """Wait for a command or the timeout, whichever comes first."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._wake.wait()

    def _apply_commands(self) -> None:
        commands, self._commands = self._commands, []
        for command in commands:
            if isinstance(command, str):
                self.engine.abort(command)
            elif isinstance(command, _Call):
                self._run_call(command)
            else:
                self._add(command)
        self._deliver(self.engine.drain_finished())

    def _add(self, command: _Add) -> None:
        try:
            if command.first_token_id is None:
                self.engine.add_request(
                    command.request_id,
                    command.prompt_token_ids,
                    command.params,
                    priority=command.priority,
                    cache_salt=command.cache_salt,
                    hold_kv=command.hold_kv,
                    kv_progress=command.kv_progress,
                )
            else:
                self.engine.add_prefilled_request(
                    command.request_id,
                    command.prompt_token_ids,
                    command.params,
                    command.first_token_id,
                    sampler_state=command.sampler_state,
                    priority=command.priority,
                    cache_salt=command.cache_salt,
                )
        except (ValueError, EngineFailedError) as exc:
            self._fail(command.request_id, exc)

    def _run_call(self, command: _Call) -> None:
        if command.done.done():  # the caller gave up (timeout, cancellation)
            return
        try:
            command.done.set_result(command.fn(self.engine))
        except Exception as exc:
            command.done.set_exception(exc)

    def _deliver(self, outputs: Sequence[RequestOutput]) -> None:
        for output in outputs:
            queue = self._streams.get(output.request_id)
            if queue is not None:
                queue.put_nowait(output)

    def _fail(self, request_id: str, exc: BaseException) -> None:
        queue = self._streams.get(request_id)
        if queue is not None:
            queue.put_nowait(exc)
