"""SQLite connections: WAL, busy timeout, read-only mode for readers.

Every connection opened here is tracked, so the test suite can fail a test that leaves one open
(an unclosed database is a leaked file handle and, for a writer, a held lock).
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import weakref
from pathlib import Path

log = logging.getLogger("semwatch.store")

_open: weakref.WeakSet[TrackedConnection] = weakref.WeakSet()


class TrackedConnection(sqlite3.Connection):
    """A connection that knows whether it was closed."""

    closed: bool = False

    def close(self) -> None:
        self.closed = True
        super().close()


def connect(path: Path, *, readonly: bool = False, busy_timeout_ms: int = 10000,
            check_same_thread: bool = True, immutable: bool = False) -> TrackedConnection:
    """Open `path`; writers get WAL mode, readers open the file read-only (never block the writer).
    `immutable` (readers of a file that never changes, e.g. a fleet snapshot): no locks at all."""
    if readonly:
        uri = f"{Path(path).resolve().as_uri()}?mode=ro" + ("&immutable=1" if immutable else "")
        conn = sqlite3.connect(uri, uri=True, timeout=busy_timeout_ms / 1000,
                               factory=TrackedConnection, check_same_thread=check_same_thread)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=busy_timeout_ms / 1000, factory=TrackedConnection,
                               check_same_thread=check_same_thread, isolation_level=None)
    assert isinstance(conn, TrackedConnection)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
    _open.add(conn)
    return conn


def track(conn: TrackedConnection) -> None:
    """Count a connection opened elsewhere (an in-memory copy) among the open ones."""
    _open.add(conn)


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back if a transaction is still open. SQLite rolls back by itself on some errors
    (SQLITE_FULL, SQLITE_IOERR); a second ROLLBACK would then raise "no transaction is active" and
    hide the real error."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except Exception as exc:  # the original error is the one to report
            log.debug("rollback: %s", exc)


def open_connections() -> list[TrackedConnection]:
    """Connections opened through `connect` and not yet closed."""
    return [c for c in _open if not c.closed]


class DatabaseLocked(Exception):
    """Another daemon holds the database's lock."""


def lock_path(database: Path) -> Path:
    """`<database>.lock`: held by the daemon that owns the database, for its whole run."""
    return Path(database).with_name(Path(database).name + ".lock")


def lock_database(path: Path, tag: str = "") -> int:
    """Take the exclusive lock `<database>.lock` (flock, released by the kernel when the process
    ends, so a crash never leaves a stale lock) and write `<pid> <tag>` into it (`tag`: which
    semwatch holds it, read by `daemon_holding`). Returns its descriptor; raises `DatabaseLocked`
    naming the holder's pid when another daemon has it. Readers never take it."""
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").split()
        os.close(fd)
        raise DatabaseLocked(f"another semwatch daemon (pid {holder[0] if holder else '?'}) is using "
                             f"the database {path}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {tag}".strip().encode("utf-8") + b"\n", 0)
    return fd


def daemon_holding(database: Path) -> tuple[str, str] | None:
    """(pid, tag) of the daemon that holds `<database>.lock` now, else None. The tag is empty for a
    daemon of a release that did not write one. Takes nothing: a shared flock tried and released."""
    try:
        fd = os.open(lock_path(database), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, _, tag = os.pread(fd, 256, 0).decode("utf-8", "replace").strip().partition(" ")
            return pid or "?", tag.strip()
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class WriteLock:
    """The write lock of every process that writes the database (the daemon's writer, `semwatch
    reprocess`, any future writer), held for one batch at a time (its transaction, its results.csv
    lines and their `csv_written` marks, as one unit) and while a writer opens, creates or migrates
    the database.

    The daemon and `semwatch reprocess` may run together on one database. SQLite alone would
    serialise their transactions, but not the CSV: a batch is committed, then appended to
    results.csv, then marked written, and a second writer's start-up reconcile between those steps
    would append the same lines again. So every writer takes this lock around each batch; a batch
    takes milliseconds, so the other writer waits at most that long (or, while a full disk makes
    the holder retry, until space returns). An flock: the kernel releases it when a holder dies,
    even by kill -9, so a crash never leaves it held.

    What is locked is the database's folder, not a file beside the database: `rm semwatch.db*`
    cannot delete it, so two writers never lock different things (a lock file deleted and created
    again would let a writer of the old database and one of a new database both hold "the" lock).
    Under it a writer checks that the path still names the file it has open (`Store.check_identity`)
    before every batch, and a new database (which moves the old results.csv aside) is created only
    under it: a writer of a deleted or replaced database either finished its batch, in the old
    database and its CSV, before the new one existed, or sees the change and writes nothing."""

    def __init__(self, database: Path) -> None:
        folder = Path(database).absolute().parent
        folder.mkdir(parents=True, exist_ok=True)
        self.fd: int | None = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.depth = 0

    def __enter__(self) -> WriteLock:
        if self.fd is None:
            raise RuntimeError("the write lock is closed")
        if self.depth == 0:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        self.depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.depth -= 1
        if self.depth == 0 and self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
