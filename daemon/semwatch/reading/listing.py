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


def confinement_root(path: str, watch_folder: Path) -> str:
    """Where reads of a recorded file are confined: the watch folder for its files, else the file's
    own folder (a row that `semwatch reprocess FOLDER` ingested from an archive: its sidecar lies
    beside it). `reprocess` and the daemon's catch-up both read ledger rows under it."""
    folder, file = watch_folder.absolute(), Path(path).absolute()
    return str(folder if file.is_relative_to(folder) else file.parent)


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
    Wanted files whose path is too long to open are appended to `too_long`.

    A stream: entries are yielded as the folder is read, never gathered, so a folder of a million
    files holds memory for one entry at a time (plus the sub-folders still to enter). One folder
    is open at a time; the consumer's pace holds it open."""
    stack = [str(folder)]
    while stack:
        current = stack.pop()
        try:
            listing = os.scandir(current)
        except OSError as exc:
            if current == str(folder):
                raise
            log.debug("cannot list %s: %s", current, exc)
            continue
        with listing:
            for entry in _read(listing, current, top=current == str(folder)):
                try:
                    found = _wanted(entry, current, names, recursive, stack, too_long)
                except OSError:
                    continue
                if found is not None:
                    yield found


def _read(listing: Iterator[os.DirEntry[str]], current: str, *, top: bool) -> Iterator[os.DirEntry[str]]:
    """The entries of one folder as it is read; an error while reading a sub-folder ends that
    folder only (the top folder's is raised, as when it cannot be opened)."""
    try:
        yield from listing
    except OSError as exc:
        if top:
            raise
        log.debug("cannot list %s: %s", current, exc)


def _wanted(entry: os.DirEntry[str], current: str, names: NameFilter, recursive: bool, stack: list[str],
            too_long: list[TooLong] | None) -> tuple[str, os.stat_result] | None:
    """The entry with its stat if it is wanted; a sub-folder to enter goes onto `stack`."""
    if entry.is_dir(follow_symlinks=False):
        if recursive and names.enters(entry.name):
            if len(os.fsencode(entry.path)) >= PATH_MAX - 1:
                _too_deep(entry.path)
            else:
                stack.append(entry.path)
        return None
    if not names.wants(entry.name):
        return None
    if len(os.fsencode(entry.path)) >= PATH_MAX and too_long is not None:
        too_long.append(TooLong(entry.path, _stat_in(current, entry.name)))
        return None
    return entry.path, stat_path(entry.path)


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
