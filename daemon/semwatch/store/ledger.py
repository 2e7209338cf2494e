"""The ledger: every write the daemon makes to its database, as SQL (`Store`), and what it reads
back at start-up.

The ledger is the `images` table keyed on (path, size_bytes, mtime_ns): one row per version of a
file. A row is inserted `pending` when the daemon queues the file and completed in place with its
result, so a restart, a duplicate event or a rescan never processes a version twice, and a file
that changes gets a new row (the old one `current = 0`). A partial unique index keeps exactly one
current row per path. Only the writer thread (`writer.Writer`) writes, one transaction per batch
of messages (`messages`); readers open the file read-only (`snapshot`, `report`).

Paths and sample ids are stored as `safefs.path_text` (valid UTF-8, lossless: a name that is not
UTF-8 keeps its bytes as `\\xNN`); `load_ledger` turns them back into the names that open the files.
Finished rows also go to results.csv (`results_csv`), then are marked `csv_written`. If the
database file is deleted or replaced under the writer, it stops before writing again
(`DatabaseReplaced`). The schema and its migrations are in `schema`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from semwatch.config import SampleSettings
from semwatch.safefs import path_from_text, path_text, text_safe
from semwatch.store import db
from semwatch.store import results_csv as live_csv
from semwatch.store.instrument import Instrument
from semwatch.store.instrument import bind as bind_instrument
from semwatch.store.messages import (
    Attempt,
    DaemonStatus,
    Failed,
    Gone,
    Message,
    ModelSwitched,
    Pending,
    Reclassified,
    Refused,
    Result,
    ShadowResult,
    Started,
)
from semwatch.store.samples import TouchedSamples, update_samples
from semwatch.store.schema import SCHEMA_VERSION, VERSION_TAG, create_schema, schema_version
from semwatch.values import FileKey, ImageVerdict, utc_now

__all__ = [
    "DatabaseReplaced", "HeldByOtherVersion", "LedgerState", "Store", "find_verdict_by_content",
    "load_ledger",
]

@dataclass(frozen=True)
class LedgerState:
    """What the ledger says at start-up: finished versions and versions still pending."""

    done: dict[str, tuple[int, int]]  # path -> (size, mtime_ns) of its current, finished version
    pending: dict[str, tuple[int, int, int]]  # path -> (size, mtime_ns, attempts)


def load_ledger(conn: sqlite3.Connection) -> LedgerState:
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


def find_verdict_by_content(conn: sqlite3.Connection, sha256: str, model_id: str,
                            path: Path) -> ImageVerdict | None:
    """The verdict of a finished (not failed) version with the same content by the same model, as
    `path`'s verdict (a copy need not be classified again); None if there is none."""
    row = conn.execute(
        "SELECT status, predicted_class, composition, state, confidence, tile_agreement, n_tiles, "
        "probabilities, reasons FROM images WHERE sha256 = ? AND model_id = ? "
        "AND status IN ('ok', 'unknown', 'rejected') ORDER BY id DESC LIMIT 1",
        (sha256, model_id),
    ).fetchone()
    if row is None:
        return None
    return ImageVerdict(
        path=path, status=row["status"], predicted_class=row["predicted_class"],
        composition=row["composition"], state=row["state"], confidence=float(row["confidence"] or 0.0),
        tile_agreement=float(row["tile_agreement"] or 0.0), n_tiles=int(row["n_tiles"] or 0),
        probabilities=json.loads(row["probabilities"]) if row["probabilities"] else {},
        reasons=tuple(json.loads(row["reasons"])) if row["reasons"] else (), model_id=model_id,
    )


class DatabaseReplaced(RuntimeError):
    """The database file was deleted or replaced while a writer had it open: writing on would
    go into a file nobody reads. The daemon exits (systemd restarts it on the new file); `semwatch
    reprocess` stops (exit 74) having written nothing more."""


class HeldByOtherVersion(db.DatabaseLocked):
    """A daemon of another semwatch version holds the database, and opening it here would migrate
    its schema under that daemon (which would then refuse to start again: "schema too new")."""


class Store:
    """The writer's connection and every write the daemon makes. Not thread-safe: one owner at a time
    (opened by the service, then used only by the writer thread). Opening it creates or migrates
    the schema (`schema.create_schema`), under the write lock (`db.WriteLock`): a new database, which
    moves an earlier results.csv aside, never appears between another writer's identity check and
    its CSV lines. Every process that writes the database opens it through this class
    (`access.open_writer`) and writes only under `batch()` / the write lock."""

    def __init__(self, database: Path, results_csv: Path | None, *, busy_timeout_ms: int = 10000,
                 check_same_thread: bool = False, sample_settings: SampleSettings | None = None,
                 instrument: Instrument | None = None, rename_instrument: bool = False) -> None:
        self.write_lock = db.WriteLock(database)  # taken by every writer around each batch
        try:
            with self.write_lock:
                self.conn = db.connect(database, busy_timeout_ms=busy_timeout_ms,
                                       check_same_thread=check_same_thread)
                try:
                    if schema_version(self.conn) < SCHEMA_VERSION:
                        _refuse_other_daemon(database)
                    applied = create_schema(self.conn)
                    if instrument is not None:  # which microscope writes it (store.instrument)
                        bind_instrument(self.conn, instrument, rename=rename_instrument)
                    self.identity = _identity(database)
                    if 1 in applied and results_csv is not None:  # a new database
                        live_csv.set_aside_orphan(results_csv)
                except BaseException:
                    self.conn.close()
                    raise
        except BaseException:
            self.write_lock.close()
            raise
        self.database = database
        self.csv_path = results_csv
        self.sample_settings = sample_settings or SampleSettings()

    def close(self) -> None:
        self.conn.close()
        self.write_lock.close()

    def check_identity(self) -> None:
        """Raise `DatabaseReplaced` if the file at the database's path is no longer the one open."""
        try:
            now = _identity(self.database)
        except FileNotFoundError:
            raise DatabaseReplaced(f"the database file was deleted: {self.database}") from None
        if now != self.identity:
            raise DatabaseReplaced(f"the database file was replaced by another file: {self.database}")

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """The write lock, and the database checked to be the file this Store has open: every write
        outside the writer's batches (a run's record, the daemon row at start) goes under this."""
        with self.write_lock:
            self.check_identity()
            yield

    # --- models and daemon row --------------------------------------------------------------

    def register_model(self, model_id: str, name: str | None, classes: Sequence[str],
                       created_at: str | None, metrics: Mapping[str, object] | None,
                       path: Path | None) -> None:
        self.conn.execute(
            "INSERT INTO models (model_id, name, classes, created_at, metrics, path, first_used_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (model_id) DO UPDATE SET path = excluded.path",
            (model_id, name, json.dumps(list(classes)), created_at,
             json.dumps(dict(metrics or {}), default=str), str(path) if path else None, utc_now()),
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

    # --- the ledger -------------------------------------------------------------------------

    def apply(self, messages: Iterable[Message]) -> list[int]:
        """Apply messages in one transaction; returns the ids of rows that got a final status."""
        finished: list[int] = []
        touched = TouchedSamples()
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            for msg in messages:
                row_id = self._apply_one(msg, touched)
                if row_id is not None:
                    finished.append(row_id)
            if touched:
                update_samples(self.conn, touched, self.sample_settings)
            self.conn.execute("COMMIT")
        except BaseException:
            db.rollback(self.conn)
            raise
        return finished

    def _apply_one(self, msg: Message, touched: TouchedSamples) -> int | None:
        """One message's statements; the id of the row it finished, if any."""
        if isinstance(msg, Pending):
            self._ensure_row(msg.key, msg.detected_at, msg.attempts)
        elif isinstance(msg, Started):
            self.conn.execute(
                "UPDATE images SET attempts = attempts + 1 WHERE path = ? AND size_bytes = ? "
                "AND mtime_ns = ? AND status = 'pending'", _key(msg.key))
        elif isinstance(msg, Refused):
            self._ensure_row(msg.key, msg.detected_at, 0)
            return self._failed(Failed(msg.key, 0, msg.error))
        elif isinstance(msg, Result):
            row_id = self._result(msg)
            if row_id is not None:
                touched.result(path_text(msg.sample_id), msg.expected)
            return row_id
        elif isinstance(msg, Reclassified):
            return self._reclassified(msg, touched)
        elif isinstance(msg, Attempt):
            self.conn.execute(
                "UPDATE images SET attempts = ?, error = ? WHERE path = ? AND size_bytes = ? "
                "AND mtime_ns = ? AND status = 'pending'",
                (msg.attempts, text_safe(msg.error), *_key(msg.key)),
            )
        elif isinstance(msg, Failed):
            row_id = self._failed(msg)
            if row_id is not None and msg.sample_id is not None:
                touched.failure(path_text(msg.sample_id))
            return row_id
        elif isinstance(msg, Gone):
            self.conn.execute(
                "DELETE FROM images WHERE path = ? AND size_bytes = ? AND mtime_ns = ? "
                "AND status = 'pending'", _key(msg.key))
        elif isinstance(msg, ModelSwitched):
            self.register_model(msg.model_id, msg.name, msg.classes, msg.created_at, None, Path(msg.path))
            self.conn.execute("UPDATE daemon SET model_id = ? WHERE id = 1", (msg.model_id,))
        elif isinstance(msg, ShadowResult):
            self._shadow(msg)
        else:
            self._daemon_status(msg)
        return None

    def _shadow(self, msg: ShadowResult) -> None:
        """A shadow verdict beside the live one (one per content and shadow model)."""
        v, live = msg.verdict, msg.live
        row = self.conn.execute("SELECT id FROM images WHERE path = ? AND current = 1",
                                (msg.path,)).fetchone()
        agrees = v.status == live.status and v.predicted_class == live.predicted_class
        self.conn.execute(
            "INSERT INTO shadow_results (image_id, path, sha256, model_id, status, predicted_class, "
            "confidence, probabilities, live_model_id, live_status, live_class, agrees, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sha256, model_id) DO NOTHING",
            (row["id"] if row is not None else None, msg.path, msg.sha256, msg.model_id, v.status,
             v.predicted_class, float(v.confidence),
             json.dumps({k: round(float(p), 6) for k, p in v.probabilities.items()}), live.model_id,
             live.status, live.predicted_class, int(agrees), utc_now()))

    def _ensure_row(self, key: FileKey, detected_at: str, attempts: int) -> int:
        """The id of `key`'s row, inserting it `pending` (and superseding other versions) if new."""
        row = self.conn.execute(
            "SELECT id, current FROM images WHERE path = ? AND size_bytes = ? AND mtime_ns = ? "
            "ORDER BY revision DESC LIMIT 1", _key(key),
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
        return row

    def _reclassified(self, msg: Reclassified, touched: TouchedSamples) -> int | None:
        """A new current row with the new result; the superseded one stays, `current = 0`. Nothing
        happens unless `msg.supersedes` is still the current, finished row of this very version
        (the file may have changed, or another process re-classified it first)."""
        old = self.conn.execute(
            "SELECT id, path, size_bytes, mtime_ns, status, current, detected_at, sample_id, revision "
            "FROM images WHERE id = ?", (msg.supersedes,)).fetchone()
        if (old is None or not old["current"] or old["status"] == "pending"
                or (old["path"], old["size_bytes"], old["mtime_ns"]) != _key(msg.key)):
            return None
        v = msg.verdict
        self.conn.execute("UPDATE images SET current = 0 WHERE id = ?", (old["id"],))
        cur = self.conn.execute(
            "INSERT INTO images (path, size_bytes, mtime_ns, status, sha256, sample_id, predicted_class, "
            "composition, state, confidence, tile_agreement, n_tiles, error, model_id, detected_at, "
            "processed_at, probabilities, reasons, attempts, current, csv_written, revision, supersedes) "
            "SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?, ?, 1, 1, 0, "
            "max(revision) + 1, ? FROM images WHERE path = ? AND size_bytes = ? AND mtime_ns = ?",
            (*_key(msg.key), v.status, msg.sha256, path_text(msg.sample_id), v.predicted_class,
             v.composition, v.state, float(v.confidence), float(v.tile_agreement), int(v.n_tiles),
             msg.model_id, old["detected_at"], utc_now(),
             json.dumps({k: round(float(p), 6) for k, p in v.probabilities.items()}),
             json.dumps([text_safe(r) for r in v.reasons]), old["id"], *_key(msg.key)),
        )
        touched.result(path_text(msg.sample_id), msg.expected)
        if old["sample_id"] is not None and old["sample_id"] != path_text(msg.sample_id):
            touched.failure(old["sample_id"])  # its old sample loses the image: recompute it too
        assert cur.lastrowid is not None
        return cur.lastrowid

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
        return row

    def _row_for_final(self, key: FileKey) -> int | None:
        """The pending, current row of `key` (inserted if the Pending message was never written);
        None when the version is already finished or superseded by a newer one."""
        row = self.conn.execute(
            "SELECT id, status, current FROM images WHERE path = ? AND size_bytes = ? AND mtime_ns = ? "
            "ORDER BY revision DESC LIMIT 1",
            _key(key),
        ).fetchone()
        if row is None:
            return self._ensure_row(key, utc_now(), 0)
        if row["status"] != "pending" or not row["current"]:
            return None
        return int(row["id"])

    def _daemon_status(self, msg: DaemonStatus) -> None:
        self.conn.execute(
            "UPDATE daemon SET heartbeat_at = ?, waiting = ?, in_progress = ?, done = ?, failed = ?, "
            "images_per_s = ?, tiles_per_s = ?, state = ?, message = ? WHERE id = 1",
            (utc_now(), msg.waiting, msg.in_progress, msg.done, msg.failed, msg.images_per_s,
             msg.tiles_per_s, msg.state, msg.message),
        )

    # --- results.csv ------------------------------------------------------------------------

    def append_csv(self, row_ids: Sequence[int]) -> None:
        """Append the finished rows to the CSV (one write), then mark them written."""
        self.write_csv_lines(row_ids)
        self.mark_csv_written(row_ids)

    def write_csv_lines(self, row_ids: Sequence[int]) -> None:
        """Append the rows' CSV lines in one write (all or nothing)."""
        if self.csv_path is None or not row_ids:
            return
        records = live_csv.records(self.conn, row_ids)
        if records:
            live_csv.append(self.csv_path, records)

    def mark_csv_written(self, row_ids: Sequence[int]) -> None:
        if self.csv_path is None or not row_ids:
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.executemany("UPDATE images SET csv_written = 1 WHERE id = ?", [(i,) for i in row_ids])
            self.conn.execute("COMMIT")
        except BaseException:
            db.rollback(self.conn)
            raise

    def reconcile_csv(self) -> int:
        """After a crash: drop a torn last line, then append the finished rows missing from the CSV.
        Returns how many were appended."""
        if self.csv_path is None:
            return 0
        with self.batch():  # no other process between its commit and its CSV marks
            return self._reconcile_csv(self.csv_path)

    def _reconcile_csv(self, csv_path: Path) -> int:
        in_file = live_csv.ids_in_file(csv_path)
        unwritten = [int(r["id"]) for r in self.conn.execute(
            "SELECT id FROM images WHERE csv_written = 0 AND status != 'pending' ORDER BY id")]
        missing = [i for i in unwritten if i not in in_file]
        if missing:
            live_csv.append(csv_path, live_csv.records(self.conn, missing))
        self.mark_csv_written(unwritten)
        return len(missing)


def _key(key: FileKey) -> tuple[str, int, int]:
    """A ledger key as SQL parameters (the path as stored text)."""
    return path_text(key.path), key.size, key.mtime_ns


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def _refuse_other_daemon(database: Path) -> None:
    """Before a migration: refuse while a daemon of another version holds the database."""
    holder = db.daemon_holding(database)
    if holder is None or holder[1] == VERSION_TAG:
        return
    pid, tag = holder
    raise HeldByOtherVersion(
        f"a semwatch daemon of another version (pid {pid}, {tag or 'a release that did not record it'}) "
        f"holds the database {database}, and this {VERSION_TAG} would migrate its schema: stop that "
        f"daemon (or upgrade it) first")
