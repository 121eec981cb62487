"""``StopMatcher``: finds the first stop string in a stream of text pieces, holding back just enough.

Lifecycle: one per choice. ``push(text)`` returns the text that is safe to show now (it cannot be
the start of a stop string) and, once a stop string completes, the matched string (the matcher is
then done: later pushes return nothing). ``flush()`` at the end returns what was held back. With
``include`` the matched string is part of the returned text (``include_stop_str_in_output``).
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    def __init__(self, stop: Sequence[str], *, include: bool = False) -> None:
        self._stop = tuple(s for s in stop if s)
        self._include = include
        self._pending = ""
        self.matched: str | None = None

    @property
    def done(self) -> bool:
        return self.matched is not None

    def push(self, text: str) -> str:
        if self.done or not text:
            return ""
        if not self._stop:
            return text
        buffer = self._pending + text
        first: tuple[int, str] | None = None
        for stop in self._stop:
            at = buffer.find(stop)
            if at >= 0 and (first is None or at < first[0]):
                first = (at, stop)
        if first is not None:
            at, stop = first
            self.matched, self._pending = stop, ""
            return buffer[: at + len(stop)] if self._include else buffer[:at]
        keep = max((_overlap(buffer, stop) for stop in self._stop), default=0)
        safe, self._pending = buffer[: len(buffer) - keep], buffer[len(buffer) - keep :]
        return safe

    def flush(self) -> str:
        pending, self._pending = self._pending, ""
        return "" if self.done else pending


def _overlap(text: str, stop: str) -> int:
    """The length of the longest end of ``text`` that is a proper start of ``stop`` (held back)."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0
