"""Routing on a real router over two real colocated ranks of the tiny model (loopback gRPC).

Requests go through ``Frontend.start`` the way every API adapter sends them. Each pick of the
``Dispatcher`` is recorded (the policy's inputs and its answer), so the tests can say which rank took
which request and what both ranks carried at that moment. The workers' block size is 4 tokens and
the router's prefix blocks are 16 tokens: a 64-token shared prefix is 4 router blocks (enough to
prefer a rank, more than the 0.3 × prompt of the default policy) and 16 worker blocks (so a hit
shows up as ``cached_tokens`` in the usage and in the rank's ``prefix_hits``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from router_fixtures import LiveRouter, live_router

from k2serve.router import dispatcher as dispatcher_module
from k2serve.router.frontend import Frontend
from k2serve.router.generation_event import RequestFinished, RequestUsage
from k2serve.router.generation_request import GenerationRequest, Routing, Sampling
from k2serve.router.policy import Imbalance, RoutingPolicy, WorkerLoad
from k2serve.tiny_model import make_tiny_model

PREFIX_TOKENS = 64
SUFFIX_TOKENS = 8
TIGHT = Imbalance(max_extra_requests=2, max_ratio=1.0)  # the burst tests: at most 2 more than the least


@dataclass(frozen=True)
class Pick:
    role: str
    loads: tuple[WorkerLoad, ...]
    chosen: str

    def load_of(self, worker_id: str) -> int:
        return next(w.requests for w in self.loads if w.worker_id == worker_id)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("routing") / "tiny", seed=3)


@pytest.fixture(scope="module")
def live(model_dir: Path) -> Iterator[LiveRouter]:
    with live_router(model_dir, roles=("mixed", "mixed"), num_blocks=512, block_size=4) as router:

        async def start_monitor() -> None:
            router.frontend.dispatcher.start_monitor(interval_s=0.1)

        router.run(start_monitor())
        yield router


@pytest.fixture
def picks(monkeypatch: pytest.MonkeyPatch) -> list[Pick]:
    """Every pick the dispatcher makes during the test."""
    recorded: list[Pick] = []
    choose = dispatcher_module.choose

    def spy(policy: RoutingPolicy, role: str, candidates: Sequence[WorkerLoad], **kwargs: Any) -> Any:
        decision = choose(policy, role, candidates, **kwargs)
        recorded.append(Pick(role, tuple(candidates), decision.worker_id))
        return decision

    monkeypatch.setattr(dispatcher_module, "choose", spy)
    return recorded


@pytest.fixture
def tight(live: LiveRouter) -> Iterator[RoutingPolicy]:
    """The live dispatcher with a tight imbalance bound, for the bursts (same prefix block size)."""
    dispatcher = live.frontend.dispatcher
    default = dispatcher.policy
    dispatcher.policy = dataclasses.replace(default, imbalance=TIGHT)
    try:
        yield dispatcher.policy
    finally:
        dispatcher.policy = default


def _request(prompt: Sequence[int], *, session_key: str | None = None, max_tokens: int = 4) -> GenerationRequest:
    return GenerationRequest(
        request_id=Frontend.new_request_id("route"),
        prompt_token_ids=tuple(prompt),
        sampling=Sampling(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
        routing=Routing(session_key=session_key),
    )


async def _complete(live: LiveRouter, request: GenerationRequest) -> RequestUsage:
    stream = await live.frontend.start(request)
    usage = None
    try:
        async for event in stream:
            if isinstance(event, RequestFinished):
                usage = event.usage
    finally:
        await stream.aclose()
    assert usage is not None
    return usage


def _run_all(live: LiveRouter, requests: Sequence[GenerationRequest]) -> list[RequestUsage]:
    async def all_at_once() -> list[RequestUsage]:
        return list(await asyncio.gather(*(_complete(live, r) for r in requests)))

    return live.run(all_at_once(), timeout_s=120)


def _prefix_hits(live: LiveRouter) -> Mapping[str, int]:
    return {load.worker_id: load.prefix_hits for load in live.loads()}


def _tokens(rng: random.Random, n: int, low: int) -> list[int]:
    return [rng.randrange(low, low + 100) for _ in range(n)]


def test_requests_sharing_a_long_prefix_go_to_the_rank_that_has_it_cached(live: LiveRouter, picks: list[Pick]) -> None:
    rng = random.Random(1)
    prefix = _tokens(rng, PREFIX_TOKENS, 100)
    hits_before = _prefix_hits(live)
    usages = []
    for i in range(6):  # one at a time: both ranks idle at every pick, so only the prefix decides
        suffix = [10 + i, *_tokens(rng, SUFFIX_TOKENS - 1, 300)]
        usages.append(_complete_one(live, _request([*prefix, *suffix])))
    chosen = [p.chosen for p in picks]
    assert len(chosen) == 6 and len(set(chosen)) == 1, chosen  # least load alone would alternate
    assert usages[0].cached_tokens == 0
    assert all(u.cached_tokens >= PREFIX_TOKENS for u in usages[1:]), usages
    hits = {w: n - hits_before[w] for w, n in _prefix_hits(live).items()}
    home = chosen[0]
    assert hits[home] >= 5 * PREFIX_TOKENS and all(n == 0 for w, n in hits.items() if w != home), hits
    assert all(p.loads[0].fresh for p in picks)  # the monitor's reports were part of every pick


def test_a_burst_on_one_prefix_spills_over_within_the_imbalance(
    live: LiveRouter, picks: list[Pick], tight: RoutingPolicy
) -> None:
    rng = random.Random(2)
    prefix = _tokens(rng, PREFIX_TOKENS, 200)
    warm = _complete_one(live, _request([*prefix, 1, 2, 3, 4]))  # one rank holds the prefix now
    assert warm.cached_tokens == 0
    home = picks[-1].chosen
    burst = [_request([*prefix, 20 + i, *_tokens(rng, 7, 300)], max_tokens=48) for i in range(12)]
    usages = _run_all(live, burst)
    burst_picks = picks[1:]
    assert len(burst_picks) == 12
    for pick in burst_picks:  # the prefix's rank takes a request only while it is within the bound
        least = min(w.requests for w in pick.loads)
        assert pick.load_of(pick.chosen) - least <= TIGHT.max_extra_requests, pick
    # the prefix pulls the burst to its rank until the bound is reached; the request that spills over
    # gives the other rank the prefix too, and from then on the load decides between the two holders
    bound = TIGHT.max_extra_requests + 1
    assert [p.chosen for p in burst_picks[:bound]] == [home] * bound, burst_picks
    counts = Counter(p.chosen for p in burst_picks)
    assert len(counts) == 2 and max(counts.values()) - min(counts.values()) <= bound, counts
    assert sum(u.cached_tokens >= PREFIX_TOKENS for u in usages) >= counts[home], (usages, counts)


def test_concurrent_unrelated_requests_are_spread_by_load(
    live: LiveRouter, picks: list[Pick], tight: RoutingPolicy
) -> None:
    rng = random.Random(3)
    requests = [_request(_tokens(rng, 40, 100 + 10 * i), max_tokens=32) for i in range(12)]
    _run_all(live, requests)
    counts = Counter(p.chosen for p in picks)
    assert len(picks) == 12 and len(counts) == 2, counts
    assert max(counts.values()) - min(counts.values()) <= TIGHT.max_extra_requests, counts
    for pick in picks:
        least = min(w.requests for w in pick.loads)
        assert pick.load_of(pick.chosen) == least, pick  # no prefix in common: always the least loaded


def test_a_session_stays_on_its_rank_across_unrelated_prompts(live: LiveRouter, picks: list[Pick]) -> None:
    rng = random.Random(4)
    for key in ("alice", "bob", "carol"):
        first = len(picks)
        for _ in range(4):
            _complete_one(live, _request(_tokens(rng, 24, 100), session_key=key))
        assert len({p.chosen for p in picks[first:]}) == 1, (key, picks[first:])


def _complete_one(live: LiveRouter, request: GenerationRequest) -> RequestUsage:
    return live.run(_complete(live, request), timeout_s=60)
