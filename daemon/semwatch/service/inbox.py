"""The watcher's inbox: every message other threads send the watcher thread, typed.

The inotify thread sends hints (a name changed, a folder appeared or went, the kernel queue
overflowed); the pipeline reports what became of each submitted file (finished, retry later,
changed while read); `Wake` just ends the watcher's wait. The daemon creates one `Inbox` and hands
it to the pipeline and the watcher, so neither needs the other to exist first.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass

from semwatch.values import FileKey


@dataclass(frozen=True)
class Hint:
    """inotify: something happened to `path`; `closed` when the writer closed it or moved it in."""

    path: str
    closed: bool = False


@dataclass(frozen=True)
class FolderAppeared:
    """inotify: a new folder (what it already holds is scanned)."""

    path: str


@dataclass(frozen=True)
class FolderGone:
    """inotify: a watched folder was deleted or moved away."""

    path: str


@dataclass(frozen=True)
class Rescan:
    """inotify: events were lost (a full kernel queue or watch table): scan everything."""


@dataclass(frozen=True)
class Wake:
    """Nothing to do but stop waiting (stop() was called)."""


@dataclass(frozen=True)
class Finished:
    """pipeline: this version has its final row (a result or a failure)."""

    key: FileKey


@dataclass(frozen=True)
class Retry:
    """pipeline: reading failed in a way that may pass; look again after `delay` seconds."""

    key: FileKey
    attempts: int
    delay: float


@dataclass(frozen=True)
class Changed:
    """pipeline: the file changed or vanished while it was read; back to the settle gate."""

    key: FileKey


WatcherMessage = Hint | FolderAppeared | FolderGone | Rescan | Wake | Finished | Retry | Changed


class Inbox(queue.Queue[WatcherMessage]):
    """An unbounded queue of `WatcherMessage`s, read only by the watcher thread."""
