"""Routing policies: which worker rank takes a request, as pure functions over load snapshots.

Lifecycle: the ``Dispatcher`` turns the configured name into a ``RoutingPolicy`` once
(``parse_policy``; an unknown name is a ``ValueError`` that lists the valid ones). For every pick it
builds one ``WorkerLoad`` per candidate rank (its own in-flight count plus the ``LoadMonitor``'s
latest report), asks the ``PrefixIndex`` how much of the prompt each rank holds, and calls
``choose``. Nothing here does I/O or keeps state: the turn counter, the index and the reports live
with their owners, so every function can be tested on plain values.

Policies (``RoutingPolicy.name``):
- ``round_robin``: candidates in worker-id order, one after the other (every role).
- ``least_load``: the lowest ``WorkerLoad.score``; ties take turns in worker-id order.
- ``prefix``: prefill and mixed ranks by ``prefix_aware``; decode ranks by least load.
- ``session``: prefill and mixed ranks by ``session_affinity`` when the request has a session key,
  else least load; decode ranks by least load.
- ``auto`` (default): session affinity when a session key is present, else prefix-aware, for
  prefill and mixed ranks; decode ranks always by least load (a decode rank holds no prefix: the KV
  comes from the prefill rank, so only its load matters).

Load of a rank (``WorkerLoad.requests``): the router's own in-flight count is exact for its own
requests and current; the worker's report (waiting + running) also counts other routers' requests
but is up to one poll old. So the load is ``in_flight + others``, where ``others`` = the report
minus the router's own count at the time of the report (never below 0). With one router this is
the in-flight count; with several, each sees the others' share as of the last poll. ``score`` adds
``kv_weight × kv_usage``: a full KV cache counts as ``kv_weight`` more requests (preemption risk).

Imbalance rule (``Imbalance.overloaded``), after SGLang's cache-aware router: a preferred rank (the
longest cached prefix, the session's rank) is passed over when its requests exceed the least-loaded
candidate's by more than ``max_extra_requests`` AND by more than the factor ``max_ratio``. Both must
hold: at low load a few extra requests are cheap next to a recomputed prefix; at high load a small
relative excess is. ``max_ratio = 1`` makes the rule purely absolute; ``max_extra_requests = 0``
purely relative. After a pick the preferred rank is thus at most ``max(max_extra_requests,
(max_ratio - 1) × least) + 1`` requests above the least-loaded one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

POLICY_NAMES = ("auto", "round_robin", "least_load", "prefix", "session")
_PREFIX_POLICIES = ("auto", "prefix")
_SESSION_POLICIES = ("auto", "session")


@dataclass(frozen=True)
class WorkerLoad:
    """One candidate rank as a policy sees it at the moment of a pick."""

    worker_id: str
    role: str  # prefill | decode | mixed
    in_flight: int = 0  # this router's calls on the rank now
    waiting: int = 0  # the rank's last report (meaningful only when ``fresh``)
    running: int = 0
    kv_usage: float = 0.0  # used blocks / all blocks
    fresh: bool = False  # a recent report exists; False = the router's own count only
    in_flight_at_report: int = 0  # this router's calls on the rank when the report was taken
    draining: bool = False

    @property
    def requests(self) -> int:
        if not self.fresh:
            return self.in_flight
        others = max(0, self.waiting + self.running - self.in_flight_at_report)
        return self.in_flight + others

    def score(self, kv_weight: float) -> float:
        return self.requests + (kv_weight * self.kv_usage if self.fresh else 0.0)


@dataclass(frozen=True)
class Imbalance:
    """How much busier than the least-loaded candidate a preferred rank may be (see the module doc)."""

    max_extra_requests: int = 8
    max_ratio: float = 1.5

    def __post_init__(self) -> None:
        if self.max_extra_requests < 0:
            raise ValueError(f"imbalance max_extra_requests must be >= 0, got {self.max_extra_requests}")
        if not self.max_ratio >= 1.0:
            raise ValueError(f"imbalance max_ratio must be >= 1, got {self.max_ratio}")

    def overloaded(self, preferred: WorkerLoad, least: WorkerLoad) -> bool:
        busy, idle = preferred.requests, least.requests
        return busy - idle > self.max_extra_requests and busy > self.max_ratio * idle


DEFAULT_KV_WEIGHT = 2.0


@dataclass(frozen=True)
class RoutingPolicy:
    """The router's balancing configuration (``RouterSettings.policy`` names it)."""

    name: str = "auto"
    imbalance: Imbalance = field(default_factory=Imbalance)
    block_size: int = 16  # tokens per block of the router's prefix index (need not equal the workers')
    min_match_blocks: int = 1  # a cached prefix shorter than this many blocks is no reason to prefer a rank
    min_match_ratio: float = 0.3  # ... nor one shorter than this fraction of the prompt
    kv_weight: float = DEFAULT_KV_WEIGHT
    max_index_entries: int = 100_000  # (block, worker) pairs the prefix index keeps (LRU)

    def __post_init__(self) -> None:
        if self.name not in POLICY_NAMES:
            raise ValueError(f"unknown routing policy {self.name!r}; expected one of: {', '.join(POLICY_NAMES)}")
        if self.block_size < 1 or self.min_match_blocks < 1 or self.max_index_entries < 1:
            raise ValueError("routing policy block_size, min_match_blocks and max_index_entries must be >= 1")
        if not 0.0 <= self.min_match_ratio <= 1.0 or self.kv_weight < 0:
            raise ValueError("routing policy min_match_ratio must be in [0, 1] and kv_weight >= 0")

    @property
    def uses_prefix_index(self) -> bool:
        return self.name in _PREFIX_POLICIES

    def min_matched_tokens(self, prompt_tokens: int) -> int:
        return max(self.min_match_blocks * self.block_size, int(self.min_match_ratio * prompt_tokens))


def parse_policy(name: str) -> RoutingPolicy:
    """The default configuration of the named policy; ``ValueError`` names the valid ones."""
    return RoutingPolicy(name=name)


# ---- the policies ---------------------------------------------------------------------------------------


def round_robin(candidates: Sequence[WorkerLoad], turn: int) -> str:
    ordered = _by_id(candidates)
    return ordered[turn % len(ordered)].worker_id


def least_load(candidates: Sequence[WorkerLoad], turn: int = 0, *, kv_weight: float = DEFAULT_KV_WEIGHT) -> str:
    """The lowest score; ties take turns in worker-id order."""
    return _least(candidates, turn, kv_weight).worker_id


def prefix_aware(
    candidates: Sequence[WorkerLoad],
    matched_tokens: Mapping[str, int],
    imbalance: Imbalance,
    turn: int = 0,
    *,
    min_matched: int = 1,
    kv_weight: float = DEFAULT_KV_WEIGHT,
) -> str:
    """The candidate with the longest cached prefix (at least ``min_matched`` tokens) that is not
    overloaded next to the least-loaded candidate; equal prefixes go to the lower score. None: least load."""
    least = _least(candidates, turn, kv_weight)
    holders = [
        c
        for c in candidates
        if matched_tokens.get(c.worker_id, 0) >= max(min_matched, 1) and not imbalance.overloaded(c, least)
    ]
    if not holders:
        return least.worker_id
    longest = max(matched_tokens[c.worker_id] for c in holders)
    return _least([c for c in holders if matched_tokens[c.worker_id] == longest], turn, kv_weight).worker_id


def session_affinity(
    candidates: Sequence[WorkerLoad],
    session_key: str,
    imbalance: Imbalance,
    turn: int = 0,
    *,
    kv_weight: float = DEFAULT_KV_WEIGHT,
) -> str:
    """Rendezvous (highest-random-weight) hashing: the session's rank is the candidate with the highest
    ``hash(session_key, worker_id)``, so a worker coming or going moves only the sessions it wins or
    held. An overloaded rank passes the request to the session's next rank in that order (stable too)."""
    least = _least(candidates, turn, kv_weight)
    ranked = sorted(candidates, key=lambda c: _rendezvous_weight(session_key, c.worker_id), reverse=True)
    return next(c for c in ranked if not imbalance.overloaded(c, least)).worker_id  # ``least`` always qualifies


@dataclass(frozen=True)
class Pick:
    """A routing decision. ``reason``: ``prefix`` (the longest cached prefix), ``session`` (the session's
    rank), ``spill`` (the preferred rank was overloaded), ``least_load`` or ``round_robin``."""

    worker_id: str
    reason: str


def choose(
    policy: RoutingPolicy,
    role: str,
    candidates: Sequence[WorkerLoad],
    *,
    turn: int = 0,
    matched_tokens: Mapping[str, int] | None = None,
    session_key: str | None = None,
    prompt_tokens: int = 0,
) -> Pick:
    """The rank ``policy`` picks among ``candidates`` (all of ``role``) for one request, and why. A rank
    that reports draining is passed over while another can take the request."""
    if not candidates:
        raise ValueError("choose needs at least one candidate")
    live = [c for c in candidates if not (c.fresh and c.draining)] or list(candidates)
    if policy.name == "round_robin":
        return Pick(round_robin(live, turn), "round_robin")
    if role == "decode" or policy.name == "least_load":
        return Pick(least_load(live, turn, kv_weight=policy.kv_weight), "least_load")
    if session_key and policy.name in _SESSION_POLICIES:
        chosen = session_affinity(live, session_key, policy.imbalance, turn, kv_weight=policy.kv_weight)
        home = max(live, key=lambda c: _rendezvous_weight(session_key, c.worker_id)).worker_id
        return Pick(chosen, "session" if chosen == home else "spill")
    if policy.name in _PREFIX_POLICIES:
        matched, min_matched = matched_tokens or {}, max(policy.min_matched_tokens(prompt_tokens), 1)
        chosen = prefix_aware(
            live, matched, policy.imbalance, turn, min_matched=min_matched, kv_weight=policy.kv_weight
        )
        if matched.get(chosen, 0) >= min_matched:
            return Pick(chosen, "prefix")
        held = any(matched.get(c.worker_id, 0) >= min_matched for c in live)
        return Pick(chosen, "spill" if held else "least_load")
    return Pick(least_load(live, turn, kv_weight=policy.kv_weight), "least_load")


# ---- helpers ----------------------------------------------------------------------------------------------


def _by_id(candidates: Sequence[WorkerLoad]) -> list[WorkerLoad]:
    if not candidates:
        raise ValueError("a policy needs at least one candidate")
    return sorted(candidates, key=lambda c: c.worker_id)


def _least(candidates: Sequence[WorkerLoad], turn: int, kv_weight: float) -> WorkerLoad:
    ordered = _by_id(candidates)
    best = min(c.score(kv_weight) for c in ordered)
    tied = [c for c in ordered if c.score(kv_weight) == best]
    return tied[turn % len(tied)]


def _rendezvous_weight(session_key: str, worker_id: str) -> int:
    digest = hashlib.blake2b(digest_size=8, person=b"k2s-session")
    digest.update(session_key.encode("utf-8") + b"\x00" + worker_id.encode("utf-8"))
    return int.from_bytes(digest.digest(), "big")
