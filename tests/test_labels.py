"""Operators' labels in the ledger (`store.labels`): keyed on content, history kept, undo goes one
label back, written only inside the write lock, never touching a verdict."""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dbfixture import make_database
from semwatch.config import Settings
from semwatch.store import db
from semwatch.store.labels import (
    NothingToUndo,
    add_label,
    current_labels,
    label_history,
    label_of,
    undo,
    writing,
)
from semwatch.store.ledger import Store
from semwatch.store.schema import SCHEMA_VERSION

SHA_A = "a" * 64
SHA_B = "b" * 64


@pytest.fixture
def store(settings: Settings) -> Store:
    make_database(settings.store.database, now=datetime.now(UTC), images=[
        {"path": "/export/s1/a.tif", "sha256": SHA_A, "predicted_class": "622_pristine"},
        {"path": "/export/s1/copy-of-a.tif", "sha256": SHA_A, "predicted_class": "622_pristine"},
        {"path": "/export/s2/b.tif", "sha256": SHA_B, "status": "unknown", "predicted_class": None},
    ])
    s = Store(settings.store.database, None)
    yield s  # type: ignore[misc]
    s.close()


def verdicts(conn: sqlite3.Connection) -> list[tuple[object, ...]]:
    return [tuple(r) for r in conn.execute("SELECT * FROM images ORDER BY id")]


def test_a_label_follows_the_content_and_history_is_kept(store: Store) -> None:
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    before = verdicts(store.conn)
    with writing(store) as conn:
        first = add_label(conn, SHA_A, "confirmed", "622_pristine", "ana", path="/export/s1/a.tif",
                          image_id=1)
        add_label(conn, SHA_B, "corrected", "NCA_pristine", "ana", note="new supplier", image_id=3)
    with writing(store) as conn:
        second = add_label(conn, SHA_A, "corrected", "811_cycled", "ben", image_id=2,
                           path="/export/s1/copy-of-a.tif")
    # The copy (another path, the same sha256) carries the newest label of the content.
    current = {lab.sha256: lab for lab in current_labels(store.conn)}
    assert current[SHA_A] == second and current[SHA_A].class_name == "811_cycled"
    assert current[SHA_B].note == "new supplier" and current[SHA_B].status == "corrected"
    assert [lab.id for lab in label_history(store.conn, SHA_A)] == [first.id, second.id]
    assert first.at and first.at.endswith("+00:00") and first.by == "ana"
    assert current_labels(store.conn, [SHA_B]) == [current[SHA_B]]
    assert current_labels(store.conn, []) == []
    assert verdicts(store.conn) == before  # labels never rewrite a verdict


def test_undo_goes_back_one_label_at_a_time(store: Store) -> None:
    with writing(store) as conn:
        first = add_label(conn, SHA_A, "confirmed", "622_pristine", "ana")
        second = add_label(conn, SHA_A, "foreign", None, "ben", note="a stub")
    with writing(store) as conn:
        cleared = undo(conn, SHA_A, "ben")
    assert cleared.status == "cleared" and cleared.undoes == second.id
    assert label_of(store.conn, SHA_A) == first  # the previous label counts again
    with writing(store) as conn:
        assert undo(conn, SHA_A, "ana").undoes == first.id
    assert label_of(store.conn, SHA_A) is None and current_labels(store.conn) == []
    with pytest.raises(NothingToUndo), writing(store) as conn:
        undo(conn, SHA_A, "ana")
    # A new label after the undos counts; the whole story stays in the history.
    with writing(store) as conn:
        third = add_label(conn, SHA_A, "corrected", "811_formation", "cy")
    assert label_of(store.conn, SHA_A) == third
    assert [lab.status for lab in label_history(store.conn, SHA_A)] == [
        "confirmed", "foreign", "cleared", "cleared", "corrected"]
    # The table itself refuses a second undo of one label and a class on a foreign label.
    with pytest.raises(sqlite3.IntegrityError), writing(store) as conn:
        conn.execute("INSERT INTO labels (sha256, status, by, created_at, undoes) "
                     "VALUES (?, 'cleared', 'x', 'now', ?)", (SHA_A, second.id))
    with pytest.raises(sqlite3.IntegrityError), writing(store) as conn:
        conn.execute("INSERT INTO labels (sha256, status, class_name, by, created_at) "
                     "VALUES (?, 'foreign', '622_pristine', 'x', 'now')", (SHA_A,))


def test_a_failed_transaction_applies_nothing(store: Store) -> None:
    with pytest.raises(ValueError), writing(store) as conn:
        add_label(conn, SHA_A, "confirmed", "622_pristine", "ana")
        add_label(conn, SHA_B, "corrected", None, "ana")  # refused: a correction names its class
    assert current_labels(store.conn) == []


def test_labels_are_written_only_under_the_write_lock(store: Store, settings: Settings) -> None:
    with pytest.raises(RuntimeError, match="writing"):
        add_label(store.conn, SHA_A, "confirmed", "622_pristine", "ana")
    other = db.WriteLock(settings.store.database)  # another writer (the daemon) holds the lock
    done = threading.Event()

    def label() -> None:
        with writing(store) as conn:
            add_label(conn, SHA_A, "confirmed", "622_pristine", "ana")
        done.set()

    try:
        with other:
            worker = threading.Thread(target=label)
            worker.start()
            assert not done.wait(0.5)  # waits for the lock (not a timing assertion: it must wait)
        worker.join(30)
        assert done.is_set()
    finally:
        other.close()
    reader = db.connect(settings.store.database, readonly=True)
    try:
        assert [lab.sha256 for lab in current_labels(reader)] == [SHA_A]
    finally:
        reader.close()


def test_a_replaced_database_is_not_labelled(store: Store, settings: Settings, tmp_path: Path) -> None:
    moved = tmp_path / "moved.db"
    settings.store.database.rename(moved)
    Store(settings.store.database, None).close()  # someone put a new database in its place
    with pytest.raises(RuntimeError, match="replaced"), writing(store) as conn:
        add_label(conn, SHA_A, "confirmed", "622_pristine", "ana")
