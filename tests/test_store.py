"""The ledger, the single writer and the CSV, on real SQLite files."""

from __future__ import annotations

import csv
import threading
from pathlib import Path

from semwatch.config import Settings
from semwatch.store import db
from semwatch.store.ledger import (
    Attempt,
    DaemonStatus,
    Failed,
    Pending,
    Result,
    Store,
    Writer,
    find_result_by_content,
    load_ledger,
)
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
        assert find_result_by_content(store.conn, "abc", "m1") is not None
        assert find_result_by_content(store.conn, "abc", "m2") is None
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
