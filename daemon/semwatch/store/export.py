"""Snapshots of the database that are safe to share (`[fleet] export_folder`, `semwatch export`).

The live database is in WAL mode: its state is the main file plus `-wal`, so a file copy of it, or
a reader on a network share, can see a torn or stale database. A snapshot is made in two steps:
1. SQLite's online backup API copies the database, in one read transaction (a consistent state; the
   daemon's writer is never blocked: WAL readers do not block writers), into a private file beside
   the database, then sets `journal_mode = DELETE` there: a self-contained single file.
2. That finished file is written sequentially to the share as `.<instrument>.semwatch.db.part`,
   fsynced and renamed to `<instrument>.<UTC time>.semwatch.db`, so a reader only ever sees whole
   snapshots; the oldest beyond `keep` are then deleted.
The share only ever sees one sequential write and two renames, which any share handles, and the
database's read transaction lasts as long as a local copy, not as long as the share takes.

`write_snapshot` does the work in whatever process calls it; the daemon and `semwatch export` run
it in a child process (`python -m semwatch.store.export`, see `service.fleet_export`) killed at a
deadline: a share that hangs (a dead NFS server, a FIFO where the file should go) or fills up costs
that child, never a thread of the daemon.
"""

from __future__ import annotations

import fcntl
import os
import re
import sqlite3
import sys
from datetime import UTC, datetime
from pathlib import Path

SUFFIX = ".semwatch.db"
CHUNK = 1 << 20


def file_stem(instrument: str) -> str:
    """The instrument's name as a file-name prefix (anything but letters, digits, `-` and `_`
    becomes `_`; the name itself is inside the snapshot)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", instrument) or "_"


def snapshot_name(instrument: str, when: datetime) -> str:
    """`<instrument>.<YYYYMMDDTHHMMSS.mmmZ>.semwatch.db`: sorts by time within an instrument."""
    stamp = when.astimezone(UTC).strftime("%Y%m%dT%H%M%S.") + f"{when.microsecond // 1000:03d}Z"
    return f"{file_stem(instrument)}.{stamp}{SUFFIX}"


def part_path(folder: Path, instrument: str) -> Path:
    """Where a snapshot is written before its rename (one per instrument: a killed write's leftover
    is overwritten by the next one)."""
    return folder / f".{file_stem(instrument)}{SUFFIX}.part"


def snapshots_of(folder: Path, instrument: str) -> list[Path]:
    """The instrument's finished snapshots in `folder`, oldest first."""
    prefix = file_stem(instrument) + "."
    return sorted(p for p in folder.glob(f"*{SUFFIX}")
                  if p.name.startswith(prefix) and _STAMP.fullmatch(p.name[len(prefix):-len(SUFFIX)]))


_STAMP = re.compile(r"\d{8}T\d{6}\.\d{3}Z")


def backup_to(database: Path, target: Path) -> None:
    """A consistent, self-contained copy of `database` at `target` (replaced): the online backup in
    one step (one read transaction), then journal_mode DELETE in the copy."""
    target.unlink(missing_ok=True)
    source = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        copy = sqlite3.connect(target)
        try:
            source.backup(copy)  # pages=-1: all at once, the same state throughout
            copy.execute("PRAGMA journal_mode = DELETE")
        finally:
            copy.close()
    finally:
        source.close()


class Busy(OSError):
    """Another snapshot of this database is being written (the daemon's and `semwatch export`)."""


def write_snapshot(database: Path, folder: Path, instrument: str, keep: int, *, scratch: Path,
                   now: datetime | None = None) -> Path:
    """Back `database` up into `scratch` (a private local file), write it to `folder` under the
    part name, rename it into place, prune to `keep` snapshots of the instrument; the new path.
    One at a time per database (`<database>.export.lock`, a local flock released when the process
    ends, even killed): two writers of the one part file would interleave."""
    lock = os.open(database.with_name(database.name + ".export.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                   0o644)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(f"another snapshot of {database} is being written") from None
        return _write_snapshot(database, folder, instrument, keep, scratch=scratch, now=now)
    finally:
        os.close(lock)


def _write_snapshot(database: Path, folder: Path, instrument: str, keep: int, *, scratch: Path,
                    now: datetime | None) -> Path:
    backup_to(database, scratch)
    part = part_path(folder, instrument)
    final = folder / snapshot_name(instrument, now or datetime.now(UTC))
    try:
        _copy(scratch, part)
        part.replace(final)
        _fsync_folder(folder)
    except BaseException:
        try:
            if part.is_file():
                part.unlink()
        except OSError:
            pass
        raise
    for old in snapshots_of(folder, instrument)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def _copy(source: Path, target: Path) -> None:
    """A plain sequential write, fsynced. O_NOFOLLOW: a link planted at the part name is refused;
    without O_NONBLOCK a FIFO there blocks, as a hung share would (the caller's deadline ends it)."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with open(source, "rb") as src:
            while chunk := src.read(CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some shares cannot sync a folder; the rename is done either way
        pass
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    """`python -m semwatch.store.export DATABASE FOLDER INSTRUMENT KEEP SCRATCH`: one snapshot; its
    path on stdout, or the reason on stderr (exit 1). Run as a child with a deadline."""
    database, folder, instrument, keep, scratch = argv
    if os.environ.get("SEMWATCH_TEST_EXPORT_FAULT") == "enospc":  # tests: a share that is full
        print(f"[Errno 28] No space left on device: {folder}", file=sys.stderr)
        return 1
    try:
        path = write_snapshot(Path(database), Path(folder), instrument, int(keep), scratch=Path(scratch))
    except (OSError, sqlite3.Error) as exc:
        print(f"{exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
