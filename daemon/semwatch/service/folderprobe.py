"""Is the watch folder answering? A bounded-time look at it from a helper thread.

A watch folder on a share that freezes (a dead NFS or SMB server, a hung FUSE daemon) makes every
call on it block in the kernel, for minutes or for ever. The watcher thread then blocks in its scan
and would show only after `[watch] stuck_seconds` as "stage watcher has not moved", as if the daemon
were at fault; and any other thread that looks at the folder would block with it. So one helper
thread stats the folder about once a second and everyone else only asks it (`state()`, which never
blocks): a stat that has not answered for `unreachable_after` seconds (about two polling intervals,
at least UNREACHABLE_MIN_SECONDS) means the folder is unreachable. One stat at a time: a probe
blocked in the kernel is not joined by more threads; it is a daemon thread and the process does
not wait for it.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from semwatch.config import WatchSettings

log = logging.getLogger("semwatch.watcher")

PROBE_SECONDS = 1.0  # one stat of the folder about this often
UNREACHABLE_MIN_SECONDS = 5.0  # a slow share answers a stat within this; a frozen one does not


def unreachable_after(settings: WatchSettings) -> float:
    """Seconds without an answer after which the folder counts as unreachable."""
    return max(UNREACHABLE_MIN_SECONDS, 2 * settings.poll_interval_seconds)


@dataclass(frozen=True)
class FolderState:
    folder: Path
    exists: bool  # the last answer: it is a folder
    silent_for: float  # how long the stat in flight has waited for an answer (0: none waiting)
    unreachable: bool  # silent for longer than the limit

    def problem(self) -> tuple[str, str] | None:
        """(condition name, text) for the daemon's health, or None when all is well."""
        if self.unreachable:
            return ("folder_unreachable", f"watch folder unreachable: {self.folder} has not answered for "
                    f"{self.silent_for:.0f} s (a frozen network share?)")
        if not self.exists:
            return "folder", f"watch folder gone: {self.folder}"
        return None


class FolderProbe:
    """The helper thread (`start`/`stop`) and its answer (`state`, from any thread)."""

    def __init__(self, folder: Path, *, unreachable_after: float, interval: float = PROBE_SECONDS,
                 stat_folder: Callable[[Path], os.stat_result] | None = None) -> None:
        self.folder = folder
        self.limit = unreachable_after
        self.interval = interval
        self.stat_folder = stat_folder  # None: os.stat as it is at each call
        self._lock = threading.Lock()
        self._since: float | None = None  # when the stat in flight began
        self._exists = True
        self._was_unreachable = False
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._main, name="semwatch-folder-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ends the thread unless it is blocked on the share (then the process does not wait)."""
        self._stopping.set()
        self._thread.join(self.interval + 1.0)

    def state(self) -> FolderState:
        with self._lock:
            since, exists = self._since, self._exists
        silent = time.monotonic() - since if since is not None else 0.0
        return FolderState(self.folder, exists, silent, silent >= self.limit)

    def check(self) -> FolderState:
        """`state()`, logging when the folder stops and starts answering (the daemon's status loop)."""
        now = self.state()
        if now.unreachable and not self._was_unreachable:
            log.error("watch folder unreachable: %s has not answered a stat for %.0f s (a frozen network "
                      "share?); the daemon waits for it, the watcher is not counted as stuck meanwhile",
                      self.folder, now.silent_for)
        elif self._was_unreachable and not now.unreachable:
            log.warning("watch folder answers again: %s", self.folder)
        self._was_unreachable = now.unreachable
        return now

    def _main(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                self._since = time.monotonic()
            try:
                exists = stat.S_ISDIR((self.stat_folder or os.stat)(self.folder).st_mode)
            except OSError:
                exists = False
            with self._lock:
                self._since = None
                self._exists = exists
            self._stopping.wait(self.interval)
