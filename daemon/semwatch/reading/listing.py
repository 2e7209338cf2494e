"""Which files of a folder are micrographs to read: the include/exclude name rules and an
iterative scan, shared by the daemon's watcher and `semwatch reprocess FOLDER` (an archive is
listed by the same rules the daemon applies to its export folder).
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from semwatch.config import WatchSettings
from semwatch.safefs import PATH_MAX

log = logging.getLogger("semwatch.watcher")


def stat_path(path: str) -> os.stat_result:
    """The stat that keys a file's version: the target's for a link (a change of the target is a
    new version), the entry's own for a dangling link. Never opens anything (safe on FIFOs)."""
    try:
        return os.stat(path)  # noqa: PTH116 - str paths on the hot path
    except FileNotFoundError:
        return os.lstat(path)


@dataclass(frozen=True)
class NameFilter:
    include: tuple[str, ...]
    exclude: tuple[str, ...]

    @classmethod
    def from_settings(cls, settings: WatchSettings) -> NameFilter:
        return cls(tuple(p.lower() for p in settings.include), tuple(p.lower() for p in settings.exclude))

    def wants(self, name: str) -> bool:
        low = name.lower()
        if any(fnmatch.fnmatchcase(low, p) for p in self.exclude):
            return False
        return any(fnmatch.fnmatchcase(low, p) for p in self.include)

    def enters(self, dirname: str) -> bool:
        """Sub-folders matching an exclude pattern (".*" hidden, temporary) are skipped."""
        low = dirname.lower()
        return not any(fnmatch.fnmatchcase(low, p) for p in self.exclude)


@dataclass(frozen=True)
class TooLong:
    """A path the scan found that is too long to open (PATH_MAX): recorded failed, never read."""

    path: str
    st: os.stat_result


def scan(folder: Path, names: NameFilter, recursive: bool,
         too_long: list[TooLong] | None = None) -> Iterator[tuple[str, os.stat_result]]:
    """Every wanted entry under `folder` that is not a folder (regular files, and also FIFOs,
    devices and links, which the reader refuses with a recorded reason) with its stat. Iterative,
    so any depth is fine; links to folders are never entered; unreadable sub-folders are skipped.
    Wanted files whose path is too long to open are appended to `too_long`."""
    stack = [str(folder)]
    while stack:
        current = stack.pop()
        try:
            with os.scandir(current) as it:
                entries = list(it)
        except OSError as exc:
            if current == str(folder):
                raise
            log.debug("cannot list %s: %s", current, exc)
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if recursive and names.enters(entry.name):
                        if len(os.fsencode(entry.path)) >= PATH_MAX - 1:
                            _too_deep(entry.path)
                        else:
                            stack.append(entry.path)
                elif names.wants(entry.name):
                    if len(os.fsencode(entry.path)) >= PATH_MAX and too_long is not None:
                        too_long.append(TooLong(entry.path, _stat_in(current, entry.name)))
                        continue
                    yield entry.path, stat_path(entry.path)
            except OSError:
                continue


_reported_deep: set[str] = set()


def _too_deep(path: str) -> None:
    """A folder whose path is too long to list: said once (a hostile tree must not flood the log)."""
    if path not in _reported_deep and len(_reported_deep) < 1000:
        _reported_deep.add(path)
        log.warning("folder path too long to read (%d bytes, limit %d); its files are not processed: %s",
                    len(os.fsencode(path)), PATH_MAX - 1, path[:200] + "...")


def _stat_in(folder: str, name: str) -> os.stat_result:
    """lstat of `name` inside `folder` through a folder descriptor (the full path is too long)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return os.stat(name, dir_fd=fd, follow_symlinks=False)
    finally:
        os.close(fd)
