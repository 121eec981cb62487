"""``run_sweep``: the async ``bench serve`` runner, one ``PointResult`` per request rate × concurrency cap.

Lifecycle: ``await run_sweep(options)`` resolves the model (``--model`` or the server's first
one), opens one client (REST or gRPC) for the whole sweep, sends ``--num-warmups`` warm-up
requests (not measured), then runs the points in order. A point: build its workload (seed + point
index), draw the arrival times, start one task per conversation (each sleeps until its arrival,
then sends its turns one after the other, each inside the concurrency cap), wait for all of them
at most ``--point-timeout`` (then cancel the rest), and compute the metrics over the point's wall
time. Every request is bounded by ``--request-timeout`` inside the client; every failure is a
record (an agentic round after a failed one, or a request cut by the point timeout, is recorded
as failed with the reason), never an exception. A tqdm bar per point counts finished requests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from tqdm import tqdm

from k2serve.loadtest.arrivals import ConcurrencyCap, arrival_offsets
from k2serve.loadtest.bench_metrics import BenchMetrics, compute_metrics
from k2serve.loadtest.bench_options import BenchOptions, SweepPoint, sweep_points
from k2serve.loadtest.bench_request import BenchRequest, RequestRecord
from k2serve.loadtest.client import OpenAIChatClient, discover_model
from k2serve.loadtest.conversation import Conversation
from k2serve.loadtest.dataset import build_workload
from k2serve.loadtest.grpc_client import GrpcChatClient, discover_grpc_model

WARMUP_SEED_OFFSET = 1_000_003


class ChatClient(Protocol):
    async def send(self, request: BenchRequest, origin: float) -> RequestRecord: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class PointResult:
    point: SweepPoint
    model: str
    dataset: str
    started_at: str  # ISO 8601, UTC
    num_requests: int
    metrics: BenchMetrics
    records: tuple[RequestRecord, ...]


class _RecordSink:
    """The records of one point, in completion order, and its progress bar."""

    def __init__(self, origin: float, bar: tqdm) -> None:
        self.origin = origin
        self.records: list[RequestRecord] = []
        self._bar = bar

    def add(self, record: RequestRecord) -> None:
        self.records.append(record)
        self._bar.update(1)

    def skip(self, conversation: Conversation, first_turn: int, error: str) -> None:
        for turn in range(first_turn, conversation.num_turns):
            self.add(RequestRecord(success=False, error=error, session_id=conversation.session_id, turn=turn))


async def resolve_model(options: BenchOptions) -> str:
    if options.model:
        return options.model
    if options.backend == "grpc":
        return await discover_grpc_model(options.grpc_target, options.api_key)
    return await discover_model(options.base_url, options.api_key)


def make_client(options: BenchOptions, model: str) -> ChatClient:
    if options.backend == "grpc":
        return GrpcChatClient(
            options.grpc_target,
            model,
            api_key=options.api_key,
            request_timeout_s=options.request_timeout_s,
            temperature=options.temperature,
            ignore_eos=options.ignore_eos,
        )
    return OpenAIChatClient(
        options.base_url,
        model,
        api_key=options.api_key,
        request_timeout_s=options.request_timeout_s,
        temperature=options.temperature,
        ignore_eos=options.ignore_eos,
        path=options.endpoint,
    )


async def run_sweep(options: BenchOptions) -> list[PointResult]:
    model = await resolve_model(options)
    client = make_client(options, model)
    try:
        points = sweep_points(options)
        await warm_up(client, options, points[0])
        return [await run_point(client, options, point, model) for point in points]
    finally:
        await client.aclose()


async def warm_up(client: ChatClient, options: BenchOptions, first: SweepPoint) -> None:
    if options.num_warmups == 0:
        return
    workload = build_workload(options.dataset, options.seed + WARMUP_SEED_OFFSET)
    cap, origin = ConcurrencyCap(first.max_concurrency), time.perf_counter()

    async def one(request: BenchRequest) -> None:
        async with cap:
            await client.send(request, origin)

    tasks = [asyncio.create_task(one(r)) for r in workload.warmup_requests(options.num_warmups)]
    _, pending = await asyncio.wait(tasks, timeout=options.point_timeout_s)
    await _cancel(pending)


async def run_point(client: ChatClient, options: BenchOptions, point: SweepPoint, model: str) -> PointResult:
    seed = options.seed + point.index
    workload = build_workload(options.dataset, seed)
    conversations = workload.conversations()
    offsets = arrival_offsets(len(conversations), point.request_rate, options.burstiness, seed)
    cap = ConcurrencyCap(point.max_concurrency)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    bar = tqdm(total=workload.num_requests, desc=point.label, unit="req", disable=not options.progress, leave=True)
    origin = time.perf_counter()
    sink = _RecordSink(origin, bar)
    try:
        tasks = [
            asyncio.create_task(_converse(c, origin + offset, client, cap, sink))
            for c, offset in zip(conversations, offsets, strict=True)
        ]
        _, pending = await asyncio.wait(tasks, timeout=options.point_timeout_s) if tasks else (set(), set())
        await _cancel(pending)
        duration = time.perf_counter() - origin
    finally:
        bar.close()
    metrics = compute_metrics(sink.records, max(duration, 1e-9), options.percentiles, options.goodput)
    return PointResult(point, model, workload.name, started_at, workload.num_requests, metrics, tuple(sink.records))


async def _converse(
    conversation: Conversation, send_at: float, client: ChatClient, cap: ConcurrencyCap, sink: _RecordSink
) -> None:
    done = 0
    try:
        await asyncio.sleep(max(0.0, send_at - time.perf_counter()))
        for turn in range(conversation.num_turns):
            request = conversation.request(turn)
            async with cap:
                record = await client.send(request, sink.origin)
            sink.add(record)
            done += 1
            if not record.success:
                sink.skip(conversation, done, f"not sent: round {turn} of this session failed")
                return
            conversation.on_reply(turn, record)
    except asyncio.CancelledError:
        sink.skip(conversation, done, "not finished within --point-timeout")
        raise
    except Exception as exc:  # a bug must not end the sweep: it becomes the session's failure
        sink.skip(conversation, done, f"internal error: {type(exc).__name__}: {exc}")


async def _cancel(pending: Sequence[asyncio.Task[None]] | set[asyncio.Task[None]]) -> None:
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
