"""``WorkerClient`` and ``Dispatcher``: how the router reaches workers and runs one request on them.

Lifecycle: the router keeps one ``WorkerClient`` (a gRPC channel) per live worker address, from the
registry's worker set (``Dispatcher.update``). A worker that leaves the set (dead, draining,
replaced) gets no new request at once; its channel is closed only after the calls already on it
have ended (each has its own deadline, so this is bounded by ``request_timeout_s``): closing it
earlier would cancel them, and a locally cancelled gRPC call raises ``CancelledError`` in the
request's task, i.e. the request would end without an outcome. ``close()`` closes every channel.
For every request ``Dispatcher.generate`` picks the ranks and streams ``TokenEvent``s:
- colocated pool: one ``Generate`` stream on the mixed rank the policy picks;
- prefill + decode pools (any prefill or decode worker in the set): ``Prefill`` on a prefill rank
  (the first token), then ``Decode`` on a decode rank with the returned ``KvHandle`` (the rest). A
  prefill that fails with UNAVAILABLE (rank dead, draining or its group failed) is retried on
  another prefill rank up to ``prefill_retries`` times; a decode that fails ends the request with
  ``finish_reason`` ``error`` and the reason (the decode rank and the status code), except a decode
  whose KV pull failed before any token (its prefill rank died or dropped the lease): that request
  is prefilled again on another prefill rank (``pull_retries`` times; the client keeps the first
  token it already has, the decode starts from it) — never a hang:
  every call carries a deadline. Whenever the decode rank did not take the KV over (no decode
  worker, the decode failed, the consumer left), the prefill rank is told to release its lease at
  once (``Abort``, bounded) instead of holding the blocks until the lease expires.
Picking: the ``RoutingPolicy`` (``policy``: ``auto`` by default) chooses among the live ranks of a
role from their ``WorkerLoad`` (the calls in flight counted here, plus each rank's ``GetLoad``
report once ``start_monitor()`` runs a ``LoadMonitor``; ``close()`` stops it), the request's
session key, and, for prefill and mixed ranks, the ``PrefixIndex``'s guess of how much of the prompt
each rank has cached. Every prefill or mixed pick is recorded in the index (per ``cache_salt``); a
worker that leaves or is replaced is forgotten there. Decode ranks go by load (auto, prefix,
session). Ties take turns per role.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import dataclass, field

import grpc

from k2serve.proto import worker_pb2, worker_pb2_grpc
from k2serve.router.load_monitor import LoadMonitor
from k2serve.router.policy import RoutingPolicy, WorkerLoad, choose
from k2serve.router.prefix_index import BlockName, PrefixIndex

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
    logprobs: tuple[worker_pb2.TokenLogprob, ...] = ()  # one per id when the sampling asks for them


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

    @property
    def worker_id(self) -> str:
        return self.endpoint.worker_id

    async def get_load(self, timeout_s: float) -> worker_pb2.Load:
        return await self.stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=timeout_s)


RELEASE_TIMEOUT_S = 2.0  # telling a prefill rank to drop a lease nobody will pull


@dataclass
class Dispatcher:
    request_timeout_s: float = 600.0
    prefill_retries: int = 1  # a Prefill that fails with UNAVAILABLE goes to another prefill rank this often
    pull_retries: int = 1  # a Decode whose KV pull failed re-prefills on another prefill rank; 0 = fail at once
    policy: RoutingPolicy = field(default_factory=RoutingPolicy)  # the index keeps its first block size
    decisions: Counter[tuple[str, str]] = field(default_factory=Counter)  # (role, Pick.reason) -> picks, for metrics
    _clients: dict[str, WorkerClient] = field(default_factory=dict)
    _turns: dict[str, int] = field(default_factory=dict)  # per role: advances on every pick among several
    _retiring: dict[asyncio.Task[None], grpc.aio.Channel] = field(default_factory=dict)  # closing after their calls
    _index: PrefixIndex = field(init=False)
    _monitor: LoadMonitor | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self._index = PrefixIndex(self.policy.block_size, self.policy.max_index_entries)

    def start_monitor(self, interval_s: float = 0.5, timeout_s: float = 1.0) -> None:
        """Poll every live worker's load from now on (needs a running loop; ``close()`` stops it)."""
        if self._monitor is None:
            self._monitor = LoadMonitor(
                lambda: list(self._clients.values()), interval_s=interval_s, timeout_s=timeout_s
            )
        self._monitor.start()

    async def update(self, endpoints: Iterable[WorkerEndpoint]) -> None:
        """Make the client set equal ``endpoints``; the channels of workers that left close once their
        calls have ended (at most ``request_timeout_s`` from now)."""
        wanted = {e.worker_id: e for e in endpoints}
        for worker_id in list(self._clients):
            client = self._clients[worker_id]
            if worker_id not in wanted or wanted[worker_id] != client.endpoint:
                del self._clients[worker_id]
                self._retire(client)
                self._index.forget(worker_id)  # gone, or a new rank at a new address with an empty cache
                if self._monitor is not None:
                    self._monitor.forget(worker_id)
        for worker_id, endpoint in wanted.items():
            if worker_id not in self._clients:
                self._clients[worker_id] = WorkerClient.connect(endpoint)

    def _retire(self, client: WorkerClient) -> None:
        task = asyncio.get_running_loop().create_task(
            client.channel.close(grace=self.request_timeout_s), name=f"retire-{client.endpoint.worker_id}"
        )
        self._retiring[task] = client.channel
        task.add_done_callback(lambda done: self._retiring.pop(done, None))

    @property
    def endpoints(self) -> list[WorkerEndpoint]:
        return [c.endpoint for c in self._clients.values()]

    def loads(self, role: str | None = None) -> list[WorkerLoad]:
        """What the policy sees of every live worker (of ``role``) now."""
        return [self._load(c) for c in self._clients.values() if role is None or c.endpoint.role == role]

    def _load(self, client: WorkerClient) -> WorkerLoad:
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

    def _live(self, role: str, exclude: Sequence[str] = ()) -> list[WorkerClient]:
        candidates = [c for c in self._clients.values() if c.endpoint.role == role and c.worker_id not in exclude]
        if not candidates:
            raise NoWorkerError(f"no live {role} worker")
        return candidates

    def _pick(self, role: str, call: _Call, exclude: Sequence[str] = ()) -> WorkerClient:
        """The policy's rank of ``role`` for ``call``; a prefill or mixed pick is recorded in the index."""
        candidates = {c.worker_id: c for c in self._live(role, exclude)}
        turn = self._turns.get(role, 0)
        if len(candidates) > 1:
            self._turns[role] = turn + 1
        prefix_role = role != "decode"
        pick = choose(
            self.policy,
            role,
            [self._load(c) for c in candidates.values()],
            turn=turn,
            matched_tokens=self._index.match_hashes(call.blocks) if prefix_role else None,
            session_key=call.session_key,
            prompt_tokens=len(call.prompt),
        )
        self.decisions[(role, pick.reason)] += 1
        chosen = candidates[pick.worker_id]
        if prefix_role:
            self._index.record_hashes(call.blocks, chosen.worker_id)
        return chosen

    @property
    def disaggregated(self) -> bool:
        """Any prefill or decode worker: requests take the two-step path (a missing role is named)."""
        roles = {c.endpoint.role for c in self._clients.values()}
        return bool(roles & {"prefill", "decode"})

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling: worker_pb2.SamplingParams,
        *,
        cache_salt: str = "",
        timeout_s: float | None = None,
        session_key: str | None = None,
    ) -> AsyncGenerator[TokenEvent, None]:
        """The request's token events; ``timeout_s`` (the client's deadline) bounds every call it makes;
        ``session_key`` (multi-turn affinity) and the prompt under ``cache_salt`` steer the pick."""
        prompt = tuple(prompt_token_ids)
        call = _Call(
            request_id,
            prompt,
            sampling,
            cache_salt,
            timeout_s or self.request_timeout_s,
            session_key or None,
            self._index.hashes(prompt, cache_salt) if self.policy.uses_prefix_index else (),
        )
        run = self._disaggregated if self.disaggregated else self._colocated
        # closing this generator closes the inner one now (not whenever it is collected): its cleanup
        # (the in-flight counts, a lease nobody will pull) runs before aclose() returns
        async with contextlib.aclosing(run(call)) as events:
            async for event in events:
                yield event

    async def _colocated(self, call: _Call) -> AsyncGenerator[TokenEvent, None]:
        client = self._pick("mixed", call)
        request = worker_pb2.GenerateRequest(
            request_id=call.request_id,
            prompt_token_ids=list(call.prompt),
            sampling=call.sampling,
            cache_salt=call.cache_salt,
        )
        client.in_flight += 1
        try:
            async for delta in client.stub.Generate(request, timeout=call.timeout_s):
                yield _event(delta, f"worker {client.endpoint.worker_id}")
        finally:
            client.in_flight -= 1

    async def _disaggregated(self, call: _Call) -> AsyncGenerator[TokenEvent, None]:
        request_id = call.request_id
        self._live("decode")  # no decode worker: fail before the prefill pins blocks for nobody
        prefill, first = await self._prefill(call)
        if first.finish_reason:
            yield TokenEvent(
                (first.first_token_id,), first.finish_reason, usage=first.usage, logprobs=_first_logprobs(first)
            )
            return
        handed_over = False  # the decode rank has the KV (it released the lease itself)
        tried = [prefill.endpoint.worker_id]
        first_token_id = first.first_token_id
        try:
            yield TokenEvent((first.first_token_id,), logprobs=_first_logprobs(first))
            cached_tokens = first.usage.cached_tokens  # the prefill rank's prefix-cache hit
            while True:
                decode = self._pick("decode", call)
                decode_request = worker_pb2.DecodeRequest(
                    request_id=request_id,
                    prompt_token_ids=list(call.prompt),
                    sampling=call.sampling,
                    first_token_id=first_token_id,  # the client has it: a re-prefill keeps it
                    kv=first.kv,
                    sampler_state=first.sampler_state,
                    cache_salt=call.cache_salt,
                )
                decode.in_flight += 1
                try:
                    async for delta in decode.stub.Decode(decode_request, timeout=call.timeout_s):
                        handed_over = True  # a delta comes only after the pull (and its release) is done
                        if delta.HasField("usage"):
                            delta.usage.cached_tokens = max(delta.usage.cached_tokens, cached_tokens)
                        yield _event(delta, f"decode rank {decode.endpoint.worker_id}")
                    return
                except grpc.aio.AioRpcError as exc:
                    if handed_over or not _pull_failed(exc) or len(tried) > self.pull_retries:
                        yield TokenEvent((), "error", f"decode rank {decode.endpoint.worker_id}: {_why(exc)}")
                        return
                    failed = f"decode rank {decode.endpoint.worker_id}: {_why(exc)}"
                finally:
                    decode.in_flight -= 1
                # the KV could not be pulled (its prefill rank died or dropped it): prefill it again elsewhere
                await self._release(prefill, request_id)
                try:
                    prefill, first = await self._prefill(call, exclude=tried)
                except (grpc.aio.AioRpcError, NoWorkerError) as exc:
                    why = _why(exc) if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                    yield TokenEvent((), "error", f"{failed}; re-prefill failed: {why}")
                    return
                tried.append(prefill.endpoint.worker_id)
                cached_tokens = first.usage.cached_tokens
                if first.finish_reason:  # a sampled re-prefill that ended at once: no KV to hand over
                    yield TokenEvent((), "error", f"{failed}; the re-prefill ended the request ({first.finish_reason})")
                    return
        finally:
            if not handed_over:
                await self._release(prefill, request_id)

    async def _prefill(
        self, call: _Call, exclude: Sequence[str] = ()
    ) -> tuple[WorkerClient, worker_pb2.PrefillResponse]:
        request = worker_pb2.PrefillRequest(
            request_id=call.request_id,
            prompt_token_ids=list(call.prompt),
            sampling=call.sampling,
            cache_salt=call.cache_salt,
        )
        tried: list[str] = list(exclude)
        while True:
            prefill = self._pick("prefill", call, exclude=tried)
            prefill.in_flight += 1
            try:
                return prefill, await prefill.stub.Prefill(request, timeout=call.timeout_s)
            except grpc.aio.AioRpcError as exc:
                tried.append(prefill.endpoint.worker_id)
                if exc.code() != grpc.StatusCode.UNAVAILABLE or len(tried) - len(exclude) > self.prefill_retries:
                    raise
            finally:
                prefill.in_flight -= 1

    async def _release(self, prefill: WorkerClient, request_id: str) -> None:
        """Best effort, bounded: the prefill rank drops the request's lease. A worker that left the set
        (draining, say) still holds it, but its retiring channel takes no new call: use a short-lived one."""
        abort = worker_pb2.AbortRequest(request_id=request_id)
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
            if self._clients.get(prefill.endpoint.worker_id) is prefill:
                await prefill.stub.Abort(abort, timeout=RELEASE_TIMEOUT_S)
                return
            async with grpc.aio.insecure_channel(prefill.endpoint.address, options=_CHANNEL_OPTIONS) as channel:
                await worker_pb2_grpc.WorkerStub(channel).Abort(abort, timeout=RELEASE_TIMEOUT_S)

    async def abort(self, request_id: str) -> None:
        """Best effort on every worker (the request may be on any of them); bounded."""
        calls = [
            c.stub.Abort(worker_pb2.AbortRequest(request_id=request_id), timeout=2.0) for c in self._clients.values()
        ]
        await asyncio.gather(*calls, return_exceptions=True)

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


def _pull_failed(exc: grpc.aio.AioRpcError) -> bool:
    """The decode rank could not get the KV from the prefill rank (the service's UNAVAILABLE messages)."""
    details = exc.details() or ""
    return exc.code() == grpc.StatusCode.UNAVAILABLE and ("KV transfer" in details or "prefill rank" in details)


def _why(exc: grpc.aio.AioRpcError) -> str:
    return f"{exc.code().name}: {exc.details() or 'no details'}"


def _event(delta: worker_pb2.TokenDelta, where: str) -> TokenEvent:
    """The delta as an event; an error names the worker it came from."""
    usage = delta.usage if delta.HasField("usage") else None
    error = f"{where}: {delta.error or 'no details'}" if delta.finish_reason == "error" else delta.error
    return TokenEvent(tuple(delta.token_ids), delta.finish_reason, error, usage, tuple(delta.logprobs))


def _first_logprobs(first: worker_pb2.PrefillResponse) -> tuple[worker_pb2.TokenLogprob, ...]:
    return tuple(first.first_logprobs)


@dataclass(frozen=True)
class _Call:
    """One request as the dispatcher sends it."""

    request_id: str
    prompt: tuple[int, ...]
    sampling: worker_pb2.SamplingParams
    cache_salt: str
    timeout_s: float
    session_key: str | None = None
    blocks: tuple[BlockName, ...] = ()  # the prompt's prefix-index names (empty when the policy needs none)
