"""The per-request ledger of the fault tests (reliability.md §4.1): exactly one outcome per request.

Lifecycle: a test makes one ``Ledger``, runs its requests (each under its own deadline: a request
with no terminal event by then is recorded ``hung``) and records one ``Result`` per request id; a
second outcome for the same id fails the test at once. ``ledger.figure(...)`` renders the report
line of docs/RELIABILITY.md ("F faults injected over R requests: R terminal, 0 hung, ...") and
``report(name, line)`` prints it and, when ``K2SERVE_RELIABILITY_REPORT`` names a file, appends it
there (how the figures in docs/RELIABILITY.md are collected).

Outcome kinds (the text before the first ``:``; the rest says why):
- ``ok``: finished normally (with the oracle's tokens when the test knows them);
- ``wrong``: finished with other tokens than the oracle's, or a stream that ended without a finish;
- ``error``: a clean terminal error (an ``error`` finish event, a gRPC status, a 4xx/5xx answer,
  an SSE error event); ``error: http 503 ...``-style texts keep the status in the reason;
- ``cancelled``: the client itself gave up (its own timeout or disconnect, by design of the test);
- ``raised``: an unexpected exception in the client path (a bug of the router or the workers);
- ``hung``: no terminal event by the request's deadline.
"""

from __future__ import annotations

import asyncio
import os
import statistics
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

KINDS = ("ok", "wrong", "error", "cancelled", "raised", "hung")


@dataclass(frozen=True)
class Result:
    request_id: str
    outcome: str  # "<kind>" or "<kind>: <why>", kind in KINDS
    tokens: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def kind(self) -> str:
        return self.outcome.split(":", 1)[0]


@dataclass
class Ledger:
    """Exactly one outcome per request id."""

    results: dict[str, Result] = field(default_factory=dict)

    def record(self, result: Result) -> Result:
        assert result.kind in KINDS, f"{result.request_id}: unknown outcome {result.outcome!r}"
        earlier = self.results.get(result.request_id)
        assert earlier is None, f"{result.request_id}: a second outcome {result.outcome!r} after {earlier}"
        self.results[result.request_id] = result
        return result

    def kinds(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for result in self.results.values():
            counts[result.kind] = counts.get(result.kind, 0) + 1
        return counts

    def with_kind(self, kind: str) -> list[Result]:
        return [r for r in self.results.values() if r.kind == kind]

    def assert_none(self, *kinds: str) -> None:
        """No result of these kinds (default: hung, wrong, raised), with the offenders in the message."""
        bad = [r for r in self.results.values() if r.kind in (kinds or ("hung", "wrong", "raised"))]
        assert not bad, f"{len(bad)} of {len(self.results)} requests: " + "; ".join(
            f"{r.request_id}: {r.outcome}" for r in bad[:8]
        )

    def figure(self, faults: int, *, leaked_blocks: int = 0, recovery_s: list[float] | None = None) -> str:
        """``F faults injected over R requests: T terminal, H hung, ...`` (reliability.md §4.1)."""
        counts = self.kinds()
        total = len(self.results)
        hung = counts.get("hung", 0)
        parts = [
            f"{faults} faults injected over {total} requests: {total - hung} terminal",
            f"{hung} hung",
            f"{counts.get('ok', 0)} ok",
            f"{counts.get('error', 0) + counts.get('cancelled', 0)} clean errors",
            f"{counts.get('wrong', 0) + counts.get('raised', 0)} wrong",
            f"{leaked_blocks} leaked blocks",
        ]
        if recovery_s:
            ordered = sorted(recovery_s)
            p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
            parts.append(f"recovery p50 {statistics.median(ordered):.2f} s / p99 {p99:.2f} s")
        return ", ".join(parts)


async def settle(consume: Awaitable[str], deadline_s: float, *, clean: tuple[type[Exception], ...] = ()) -> str:
    """The outcome of ``consume`` (which returns one itself) run under its deadline: ``hung`` when the
    deadline passes, ``error`` for a gRPC status or one of the ``clean`` exceptions, ``raised`` for
    anything else (a bug of the client path, the router or the workers)."""
    try:
        return await asyncio.wait_for(consume, deadline_s)
    except TimeoutError:
        return "hung"
    except grpc.aio.AioRpcError as exc:
        return f"error: {exc.code().name}: {exc.details()}"
    except clean as exc:
        return f"error: {exc}"
    except Exception as exc:
        return f"raised: {type(exc).__name__}: {exc}"


def report(name: str, line: str) -> None:
    """Print the figure; append ``name: line`` to $K2SERVE_RELIABILITY_REPORT when it is set."""
    print(f"[reliability] {name}: {line}")
    target = os.environ.get("K2SERVE_RELIABILITY_REPORT")
    if target:
        with Path(target).open("a", encoding="utf-8") as out:
            out.write(f"{name}: {line}\n")
