"""``WorkerClient`` and ``WorkerSet``: the router's gRPC channels to the worker ranks, and what their
answers mean.

Lifecycle: the ``Dispatcher`` keeps one ``WorkerSet``, made equal to the registry's worker set by
``update``: one ``WorkerClient`` (a channel) per live worker address. A worker that leaves the set
(dead, draining, replaced) gets no new call at once; its channel is closed only after the calls
already on it have ended (each has its own deadline, so this is bounded by ``retire_grace_s``):
closing it earlier would cancel them, and a locally cancelled gRPC call raises ``CancelledError`` in
the request's task, i.e. the request would end without an outcome. ``close()`` closes every channel
now. ``loads`` is what a routing policy sees of each rank: the calls in flight counted here, plus
each rank's ``GetLoad`` report once ``start_monitor()`` runs a ``LoadMonitor``. ``WorkerClient.stream``
reads one server-streaming call (``Generate`` or ``Decode``) under a stall bound: once the call has
sent its first delta, a gap longer than ``stall_timeout_s`` cancels it and raises ``StalledError``
(the rank is taken as dead: stopped, or the connection blackholed). No bound applies before the
first delta (a long prefill or KV pull is legitimate; the call's own deadline bounds it). Leaving
the iteration early (the consumer gone, an error) cancels the call, so the rank aborts the request.

``rank_failed`` says whether a failed call is the rank's fault (dead, draining, group failed, the
connection reset or cancelled by the server) rather than the request's (INVALID_ARGUMENT, the
client's own deadline, ...): only the former may go on on another rank.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc

from k2serve.proto import worker_pb2, worker_pb2_grpc
from k2serve.proto.cluster_token import authorized
from k2serve.router.load_monitor import LoadMonitor
from k2serve.router.policy import WorkerLoad

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 256 * 2**20),
    ("grpc.max_receive_message_length", 256 * 2**20),
    ("grpc.keepalive_permit_without_calls", 1),
]
# UNAVAILABLE: dead, draining, group failed, connection refused or reset; CANCELLED: a locally
# cancelled aio call raises CancelledError instead, so this status comes from the server or the
# transport (a server that stops, an RST_STREAM); INTERNAL: a broken HTTP/2 stream.
RANK_FAILURE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL})


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
    logprobs: tuple[worker_pb2.TokenLogprob, ...] = ()  # one per id when the sampling asks for them


class NoWorkerError(RuntimeError):
    """No live worker of the needed role (the caller answers 503 / UNAVAILABLE)."""


class StalledError(Exception):
    """A started stream sent nothing for the stall bound; its call has been cancelled."""

    def __init__(self, stall_timeout_s: float) -> None:
        super().__init__(f"STALLED: no token for {stall_timeout_s:g}s after the last one")
        self.stall_timeout_s = stall_timeout_s


@dataclass
class WorkerClient:
    endpoint: WorkerEndpoint
    channel: grpc.aio.Channel
    stub: Any  # a WorkerStub whose calls carry the cluster token (``proto/cluster_token.py``)
    in_flight: int = 0

    @classmethod
    def connect(cls, endpoint: WorkerEndpoint, cluster_token: str | None = None) -> WorkerClient:
        channel = grpc.aio.insecure_channel(endpoint.address, options=CHANNEL_OPTIONS)
        return cls(endpoint, channel, authorized(worker_pb2_grpc.WorkerStub(channel), cluster_token))

    @property
    def worker_id(self) -> str:
        return self.endpoint.worker_id

    async def get_load(self, timeout_s: float) -> worker_pb2.Load:
        return await self.stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=timeout_s)

    async def stream(
        self, call: grpc.aio.UnaryStreamCall, stall_timeout_s: float
    ) -> AsyncGenerator[worker_pb2.TokenDelta, None]:
        """The call's deltas until its end; raises ``AioRpcError`` for a failed call and ``StalledError``
        when, after the first delta, none comes for ``stall_timeout_s`` (0 = no bound)."""
        started = False
        try:
            while True:
                if started and stall_timeout_s > 0:
                    try:  # a cancelled read cancels the call (grpc.aio), so the rank aborts the request
                        async with asyncio.timeout(stall_timeout_s):
                            delta = await call.read()
                    except TimeoutError:
                        raise StalledError(stall_timeout_s) from None
                else:
                    delta = await call.read()
                if delta is grpc.aio.EOF:
                    return
                started = True
                yield delta
        finally:
            call.cancel()  # no-op once the call is done


@dataclass
class WorkerSet:
    """The live workers one router reaches, by worker id."""

    retire_grace_s: float  # a retiring channel closes once its calls end, at the latest after this
    cluster_token: str | None = field(default=None, repr=False)  # carried by every call to a worker
    _clients: dict[str, WorkerClient] = field(default_factory=dict)
    _retiring: dict[asyncio.Task[None], grpc.aio.Channel] = field(default_factory=dict)  # closing after their calls
    _monitor: LoadMonitor | None = None

    def start_monitor(self, interval_s: float, timeout_s: float) -> None:
        """Poll every live worker's load from now on (needs a running loop; ``close()`` stops it)."""
        if self._monitor is None:
            self._monitor = LoadMonitor(lambda: self.clients, interval_s=interval_s, timeout_s=timeout_s)
        self._monitor.start()

    def update(self, endpoints: Iterable[WorkerEndpoint]) -> list[str]:
        """Make the set equal ``endpoints`` (needs a running loop); the ids that left or were replaced."""
        wanted = {e.worker_id: e for e in endpoints}
        gone = [w for w, c in self._clients.items() if w not in wanted or wanted[w] != c.endpoint]
        for worker_id in gone:
            client = self._clients.pop(worker_id)
            task = asyncio.get_running_loop().create_task(
                client.channel.close(grace=self.retire_grace_s), name=f"retire-{worker_id}"
            )
            self._retiring[task] = client.channel
            task.add_done_callback(lambda done: self._retiring.pop(done, None))
            if self._monitor is not None:
                self._monitor.forget(worker_id)
        for worker_id, endpoint in wanted.items():
            if worker_id not in self._clients:
                self._clients[worker_id] = WorkerClient.connect(endpoint, self.cluster_token)
        return gone

    @property
    def clients(self) -> list[WorkerClient]:
        return list(self._clients.values())

    @property
    def endpoints(self) -> list[WorkerEndpoint]:
        return [c.endpoint for c in self._clients.values()]

    @property
    def roles(self) -> set[str]:
        return {c.endpoint.role for c in self._clients.values()}

    def get(self, worker_id: str) -> WorkerClient | None:
        return self._clients.get(worker_id)

    def live(self, role: str, exclude: Iterable[str] = ()) -> list[WorkerClient]:
        """The live workers of ``role`` but ``exclude``; ``NoWorkerError`` when there is none."""
        excluded = set(exclude)
        candidates = [c for c in self._clients.values() if c.endpoint.role == role and c.worker_id not in excluded]
        if not candidates:
            raise NoWorkerError(f"no live {role} worker")
        return candidates

    def has(self, role: str, exclude: Iterable[str] = ()) -> bool:
        excluded = set(exclude)
        return any(c.endpoint.role == role and c.worker_id not in excluded for c in self._clients.values())

    def loads(self, role: str | None = None) -> list[WorkerLoad]:
        """What a policy sees of every live worker (of ``role``) now."""
        return [self.load(c) for c in self._clients.values() if role is None or c.endpoint.role == role]

    def load(self, client: WorkerClient) -> WorkerLoad:
        endpoint = client.endpoint
        report = self._monitor.latest(endpoint.worker_id) if self._monitor is not None else None
        if report is None:
            return WorkerLoad(endpoint.worker_id, endpoint.role, client.in_flight)
        return WorkerLoad(
            endpoint.worker_id,
            endpoint.role,
            client.in_flight,
            waiting=report.waiting,
            running=report.running,
            kv_usage=report.kv_usage,
            fresh=True,
            in_flight_at_report=report.in_flight_at_report,
            draining=report.draining,
        )

    async def close(self) -> None:
        """Stop the load monitor; close every channel now, retiring ones included (calls on them are cancelled)."""
        if self._monitor is not None:
            await self._monitor.stop()
        clients, self._clients = list(self._clients.values()), {}
        retiring, self._retiring = dict(self._retiring), {}
        for task in retiring:
            task.cancel()
        await asyncio.gather(*retiring, return_exceptions=True)
        for channel in [*(c.channel for c in clients), *retiring.values()]:
            await channel.close()


def rank_failed(exc: grpc.aio.AioRpcError) -> bool:
    """The call failed because of its rank or the path to it, not because of the request."""
    return exc.code() in RANK_FAILURE_CODES


def pull_failed(exc: grpc.aio.AioRpcError) -> bool:
    """The decode rank could not get the KV from the prefill rank (the service's UNAVAILABLE messages)."""
    details = exc.details() or ""
    return exc.code() == grpc.StatusCode.UNAVAILABLE and ("KV transfer" in details or "prefill rank" in details)


def why(exc: grpc.aio.AioRpcError) -> str:
    return f"{exc.code().name}: {exc.details() or 'no details'}"
