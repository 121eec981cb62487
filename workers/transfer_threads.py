"""``TransferThreads``: daemon threads that run KV transfers, kept for the next one.

Starting a Python thread costs 0.1-0.3 ms on a busy 2-core host, on each side of every transfer: a
measurable part of the fixed cost of a small transfer (``k2serve bench kv-transfer``). A transfer
handed to ``run`` goes to an idle thread if there is one, else to a new one; a thread idle for
``idle_s`` ends. Threads are daemons, like the one-off threads ``KvTransfer.start`` would make, so a
transfer blocked until its deadline never holds up interpreter exit.

Lifecycle: one per ``P2pKvServer`` / ``P2pKvClient``; its threads end on their own once idle.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable


class TransferThreads:
    """Reusable daemon threads (see the module docstring). ``run`` never blocks."""

    def __init__(self, name: str, idle_s: float = 30.0) -> None:
        self.name = name
        self.idle_s = idle_s
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads that will take the next job; a thread ends only by taking one of these away
        self._started = 0

    def run(self, job: Callable[[], None]) -> None:
        with self._lock:
            spawn = self._idle == 0
            if spawn:
                self._started += 1
            else:
                self._idle -= 1  # that thread's next job is this one
        self._jobs.put(job)
        if spawn:
            threading.Thread(target=self._loop, name=f"{self.name}-{self._started}", daemon=True).start()

    @property
    def threads_started(self) -> int:
        with self._lock:
            return self._started

    @property
    def idle_threads(self) -> int:
        with self._lock:
            return self._idle

    def _loop(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self.idle_s)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # nobody counts on this thread: it may end
                        self._idle -= 1
                        return
                continue  # a job was promised to an idle thread: stay for it
            job()  # KvTransfer._main: it catches everything itself
            with self._lock:
                self._idle += 1
