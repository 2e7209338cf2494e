"""Operators' labels: what a person says about an image's content (schema step 4, `labels` table).

A label is keyed on the image's sha256, so a copy of a file carries its label; `path` and
`image_id` record where it was made. Statuses: `confirmed` (the verdict was right; `class_name` is
the class it confirmed), `corrected` (it is `class_name`), `foreign` (not a specimen the model
should know), and `cleared` (an undo). Rows are only ever inserted: the history stays. The current
label of a sha256 is its newest label that no `cleared` row takes back; `undo` inserts a `cleared`
row naming (`undoes`) the current label, so undoing again goes one label further back, and the
unique index on `undoes` makes a label undone at most once. Labels never change `images`.

Writers: every label transaction runs inside `writing(store)`: the database's write lock
(`db.WriteLock`, which the daemon and `semwatch reprocess` take per batch), the database's identity
check, and one BEGIN IMMEDIATE ... COMMIT, so a bulk import is applied whole or not at all.
`add_label` and `undo` refuse to run outside a transaction. Readers (`current_labels`,
`label_history`, `label_of`) work on any connection, read-only included.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from semwatch.store import db
from semwatch.store.ledger import Store
from semwatch.values import utc_now

LabelStatus = Literal["confirmed", "corrected", "foreign", "cleared"]
STATUSES: tuple[LabelStatus, ...] = ("confirmed", "corrected", "foreign", "cleared")

_COLUMNS = "id, sha256, status, class_name, by, created_at, note, path, image_id, undoes"

# The labels that count: not a `cleared` row, and not taken back by one.
_LIVE = ("status != 'cleared' AND NOT EXISTS "
         "(SELECT 1 FROM labels u WHERE u.undoes = {t}.id)")


@dataclass(frozen=True)
class Label:
    """One row of `labels`. `at` is its UTC ISO time; `undoes` is set on `cleared` rows only."""

    id: int
    sha256: str
    status: LabelStatus
    class_name: str | None
    by: str
    at: str
    note: str | None
    path: str | None
    image_id: int | None
    undoes: int | None = None


class NothingToUndo(LookupError):
    """The content has no current label."""


def _label(row: sqlite3.Row) -> Label:
    return Label(int(row["id"]), row["sha256"], row["status"], row["class_name"], row["by"],
                 row["created_at"], row["note"], row["path"],
                 None if row["image_id"] is None else int(row["image_id"]),
                 None if row["undoes"] is None else int(row["undoes"]))


@contextlib.contextmanager
def writing(store: Store) -> Iterator[sqlite3.Connection]:
    """One label transaction: under the write lock, on the database the store opened (not a file
    put in its place), all statements or none."""
    with store.write_lock:
        store.check_identity()
        store.conn.execute("BEGIN IMMEDIATE")
        try:
            yield store.conn
            store.conn.execute("COMMIT")
        except BaseException:
            db.rollback(store.conn)
            raise


def _require_transaction(conn: sqlite3.Connection) -> None:
    if not conn.in_transaction:
        raise RuntimeError("labels are written inside `labels.writing(store)` (the write lock)")


def add_label(conn: sqlite3.Connection, sha256: str, status: LabelStatus, class_name: str | None,
              by: str, *, note: str | None = None, path: str | None = None,
              image_id: int | None = None, at: str | None = None) -> Label:
    """Insert one label (inside `writing`). `class_name` is required for confirmed/corrected and
    refused otherwise (the table's CHECK says the same); the caller validates the name."""
    _require_transaction(conn)
    when = at or utc_now()
    if status == "cleared":
        raise ValueError("a label is cleared with undo()")
    if (class_name is not None) != (status in ("confirmed", "corrected")):
        raise ValueError(f"a {status} label {'needs' if class_name is None else 'has no'} class name")
    cur = conn.execute(
        "INSERT INTO labels (sha256, status, class_name, by, note, created_at, path, image_id) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (sha256, status, class_name, by, note or None, when, path, image_id))
    assert cur.lastrowid is not None
    return Label(cur.lastrowid, sha256, status, class_name, by, when, note or None, path, image_id)


def undo(conn: sqlite3.Connection, sha256: str, by: str, *, note: str | None = None,
         at: str | None = None) -> Label:
    """Take back the current label of `sha256` (inside `writing`): a `cleared` row naming it; the
    label before it (if any) counts again. Returns the cleared row; `NothingToUndo` if none."""
    _require_transaction(conn)
    current = label_of(conn, sha256)
    if current is None:
        raise NothingToUndo(f"no label to undo for {sha256}")
    when = at or utc_now()
    cur = conn.execute(
        "INSERT INTO labels (sha256, status, class_name, by, note, created_at, path, image_id, undoes) "
        "VALUES (?, 'cleared', NULL, ?, ?, ?, ?, ?, ?)",
        (sha256, by, note or None, when, current.path, current.image_id, current.id))
    assert cur.lastrowid is not None
    return Label(cur.lastrowid, sha256, "cleared", None, by, when, note or None, current.path,
                 current.image_id, current.id)


def label_of(conn: sqlite3.Connection, sha256: str) -> Label | None:
    """The current label of one content, or None."""
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM labels l WHERE sha256 = ? AND {_LIVE.format(t='l')} "
        "ORDER BY id DESC LIMIT 1", (sha256,)).fetchone()
    return None if row is None else _label(row)


def current_labels(conn: sqlite3.Connection, sha256s: Sequence[str] | None = None) -> list[Label]:
    """The current label of every labelled content (or of `sha256s` only), oldest first."""
    where = ""
    params: tuple[str, ...] = ()
    if sha256s is not None:
        if not sha256s:
            return []
        where = f"AND l.sha256 IN ({','.join('?' * len(sha256s))})"
        params = tuple(sha256s)
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM labels l WHERE {_LIVE.format(t='l')} {where} "
        f"AND l.id = (SELECT max(m.id) FROM labels m WHERE m.sha256 = l.sha256 AND {_LIVE.format(t='m')}) "
        "ORDER BY l.id", params)
    return [_label(r) for r in rows]


def label_history(conn: sqlite3.Connection, sha256: str) -> list[Label]:
    """Every label ever given to one content, undos included, oldest first."""
    rows = conn.execute(f"SELECT {_COLUMNS} FROM labels WHERE sha256 = ? ORDER BY id", (sha256,))
    return [_label(r) for r in rows]


def has_labels_table(conn: sqlite3.Connection) -> bool:
    """Whether the database has reached schema step 4 (a reader may open an older one)."""
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'labels'"
                        ).fetchone() is not None
