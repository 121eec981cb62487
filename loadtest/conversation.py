"""``Workload`` and ``Conversation``: what one sweep point sends, as sessions of one or more turns.

Lifecycle: a dataset builder returns a frozen ``Workload`` per sweep point; the runner calls
``conversations()`` to get fresh mutable ``Conversation``s (one per arrival: a single-turn request,
or an agentic session) and drives each turn by turn: ``request(turn)``, send, ``on_reply(turn,
record)``. A single-turn conversation ignores the reply; an agentic one grows its history.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from k2serve.loadtest.agentic import AgenticConversation, AgenticSession
from k2serve.loadtest.bench_request import BenchRequest, RequestRecord


class Conversation(Protocol):
    """Contract: ``request(t)`` is asked for t = 0, 1, ... ``num_turns - 1`` in order, each after
    ``on_reply(t - 1, ...)`` of a successful previous turn."""

    num_turns: int
    session_id: str | None

    def request(self, turn: int) -> BenchRequest: ...

    def on_reply(self, turn: int, record: RequestRecord) -> None: ...


class SingleTurn:
    def __init__(self, request: BenchRequest) -> None:
        self._request = request
        self.num_turns = 1
        self.session_id = request.session_id

    def request(self, turn: int) -> BenchRequest:
        return self._request

    def on_reply(self, turn: int, record: RequestRecord) -> None:
        return None


@dataclass(frozen=True)
class Workload:
    """Either independent requests (random, sharegpt) or agentic sessions."""

    name: str
    requests: tuple[BenchRequest, ...] = ()
    sessions: tuple[AgenticSession, ...] = ()

    @property
    def num_requests(self) -> int:
        return len(self.requests) + sum(s.num_turns for s in self.sessions)

    def conversations(self) -> list[Conversation]:
        out: list[Conversation] = [SingleTurn(r) for r in self.requests]
        out.extend(AgenticConversation(s) for s in self.sessions)
        return out

    def warmup_requests(self, n: int) -> list[BenchRequest]:
        """The first turn of the first ``n`` conversations (cycled when there are fewer)."""
        firsts = [c.request(0) for c in self.conversations()]
        return [firsts[i % len(firsts)] for i in range(n)] if firsts else []
