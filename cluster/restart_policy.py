"""``RestartPolicy``: when a failed group may be recreated, and when the controller gives up on it.

Lifecycle: the controller asks ``delay_s(restarts)`` after the ``restarts``-th failure of a group
(exponential: ``backoff_initial_s * 2**(restarts - 1)``, capped at ``backoff_max_s``) and
``exhausted(restarts)`` to stop once ``max_restarts`` recreations have failed too; a group that has
been ready for ``reset_after_s`` starts counting from zero again (as Kubernetes resets a crash-loop
back-off), so a long-lived cluster does not run out of restarts one rare failure at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

from k2serve.cluster.config import RestartSettings


@dataclass(frozen=True)
class RestartPolicy:
    settings: RestartSettings

    def delay_s(self, restarts: int) -> float:
        if restarts <= 0:
            return 0.0
        s = self.settings
        return min(s.backoff_max_s, s.backoff_initial_s * 2.0 ** min(restarts - 1, 62))

    def exhausted(self, restarts: int) -> bool:
        return restarts > self.settings.max_restarts

    def forgives(self, ready_for_s: float) -> bool:
        return ready_for_s >= self.settings.reset_after_s
