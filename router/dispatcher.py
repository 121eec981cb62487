"""``Dispatcher``: how the router runs one request on the worker ranks, and keeps it going when one fails.

Lifecycle: one per router process; ``update`` keeps its ``WorkerSet`` equal to the registry's
workers (``start_monitor`` adds their load reports, ``close`` closes every channel). For every
request ``generate`` picks the ranks and streams ``TokenEvent``s:
- colocated pool: one ``Generate`` stream on the mixed rank the policy picks;
- prefill + decode pools (any prefill or decode worker in the set): ``Prefill`` on a prefill rank
  (the first token), then ``Decode`` on a decode rank with the returned ``KvHandle`` (the rest).
  With ``kv_push`` (default) the decode rank is picked first and named in the ``Prefill``
  (``push_to``): the prefill rank pushes the KV to it layer by layer during its last forward, and
  the ``Decode`` goes there (when the handle says the push was taken) and finds the KV in place;
  otherwise, or on any retry, the decode rank pulls the KV after the prefill. A
  prefill that fails with UNAVAILABLE is retried on another prefill rank up to ``prefill_retries``
  times. A decode whose KV pull failed before any token (its prefill rank died or dropped the lease)
  is prefilled again on another prefill rank (``pull_retries`` times; the client keeps the first
  token it has and the decode starts from it with the re-prefill's sampler state, so a seeded stream
  is unchanged). A decode answered RESOURCE_EXHAUSTED (no KV blocks) goes to another decode rank
  with the same handle (the lease is still held) while one is left. Whenever no decode rank took the
  KV over (none left, the decode failed, the consumer left), the prefill rank is told to release the
  lease at once (``Abort``, bounded) instead of holding the blocks until it expires.
Every call carries a deadline (the client's, else ``request_timeout_s``): never a hang.
Migration (``migration_limit`` re-issues per request, 0 = off; Dynamo's request migration): a
``Generate`` or ``Decode`` stream that fails because its RANK failed (``rank_failed``: UNAVAILABLE,
CANCELLED by the server, a broken stream; ``StalledError``; an ``error`` delta, which a worker sends
only when its engine or group failed) goes on on another live rank of that role that has not failed
this request, from the original prompt + every token the client has (``RequestProgress``: no gap,
no duplicate, usage of the original prompt and every token); disaggregated, that extended prompt is
prefilled again (its first token is the stream's next) and decoded on another decode rank. Greedy
requests equal an uninterrupted run token for token; sampled ones continue from the same prefix with
the generator restarted from the seed (``continued_sampling`` says what a migration cannot carry).
``migrations`` counts re-issues: ``new`` (no token had reached the client) and ``ongoing``. Not
migrated: a request's own errors (INVALID_ARGUMENT, its deadline), ``n`` > 1, one that
``Dispatcher.abort`` ended. When migration is off, refused or spent, the request ends with an
``error`` event naming every rank that failed it (before any token: the gRPC error, which the
caller answers with 503).
Stall (``stall_timeout_s``, 0 = off): a started stream that sends nothing for that long is cancelled
and its rank counts as failed (a stopped process, a blackholed connection): ``WorkerClient.stream``.
Picking: the ``RoutingPolicy`` (``policy``: ``auto`` by default) chooses among the live ranks of a
role from their ``WorkerLoad``, the request's session key, and, for prefill and mixed ranks, the
``PrefixIndex``'s guess of how much of the prompt each rank has cached. Every prefill or mixed pick
is recorded in the index (per ``cache_salt``); a worker that leaves or is replaced is forgotten
there. Decode ranks go by load (auto, prefix, session). Ties take turns per role.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import Counter
from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import dataclass, field

import grpc

from k2serve.proto import worker_pb2, worker_pb2_grpc
from k2serve.proto.cluster_token import authorized
from k2serve.router.policy import RoutingPolicy, WorkerLoad, choose
from k2serve.router.prefix_index import BlockName, PrefixIndex
from k2serve.router.request_progress import RequestProgress
from k2serve.router.worker_client import (
    CHANNEL_OPTIONS,
    NoWorkerError,
    StalledError,
    TokenEvent,
    WorkerClient,
    WorkerEndpoint,
    WorkerSet,
    pull_failed,
    rank_failed,
    why,
)

RELEASE_TIMEOUT_S = 2.0  # telling a prefill rank to drop a lease nobody will pull


@dataclass
class Dispatcher:
    request_timeout_s: float = 600.0
    prefill_retries: int = 1  # a Prefill that fails with UNAVAILABLE goes to another prefill rank this often
    pull_retries: int = 1  # a Decode whose KV pull failed re-prefills on another prefill rank; 0 = fail at once
    migration_limit: int = 3  # re-issues of one request after its rank failed; 0 = off
    stall_timeout_s: float = 30.0  # a started stream silent this long counts as a dead rank; 0 = off
    kv_push: bool = True  # pick the decode rank first, so the prefill rank pushes the KV layer by layer
    policy: RoutingPolicy = field(default_factory=RoutingPolicy)  # the index keeps its first block size
    cluster_token: str | None = field(default=None, repr=False)  # carried by every call to a worker
    decisions: Counter[tuple[str, str]] = field(default_factory=Counter)  # (role, Pick.reason) -> picks, for metrics
    migrations: Counter[str] = field(default_factory=Counter)  # "ongoing" | "new" -> re-issued requests
    _workers: WorkerSet = field(init=False)
    _turns: dict[str, int] = field(default_factory=dict)  # per role: advances on every pick among several
    _running: dict[str, RequestProgress] = field(default_factory=dict)  # request id -> its progress (for abort)
    _index: PrefixIndex = field(init=False)

    def __post_init__(self) -> None:
        if self.migration_limit < 0:
            raise ValueError(f"migration_limit: must be >= 0, got {self.migration_limit}")
        if self.stall_timeout_s < 0:
            raise ValueError(f"stall_timeout_s: must be >= 0 (0 = off), got {self.stall_timeout_s}")
        self._workers = WorkerSet(retire_grace_s=self.request_timeout_s, cluster_token=self.cluster_token)
        self._index = PrefixIndex(self.policy.block_size, self.policy.max_index_entries)

    def start_monitor(self, interval_s: float = 0.5, timeout_s: float = 1.0) -> None:
        """Poll every live worker's load from now on (needs a running loop; ``close()`` stops it)."""
        self._workers.start_monitor(interval_s, timeout_s)

    async def update(self, endpoints: Iterable[WorkerEndpoint]) -> None:
        """Make the worker set equal ``endpoints`` (``WorkerSet.update``)."""
        for worker_id in self._workers.update(endpoints):
            self._index.forget(worker_id)  # gone, or a new rank at a new address with an empty cache

    @property
    def endpoints(self) -> list[WorkerEndpoint]:
        return self._workers.endpoints

    def loads(self, role: str | None = None) -> list[WorkerLoad]:
        """What the policy sees of every live worker (of ``role``) now."""
        return self._workers.loads(role)

    @property
    def disaggregated(self) -> bool:
        """Any prefill or decode worker: requests take the two-step path (a missing role is named)."""
        return bool(self._workers.roles & {"prefill", "decode"})

    def _pick(self, role: str, call: _Call, exclude: Iterable[str] = ()) -> WorkerClient:
        """The policy's rank of ``role`` for ``call``; a prefill or mixed pick is recorded in the index."""
        candidates = {c.worker_id: c for c in self._workers.live(role, exclude)}
        turn = self._turns.get(role, 0)
        if len(candidates) > 1:
            self._turns[role] = turn + 1
        prefix_role = role != "decode"
        pick = choose(
            self.policy,
            role,
            [self._workers.load(c) for c in candidates.values()],
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
        progress = RequestProgress(prompt, sampling, tracks=_choices(sampling) == 1)
        disaggregated = self.disaggregated
        if disaggregated:
            self._workers.live("decode")  # no decode worker: fail before the prefill pins blocks for nobody
        self._running[request_id] = progress
        try:
            # closing this generator closes the inner one now (not whenever it is collected): its cleanup
            # (the in-flight counts, a lease nobody will pull) runs before aclose() returns
            async with contextlib.aclosing(self._attempts(call, progress, disaggregated)) as events:
                async for event in events:
                    yield event
        finally:
            if self._running.get(request_id) is progress:
                del self._running[request_id]

    async def _attempts(
        self, call: _Call, progress: RequestProgress, disaggregated: bool
    ) -> AsyncGenerator[TokenEvent, None]:
        """Attempts of ``call`` until one ends it: the first, then one per migration."""
        while True:
            if progress.spent:  # every token the request may have was sent before its rank failed
                yield progress.final_event("length")
                return
            prompt, sampling = progress.next_attempt()
            attempt = dataclasses.replace(call, prompt=prompt, sampling=sampling)
            run = self._disaggregated(attempt, progress) if disaggregated else self._colocated(attempt, progress)
            try:
                async with contextlib.aclosing(run) as events:
                    async for event in events:
                        yield event
                return
            except _CallFailed as failed:
                failure = failed
            except (grpc.aio.AioRpcError, NoWorkerError) as exc:
                if not progress.sent:
                    raise  # nothing reached the client yet: the caller answers it (503, 400, ...)
                failure = _CallFailed(str(exc) if isinstance(exc, NoWorkerError) else why(exc), "")
            progress.failures.append(failure.reason)
            if progress.aborted:  # Dispatcher.abort: a call it ended is no failure to migrate
                yield TokenEvent((), "abort", "; ".join(progress.failures))
                return
            refusal = self._migrate(progress, failure)
            if refusal is None:
                continue
            if failure.rpc_error is not None and not progress.sent:
                raise _combined(failure.rpc_error, progress.failures)
            yield TokenEvent((), "error", "; ".join([*progress.failures, refusal] if refusal else progress.failures))
            return

    def _migrate(self, progress: RequestProgress, failure: _CallFailed) -> str | None:
        """None when the request goes on on another rank (counted); else why not ("" = migration off)."""
        if not failure.role:
            return ""
        progress.failed_ranks.add(failure.worker_id)
        if not self.migration_limit or not progress.tracks:
            return ""
        if progress.migrations >= self.migration_limit:
            return f"gave up after {self.migration_limit} migrations"
        if not self._workers.has(failure.role, progress.failed_ranks):
            return f"no other live {failure.role} rank to migrate to"
        progress.migrations += 1
        self.migrations["ongoing" if progress.sent else "new"] += 1
        return None

    async def _colocated(self, call: _Call, progress: RequestProgress) -> AsyncGenerator[TokenEvent, None]:
        client = self._pick("mixed", call, progress.failed_ranks)
        request = worker_pb2.GenerateRequest(
            request_id=call.request_id,
            prompt_token_ids=list(call.prompt),
            sampling=call.sampling,
            cache_salt=call.cache_salt,
        )
        where = f"mixed rank {client.worker_id}"
        client.in_flight += 1
        try:
            stream = client.stream(client.stub.Generate(request, timeout=call.timeout_s), self.stall_timeout_s)
            async with contextlib.aclosing(stream) as deltas:  # leaving early cancels the call now
                async for delta in deltas:
                    if delta.finish_reason == "error":
                        raise _CallFailed.engine(where, delta, "mixed", client.worker_id)
                    yield progress.event(delta)
        except grpc.aio.AioRpcError as exc:
            if not rank_failed(exc) and not progress.sent:
                raise  # the request's own error, before any token: the caller answers it (400, 504, ...)
            role = "mixed" if rank_failed(exc) else ""
            raise _CallFailed(f"{where}: {why(exc)}", role, client.worker_id, exc) from exc
        except StalledError as exc:
            raise _CallFailed(f"{where}: {exc}", "mixed", client.worker_id) from exc
        finally:
            client.in_flight -= 1

    async def _disaggregated(self, call: _Call, progress: RequestProgress) -> AsyncGenerator[TokenEvent, None]:
        request_id = call.request_id
        target = self._pick("decode", call, progress.failed_ranks) if self.kv_push else None
        try:
            prefill, first = await self._prefill(call, exclude=progress.failed_ranks, push_to=target)
        except BaseException as exc:
            if target is not None:  # the push it may have taken goes now, and a late one is refused
                await self._release(target, request_id)
            if not isinstance(exc, grpc.aio.AioRpcError) or not progress.sent:
                raise
            raise _CallFailed(f"re-prefill failed: {why(exc)}", "", rpc_error=exc) from exc
        if first.finish_reason:  # no lease: nothing to decode
            if target is not None:  # a push the decode rank may have taken (and even received) goes now
                await self._release(target, request_id)
            yield progress.first_event(first)
            return
        handed_over = False  # the decode rank has the KV (it released the lease itself)
        pushed = self._pushed_to(target, first.kv, progress)  # holds blocks for the pushed KV until claimed
        tried = [prefill.worker_id]
        first_token_id = first.first_token_id  # the client has it: a re-prefill keeps it
        try:
            yield progress.first_event(first)  # a consumer that leaves here still gets the lease released
            while True:
                cached_tokens = first.usage.cached_tokens  # the prefill rank's prefix-cache hit
                first_try = pushed is not None and len(tried) == 1 and pushed.worker_id not in progress.failed_ranks
                # the first try goes where the KV was pushed; a retry (another decode rank, a re-prefill) pulls
                decode = (
                    pushed if first_try and pushed is not None else self._pick("decode", call, progress.failed_ranks)
                )
                where = f"decode rank {decode.worker_id}"
                decode_request = worker_pb2.DecodeRequest(
                    request_id=request_id,
                    prompt_token_ids=list(call.prompt),
                    sampling=call.sampling,
                    first_token_id=first_token_id,
                    kv=first.kv,
                    sampler_state=first.sampler_state,
                    cache_salt=call.cache_salt,
                )
                decode.in_flight += 1
                try:
                    stream = decode.stream(
                        decode.stub.Decode(decode_request, timeout=call.timeout_s), self.stall_timeout_s
                    )
                    async with contextlib.aclosing(stream) as deltas:
                        async for delta in deltas:
                            handed_over = True  # a delta comes only after the pull (and its release) is done
                            if delta.finish_reason == "error":
                                raise _CallFailed.engine(where, delta, "decode", decode.worker_id)
                            if delta.HasField("usage"):
                                delta.usage.cached_tokens = max(delta.usage.cached_tokens, cached_tokens)
                            yield progress.event(delta)
                    return
                except grpc.aio.AioRpcError as exc:
                    failed = f"{where}: {why(exc)}"
                    if not handed_over and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        progress.failures.append(failed)  # no KV blocks there: the same handle elsewhere
                        progress.failed_ranks.add(decode.worker_id)
                        if not self._workers.has("decode", progress.failed_ranks):
                            raise _CallFailed("no other live decode rank to take the request", "") from exc
                        continue
                    if handed_over or not pull_failed(exc):
                        raise _CallFailed(failed, "decode" if rank_failed(exc) else "", decode.worker_id) from exc
                    if len(tried) > self.pull_retries:
                        raise _CallFailed(failed, "") from exc
                except StalledError as exc:
                    raise _CallFailed(f"{where}: {exc}", "decode", decode.worker_id) from exc
                finally:
                    decode.in_flight -= 1
                # the KV could not be pulled (its prefill rank died or dropped it): prefill it again elsewhere
                await self._release(prefill, request_id)
                progress.failures.append(failed)
                try:
                    prefill, first = await self._prefill(call, exclude=[*progress.failed_ranks, *tried])
                except (grpc.aio.AioRpcError, NoWorkerError) as exc:
                    reason = why(exc) if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                    raise _CallFailed(f"re-prefill failed: {reason}", "") from exc
                tried.append(prefill.worker_id)
                if first.finish_reason:  # a sampled re-prefill that ended at once: no KV to hand over
                    raise _CallFailed(f"the re-prefill ended the request ({first.finish_reason})", "")
        finally:
            if not handed_over:
                await self._release(prefill, request_id)
                if pushed is not None:  # its push, if no Decode claimed it, goes now (not at its expiry)
                    await self._release(pushed, request_id)

    def _pushed_to(
        self, target: WorkerClient | None, handle: worker_pb2.KvHandle, progress: RequestProgress
    ) -> WorkerClient | None:
        """The decode rank the prefill rank pushed the KV to, while it is still live and unfailed."""
        if target is None or handle.pushed_to != target.worker_id or target.worker_id in progress.failed_ranks:
            return None
        return target if self._workers.get(target.worker_id) is target else None

    async def _prefill(
        self, call: _Call, exclude: Sequence[str] | set[str] = (), push_to: WorkerClient | None = None
    ) -> tuple[WorkerClient, worker_pb2.PrefillResponse]:
        request = worker_pb2.PrefillRequest(
            request_id=call.request_id,
            prompt_token_ids=list(call.prompt),
            sampling=call.sampling,
            cache_salt=call.cache_salt,
        )
        if push_to is not None:
            request.push_to.worker_id = push_to.worker_id
            request.push_to.address = push_to.endpoint.address
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
        """Best effort, bounded: the prefill rank drops the request's lease (a decode rank, a push it took).
        A worker that left the set (draining, say) still holds it, but its retiring channel takes no new
        call: use a short-lived one."""
        abort = worker_pb2.AbortRequest(request_id=request_id)
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
            live = self._workers.get(prefill.worker_id)
            if live is not None and live is prefill:
                await live.stub.Abort(abort, timeout=RELEASE_TIMEOUT_S)
                return
            async with grpc.aio.insecure_channel(prefill.endpoint.address, options=CHANNEL_OPTIONS) as channel:
                stub = authorized(worker_pb2_grpc.WorkerStub(channel), self.cluster_token)
                await stub.Abort(abort, timeout=RELEASE_TIMEOUT_S)

    async def abort(self, request_id: str) -> None:
        """Best effort on every worker (the request may be on any of them); bounded. A call this ends
        (a Decode waiting for blocks answers CANCELLED) ends the request: it is not migrated."""
        progress = self._running.get(request_id)
        if progress is not None:
            progress.aborted = True
        abort = worker_pb2.AbortRequest(request_id=request_id)
        await asyncio.gather(*(c.stub.Abort(abort, timeout=2.0) for c in self._workers.clients), return_exceptions=True)

    async def close(self) -> None:
        """Stop the load monitor; close every channel now, retiring ones included (calls on them are cancelled)."""
        await self._workers.close()


class _CallFailed(Exception):
    """One attempt of a request failed. ``role`` (with ``worker_id``): the rank of that role failed and
    the request may go on on another; "" = it may not (a refused request, a failed re-prefill)."""

    def __init__(
        self, reason: str, role: str, worker_id: str = "", rpc_error: grpc.aio.AioRpcError | None = None
    ) -> None:
        super().__init__(reason)
        self.reason, self.role, self.worker_id, self.rpc_error = reason, role, worker_id, rpc_error

    @classmethod
    def engine(cls, where: str, delta: worker_pb2.TokenDelta, role: str, worker_id: str) -> _CallFailed:
        """An ``error`` delta: workers send one only when their engine or group failed."""
        return cls(f"{where}: {delta.error or 'no details'}", role, worker_id)


def _combined(error: grpc.aio.AioRpcError, failures: list[str]) -> grpc.aio.AioRpcError:
    """``error`` itself after one failure; after several, its code with every rank's reason."""
    if len(failures) == 1:
        return error
    return grpc.aio.AioRpcError(error.code(), grpc.aio.Metadata(), grpc.aio.Metadata(), "; ".join(failures))


def _choices(sampling: worker_pb2.SamplingParams) -> int:
    return sampling.n if sampling.HasField("n") else 1


@dataclass(frozen=True)
class _Call:
    """One request as the dispatcher sends it (an attempt of a migrated one: the extended prompt)."""

    request_id: str
    prompt: tuple[int, ...]
    sampling: worker_pb2.SamplingParams
    cache_salt: str
    timeout_s: float
    session_key: str | None = None
    blocks: tuple[BlockName, ...] = ()  # the ORIGINAL prompt's prefix-index names (empty when the policy needs none)
