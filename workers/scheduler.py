"""Token-budget scheduler of one rank: which requests run this step, and how many tokens each.

Lifecycle: the engine ``add``s requests, calls ``schedule()`` once per step, runs the model on the
result, advances ``num_computed_tokens`` and calls ``finish`` for requests that reached a terminal
state. ``abort`` may come at any time between steps; it frees blocks at once.

One rule covers prefill chunks, prefix-cache hits and decode steps: a request wants
``num_tokens - num_computed_tokens`` more tokens computed; the step grants up to the remaining
token budget (all of it, or nothing, when chunked prefill is off). Running requests are served
first, in admission order; then waiting ones are admitted by priority, then arrival.

When the block pool runs dry, the scheduler preempts by recompute: the running request that would
be admitted last (lowest priority, latest arrival) loses its blocks and returns to the head of the
waiting queue with ``num_computed_tokens = 0``. A request that cannot fit even alone is preempted
itself and waits for others to finish. No waiting request is admitted in a step that preempted.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Literal

from k2serve.workers.kv_cache_manager import KvCacheManager
from k2serve.workers.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # tokens computed per step, all requests together
    max_num_seqs: int = 256  # running requests
    enable_chunked_prefill: bool = True
    policy: Literal["fcfs", "priority"] = "fcfs"

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens: must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be >= 1, got {self.max_num_seqs}")
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"policy: must be 'fcfs' or 'priority', got {self.policy!r}")


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens computed for it this step, from request.num_computed_tokens on

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the request's tokens and so samples the next one."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledRequest, ...]
    preempted: tuple[str, ...] = ()

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class Scheduler:
    config: SchedulerConfig
    kv: KvCacheManager
    running: list[Request] = field(default_factory=list)
    _waiting: list[tuple[tuple[int, int], Request]] = field(default_factory=list)  # heap on (priority, arrival)
    num_preemptions: int = 0

    # ---- queue management ------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        heapq.heappush(self._waiting, (self._order(request), request))

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def oldest_waiting_s(self, now: float) -> float:
        """Age of the longest-waiting request (0 when none waits): the queue signal of the autoscaler."""
        waiting = list(self._waiting)  # read from another thread: a copy, never a torn heap walk
        return max((now - r.times.arrival for _, r in waiting), default=0.0)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.running or self._waiting)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Put ``request`` in its terminal ``status`` and free its blocks (no-op if already finished)."""
        if request.status.is_finished:
            return
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self._waiting = [(k, r) for k, r in self._waiting if r is not request]
            heapq.heapify(self._waiting)
        request.status = status
        self.kv.free(request.request_id)

    # ---- one step ------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []
        for request in list(self.running):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop to make room
            num_new = self._grant(request, budget)
            if num_new == 0:
                continue
            while not self.kv.allocate(request.request_id, request.num_computed_tokens + num_new):
                victim = self._pick_victim()
                self._preempt(victim)
                preempted.append(victim.request_id)
                for entry in scheduled:
                    if entry.request is victim:  # (priority policy) it ran earlier in this step's list
                        scheduled.remove(entry)
                        budget += entry.num_new_tokens
                        break
                if victim is request:
                    break
            if request.status is RequestStatus.RUNNING:
                scheduled.append(ScheduledRequest(request, num_new))
                budget -= num_new
        if not preempted:
            budget = self._admit_waiting(budget, scheduled)
        return SchedulerOutput(tuple(scheduled), tuple(preempted))

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledRequest]) -> int:
        while self._waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self._waiting[0][1]
            rid = request.request_id
            looked_up = not self.kv.block_table(rid)  # forked n > 1 children arrive holding blocks
            if looked_up:
                request.num_computed_tokens = self.kv.lookup_prefix(rid, request.all_token_ids(), request.cache_salt)
            num_new = self._grant(request, budget)
            if num_new == 0 or not self.kv.allocate(rid, request.num_computed_tokens + num_new):
                if looked_up:  # give the prefix hit back; it is looked up again next time
                    self.kv.free(rid)
                    request.num_computed_tokens = 0
                break
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = min(request.num_computed_tokens, request.num_prompt_tokens)
            heapq.heappop(self._waiting)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new
        return budget

    def _grant(self, request: Request, budget: int) -> int:
        wanted = request.num_tokens - request.num_computed_tokens
        if wanted <= budget:
            return wanted
        return budget if self.config.enable_chunked_prefill else 0

    def _order(self, request: Request) -> tuple[int, int]:
        priority = request.priority if self.config.policy == "priority" else 0
        return (priority, request.arrival)

    def _pick_victim(self) -> Request:
        return max(self.running, key=self._order)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request.request_id)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.add(request)
