"""Test-only fault hooks of one rank (reliability.md §4.1, fault injectors item 3): what to break
(``FaultPlan``, parsed from ``K2SERVE_FAULTS``) and the per-rank counters that decide when
(``FaultInjector``).

``K2SERVE_FAULTS`` is a comma-separated list of ``key=value``; every fault is off by default:

- ``fail_forward_after=N``: engine steps (forward passes) 1..N run normally, each later one raises
  ``InjectedFault`` before computing (vLLM's ``evil_forward``); ``fail_forward_times=M`` fails only
  the next M of them (default: every later one);
- ``block_before_step=PATH``: before each engine step with requests, the engine loop waits while
  the file PATH exists (polled every 10 ms on the event loop, never blocking it), at most
  ``block_max_s`` seconds (default 60) per step;
- ``kv_send_delay_ms=D``: the prefill side waits D ms before sending each KV transfer;
- ``kv_drop_every=K``: every K-th KV transfer this rank sends fails on the sender side
  ("injected fault: dropped");
- ``kv_corrupt_every=K``: every K-th KV transfer this rank sends has one byte flipped on the wire
  after its checksum was computed (a receiver with checksums on fails it: "checksum mismatch");
- ``step_ms_per_token=X``: every forward pass also sleeps X ms per scheduled token, as a device
  would compute them: a rank with a known capacity (the autoscaler's load-step benchmark), or a slow rank.
- ``role=prefill|decode|mixed``: the plan applies to ranks of that role only (default: every rank).

Unknown keys, repeated keys and bad values raise ``ValueError`` naming the key.

Lifecycle: the entry point that builds ``WorkerOptions`` (``cluster/worker_actor.py``) parses the
variable once; the worker service builds one ``FaultInjector(plan, role)`` per rank, logs
``describe()`` as a warning when it is active, and hands its hooks to the engine (``before_forward``),
the engine loop (``barrier``) and the KV senders (``next_kv_send``, one call per transfer). The
counters live in the injector, so two ranks of one process never share them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, fields

from k2serve.workers.kv_transfer import SendFault

logger = logging.getLogger(__name__)

ENV_VAR = "K2SERVE_FAULTS"
_ROLES = ("prefill", "decode", "mixed")
_BARRIER_POLL_S = 0.01


class InjectedFault(RuntimeError):
    """Raised by a fault hook in place of the real failure it stands for."""


@dataclass(frozen=True)
class FaultPlan:
    fail_forward_after: int | None = None  # steps that run normally before the failures start
    fail_forward_times: int | None = None  # how many steps fail after those (None: every later one)
    block_before_step: str | None = None  # barrier file: steps wait while it exists
    block_max_s: float = 60.0  # the longest one step waits at the barrier
    kv_send_delay_ms: float = 0.0
    kv_drop_every: int = 0  # 0 = never
    kv_corrupt_every: int = 0  # 0 = never
    role: str | None = None  # only ranks of this role (None: every rank)
    step_ms_per_token: float = 0.0  # emulated device time per scheduled token (a slow rank; load tests)

    def __post_init__(self) -> None:
        if self.fail_forward_after is not None and self.fail_forward_after < 0:
            raise ValueError(f"fail_forward_after: must be >= 0, got {self.fail_forward_after}")
        if self.fail_forward_times is not None:
            if self.fail_forward_times < 1:
                raise ValueError(f"fail_forward_times: must be >= 1, got {self.fail_forward_times}")
            if self.fail_forward_after is None:
                raise ValueError("fail_forward_times: needs fail_forward_after")
        if self.block_before_step is not None and not self.block_before_step:
            raise ValueError("block_before_step: needs a file path")
        if not self.block_max_s > 0:
            raise ValueError(f"block_max_s: must be > 0, got {self.block_max_s}")
        if not 0 <= self.step_ms_per_token <= 1000:
            raise ValueError(f"step_ms_per_token: must be in [0, 1000], got {self.step_ms_per_token}")
        if not 0 <= self.kv_send_delay_ms <= 600_000:
            raise ValueError(f"kv_send_delay_ms: must be in [0, 600000], got {self.kv_send_delay_ms}")
        for name in ("kv_drop_every", "kv_corrupt_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 1 (or 0 for never), got {getattr(self, name)}")
        if self.role is not None and self.role not in _ROLES:
            raise ValueError(f"role: expected prefill, decode or mixed, got {self.role!r}")

    @classmethod
    def parse(cls, text: str) -> FaultPlan:
        """The plan of a ``K2SERVE_FAULTS`` value ("" or blanks: no fault)."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, object] = {}
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            key, sep, raw = item.partition("=")
            key, raw = key.strip(), raw.strip()
            if not sep:
                raise ValueError(f"{ENV_VAR}: expected key=value, got {item!r}")
            if key not in known:
                raise ValueError(f"{key}: unknown fault key; known: {', '.join(sorted(known))}")
            if key in values:
                raise ValueError(f"{key}: given twice")
            values[key] = _convert(key, raw)
        return cls(**values)  # type: ignore[arg-type]

    @property
    def active(self) -> bool:
        return self != FaultPlan(role=self.role, block_max_s=self.block_max_s)

    def applies_to(self, role: str) -> bool:
        return self.active and (self.role is None or self.role == role)

    def describe(self) -> str:
        """``key=value`` of every fault that is on, in the ``K2SERVE_FAULTS`` syntax ("" when none)."""
        default = FaultPlan()
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value != getattr(default, f.name):
                parts.append(f"{f.name}={value:g}" if isinstance(value, float) else f"{f.name}={value}")
        return ",".join(parts)


def _convert(key: str, raw: str) -> object:
    if key in ("block_before_step", "role"):
        if not raw:
            raise ValueError(f"{key}: needs a value")
        return raw
    try:
        if key in ("block_max_s", "kv_send_delay_ms", "step_ms_per_token"):
            return float(raw)
        return int(raw)
    except ValueError:
        raise ValueError(f"{key}: expected a number, got {raw!r}") from None


class FaultInjector:
    """One rank's fault hooks and their counters (see the module docstring); inert when the plan
    does not apply to ``role``. Hooks are called from one thread each: ``before_forward`` from the
    engine's step, ``barrier`` from the loop, ``next_kv_send`` from the service's event loop."""

    def __init__(self, plan: FaultPlan, role: str) -> None:
        self.plan = plan if plan.applies_to(role) else FaultPlan()
        self.role = role
        self.forward_steps = 0  # forward passes seen by before_forward
        self.failed_steps = 0  # of which failed on purpose
        self.kv_sends = 0  # transfers seen by next_kv_send
        self.kv_dropped = 0
        self.kv_corrupted = 0
        self.barrier_waits = 0  # steps that found the barrier file

    @property
    def active(self) -> bool:
        return self.plan.active

    def describe(self) -> str:
        return self.plan.describe()

    @property
    def fails_forwards(self) -> bool:
        return self.plan.fail_forward_after is not None

    @property
    def blocks_steps(self) -> bool:
        return self.plan.block_before_step is not None

    @property
    def emulates_device(self) -> bool:
        return self.plan.step_ms_per_token > 0

    def device_delay(self, num_tokens: int) -> None:
        """The engine's hook after a forward pass: sleep as a device would compute ``num_tokens``."""
        time.sleep(num_tokens * self.plan.step_ms_per_token / 1000.0)

    def before_forward(self) -> None:
        """The engine's hook right before a forward pass; raises ``InjectedFault`` on the steps to fail."""
        plan = self.plan
        self.forward_steps += 1
        if plan.fail_forward_after is None or self.forward_steps <= plan.fail_forward_after:
            return
        if plan.fail_forward_times is not None and self.failed_steps >= plan.fail_forward_times:
            return
        self.failed_steps += 1
        raise InjectedFault(f"injected fault: forward step {self.forward_steps} failed")

    async def barrier(self, between: Callable[[], bool]) -> bool:
        """Wait while the barrier file exists (bounded by ``block_max_s``), calling ``between()`` after
        every poll (the loop applies its commands there) and leaving early once it returns False (no
        step is waiting any more); True when it waited."""
        path = self.plan.block_before_step
        if path is None or not os.path.exists(path):
            return False
        self.barrier_waits += 1
        deadline = time.monotonic() + self.plan.block_max_s
        while os.path.exists(path):
            if time.monotonic() >= deadline:
                logger.warning("fault barrier %s still there after %gs: stepping on", path, self.plan.block_max_s)
                break
            await asyncio.sleep(_BARRIER_POLL_S)
            if not between():
                break
        return True

    def next_kv_send(self) -> SendFault:
        """The faults of the next KV transfer this rank sends (counts it)."""
        plan = self.plan
        if not (plan.kv_send_delay_ms or plan.kv_drop_every or plan.kv_corrupt_every):
            return SendFault()
        self.kv_sends += 1
        drop = bool(plan.kv_drop_every) and self.kv_sends % plan.kv_drop_every == 0
        corrupt = not drop and bool(plan.kv_corrupt_every) and self.kv_sends % plan.kv_corrupt_every == 0
        self.kv_dropped += drop
        self.kv_corrupted += corrupt
        return SendFault(delay_s=plan.kv_send_delay_ms / 1000.0, drop=drop, corrupt=corrupt)
