"""One rank's engine: many concurrent requests -> batched forward passes -> token-delta events.

Lifecycle: ``Engine(model, kv_cache, config)`` wires a block pool, a KV cache manager, a scheduler
and a sampler around a loaded model and its allocated cache. Callers ``add_request`` (validated at
once; a bad request never reaches a step), ``abort`` at any time, and call ``step()`` repeatedly;
each step schedules, runs one forward pass, samples and returns ``RequestOutput`` deltas. ``step``
is synchronous and does no I/O; ``engine_loop.EngineLoop`` drives it for the service.

Every request ends in exactly one terminal state and its last delta carries ``finish_reason`` and
usage (prompt, completion and cached prompt tokens). A request with ``n > 1`` fans out into ``n``
children ``{id}#{i}``: child 0 prefills the prompt, the others then share its full prompt blocks
(``KvCacheManager.fork``) and compute only the partial last block.

In an expert-parallel group (``lockstep`` given) every ``step()`` is a collective: the ranks agree
on their token counts first, and a rank with nothing scheduled runs the model's empty step while
any peer has work. If a collective fails (``GroupError``: a peer died or is stuck), every request
of this rank ends with ``finish_reason`` ``error`` and the group's message, the engine refuses new
requests (``EngineFailedError``), and its owner must restart the rank. ``fail(reason)`` does the same
for an owner that declares the engine dead (``EngineLoop``: too many failed steps in a row).

Disaggregated serving (prefill and decode on different ranks):
- prefill role: ``add_request(..., hold_kv=True)`` with ``max_tokens=1``; when the request ends, its
  prompt's blocks stay pinned (``held_kv``: block ids, token count, the sampler's generator state)
  until ``release_kv`` — the KV transfer reads them meanwhile, from another thread: pinned blocks
  are never written or reallocated;
- decode role: ``reserve_kv(request_id, num_tokens)`` allocates the blocks the transfer writes into
  (from another thread: no step touches a reservation), then ``add_prefilled_request`` admits the
  request with its prompt already computed and its first token already sampled, straight into the
  running batch (a waiting request holds no blocks); it decodes from there, and a preemption
  recomputes everything locally. ``cancel_reservation`` gives the blocks back
  when the transfer fails.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from k2serve.workers.block_pool import BlockPool
from k2serve.workers.engine_observer import EngineObserver, NullObserver
from k2serve.workers.kv_cache_manager import KvCacheManager
from k2serve.workers.kv_progress import LayerProgress
from k2serve.workers.lockstep import Lockstep
from k2serve.workers.model.forward_batch import make_forward_batch
from k2serve.workers.model.model import KimiK2ForCausalLM
from k2serve.workers.parallel import GroupError
from k2serve.workers.request import Request, RequestStatus, RequestValidationError
from k2serve.workers.sampler import Sampler, SamplingState
from k2serve.workers.sampling_params import SamplingParams, SamplingParamsError
from k2serve.workers.scheduler import Scheduler, SchedulerConfig, SchedulerOutput


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    max_model_len: int = 4096  # prompt + output tokens of one request
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    enable_prefix_caching: bool = True
    stop_token_ids: tuple[int, ...] = ()  # the model's own stops (Kimi: <|im_end|>, [EOS]); ignore_eos skips them

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {self.block_size}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len: must be >= 2, got {self.max_model_len}")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache (or shared with an n > 1 sibling)
    transferred_tokens: int = 0  # prompt tokens whose KV came from a prefill rank (disaggregated decode)


@dataclass(frozen=True)
class HeldKv:
    """A prefilled request's pinned prompt blocks (prefill role), until ``release_kv``."""

    request_id: str
    block_ids: tuple[int, ...]
    num_tokens: int  # prompt tokens whose rows the blocks hold
    first_token_id: int
    sampler_state: bytes  # generator state after the first token (b"" when it did not draw)


@dataclass(frozen=True)
class RequestOutput:
    """A token delta of one choice of one request."""

    request_id: str
    index: int  # choice index (n > 1)
    new_token_ids: tuple[int, ...]
    logprobs: tuple[object, ...] | None = None  # the sampler's per-token logprob records
    finish_reason: str | None = None  # stop | length | abort | error; set on the last delta only
    usage: Usage | None = None  # set on the last delta only
    error: str | None = None  # why, when finish_reason is "error"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class EngineFailedError(RuntimeError):
    """The engine failed (its expert-parallel group broke, or its owner declared it dead); it takes no
    more requests."""


class Engine:
    def __init__(
        self,
        model: KimiK2ForCausalLM,
        kv_cache: Sequence[torch.Tensor],
        config: EngineConfig,
        *,
        lockstep: Lockstep | None = None,
    ) -> None:
        num_blocks, block_size = kv_cache[0].shape[0], kv_cache[0].shape[1]
        if block_size != config.block_size:
            raise ValueError(f"block_size: the cache has blocks of {block_size}, the config says {config.block_size}")
        self.model = model
        self.kv_cache = list(kv_cache)
        self.config = config
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching=config.enable_prefix_caching)
        self.kv = KvCacheManager(self.pool)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self.sampler = Sampler()
        self.lockstep = lockstep
        self.observer: EngineObserver = NullObserver()  # metrics; the owner replaces it
        self.failure: str | None = None  # why this engine stopped for good (group error, dead engine)
        # test-only fault hook (workers.fault_plan) run right before each forward pass: raising there
        # fails the step as a failed forward would
        self.before_forward: Callable[[], None] | None = None
        # test/bench hook: emulated device time of a forward over this many tokens (fault_plan's
        # step_ms_per_token), so that capacity scales with ranks on a machine without accelerators
        self.device_delay: Callable[[int], None] | None = None
        self.busy_s = 0.0  # seconds spent in steps that ran this rank's requests (utilization = its rate)
        self.num_steps = 0  # steps that ran the model here: forward passes, and empty steps in a group
        self._requests: dict[str, Request] = {}  # live children by id
        self._children: dict[str, list[str]] = {}  # parent id -> child ids
        self._pending_siblings: dict[str, list[Request]] = {}  # child-0 id -> siblings waiting for its prompt
        self._finished: list[RequestOutput] = []  # terminal deltas produced outside a step (aborts)
        self._held: dict[str, HeldKv] = {}  # prefill role: pinned prompt blocks by request id
        self._reserved: set[str] = set()  # decode role: request ids holding blocks for an incoming transfer
        self._arrivals = 0

    # ---- admission -------------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        hold_kv: bool = False,
        kv_progress: LayerProgress | None = None,
    ) -> None:
        """Validate and queue a request; raises ``RequestValidationError``/``SamplingParamsError`` naming the field,
        ``EngineFailedError`` after a group failure. ``hold_kv``: the prefill role (module docstring);
        ``kv_progress`` (with ``hold_kv``): told when the prompt's last forward writes each layer."""
        if self.failure is not None:
            raise EngineFailedError(f"this rank's engine failed: {self.failure}")
        prompt = self._validate(request_id, prompt_token_ids, params)
        if hold_kv and params.n != 1:
            raise RequestValidationError("n", "a prefill for disaggregated decoding takes n = 1")
        if kv_progress is not None and not hold_kv:
            raise RequestValidationError("kv_progress", "only a prefill that holds its KV (hold_kv) reports progress")
        max_tokens = params.max_tokens if params.max_tokens is not None else self.config.max_model_len - len(prompt)
        children = [
            self._make_child(request_id, i, prompt, params, max_tokens, priority, cache_salt) for i in range(params.n)
        ]
        children[0].hold_kv = hold_kv
        children[0].kv_progress = kv_progress
        self._children[request_id] = [c.request_id for c in children]
        for child in children:
            self._requests[child.request_id] = child
        self.scheduler.add(children[0])
        if len(children) > 1:
            self._pending_siblings[children[0].request_id] = children[1:]

    def _validate(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams) -> tuple[int, ...]:
        if not isinstance(request_id, str) or not request_id:
            raise RequestValidationError("request_id", "must be a non-empty string")
        if request_id in self._children or request_id in self._held:
            raise RequestValidationError("request_id", f"{request_id!r} is already running")
        prompt = tuple(int(t) for t in prompt_token_ids)
        if not prompt:
            raise RequestValidationError("prompt_token_ids", "the prompt is empty")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise RequestValidationError("prompt_token_ids", f"ids {bad[:5]} are outside the vocabulary of {vocab}")
        limit = self.config.max_model_len
        if len(prompt) >= limit:
            raise RequestValidationError(
                "prompt_token_ids", f"the prompt has {len(prompt)} tokens; the context limit is {limit}"
            )
        if params.max_tokens is not None and len(prompt) + params.max_tokens > limit:
            raise RequestValidationError(
                "max_tokens",
                f"{len(prompt)} prompt + {params.max_tokens} max_tokens exceeds the context limit of {limit}",
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - len(prompt)
        needed = -(-(len(prompt) + max_tokens) // self.config.block_size)
        if needed > self.pool.num_blocks:  # it could never fit, so it would wait forever: refuse it now
            raise RequestValidationError(
                "max_tokens",
                f"{len(prompt)} + {max_tokens} tokens need {needed} KV blocks; this rank has {self.pool.num_blocks}",
            )
        params.validate(vocab)
        return prompt

    def _make_child(
        self,
        request_id: str,
        index: int,
        prompt: tuple[int, ...],
        params: SamplingParams,
        max_tokens: int,
        priority: int,
        cache_salt: str | None,
    ) -> Request:
        child_params = params.for_child(index) if params.n > 1 else params
        stop_ids = set(child_params.stop_token_ids)
        if not child_params.ignore_eos:
            stop_ids.update(self.config.stop_token_ids)
        self._arrivals += 1
        return Request(
            request_id=request_id if params.n == 1 else f"{request_id}#{index}",
            prompt_token_ids=prompt,
            params=child_params,
            max_tokens=max_tokens,
            sampling=SamplingState.create(child_params, prompt, stop_ids_for_min_tokens=tuple(sorted(stop_ids))),
            stop_ids=frozenset(stop_ids),
            arrival=self._arrivals,
            priority=priority,
            cache_salt=cache_salt,
            parent_id=request_id,
            index=index,
        )

    # ---- abort -----------------------------------------------------------------------------------------------

    def abort(self, request_id: str) -> bool:
        """Abort every choice of ``request_id``; frees its blocks at once. False if unknown or done."""
        return self._end(request_id, RequestStatus.FINISHED_ABORTED, None)

    def _end(self, request_id: str, status: RequestStatus, error: str | None) -> bool:
        child_ids = self._children.pop(request_id, None)
        if child_ids is None:
            return False
        for cid in child_ids:
            child = self._requests.pop(cid, None)
            if child is None:
                continue
            self._pending_siblings.pop(cid, None)
            if child.kv_progress is not None:
                child.kv_progress.fail(error or f"the prefill ended: {status.value}")
            self.scheduler.finish(child, status)
            self.observer.on_finished(child, status)
            self._finished.append(dataclasses.replace(self._final_output(child, (), None), error=error))
        return True

    def _fail_group(self, exc: GroupError, outputs: list[RequestOutput]) -> None:
        """The group is gone: every request of this rank ends with the error, no more admissions."""
        self.failure = str(exc)
        for request_id in list(self._children):
            self._end(request_id, RequestStatus.FINISHED_ERROR, self.failure)
        outputs.extend(self._finished)
        self._finished = list(outputs)

    def fail(self, reason: str) -> None:
        """Stop for good: every request ends with ``finish_reason`` ``error`` and ``reason`` (their terminal
        deltas come from ``drain_finished``), no more admissions. Held and reserved KV stays with its owner."""
        if self.failure is None:
            self._fail_group(GroupError(reason), [])

    # ---- the step ---------------------------------------------------------------------------------------------

    def drain_finished(self) -> list[RequestOutput]:
        """Terminal deltas produced outside ``step`` (aborts, a failed step), oldest first."""
        outputs, self._finished = self._finished, []
        return outputs

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._finished)

    @property
    def steps_with_group(self) -> bool:
        """True while this engine must keep stepping even without requests (a live EP group member)."""
        return self.lockstep is not None and self.failure is None

    def step(self) -> list[RequestOutput]:
        """One step; raises ``GroupError`` once when the group fails (its requests then end with an error)."""
        outputs, self._finished = self._finished, []
        if self.failure is not None:
            return outputs
        plan = self.scheduler.schedule()
        try:
            if not self._group_runs(plan):
                return outputs
            started = time.monotonic()
            if self.before_forward is not None:
                self.before_forward()
            self.observer.on_step(plan)
            logits = self._forward(plan)
            if self.device_delay is not None:
                self.device_delay(plan.num_batched_tokens)
            self.num_steps += 1
            self.busy_s += time.monotonic() - started
        except GroupError as exc:
            self._fail_group(exc, outputs)
            raise
        except Exception as exc:
            if self.lockstep is not None:
                # a rank that leaves its collective sequence desynchronizes the group: break it
                # (peers fail at once instead of at the timeout) and fail like a group error
                self.lockstep.ctx.abandon(f"rank {self.lockstep.ctx.rank} failed its step: {exc!r}")
                self._fail_group(GroupError(f"rank {self.lockstep.ctx.rank} failed its step: {exc!r}"), outputs)
                raise
            # fail the requests of this step (each still gets its one terminal delta), keep the rest
            for entry in plan.scheduled:
                self._terminate(entry.request, RequestStatus.FINISHED_ERROR, outputs)
                outputs[-1] = dataclasses.replace(outputs[-1], error=f"the engine step failed: {exc}")
            self._finished.extend(outputs)
            raise
        sampling_rows = [e for e in plan.scheduled if e.samples]
        for entry in plan.scheduled:
            request = entry.request
            request.num_computed_tokens += entry.num_new_tokens
            self.kv.commit(request.request_id, request.all_token_ids(), request.num_computed_tokens, request.cache_salt)
        if sampling_rows:
            sampled = self.sampler.sample(logits, [e.request.sampling for e in sampling_rows])
            for row, entry in enumerate(sampling_rows):
                logprobs = None if sampled.logprobs is None else (sampled.logprobs[row],)
                self._append(entry.request, sampled.token_ids[row], logprobs, outputs)
        for entry in plan.scheduled:
            self._release_siblings(entry.request)
        if self.lockstep is not None:
            try:
                self.lockstep.finish_step()  # the expert balancer may run a collective here
            except GroupError as exc:
                self._fail_group(exc, outputs)
                raise
        return outputs

    def _group_runs(self, plan: SchedulerOutput) -> bool:
        """Whether this rank runs ``plan``; in a group, agree first and run the empty step if idle."""
        if self.lockstep is None:
            return not plan.is_empty
        agreement = self.lockstep.agree(plan.num_batched_tokens)
        if agreement.all_idle:
            return False
        if plan.is_empty:
            self.model.idle_step()
            self.num_steps += 1
            self.lockstep.finish_step()
            return False
        return True

    def _forward(self, plan: SchedulerOutput) -> torch.Tensor:
        """Logits [N, V] for the scheduled requests that sample this step, in schedule order."""
        new_tokens, contexts, tables, rows = [], [], [], []
        end = 0
        for entry in plan.scheduled:
            request = entry.request
            start = request.num_computed_tokens
            new_tokens.append(request.token_slice(start, start + entry.num_new_tokens))
            contexts.append(start)
            tables.append(self.kv.block_table(request.request_id))
            end += entry.num_new_tokens
            if entry.samples:
                rows.append(end - 1)
        batch = make_forward_batch(
            new_tokens,
            block_size=self.config.block_size,
            context_lens=contexts,
            block_tables=tables,
            device=self.model.device,
        )
        batch = dataclasses.replace(batch, logits_indices=torch.tensor(rows, dtype=torch.int64, device=batch.device))
        watching = self._announce_last_prefills(plan)
        if not watching:
            return self.model(batch, self.kv_cache)

        def on_layer(layer: int) -> None:
            for progress in watching:
                progress.layer_done(layer)

        return self.model(batch, self.kv_cache, on_layer=on_layer)

    def _announce_last_prefills(self, plan: SchedulerOutput) -> list[LayerProgress]:
        """The progress of every pushed prefill whose prompt ends in this step, told its blocks (they are
        final: the request ends in this step)."""
        watching = []
        for entry in plan.scheduled:
            request = entry.request
            if request.kv_progress is not None and entry.samples and not request.output_token_ids:
                request.kv_progress.begin(self._prompt_blocks(request))
                watching.append(request.kv_progress)
        return watching

    def _append(
        self, request: Request, token: int, logprobs: tuple[object, ...] | None, outputs: list[RequestOutput]
    ) -> None:
        request.append_output(token)
        self.observer.on_token(request)
        status = request.check_stop(self.config.max_model_len)
        if status is None:
            outputs.append(RequestOutput(request.parent_id or request.request_id, request.index, (token,), logprobs))
        else:
            self._terminate(request, status, outputs, (token,), logprobs)

    def _terminate(
        self,
        request: Request,
        status: RequestStatus,
        outputs: list[RequestOutput],
        tokens: tuple[int, ...] = (),
        logprobs: tuple[object, ...] | None = None,
    ) -> None:
        if request.hold_kv and status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH):
            self._hold(request)
        elif request.kv_progress is not None:
            request.kv_progress.fail(f"the prefill ended: {status.value}")
        self.scheduler.finish(request, status)
        self.observer.on_finished(request, status)
        self._requests.pop(request.request_id, None)
        parent = request.parent_id or request.request_id
        siblings = self._children.get(parent)
        if siblings is not None and all(cid not in self._requests for cid in siblings):
            del self._children[parent]
        outputs.append(self._final_output(request, tokens, logprobs))
        self._release_siblings(request)

    # ---- disaggregation (see the module docstring) ---------------------------------------------------------

    def _prompt_blocks(self, request: Request) -> list[int]:
        """The blocks of the request's prompt tokens (what a KV transfer moves)."""
        return self.kv.block_table(request.request_id)[: -(-request.num_prompt_tokens // self.config.block_size)]

    def _hold(self, request: Request) -> None:
        blocks = self._prompt_blocks(request)
        self.pool.incref(blocks)  # the finish that follows drops the request's own reference
        self._held[request.request_id] = HeldKv(
            request.request_id,
            tuple(blocks),
            request.num_prompt_tokens,
            request.output_token_ids[0],
            request.sampling.generator_state(),
        )

    def held_kv(self, request_id: str) -> HeldKv | None:
        return self._held.get(request_id)

    def release_kv(self, request_id: str) -> bool:
        """Unpin a prefilled request's blocks (transfer acknowledged, aborted or expired)."""
        held = self._held.pop(request_id, None)
        if held is None:
            return False
        self.pool.free(reversed(held.block_ids))
        return True

    @property
    def num_held_blocks(self) -> int:
        return sum(len(h.block_ids) for h in self._held.values())

    def reserve_kv(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Blocks for ``num_tokens`` incoming prompt rows, in token order; None when the cache is short."""
        if request_id in self._children or request_id in self._reserved or request_id in self.kv:
            raise RequestValidationError("request_id", f"{request_id!r} is already running")
        if num_tokens < 1:
            raise RequestValidationError("num_tokens", f"must be >= 1, got {num_tokens}")
        if not self.kv.allocate(request_id, num_tokens):
            return None
        self._reserved.add(request_id)
        return self.kv.block_table(request_id)

    def cancel_reservation(self, request_id: str) -> None:
        if request_id in self._reserved:
            self._reserved.discard(request_id)
            self.kv.free(request_id)

    @property
    def num_reserved_requests(self) -> int:
        return len(self._reserved)

    def add_prefilled_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        first_token_id: int,
        *,
        sampler_state: bytes = b"",
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> None:
        """Admit a request whose prompt KV is in its reservation and whose first token was sampled
        elsewhere; it continues with token 2. The first token is not emitted again."""
        if self.failure is not None:
            raise EngineFailedError(f"this rank's engine failed: {self.failure}")
        if request_id not in self._reserved:
            raise RequestValidationError("request_id", f"{request_id!r} has no KV reservation (reserve_kv first)")
        prompt = tuple(int(t) for t in prompt_token_ids)
        if len(self.kv.block_table(request_id)) * self.config.block_size < len(prompt):
            raise RequestValidationError("prompt_token_ids", "longer than the reservation made for it")
        if params.n != 1:
            raise RequestValidationError("n", "disaggregated decoding takes n = 1")
        self._reserved.discard(request_id)
        try:
            prompt = self._validate(request_id, prompt, params)
            if not 0 <= first_token_id < self.model.config.vocab_size:
                raise RequestValidationError("first_token_id", f"{first_token_id} is outside the vocabulary")
        except ValueError:
            self.kv.free(request_id)
            raise
        max_tokens = params.max_tokens if params.max_tokens is not None else self.config.max_model_len - len(prompt)
        request = self._make_child(request_id, 0, prompt, params, max_tokens, priority, cache_salt)
        request.sampling.restore_generator(sampler_state, self.model.device)
        request.append_output(first_token_id)
        request.num_computed_tokens = len(prompt)
        request.num_cached_tokens = 0
        request.num_transferred_tokens = len(prompt)
        self._children[request_id] = [request_id]
        self._requests[request_id] = request
        status = request.check_stop(self.config.max_model_len)
        if status is not None:  # the first token already ended it: one terminal delta, no step
            self._terminate(request, status, self._finished)
            return
        # A waiting request holds no blocks (request.py): one that did could starve a preempted request
        # ahead of it forever, since preemption only takes blocks back from running ones. So it joins the
        # running batch with its blocks, or, when the batch is full, waits like a preempted request.
        if self.scheduler.num_running < self.config.scheduler.max_num_seqs:
            request.status = RequestStatus.RUNNING
            self.scheduler.running.append(request)
        else:
            self.kv.free(request_id)
            request.num_computed_tokens = 0  # recomputed here when admitted
            self.scheduler.add(request)

    def _final_output(
        self, request: Request, tokens: tuple[int, ...], logprobs: tuple[object, ...] | None
    ) -> RequestOutput:
        usage = Usage(
            request.num_prompt_tokens,
            request.num_output_tokens,
            max(request.num_cached_tokens, 0),
            request.num_transferred_tokens,
        )
        return RequestOutput(
            request.parent_id or request.request_id,
            request.index,
            tokens,
            logprobs,
            finish_reason=request.status.finish_reason,
            usage=usage,
        )

    def _release_siblings(self, first: Request) -> None:
        """Once child 0 has computed its prompt (or ended), its waiting siblings share its full blocks."""
        siblings = self._pending_siblings.get(first.request_id)
        if siblings is None:
            return
        prompt_done = first.num_computed_tokens >= first.num_prompt_tokens
        if not (prompt_done or first.status.is_finished):
            return
        del self._pending_siblings[first.request_id]
        for sibling in siblings:
            if prompt_done and not first.status.is_finished:
                shared = self.kv.fork(first.request_id, sibling.request_id, sibling.num_prompt_tokens - 1)
                sibling.num_computed_tokens = shared
                sibling.num_cached_tokens = shared
            self.scheduler.add(sibling)

    # ---- introspection ----------------------------------------------------------------------------------------

    @property
    def num_requests(self) -> int:
        return len(self._children)


__all__ = [
    "Engine",
    "EngineConfig",
    "EngineFailedError",
    "HeldKv",
    "RequestOutput",
    "RequestValidationError",
    "SamplingParams",
    "SamplingParamsError",
    "Usage",
]
