"""``WorkerClient`` and ``Dispatcher``: how the router reaches workers and runs one request on them.

Lifecycle: the router keeps one ``WorkerClient`` (a gRPC channel) per live worker address, from the
registry's worker set (``Dispatcher.update``). For every request ``Dispatcher.generate`` picks the
ranks and streams ``TokenEvent``s:
- colocated pool: one ``Generate`` stream on the least-loaded mixed rank;
- prefill + decode pools: ``Prefill`` on a prefill rank (the first token), then ``Decode`` on a
  decode rank with the returned ``KvHandle`` (the rest). A prefill that fails with UNAVAILABLE (rank
  dead or draining) is retried on another prefill rank up to ``prefill_retries`` times; a decode
  that fails ends the request with ``finish_reason`` ``error`` and the reason — never a hang:
  every call carries a deadline.
Load: requests in flight per worker, counted here (the router's own view); ties go round-robin.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field

import grpc

from k2serve.proto import worker_pb2, worker_pb2_grpc

_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 256 * 2**20),
    ("grpc.max_receive_message_length", 256 * 2**20),
    ("grpc.keepalive_permit_without_calls", 1),
]


@dataclass(frozen=True)
class WorkerEndpoint:
    worker_id: str
    role: str  # prefill | decode | mixed
    address: str


@dataclass(frozen=True)
class TokenEvent:
    token_ids: tuple[int, ...]
    finish_reason: str = ""  # "" until the last event
    error: str = ""
    usage: worker_pb2.Usage | None = None


class NoWorkerError(RuntimeError):
    """No live worker of the needed role (the caller answers 503 / UNAVAILABLE)."""


@dataclass
class WorkerClient:
    endpoint: WorkerEndpoint
    channel: grpc.aio.Channel
    stub: worker_pb2_grpc.WorkerStub
    in_flight: int = 0

    @classmethod
    def connect(cls, endpoint: WorkerEndpoint) -> WorkerClient:
        channel = grpc.aio.insecure_channel(endpoint.address, options=_CHANNEL_OPTIONS)
        return cls(endpoint, channel, worker_pb2_grpc.WorkerStub(channel))


@dataclass
class Dispatcher:
    request_timeout_s: float = 600.0
    prefill_retries: int = 1
    _clients: dict[str, WorkerClient] = field(default_factory=dict)
    _turn: itertools.count[int] = field(default_factory=itertools.count)

    async def update(self, endpoints: Iterable[WorkerEndpoint]) -> None:
        """Make the client set equal ``endpoints`` (closes channels of workers that left)."""
        wanted = {e.worker_id: e for e in endpoints}
        for worker_id in list(self._clients):
            client = self._clients[worker_id]
            if worker_id not in wanted or wanted[worker_id] != client.endpoint:
                del self._clients[worker_id]
                await client.channel.close()
        for worker_id, endpoint in wanted.items():
            if worker_id not in self._clients:
                self._clients[worker_id] = WorkerClient.connect(endpoint)

    @property
    def endpoints(self) -> list[WorkerEndpoint]:
        return [c.endpoint for c in self._clients.values()]

    def _pick(self, role: str, exclude: Sequence[str] = ()) -> WorkerClient:
        candidates = [
            c for c in self._clients.values() if c.endpoint.role == role and c.endpoint.worker_id not in exclude
        ]
        if not candidates:
            raise NoWorkerError(f"no live {role} worker")
        turn = next(self._turn)
        return min(candidates, key=lambda c: (c.in_flight, (hash(c.endpoint.worker_id) + turn) % 997))

    @property
    def disaggregated(self) -> bool:
        roles = {c.endpoint.role for c in self._clients.values()}
        return "prefill" in roles and "decode" in roles

    async def generate(
        self, request_id: str, prompt_token_ids: Sequence[int], sampling: worker_pb2.SamplingParams
    ) -> AsyncIterator[TokenEvent]:
        if self.disaggregated:
            async for event in self._disaggregated(request_id, prompt_token_ids, sampling):
                yield event
        else:
            async for event in self._colocated(request_id, prompt_token_ids, sampling):
                yield event

    async def _colocated(
        self, request_id: str, prompt: Sequence[int], sampling: worker_pb2.SamplingParams
    ) -> AsyncIterator[TokenEvent]:
        client = self._pick("mixed")
        request = worker_pb2.GenerateRequest(request_id=request_id, prompt_token_ids=list(prompt), sampling=sampling)
        client.in_flight += 1
        try:
            async for delta in client.stub.Generate(request, timeout=self.request_timeout_s):
                yield _event(delta)
        finally:
            client.in_flight -= 1

    async def _disaggregated(
        self, request_id: str, prompt: Sequence[int], sampling: worker_pb2.SamplingParams
    ) -> AsyncIterator[TokenEvent]:
        request = worker_pb2.PrefillRequest(request_id=request_id, prompt_token_ids=list(prompt), sampling=sampling)
        tried: list[str] = []
        while True:
            prefill = self._pick("prefill", exclude=tried)
            prefill.in_flight += 1
            try:
                first = await prefill.stub.Prefill(request, timeout=self.request_timeout_s)
                break
            except grpc.aio.AioRpcError as exc:
                tried.append(prefill.endpoint.worker_id)
                if exc.code() != grpc.StatusCode.UNAVAILABLE or len(tried) > self.prefill_retries:
                    raise
            finally:
                prefill.in_flight -= 1
        if first.finish_reason:
            yield TokenEvent((first.first_token_id,), first.finish_reason, usage=first.usage)
            return
        yield TokenEvent((first.first_token_id,))
        decode = self._pick("decode")
        decode_request = worker_pb2.DecodeRequest(
            request_id=request_id,
            prompt_token_ids=list(prompt),
            sampling=sampling,
            first_token_id=first.first_token_id,
            kv=first.kv,
            sampler_state=first.sampler_state,
        )
        decode.in_flight += 1
        try:
            async for delta in decode.stub.Decode(decode_request, timeout=self.request_timeout_s):
                yield _event(delta)
        except grpc.aio.AioRpcError as exc:
            yield TokenEvent((), "error", f"decode rank {decode.endpoint.worker_id}: {exc.details()}")
        finally:
            decode.in_flight -= 1

    async def abort(self, request_id: str) -> None:
        """Best effort on every worker (the request may be on any of them); bounded."""
        calls = [
            c.stub.Abort(worker_pb2.AbortRequest(request_id=request_id), timeout=2.0) for c in self._clients.values()
        ]
        await asyncio.gather(*calls, return_exceptions=True)

    async def close(self) -> None:
        await self.update(())


def _event(delta: worker_pb2.TokenDelta) -> TokenEvent:
    usage = delta.usage if delta.HasField("usage") else None
    return TokenEvent(tuple(delta.token_ids), delta.finish_reason, delta.error, usage)
