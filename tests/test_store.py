"""The ledger, the single writer and the CSV, on real SQLite files."""

from __future__ import annotations

import csv
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from semwatch.config import Settings
from semwatch.store import db
from semwatch.store.ledger import Store, find_verdict_by_content, load_ledger
from semwatch.store.messages import Attempt, DaemonStatus, Failed, Message, Pending, Result, Started
from semwatch.store.writer import Writer
from semwatch.values import FileKey, ImageVerdict, utc_now


def verdict(path: str, cls: str = "622_cycled", conf: float = 0.9) -> ImageVerdict:
    comp, state = cls.split("_")
    probs = {cls: conf, "333_pristine": 1 - conf}
    return ImageVerdict(Path(path), "ok", cls, comp, state, conf, 0.95, 12, probs, ("fine",), "m1")


def open_store(settings: Settings) -> Store:
    return Store(settings.store.database, settings.store.results_csv)


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_result_is_recorded_once_with_csv_line(settings: Settings) -> None:
    store = open_store(settings)
    try:
        key = FileKey("/x/s1/a.jpg", 100, 1)
        store.apply([Pending(key, utc_now())])
        done = store.apply([Result(key, "abc", "s1", verdict(key.path), "m1")])
        store.append_csv(done)
        # A duplicate result (a second event, a rescan) changes nothing.
        again = store.apply([Pending(key, utc_now()), Result(key, "abc", "s1", verdict(key.path), "m1")])
        store.append_csv(again)
        assert again == []
        rows = store.conn.execute("SELECT * FROM images").fetchall()
        assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["current"] == 1
        assert rows[0]["model_id"] == "m1" and rows[0]["processed_at"].endswith("+00:00")
        lines = csv_rows(settings.store.results_csv)
        assert [r["path"] for r in lines] == [key.path]
        assert lines[0]["reasons"] == "fine"
        sample = store.conn.execute("SELECT * FROM samples").fetchone()
        assert (sample["sample_id"], sample["composition"], sample["verdict"]) == ("s1", "622", "unknown")
        copy = find_verdict_by_content(store.conn, "abc", "m1", Path("/x/s2/copy.jpg"))
        stored = verdict("/x/s2/copy.jpg")  # as stored: probabilities to 6 places
        rounded = {c: round(p, 6) for c, p in stored.probabilities.items()}
        assert copy == replace(stored, probabilities=rounded)
        assert find_verdict_by_content(store.conn, "abc", "m2", Path("/x/s2/copy.jpg")) is None
    finally:
        store.close()


def test_new_version_supersedes_old(settings: Settings) -> None:
    store = open_store(settings)
    try:
        old, new = FileKey("/x/a.jpg", 100, 1), FileKey("/x/a.jpg", 120, 2)
        store.apply([Pending(old, utc_now()), Result(old, "h1", ".", verdict(old.path), "m1")])
        store.apply([Pending(new, utc_now())])
        # The old version's late result is dropped: a newer version is current.
        pending_only = FileKey("/x/b.jpg", 5, 5)
        store.apply([Pending(pending_only, utc_now())])
        store.apply([Pending(FileKey("/x/b.jpg", 6, 6), utc_now())])
        store.apply([Result(new, "h2", ".", verdict(new.path, "811_formation"), "m1")])
        rows = store.conn.execute("SELECT path, size_bytes, status, current FROM images ORDER BY id")
        assert [(r["path"], r["size_bytes"], r["status"], r["current"]) for r in rows] == [
            ("/x/a.jpg", 100, "ok", 0), ("/x/a.jpg", 120, "ok", 1), ("/x/b.jpg", 6, "pending", 1),
        ]
        ledger = load_ledger(store.conn)
        assert ledger.done == {"/x/a.jpg": (120, 2)}
        assert ledger.pending == {"/x/b.jpg": (6, 6, 0)}
    finally:
        store.close()


def test_failure_after_attempts_keeps_reason(settings: Settings) -> None:
    store = open_store(settings)
    try:
        key = FileKey("/x/bad.tif", 0, 1)
        store.apply([Pending(key, utc_now()), Attempt(key, 1, "empty file")])
        row = store.conn.execute("SELECT status, attempts, error FROM images").fetchone()
        assert tuple(row) == ("pending", 1, "empty file")
        done = store.apply([Failed(key, 4, "empty file", sample_id=".")])
        store.append_csv(done)
        row = store.conn.execute("SELECT status, attempts, error FROM images").fetchone()
        assert tuple(row) == ("failed", 4, "empty file")
        assert csv_rows(settings.store.results_csv)[0]["status"] == "failed"
    finally:
        store.close()


def test_csv_reconciled_after_crash(settings: Settings) -> None:
    store = open_store(settings)
    try:
        keys = [FileKey(f"/x/{i}.jpg", 10, i) for i in range(3)]
        msgs = [m for k in keys for m in (Pending(k, utc_now()), Result(k, "h", ".", verdict(k.path), "m"))]
        ids = store.apply(msgs)
        store.append_csv(ids[:1])
        # Crash mid-line after the first row: a torn line, two rows never written.
        with open(settings.store.results_csv, "ab") as fh:
            fh.write(b"99,/torn")
    finally:
        store.close()
    store = open_store(settings)
    try:
        assert store.reconcile_csv() == 2
        assert store.reconcile_csv() == 0
    finally:
        store.close()
    assert [r["path"] for r in csv_rows(settings.store.results_csv)] == [k.path for k in keys]


def test_writer_thread_and_readonly_reader(settings: Settings) -> None:
    store = open_store(settings)
    store.start_daemon(device="cpu", model_id="m", watch_folder=Path("/x"), watch_mode="polling")
    writer = Writer(store)
    writer.start()
    reader = db.connect(settings.store.database, readonly=True)
    try:
        reader.execute("BEGIN")  # a reader holding a snapshot never blocks the writer (WAL)
        assert reader.execute("SELECT count(*) FROM images").fetchone()[0] == 0
        for i in range(50):
            k = FileKey(f"/x/{i}.jpg", 1, i)
            writer.put(Pending(k, utc_now()))
            writer.put(Result(k, f"h{i}", "s", verdict(k.path), "m"))
        writer.put(DaemonStatus("running", done=50))
        writer.stop()
        writer.join(10)
        assert not writer.is_alive() and writer.error is None
        assert reader.execute("SELECT count(*) FROM images").fetchone()[0] == 0  # still its snapshot
        reader.execute("COMMIT")
        assert reader.execute("SELECT count(*) FROM images WHERE status = 'ok'").fetchone()[0] == 50
        assert reader.execute("SELECT state, done FROM daemon").fetchone()[:] == ("running", 50)
    finally:
        reader.close()
        store.close()
    assert len(csv_rows(settings.store.results_csv)) == 50
    assert not [t for t in threading.enumerate() if t.name == "semwatch-writer"]


def test_a_failure_keeps_the_samples_expected_class(settings: Settings) -> None:
    """A result brings its sample's expected class; a failure brings none and keeps the stored one,
    unless a result in the same batch brought one."""
    store = open_store(settings)
    try:
        a, b, c, d = (FileKey(f"/x/s/{n}.jpg", 1, 1) for n in "abcd")
        store.apply([Pending(a, utc_now()), Result(a, "ha", "s", verdict(a.path), "m", expected="622")])
        store.apply([Pending(b, utc_now()), Failed(b, 3, "truncated", sample_id="s")])
        row = store.conn.execute("SELECT expected, verdict, n_images, n_counted FROM samples").fetchone()
        assert tuple(row) == ("622", "pass", 2, 1)
        store.apply([Pending(c, utc_now()), Pending(d, utc_now()),
                     Result(c, "hc", "s", verdict(c.path), "m", expected=None),
                     Failed(d, 3, "truncated", sample_id="s")])
        row = store.conn.execute("SELECT expected, verdict, n_images, n_counted FROM samples").fetchone()
        assert tuple(row) == (None, "unknown", 4, 2)
    finally:
        store.close()


class FullDisk:
    """A real Store whose next `apply_failures` applies and `csv_failures` CSV writes fail as a full
    disk does (the seam `writer.Ledger`)."""

    def __init__(self, store: Store, apply_failures: int, csv_failures: int) -> None:
        self.store, self.apply_failures, self.csv_failures = store, apply_failures, csv_failures
        self.applied = 0

    def check_identity(self) -> None:
        self.store.check_identity()

    def apply(self, messages: Iterable[Message]) -> list[int]:
        if self.apply_failures:
            self.apply_failures -= 1
            raise sqlite3.OperationalError("database or disk is full")
        self.applied += 1
        return self.store.apply(messages)

    def write_csv_lines(self, row_ids: Sequence[int]) -> None:
        if self.csv_failures:
            self.csv_failures -= 1
            raise OSError(28, "No space left on device")
        self.store.write_csv_lines(row_ids)

    def mark_csv_written(self, row_ids: Sequence[int]) -> None:
        self.store.mark_csv_written(row_ids)


def test_writer_keeps_a_batch_through_transient_errors(settings: Settings) -> None:
    """The batch is applied once and its CSV lines written once, however often a step fails; the
    reader waiting on `Started.done` is released only when it is committed."""
    store = open_store(settings)
    flaky = FullDisk(store, apply_failures=2, csv_failures=1)
    writer = Writer(flaky, max_backoff=0.05)
    key, started = FileKey("/x/a.jpg", 1, 1), threading.Event()
    try:
        writer.start()
        writer.put(Pending(key, utc_now()))
        writer.put(Started(key, started))
        writer.put(Result(key, "h", ".", verdict(key.path), "m"))
        assert started.wait(10)
        writer.stop()
        writer.join(10)
        assert not writer.is_alive() and writer.error is None and writer.degraded is None
        assert flaky.applied == 1 and flaky.apply_failures == flaky.csv_failures == 0
        row = store.conn.execute("SELECT status, attempts, csv_written FROM images").fetchone()
        assert tuple(row) == ("ok", 1, 1)
    finally:
        store.close()
    assert [r["path"] for r in csv_rows(settings.store.results_csv)] == [key.path]
