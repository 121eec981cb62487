"""``Lockstep``: the ranks of one expert-parallel group step together.

Lifecycle: one per rank, built from the rank's ``ParallelContext`` and handed to its ``Engine``.
At the start of every engine step each rank calls ``agree(num_tokens)``: one all-gather of
(tokens scheduled, wants to stop) from every rank. Then:
- nobody has tokens -> every rank skips the forward (``StepAgreement.all_idle``), so an idle group
  costs one small collective per poll, not a model pass;
- some rank has tokens -> ranks with tokens run the forward, ranks without run the model's empty
  step (``idle_step``: each MoE layer's dispatch with zero tokens), so every collective has all
  of its members and none of them waits forever;
- every rank wants to stop -> ``all_done``: the group may exit together.
After a step that ran, ``finish_step()`` advances the shared step counter and runs the expert
balancer when its window closes (same step on every rank, since they agree on every step).

The collectives inherit the context's timeout: a dead peer makes ``agree`` (or a dispatch)
raise ``GroupError`` on every surviving rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from k2serve.workers.parallel import ParallelContext


@dataclass(frozen=True)
class StepAgreement:
    tokens: tuple[int, ...]  # [N] tokens each rank scheduled this step
    stopping: tuple[bool, ...]  # [N] each rank's wish to leave the group

    @property
    def all_idle(self) -> bool:
        return not any(self.tokens)

    @property
    def all_done(self) -> bool:
        return all(self.stopping) and self.all_idle


class StepHook(Protocol):
    """Runs between steps on every rank (the expert balancer)."""

    def after_step(self, step_index: int) -> None: ...


class Lockstep:
    def __init__(self, ctx: ParallelContext, *, hooks: tuple[StepHook, ...] = ()) -> None:
        self.ctx = ctx
        self.hooks = hooks
        self.steps = 0  # steps that ran a forward somewhere in the group (identical on every rank)
        self.stopping = False  # set by the owner when this rank has nothing more to add
        self.last: StepAgreement | None = None

    def agree(self, num_tokens: int) -> StepAgreement:
        rows = self.ctx.all_gather_ints([num_tokens, int(self.stopping)])  # [N][2]
        self.last = StepAgreement(tuple(r[0] for r in rows), tuple(bool(r[1]) for r in rows))
        return self.last

    def finish_step(self) -> None:
        self.steps += 1
        for hook in self.hooks:
            hook.after_step(self.steps)
