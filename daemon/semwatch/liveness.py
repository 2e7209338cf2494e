"""Liveness: each stage of the daemon says when it is busy and when it moves.

A thread that is alive but blocked (on a hung share, a device file, a full disk's lock) looks
healthy to `Thread.is_alive()`. So every stage (watcher, each reader, inference, writer) owns
a `Stage`: it calls `busy(detail)` when it starts a piece of work, `beat()` when
that work moves, `idle()` when it waits for more. A stage that is busy and has not moved for the
threshold is stuck; the service then stops feeding the systemd watchdog and says which stage
and what it was doing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Stuck:
    stage: str
    seconds: float
    doing: str


class Stage:
    """One stage's progress; written by its own thread, read by the service (a float and a str
    assignment are atomic under the GIL, so no lock is needed)."""

    def __init__(self, name: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._clock = clock
        self.doing: str | None = None  # None = idle (waiting for work)
        self.moved_at = clock()

    def busy(self, doing: str) -> None:
        self.doing = doing
        self.moved_at = self._clock()

    def beat(self) -> None:
        self.moved_at = self._clock()

    def idle(self) -> None:
        self.doing = None
        self.moved_at = self._clock()

    @contextmanager
    def working(self, doing: str) -> Iterator[None]:
        self.busy(doing)
        try:
            yield
        finally:
            self.idle()

    def stuck_for(self, now: float) -> float:
        """Seconds busy without moving (0 when idle)."""
        return 0.0 if self.doing is None else max(0.0, now - self.moved_at)


class Liveness:
    """The stages of one daemon."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._stages: dict[str, Stage] = {}
        self._lock = threading.Lock()

    def stage(self, name: str) -> Stage:
        with self._lock:
            stage = self._stages.get(name)
            if stage is None:
                stage = self._stages[name] = Stage(name, self._clock)
            return stage

    def remove(self, name: str) -> None:
        with self._lock:
            self._stages.pop(name, None)

    def stuck(self, threshold: float) -> list[Stuck]:
        """Busy stages that have not moved for `threshold` seconds."""
        now = self._clock()
        with self._lock:
            stages = list(self._stages.values())
        out = []
        for s in stages:
            seconds = s.stuck_for(now)
            if seconds > threshold:
                out.append(Stuck(s.name, seconds, s.doing or ""))
        return out
