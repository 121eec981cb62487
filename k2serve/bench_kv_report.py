"""The table and the goal line of ``k2serve bench kv-transfer``: every figure taken from the measured
``Result``s, every ratio against the raw send of the same case.

Lifecycle: pure functions, called by ``bench_kv_transfer.render`` once every case has run.
"""

from __future__ import annotations

import os
import statistics
from typing import NamedTuple

from k2serve.bench_kv_case import Case, Result

GOAL = 0.8


class Handoff(NamedTuple):
    """One way the p2p transport hands a request over, and the floor method it is held against."""

    method: str
    floor: str
    name: str
    floor_what: str  # what the floor does, in words
    own_cost: str  # what the transport adds over its floor


HANDOFFS = (
    Handoff(
        "push",
        "floor-push",
        "Push (the serving default, `kv_push: true`: the offer, the answer and the header go out while the "
        "prefill's last forward runs, so only the rows and the acknowledgement come after it)",
        "one `send` per layer of ready rows and a 1-value acknowledgement",
        "its threads and the Python around each message",
    ),
    Handoff(
        "p2p",
        "floor",
        "Pull (the fallback, for a refused push or `kv_push: false`: the offer and the answer come after the prefill)",
        "a 1-value offer, then one `send` per layer of ready rows and a 1-value acknowledgement",
        "its threads and the Python around each message, the store",
    ),
)


def ratio(r: Result, method: str) -> float:
    return r.gbs(method) / r.gbs("raw")


def ratio_text(value: float) -> str:
    """Two decimals, or three where two would round a miss up to the goal (0.797 -> "0.797", not "0.80")."""
    return f"{value:.3f}" if value < GOAL <= round(value, 2) else f"{value:.2f}"


def label(case: Case) -> str:
    return f"{case.model} {case.num_tokens}" + (f" ×{case.in_flight}" if case.in_flight > 1 else "")


def _cases_text(results: list[Result], method: str) -> str:
    return ", ".join(f"{label(r.case)} ({ratio_text(ratio(r, method))})" for r in results) or "none"


def table_rows(results: list[Result]) -> list[str]:
    """The markdown table: a header, then one row per case."""
    rows = [
        "| model | layers × row_dim | tokens | pages | in flight | MB moved | push GB/s | pull GB/s | "
        "pull no-copy GB/s | gRPC GB/s | raw send GB/s | **push / raw** | **pull / raw** | pull no-copy / raw | "
        "push floor / raw | pull floor / raw | gRPC / raw | push median ms | pull median ms | raw median ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r.case
        gbs = " | ".join(f"{r.gbs(m):.2f}" for m in ("push", "p2p", "p2p-nocopy", "grpc", "raw"))
        ratios = " | ".join(f"{ratio(r, m):.2f}" for m in ("p2p-nocopy", "floor-push", "floor", "grpc"))
        ms = " | ".join(f"{statistics.median(r.seconds[m]) * 1e3:.2f}" for m in ("push", "p2p", "raw"))
        rows.append(
            f"| {c.model} | {c.num_layers} × {c.row_dim} | {c.num_tokens} | {c.pages} | {c.in_flight} | "
            f"{c.nbytes / 1e6:.1f} | {gbs} | **{ratio(r, 'push'):.2f}** | **{ratio(r, 'p2p'):.2f}** | {ratios} | {ms} |"
        )
    return rows


def goal_line(results: list[Result]) -> str:
    """What the table says about the goal, in words."""
    parts = [
        f"Goal: p2p ≥ {GOAL} of the raw send, on contiguous pages (a fresh `BlockPool`'s ids, what a serving rank "
        "gets; sent from and received into the pages, no gather, no scatter)."
    ]
    contiguous = [r for r in results if r.case.pages == "contiguous"]
    shuffled = [r for r in results if r.case.pages == "shuffled"]
    for handoff in HANDOFFS if contiguous else ():
        met = [r for r in contiguous if ratio(r, handoff.method) >= GOAL]
        missed = [r for r in contiguous if ratio(r, handoff.method) < GOAL]
        parts.append(
            f"{handoff.name}: met for {_cases_text(met, handoff.method)}; "
            f"not met for {_cases_text(missed, handoff.method)}."
        )
        parts.append(_floor_text(missed, handoff))
    single = [r for r in contiguous if r.case.in_flight == 1]
    if single:
        smallest = min(single, key=lambda r: r.case.layout.nbytes)
        extra_ms = {
            m: (statistics.median(smallest.seconds[m]) - statistics.median(smallest.seconds["raw"])) * 1e3
            for m in ("push", "p2p")
        }
        parts.append(
            f"A transfer's fixed cost over the raw send, from the smallest case ({smallest.case.layout.nbytes / 1e6:.1f} "
            f"MB): {extra_ms['push']:.2f} ms pushed, {extra_ms['p2p']:.2f} ms pulled. The push's is the messages "
            "per layer, the acknowledgement and the wake-ups of the transfer threads of two processes on "
            f"{os.cpu_count()} cores; the pull adds the offer and the answer through the prefill rank's TCPStore "
            "and the header. The raw baseline is one message on a group formed beforehand, with none of these. "
            "The fixed cost weighs most on the small transfers; with several in flight (the pair's lanes) it "
            "overlaps other transfers' bytes, as far as the cores allow."
        )
    if shuffled:
        ranges = {m: [ratio(r, m) for r in shuffled] for m in ("push", "p2p")}
        parts.append(
            f"Shuffled pages (every block its own run, so both sides stage): push {min(ranges['push']):.2f}–"
            f"{max(ranges['push']):.2f}, pull {min(ranges['p2p']):.2f}–{max(ranges['p2p']):.2f}, the gather and "
            f"the scatter being two more passes over the bytes; on a {os.cpu_count()}-core host they add to the "
            "time, since both ends of a loopback send already keep a core busy copying (with NCCL or RDMA the "
            "wire does not use the CPU)."
        )
    return " ".join(parts)


def _floor_text(missed: list[Result], handoff: Handoff) -> str:
    """What the handoff's floor says about the cases that missed the goal."""
    below = [r for r in missed if ratio(r, handoff.floor) < GOAL]
    above = [r for r in missed if ratio(r, handoff.floor) >= GOAL]
    text = []
    if below:
        text.append(
            f"Its floor ({handoff.floor_what}, on the formed group, on one thread a side) is itself below {GOAL} "
            f"for {_cases_text(below, handoff.floor)}: where that holds across runs, no transport that moves "
            "these rows that way meets the goal on this machine."
        )
    if above:
        text.append(
            f"Its floor reaches {GOAL} for {_cases_text(above, handoff.floor)}: there the gap is the transport's "
            f"own cost ({handoff.own_cost})."
        )
    return " ".join(text)
