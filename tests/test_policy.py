"""The router's routing policies, prefix index and load monitor, on plain values (no workers)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from k2serve.proto import worker_pb2
from k2serve.router.load_monitor import LoadMonitor
from k2serve.router.policy import (
    POLICY_NAMES,
    Imbalance,
    Pick,
    RoutingPolicy,
    WorkerLoad,
    choose,
    least_load,
    parse_policy,
    prefix_aware,
    round_robin,
    session_affinity,
)
from k2serve.router.prefix_index import PrefixIndex, block_hashes

TIGHT = Imbalance(max_extra_requests=2, max_ratio=1.0)  # purely absolute: at most 2 more than the least


def _w(worker_id: str, in_flight: int = 0, role: str = "mixed", **report: float | int | bool) -> WorkerLoad:
    return WorkerLoad(worker_id, role, in_flight, **report)  # type: ignore[arg-type]


# ---- load and the simple policies ----------------------------------------------------------------------------


def test_requests_count_the_routers_calls_plus_what_other_routers_added_since_the_report() -> None:
    assert _w("a", 3).requests == 3  # no report: the router's own count
    # the report saw 5 on the rank while this router had 2 there: 3 belong to others
    assert _w("a", 4, waiting=1, running=4, fresh=True, in_flight_at_report=2).requests == 4 + 3
    # a report older than the router's latest calls never lowers the count below its own
    assert _w("a", 4, running=1, fresh=True, in_flight_at_report=3).requests == 4
    assert _w("a", 4, running=9, fresh=False).requests == 4  # a stale report is ignored
    assert _w("a", 1, kv_usage=0.5, fresh=True, in_flight_at_report=1, running=1).score(2.0) == 1 + 2.0 * 0.5


def test_round_robin_cycles_in_worker_id_order() -> None:
    workers = [_w("b", 5), _w("a"), _w("c")]
    assert [round_robin(workers, turn) for turn in range(4)] == ["a", "b", "c", "a"]


def test_least_load_picks_the_lowest_score_and_ties_take_turns() -> None:
    assert least_load([_w("a", 2), _w("b", 1), _w("c", 3)]) == "b"
    assert [least_load([_w("b", 1), _w("a", 1), _w("c", 2)], turn) for turn in range(3)] == ["a", "b", "a"]
    # a nearly full KV cache weighs like more requests
    full = _w("a", 1, kv_usage=0.95, fresh=True, running=1, in_flight_at_report=1)
    empty = _w("b", 2, kv_usage=0.0, fresh=True, running=2, in_flight_at_report=2)
    assert least_load([full, empty], kv_weight=2.0) == "b"
    assert least_load([full, empty], kv_weight=0.0) == "a"


# ---- prefix-aware ---------------------------------------------------------------------------------------------


def test_prefix_wins_while_its_rank_is_within_the_imbalance() -> None:
    matched = {"a": 64}
    assert prefix_aware([_w("a", 2), _w("b", 0)], matched, TIGHT) == "a"  # 2 extra: allowed


def test_prefix_loses_when_its_rank_is_beyond_the_imbalance() -> None:
    matched = {"a": 64}
    assert prefix_aware([_w("a", 3), _w("b", 0)], matched, TIGHT) == "b"  # 3 extra: too many


def test_imbalance_needs_both_the_absolute_and_the_relative_excess() -> None:
    rule = Imbalance(max_extra_requests=4, max_ratio=1.5)
    matched = {"a": 64}
    assert prefix_aware([_w("a", 15), _w("b", 10)], matched, rule) == "a"  # 5 extra, but only x1.5
    assert prefix_aware([_w("a", 16), _w("b", 10)], matched, rule) == "b"  # 6 extra and x1.6
    assert prefix_aware([_w("a", 4), _w("b", 0)], matched, rule) == "a"  # x inf, but only 4 extra
    assert prefix_aware([_w("a", 5), _w("b", 0)], matched, rule) == "b"


def test_the_longest_prefix_wins_and_an_overloaded_one_yields_to_the_next_longest() -> None:
    workers = [_w("a", 1), _w("b", 1), _w("c", 0)]
    assert prefix_aware(workers, {"a": 32, "b": 64}, TIGHT) == "b"
    busy = [_w("a", 1), _w("b", 5), _w("c", 0)]
    assert prefix_aware(busy, {"a": 32, "b": 64}, TIGHT) == "a"
    # equal prefixes: the less loaded holder
    assert prefix_aware([_w("a", 2), _w("b", 1), _w("c", 0)], {"a": 64, "b": 64}, TIGHT) == "b"


def test_a_short_prefix_is_no_reason_to_prefer_a_rank() -> None:
    workers = [_w("a", 1), _w("b", 0)]
    assert prefix_aware(workers, {"a": 16}, TIGHT, min_matched=32) == "b"
    assert prefix_aware(workers, {"a": 32}, TIGHT, min_matched=32) == "a"
    policy = RoutingPolicy(block_size=16, min_match_ratio=0.3)
    assert policy.min_matched_tokens(10) == 16 and policy.min_matched_tokens(1000) == 300


# ---- session affinity -----------------------------------------------------------------------------------------


def test_session_affinity_is_stable_and_spreads_sessions() -> None:
    workers = [_w(f"w{i}") for i in range(4)]
    rule = Imbalance()
    picks = {f"s{k}": session_affinity(workers, f"s{k}", rule) for k in range(400)}
    assert picks == {key: session_affinity(list(reversed(workers)), key, rule) for key in picks}  # order-free
    assert all(60 <= n <= 140 for n in Counter(picks.values()).values()), Counter(picks.values())


def test_session_affinity_moves_only_the_sessions_of_a_worker_that_left_or_that_a_new_worker_wins() -> None:
    workers = [_w(f"w{i}") for i in range(4)]
    rule = Imbalance()
    keys = [f"user-{k}" for k in range(300)]
    before = {k: session_affinity(workers, k, rule) for k in keys}
    fewer = {k: session_affinity([w for w in workers if w.worker_id != "w2"], k, rule) for k in keys}
    assert {k for k in keys if fewer[k] != before[k]} == {k for k in keys if before[k] == "w2"}
    more = {k: session_affinity([*workers, _w("w9")], k, rule) for k in keys}
    moved = {k for k in keys if more[k] != before[k]}
    assert moved and all(more[k] == "w9" for k in moved)


def test_session_affinity_spills_to_the_sessions_next_rank_when_its_rank_is_overloaded() -> None:
    workers = [_w("a"), _w("b"), _w("c")]
    home = session_affinity(workers, "s", TIGHT)
    loaded = [_w(w.worker_id, 9 if w.worker_id == home else 0) for w in workers]
    spill = session_affinity(loaded, "s", TIGHT)
    assert spill != home
    assert session_affinity(loaded, "s", TIGHT, turn=1) == spill  # the same second choice every time


# ---- choose and the configuration -----------------------------------------------------------------------------


def test_auto_prefers_the_session_then_the_prefix_and_decode_ranks_go_by_load() -> None:
    policy = RoutingPolicy(imbalance=TIGHT, block_size=4, min_match_ratio=0.0)
    workers = [_w("a", 1), _w("b", 0)]
    assert choose(policy, "mixed", workers, matched_tokens={"a": 8}, prompt_tokens=12).worker_id == "a"
    assert choose(policy, "prefill", workers, matched_tokens={"a": 8}, prompt_tokens=12).worker_id == "a"
    assert choose(policy, "decode", workers, matched_tokens={"a": 8}, prompt_tokens=12).worker_id == "b"
    session = session_affinity(workers, "k", TIGHT)
    assert choose(policy, "mixed", workers, matched_tokens={"a": 8, "b": 8}, session_key="k").worker_id == session
    assert choose(RoutingPolicy("least_load"), "mixed", workers, matched_tokens={"a": 8}).worker_id == "b"
    assert [choose(RoutingPolicy("round_robin"), "decode", workers, turn=t).worker_id for t in range(2)] == ["a", "b"]
    assert choose(RoutingPolicy("session", imbalance=TIGHT), "mixed", workers, matched_tokens={"a": 8}).worker_id == "b"


def test_a_draining_rank_gets_nothing_while_another_can_take_the_request() -> None:
    draining = _w("a", fresh=True, draining=True)
    assert choose(RoutingPolicy(), "mixed", [draining, _w("b", 5)]).worker_id == "b"
    assert choose(RoutingPolicy(), "mixed", [draining]).worker_id == "a"


def test_parse_policy_accepts_the_known_names_and_lists_them_otherwise() -> None:
    assert [parse_policy(name).name for name in POLICY_NAMES] == list(POLICY_NAMES)
    assert parse_policy("auto") == RoutingPolicy()
    with pytest.raises(ValueError, match="auto, round_robin, least_load, prefix, session"):
        parse_policy("cache_aware")
    with pytest.raises(ValueError, match="max_ratio"):
        Imbalance(max_ratio=0.5)


# ---- the prefix index -----------------------------------------------------------------------------------------


def test_index_matches_the_longest_recorded_block_aligned_prefix_per_worker() -> None:
    index = PrefixIndex(block_size=4)
    shared = list(range(100, 112))  # 3 blocks
    index.record([*shared, 1, 2, 3, 4, 5], "", "a")  # 4 full blocks, a partial one not indexed
    index.record([*shared[:8], 9, 9, 9, 9], "", "b")
    assert index.match([*shared, 7, 7, 7, 7], "") == {"a": 12, "b": 8}
    assert index.match([*shared, 1, 2, 3, 4, 5, 6, 7, 8], "") == {"a": 16, "b": 8}
    assert index.match(shared[:3], "") == {}  # shorter than a block
    assert index.match([0, *shared], "") == {}  # a prefix, not a substring


def test_index_isolates_tenants_by_salt() -> None:
    index = PrefixIndex(block_size=4)
    prompt = list(range(16))
    index.record(prompt, "tenant-a", "w0")
    assert index.match(prompt, "tenant-a") == {"w0": 16}
    assert index.match(prompt, "tenant-b") == {}
    assert index.match(prompt, "") == {}
    assert block_hashes(prompt, None, 4) == block_hashes(prompt, "", 4)  # no salt is the empty salt


def test_index_is_bounded_and_evicts_the_least_recently_recorded_first() -> None:
    index = PrefixIndex(block_size=4, max_entries=10)
    old, new = list(range(0, 20)), list(range(100, 120))  # 5 blocks each
    index.record(old, "", "a")
    index.record(new, "", "a")
    assert len(index) == 10
    index.record(old, "", "a")  # old becomes the most recent; the first of new's blocks stay longest
    index.record(list(range(200, 208)), "", "a")  # two more blocks: new's last two blocks go
    assert len(index) == 10
    assert index.match(old, "") == {"a": 20}
    assert index.match(new, "") == {"a": 12}  # its first blocks outlive its tail
    rng = random.Random(0)
    for _ in range(200):
        index.record([rng.randrange(500) for _ in range(rng.randrange(40))], "", rng.choice("abc"))
        assert len(index) <= 10


def test_forget_drops_a_worker_and_only_it() -> None:
    index = PrefixIndex(block_size=4)
    prompt = list(range(12))
    index.record(prompt, "", "a")
    index.record(prompt, "", "b")
    index.forget("a")
    assert index.match(prompt, "") == {"b": 12}
    index.forget("b")
    assert index.match(prompt, "") == {} and len(index) == 0


# ---- the load monitor -----------------------------------------------------------------------------------------


class _FakeWorker:
    def __init__(self, worker_id: str, running: int = 0, fail: bool = False, hang: bool = False) -> None:
        self.worker_id, self.in_flight, self.running, self.fail, self.hang = worker_id, 0, running, fail, hang

    async def get_load(self, timeout_s: float) -> worker_pb2.Load:
        if self.hang:
            await asyncio.sleep(3600)
        if self.fail:
            raise ConnectionError("worker gone")
        return worker_pb2.Load(worker_id=self.worker_id, running=self.running, kv_usage=0.25)


def test_load_monitor_keeps_fresh_reports_and_marks_failures_stale_without_raising() -> None:
    now = [0.0]
    good, bad, slow = _FakeWorker("good", running=3), _FakeWorker("bad", fail=True), _FakeWorker("slow", hang=True)
    workers = [good, bad, slow]
    monitor = LoadMonitor(lambda: workers, interval_s=0.5, timeout_s=0.05, clock=lambda: now[0])
    good.in_flight = 2
    asyncio.run(monitor.poll_once())
    report = monitor.latest("good")
    assert report is not None and (report.running, report.kv_usage, report.in_flight_at_report) == (3, 0.25, 2)
    assert monitor.latest("bad") is None and monitor.latest("slow") is None
    now[0] = 10.0  # no poll since: stale
    assert monitor.latest("good") is None
    now[0] = 0.0
    good.fail = True
    asyncio.run(monitor.poll_once())
    assert monitor.latest("good") is None  # a failed call marks it stale at once


def test_load_monitor_runs_in_the_background_and_drops_workers_that_left() -> None:
    async def body() -> None:
        workers = [_FakeWorker("a", running=1), _FakeWorker("b", running=2)]
        monitor = LoadMonitor(lambda: list(workers), interval_s=0.01, timeout_s=0.5)
        monitor.start()
        for _ in range(200):
            if monitor.latest("a") and monitor.latest("b"):
                break
            await asyncio.sleep(0.01)
        assert monitor.latest("b") is not None
        workers.pop()
        await asyncio.sleep(0.05)
        assert monitor.latest("b") is None and monitor.latest("a") is not None
        await monitor.stop()
        assert not monitor.running

    asyncio.run(asyncio.wait_for(body(), 10))


def test_every_pick_names_its_reason() -> None:
    workers = [_w("a", 0), _w("b", 0)]
    auto = RoutingPolicy(imbalance=TIGHT)
    assert choose(auto, "mixed", workers, matched_tokens={"a": 64}, prompt_tokens=100).reason == "prefix"
    assert choose(auto, "mixed", workers, matched_tokens={}, prompt_tokens=12).reason == "least_load"
    busy = [_w("a", 9), _w("b", 0)]
    assert choose(auto, "mixed", busy, matched_tokens={"a": 64}, prompt_tokens=100) == Pick("b", "spill")
    assert choose(auto, "decode", workers).reason == "least_load"
    assert choose(RoutingPolicy("round_robin"), "mixed", workers).reason == "round_robin"
    home = session_affinity(workers, "k", TIGHT)
    assert choose(auto, "mixed", workers, session_key="k") == Pick(home, "session")
    loaded = [_w(w.worker_id, 9 if w.worker_id == home else 0) for w in workers]
    spilled = choose(auto, "mixed", loaded, session_key="k")
    assert spilled.reason == "spill" and spilled.worker_id != home


class _SlowToStop(_FakeWorker):
    """A ``GetLoad`` that hangs, and when cancelled takes ``cleanup_s`` to let go."""

    def __init__(self, cleanup_s: float) -> None:
        super().__init__("slow")
        self.cleanup_s, self.entered = cleanup_s, asyncio.Event()

    async def get_load(self, timeout_s: float) -> worker_pb2.Load:
        self.entered.set()
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(self.cleanup_s)
        raise AssertionError("unreachable")


def test_load_monitor_stop_passes_a_cancel_of_its_caller_on() -> None:
    """``stop()`` waits for the polling task; a cancel of whoever awaits ``stop()`` meanwhile must
    reach that caller (it was swallowed with the task's own CancelledError)."""

    async def body() -> None:
        worker = _SlowToStop(cleanup_s=0.3)
        monitor = LoadMonitor(lambda: [worker], interval_s=0.01, timeout_s=30)
        monitor.start()
        async with asyncio.timeout(5):
            await worker.entered.wait()
        stopper = asyncio.create_task(monitor.stop())
        await asyncio.sleep(0.05)  # stop() now waits for the poll's cleanup
        stopper.cancel()
        await asyncio.wait({stopper}, timeout=5)
        assert stopper.cancelled()

        quiet = _SlowToStop(cleanup_s=0.0)  # without a cancel of the caller, stop() returns normally
        monitor = LoadMonitor(lambda: [quiet], interval_s=0.01, timeout_s=30)
        monitor.start()
        async with asyncio.timeout(5):
            await quiet.entered.wait()
        await monitor.stop()
        assert not monitor.running

    asyncio.run(body())
