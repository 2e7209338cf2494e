"""The database (SQLite, WAL) and the live results CSV: schema, ledger, the single writer.

The ledger is the `images` table keyed on (path, size_bytes, mtime_ns): one row per version of a
file. A row is inserted `pending` when the daemon queues the file and completed in place with its
result, so a restart, a duplicate event or a rescan never processes a version twice, and a file
that changes gets a new row (the old one `current = 0`). A partial unique index keeps exactly one
current row per path. Only the writer thread writes; readers open the file read-only.

The CSV is derived from the database: every finished row is appended once (one `os.write` on an
O_APPEND descriptor, so readers never see half a line) and then marked `csv_written`. After a
kill -9 the rows not yet marked are reconciled against the ids already in the file.

Paths and sample ids are stored as `safefs.path_text` (valid UTF-8, lossless: a name that is not
UTF-8 keeps its bytes as `\\xNN`); `load_ledger` turns them back into the names that open the files.
CSV cells go through `safefs.csv_cell` (no spreadsheet formulas). If the database file is deleted
or replaced under the writer, it stops before writing again (`DatabaseReplaced`); a full disk or
another transient error keeps the batch and retries with back-off.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import queue
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from semwatch.config import SampleSettings
from semwatch.safefs import csv_cell, path_from_text, path_text, text_safe
from semwatch.liveness import Stage
from semwatch.store import db
from semwatch.store.samples import KEEP_EXPECTED, update_samples
from semwatch.values import FileKey, ImageVerdict, utc_now

log = logging.getLogger("semwatch.store")

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id              INTEGER PRIMARY KEY,
    path            TEXT    NOT NULL,
    sha256          TEXT,
    size_bytes      INTEGER NOT NULL,
    mtime_ns        INTEGER NOT NULL,
    status          TEXT    NOT NULL
                    CHECK (status IN ('ok', 'unknown', 'rejected', 'failed', 'pending')),
    sample_id       TEXT,
    predicted_class TEXT,
    composition     TEXT,
    state           TEXT,
    confidence      REAL,
    tile_agreement  REAL,
    n_tiles         INTEGER,
    error           TEXT,
    model_id        TEXT,
    detected_at     TEXT    NOT NULL,
    processed_at    TEXT,
    probabilities   TEXT,
    reasons         TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    current         INTEGER NOT NULL DEFAULT 1 CHECK (current IN (0, 1)),
    csv_written     INTEGER NOT NULL DEFAULT 0,
    UNIQUE (path, size_bytes, mtime_ns)
);
CREATE UNIQUE INDEX IF NOT EXISTS images_one_current ON images (path) WHERE current = 1;
CREATE INDEX IF NOT EXISTS images_sha256 ON images (sha256);
CREATE INDEX IF NOT EXISTS images_sample ON images (sample_id) WHERE current = 1;
CREATE INDEX IF NOT EXISTS images_processed_at ON images (processed_at);
CREATE INDEX IF NOT EXISTS images_status ON images (status);

CREATE TABLE IF NOT EXISTS samples (
    sample_id   TEXT PRIMARY KEY,
    n_images    INTEGER NOT NULL,
    n_counted   INTEGER NOT NULL DEFAULT 0,
    composition TEXT,
    state       TEXT,
    predicted_class TEXT,
    confidence  REAL,
    uniformity  REAL,
    expected    TEXT,
    verdict     TEXT NOT NULL CHECK (verdict IN ('pass', 'fail', 'uncertain', 'unknown')),
    updated_at  TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS models (
    model_id   TEXT PRIMARY KEY,
    name       TEXT,
    classes    TEXT,
    created_at TEXT,
    metrics    TEXT,
    path       TEXT,
    first_used_at TEXT
);

CREATE TABLE IF NOT EXISTS daemon (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    pid          INTEGER,
    hostname     TEXT,
    started_at   TEXT,
    heartbeat_at TEXT,
    device       TEXT,
    model_id     TEXT,
    watch_folder TEXT,
    watch_mode   TEXT,
    waiting      INTEGER NOT NULL DEFAULT 0,
    in_progress  INTEGER NOT NULL DEFAULT 0,
    done         INTEGER NOT NULL DEFAULT 0,
    failed       INTEGER NOT NULL DEFAULT 0,
    images_per_s REAL NOT NULL DEFAULT 0,
    tiles_per_s  REAL NOT NULL DEFAULT 0,
    state        TEXT NOT NULL DEFAULT 'stopped'
                 CHECK (state IN ('starting', 'running', 'stopping', 'stopped')),
    message      TEXT
);
"""

FINAL_STATUSES = ("ok", "unknown", "rejected", "failed")

CSV_COLUMNS = (
    "id", "path", "sample_id", "status", "predicted_class", "composition", "state", "confidence",
    "tile_agreement", "n_tiles", "model_id", "sha256", "size_bytes", "mtime_ns", "detected_at",
    "processed_at", "error", "reasons",
)


def create_schema(conn: db.TrackedConnection) -> None:
    """Create the tables if missing (idempotent); refuses a database from a newer semwatch."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise RuntimeError(
            f"database schema version {version} is newer than this semwatch ({SCHEMA_VERSION})"
        )
    conn.executescript(SCHEMA)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


@dataclass(frozen=True)
class LedgerState:
    """What the ledger says at start-up: finished versions and versions still pending."""

    done: dict[str, tuple[int, int]]  # path -> (size, mtime_ns) of its current, finished version
    pending: dict[str, tuple[int, int, int]]  # path -> (size, mtime_ns, attempts)


def load_ledger(conn: db.TrackedConnection) -> LedgerState:
    done: dict[str, tuple[int, int]] = {}
    pending: dict[str, tuple[int, int, int]] = {}
    rows = conn.execute("SELECT path, size_bytes, mtime_ns, status, attempts FROM images WHERE current = 1")
    for row in rows:
        path = path_from_text(row["path"])
        if row["status"] == "pending":
            pending[path] = (row["size_bytes"], row["mtime_ns"], row["attempts"])
        else:
            done[path] = (row["size_bytes"], row["mtime_ns"])
    return LedgerState(done, pending)


def find_result_by_content(conn: db.TrackedConnection, sha256: str, model_id: str) -> dict[str, Any] | None:
    """A finished (not failed) result for the same content by the same model, if any."""
    row = conn.execute(
        "SELECT status, predicted_class, composition, state, confidence, tile_agreement, n_tiles, "
        "probabilities, reasons FROM images WHERE sha256 = ? AND model_id = ? "
        "AND status IN ('ok', 'unknown', 'rejected') ORDER BY id DESC LIMIT 1",
        (sha256, model_id),
    ).fetchone()
    return dict(row) if row is not None else None


# --- messages to the writer -------------------------------------------------------------------


@dataclass(frozen=True)
class Pending:
    """A version was queued for processing: insert its ledger row (superseding older versions)."""

    key: FileKey
    detected_at: str
    attempts: int = 0


@dataclass(frozen=True)
class Result:
    """A version was classified."""

    key: FileKey
    sha256: str
    sample_id: str
    verdict: ImageVerdict
    model_id: str
    expected: str | None = None  # expected class for the sample, where known


@dataclass(frozen=True)
class Started:
    """A reader is about to read a version: count the attempt first, so that a file that kills the
    daemon while it is read is not retried forever across restarts. `done` is set once committed."""

    key: FileKey
    done: threading.Event | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Refused:
    """A version is recorded failed without being read (a path too long to open, a file that
    would need no attempt to know it cannot be read)."""

    key: FileKey
    detected_at: str
    error: str


@dataclass(frozen=True)
class Attempt:
    """A read failed and will be retried."""

    key: FileKey
    attempts: int
    error: str


@dataclass(frozen=True)
class Failed:
    """A version could not be read after all attempts."""

    key: FileKey
    attempts: int
    error: str
    sha256: str | None = None
    sample_id: str | None = None


@dataclass(frozen=True)
class Gone:
    """A queued version vanished or changed before it was read: drop its pending row."""

    key: FileKey


@dataclass(frozen=True)
class DaemonStatus:
    """The `daemon` row: counts and rates, written about once a second."""

    state: str
    waiting: int = 0
    in_progress: int = 0
    done: int = 0
    failed: int = 0
    images_per_s: float = 0.0
    tiles_per_s: float = 0.0
    message: str | None = None


def exit_message(code: int) -> str:
    """`daemon.message` of a daemon that stopped with exit status `code` (the live view tells a clean
    stop from a failure by it)."""
    return f"exit {code}"


Message = Pending | Started | Result | Attempt | Failed | Refused | Gone | DaemonStatus


class DatabaseReplaced(RuntimeError):
    """The database file was deleted or replaced while the daemon had it open: writing on would
    go into a file nobody reads. The daemon exits; systemd restarts it on the new file."""


@dataclass
class WriteStats:
    results: int = 0
    failed: int = 0
    dropped: int = 0  # results for versions that were superseded meanwhile
    last_result_at: float = 0.0


class Store:
    """The writer's connection and every write the daemon makes. Not thread-safe: one owner at a time
    (opened by the service, then used only by the writer thread)."""

    def __init__(self, database: Path, results_csv: Path | None, *, busy_timeout_ms: int = 10000,
                 check_same_thread: bool = False, sample_settings: SampleSettings | None = None) -> None:
        self.conn = db.connect(database, busy_timeout_ms=busy_timeout_ms, check_same_thread=check_same_thread)
        try:
            fresh = self.conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'images'"
            ).fetchone()[0] == 0
            create_schema(self.conn)
            self.identity = _identity(database)
        except Exception:
            self.conn.close()
            raise
        self.database = database
        self.csv_path = results_csv
        self.sample_settings = sample_settings or SampleSettings()
        self.stats = WriteStats()
        if fresh and results_csv is not None:
            _set_aside_orphan_csv(results_csv)

    def close(self) -> None:
        self.conn.close()

    def check_identity(self) -> None:
        """Raise `DatabaseReplaced` if the file at the database's path is no longer the one open."""
        try:
            now = _identity(self.database)
        except FileNotFoundError:
            raise DatabaseReplaced(f"the database file was deleted: {self.database}") from None
        if now != self.identity:
            raise DatabaseReplaced(f"the database file was replaced by another file: {self.database}")

    # --- models and daemon row --------------------------------------------------------------

    def register_model(self, model_id: str, name: str | None, classes: Sequence[str],
                       created_at: str | None, metrics: dict[str, Any] | None, path: Path | None) -> None:
        self.conn.execute(
            "INSERT INTO models (model_id, name, classes, created_at, metrics, path, first_used_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (model_id) DO UPDATE SET path = excluded.path",
            (model_id, name, json.dumps(list(classes)), created_at,
             json.dumps(metrics or {}, default=str), str(path) if path else None, utc_now()),
        )

    def start_daemon(self, *, device: str, model_id: str, watch_folder: Path, watch_mode: str) -> None:
        now = utc_now()
        self.conn.execute(
            "INSERT INTO daemon (id, pid, hostname, started_at, heartbeat_at, device, model_id, "
            "watch_folder, watch_mode, waiting, in_progress, done, failed, images_per_s, tiles_per_s, "
            "state, message) "
            "VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0, 0, 0, 0, 0, 'starting', NULL) "
            "ON CONFLICT (id) DO UPDATE SET pid = excluded.pid, hostname = excluded.hostname, "
            "started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at, "
            "device = excluded.device, "
            "model_id = excluded.model_id, watch_folder = excluded.watch_folder, "
            "watch_mode = excluded.watch_mode, waiting = 0, in_progress = 0, done = 0, failed = 0, "
            "images_per_s = 0, tiles_per_s = 0, state = 'starting', message = NULL",
            (os.getpid(), socket.gethostname(), now, now, device, model_id, str(watch_folder), watch_mode),
        )

    def _daemon_status(self, msg: DaemonStatus) -> None:
        self.conn.execute(
            "UPDATE daemon SET heartbeat_at = ?, waiting = ?, in_progress = ?, done = ?, failed = ?, "
            "images_per_s = ?, tiles_per_s = ?, state = ?, message = ? WHERE id = 1",
            (utc_now(), msg.waiting, msg.in_progress, msg.done, msg.failed, msg.images_per_s,
             msg.tiles_per_s, msg.state, msg.message),
        )

    # --- the ledger -------------------------------------------------------------------------

    def apply(self, messages: Iterable[Message]) -> list[int]:
        """Apply messages in one transaction; returns the ids of rows that got a final status."""
        finished: list[int] = []
        touched: dict[str, str | None] = {}
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            for msg in messages:
                if isinstance(msg, Pending):
                    self._pending(msg)
                elif isinstance(msg, Started):
                    self.conn.execute(
                        "UPDATE images SET attempts = attempts + 1 WHERE path = ? AND size_bytes = ? "
                        "AND mtime_ns = ? AND status = 'pending'", _key(msg.key))
                elif isinstance(msg, Refused):
                    self._ensure_row(msg.key, msg.detected_at, 0)
                    row_id = self._failed(Failed(msg.key, 0, msg.error))
                    if row_id is not None:
                        finished.append(row_id)
                elif isinstance(msg, Result):
                    row_id = self._result(msg)
                    if row_id is not None:
                        finished.append(row_id)
                        touched[path_text(msg.sample_id)] = msg.expected
                elif isinstance(msg, Attempt):
                    self.conn.execute(
                        "UPDATE images SET attempts = ?, error = ? WHERE path = ? AND size_bytes = ? "
                        "AND mtime_ns = ? AND status = 'pending'",
                        (msg.attempts, text_safe(msg.error), *_key(msg.key)),
                    )
                elif isinstance(msg, Failed):
                    row_id = self._failed(msg)
                    if row_id is not None:
                        finished.append(row_id)
                        if msg.sample_id is not None:
                            touched.setdefault(path_text(msg.sample_id), KEEP_EXPECTED)
                elif isinstance(msg, Gone):
                    self.conn.execute(
                        "DELETE FROM images WHERE path = ? AND size_bytes = ? AND mtime_ns = ? "
                        "AND status = 'pending'", _key(msg.key))
                elif isinstance(msg, DaemonStatus):
                    self._daemon_status(msg)
            if touched:

                update_samples(self.conn, touched, self.sample_settings)
            self.conn.execute("COMMIT")
        except BaseException:
            _rollback(self.conn)
            raise
        return finished

    def _ensure_row(self, key: FileKey, detected_at: str, attempts: int) -> int:
        """The id of `key`'s row, inserting it `pending` (and superseding other versions) if new."""
        row = self.conn.execute(
            "SELECT id, current FROM images WHERE path = ? AND size_bytes = ? AND mtime_ns = ?", _key(key),
        ).fetchone()
        path = path_text(key.path)
        if row is not None:
            if not row["current"]:
                # A version came back (e.g. a file restored): it becomes current again.
                self._supersede(path)
                self.conn.execute("UPDATE images SET current = 1 WHERE id = ?", (row["id"],))
            return int(row["id"])
        self._supersede(path)
        cur = self.conn.execute(
            "INSERT INTO images (path, size_bytes, mtime_ns, status, detected_at, attempts, current) "
            "VALUES (?, ?, ?, 'pending', ?, ?, 1)",
            (*_key(key), detected_at, attempts),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def _supersede(self, path: str) -> None:
        # A pending version that never got a result is dropped; finished ones stay as history.
        self.conn.execute("DELETE FROM images WHERE path = ? AND current = 1 AND status = 'pending'", (path,))
        self.conn.execute("UPDATE images SET current = 0 WHERE path = ? AND current = 1", (path,))

    def _pending(self, msg: Pending) -> None:
        self._ensure_row(msg.key, msg.detected_at, msg.attempts)

    def _result(self, msg: Result) -> int | None:
        row = self._row_for_final(msg.key)
        if row is None:
            return None
        v = msg.verdict
        self.conn.execute(
            "UPDATE images SET status = ?, sha256 = ?, sample_id = ?, predicted_class = ?, composition = ?, "
            "state = ?, confidence = ?, tile_agreement = ?, n_tiles = ?, error = NULL, model_id = ?, "
            "processed_at = ?, probabilities = ?, reasons = ?, attempts = max(attempts, 1), csv_written = 0 "
            "WHERE id = ?",
            (v.status, msg.sha256, path_text(msg.sample_id), v.predicted_class, v.composition, v.state,
             float(v.confidence), float(v.tile_agreement), int(v.n_tiles), msg.model_id, utc_now(),
             json.dumps({k: round(float(p), 6) for k, p in v.probabilities.items()}),
             json.dumps([text_safe(r) for r in v.reasons]), row),
        )
        self.stats.results += 1
        self.stats.last_result_at = time.monotonic()
        return row

    def _failed(self, msg: Failed) -> int | None:
        row = self._row_for_final(msg.key)
        if row is None:
            return None
        self.conn.execute(
            "UPDATE images SET status = 'failed', error = ?, attempts = ?, sha256 = ?, sample_id = ?, "
            "processed_at = ?, csv_written = 0 WHERE id = ?",
            (text_safe(msg.error), msg.attempts, msg.sha256,
             path_text(msg.sample_id) if msg.sample_id is not None else None, utc_now(), row),
        )
        self.stats.failed += 1
        return row

    def _row_for_final(self, key: FileKey) -> int | None:
        """The pending, current row of `key` (inserted if the Pending message was never written)."""
        row = self.conn.execute(
            "SELECT id, status, current FROM images WHERE path = ? AND size_bytes = ? AND mtime_ns = ?",
            _key(key),
        ).fetchone()
        if row is None:
            return self._ensure_row(key, utc_now(), 0)
        if row["status"] != "pending" or not row["current"]:
            self.stats.dropped += 1  # already finished, or superseded by a newer version
            return None
        return int(row["id"])

    # --- CSV --------------------------------------------------------------------------------

    def append_csv(self, row_ids: Sequence[int]) -> None:
        """Append the finished rows to the CSV (one write), then mark them written."""
        self.write_csv_lines(row_ids)
        self.mark_csv_written(row_ids)

    def write_csv_lines(self, row_ids: Sequence[int]) -> None:
        """Append the rows' CSV lines in one write (all or nothing)."""
        if self.csv_path is None or not row_ids:
            return
        rows = self._csv_rows(row_ids)
        if rows:
            _append_lines(self.csv_path, rows)

    def mark_csv_written(self, row_ids: Sequence[int]) -> None:
        if self.csv_path is None or not row_ids:
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.executemany("UPDATE images SET csv_written = 1 WHERE id = ?", [(i,) for i in row_ids])
            self.conn.execute("COMMIT")
        except BaseException:
            _rollback(self.conn)
            raise

    def _csv_rows(self, row_ids: Sequence[int]) -> list[list[Any]]:
        out: list[list[Any]] = []
        cols = ", ".join(CSV_COLUMNS)
        for chunk in _chunks(list(row_ids), 500):
            marks = ",".join("?" * len(chunk))
            rows = self.conn.execute(f"SELECT {cols} FROM images WHERE id IN ({marks}) ORDER BY id", chunk)
            for r in rows:
                values = [r[c] for c in CSV_COLUMNS]
                reasons = r["reasons"]
                values[-1] = "; ".join(json.loads(reasons)) if reasons else ""
                out.append(values)
        return out

    def reconcile_csv(self) -> int:
        """After a crash: drop a torn last line, then append finished rows missing from the CSV."""
        if self.csv_path is None:
            return 0
        ids_in_file = _repair_and_read_ids(self.csv_path)
        todo = [
            int(r["id"])
            for r in self.conn.execute(
                "SELECT id FROM images WHERE csv_written = 0 AND status != 'pending' ORDER BY id"
            )
        ]
        missing = [i for i in todo if i not in ids_in_file]
        if missing:
            _append_lines(self.csv_path, self._csv_rows(missing))
        if todo:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany("UPDATE images SET csv_written = 1 WHERE id = ?", [(i,) for i in todo])
            self.conn.execute("COMMIT")
        return len(missing)


def _key(key: FileKey) -> tuple[str, int, int]:
    """A ledger key as SQL parameters (the path as stored text)."""
    return path_text(key.path), key.size, key.mtime_ns


def _rollback(conn: db.TrackedConnection) -> None:
    """Roll back if a transaction is still open. SQLite rolls back by itself on some errors
    (SQLITE_FULL, SQLITE_IOERR); a second ROLLBACK would then raise "no transaction is active" and
    hide the real error."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except Exception as exc:  # the original error is the one to report
            log.debug("rollback: %s", exc)


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def _set_aside_orphan_csv(csv_path: Path) -> None:
    """A new database starts its ids at 1: a results CSV left by an earlier database would get
    duplicate ids, so it is moved aside (kept, never deleted)."""
    try:
        if csv_path.stat().st_size == 0:
            return
    except FileNotFoundError:
        return
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = csv_path.with_name(f"{csv_path.stem}.before-{stamp}{csv_path.suffix}")
    csv_path.rename(aside)
    log.warning("new database: the results CSV of an earlier database was moved to %s", aside)


def _chunks(items: list[int], n: int) -> Iterator[list[int]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _format_lines(rows: Iterable[Sequence[Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for row in rows:
        writer.writerow(["" if v is None else csv_cell(v) for v in row])
    return buf.getvalue().encode("utf-8")


def _append_lines(path: Path, rows: Sequence[Sequence[Any]]) -> None:
    """One O_APPEND write per call (header first if the file is new), so lines are never torn apart."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        data = _format_lines(rows)
        before = os.fstat(fd).st_size
        if before == 0:
            data = _format_lines([CSV_COLUMNS]) + data
        view = memoryview(data)
        try:
            while view:
                written = os.write(fd, view)
                view = view[written:]
        except OSError:
            os.ftruncate(fd, before)  # a full disk must not leave half a line for the retry to extend
            raise
    finally:
        os.close(fd)


def _repair_and_read_ids(path: Path) -> set[int]:
    """Ids already in the CSV; a last line cut off by a crash (no newline) is removed."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as fh:
            fh.truncate(cut)
        data = data[:cut]
    ids: set[int] = set()
    reader = csv.reader(io.StringIO(data.decode("utf-8", errors="replace")))
    for i, row in enumerate(reader):
        if i == 0 or not row:
            continue
        try:
            ids.add(int(row[0]))
        except ValueError:
            continue
    return ids


# --- the writer thread ------------------------------------------------------------------------


class Writer(threading.Thread):
    """The single writer: drains its queue in batches, one transaction per batch, then the CSV.

    A batch that fails on a transient error (a full disk, an I/O error, a lock held too long) is
    kept and retried with back-off, the real error logged once, so nothing is lost or written twice
    and the daemon does not crash-loop while the disk is full. A replaced or deleted database file
    ends the writer (`error`), and the service exits."""

    def __init__(self, store: Store, *, max_batch: int = 256, stage: Stage | None = None,
                 max_backoff: float = 30.0) -> None:
        super().__init__(name="semwatch-writer", daemon=True)
        self.store = store
        self.queue: queue.Queue[Message | None] = queue.Queue()
        self.max_batch = max_batch
        self.error: BaseException | None = None
        self.stage = stage or Stage("writer")
        self.max_backoff = max_backoff
        self.degraded: str | None = None  # the transient error being retried, if any

    def put(self, msg: Message) -> None:
        self.queue.put(msg)

    def stop(self) -> None:
        """Finish everything queued so far, then end."""
        self.queue.put(None)

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # the service sees `error` and exits non-zero
            self.error = exc
            log.error("writer stopped: %s", exc)
        finally:
            self.stage.idle()

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            try:
                first = self.queue.get(timeout=0.5)
            except queue.Empty:
                self.store.check_identity()
                self.stage.idle()
                continue
            batch: list[Message] = []
            if first is None:
                stopping = True
            else:
                batch.append(first)
            while len(batch) < self.max_batch:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            if batch:
                self.stage.busy(f"writing {len(batch)} record(s)")
                self._write(batch)
            self.stage.idle()

    def _write(self, batch: list[Message]) -> None:
        delay, since, last_log = 0.5, time.monotonic(), 0.0
        finished: list[int] | None = None
        csv_written = False
        while True:
            self.store.check_identity()
            try:  # each step once: a retry never writes a CSV line twice
                if finished is None:
                    finished = self.store.apply(batch)
                if not csv_written:
                    self.store.write_csv_lines(finished)
                    csv_written = True
                self.store.mark_csv_written(finished)
                break
            except (sqlite3.OperationalError, OSError) as exc:
                now = time.monotonic()
                if self.degraded is None or now - last_log >= 60.0:
                    log.error("cannot write the database: %s; keeping %d record(s) and retrying",
                              exc, len(batch))
                    last_log = now
                self.degraded = str(exc)
                self.stage.beat()  # retrying on purpose: alive, not stuck
                time.sleep(delay)
                delay = min(self.max_backoff, delay * 2)
        if self.degraded is not None:
            log.warning("database writable again after %.0f s (%s)", time.monotonic() - since, self.degraded)
            self.degraded = None
        for msg in batch:
            if isinstance(msg, Started) and msg.done is not None:
                msg.done.set()
