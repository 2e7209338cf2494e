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
import json
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
_LIVE = ("{t}.status != 'cleared' AND NOT EXISTS "
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
        f"SELECT {_COLUMNS} FROM labels l WHERE l.sha256 = ? AND {_LIVE.format(t='l')} "
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


@dataclass(frozen=True)
class LabelledRow:
    """The ledger row a label is made on: its id, path (stored text), content and verdict."""

    image_id: int
    path: str
    sha256: str
    status: str
    predicted_class: str | None


_ROW = "SELECT id, path, sha256, status, predicted_class FROM images"


def _row(row: sqlite3.Row | None) -> LabelledRow | None:
    if row is None:
        return None
    return LabelledRow(int(row["id"]), row["path"], row["sha256"], row["status"], row["predicted_class"])


def row_by_id(conn: sqlite3.Connection, image_id: int) -> LabelledRow | None:
    """An image row with content (a pending row has no sha256 yet: None)."""
    return _row(conn.execute(f"{_ROW} WHERE id = ? AND sha256 IS NOT NULL", (image_id,)).fetchone())


def row_by_path(conn: sqlite3.Connection, path: str) -> LabelledRow | None:
    """The current row of a path (stored text), if it has content."""
    return _row(conn.execute(f"{_ROW} WHERE path = ? AND current = 1 AND sha256 IS NOT NULL",
                             (path,)).fetchone())


def row_by_sha256(conn: sqlite3.Connection, sha256: str) -> LabelledRow | None:
    """The newest current row with this content (a verdict of it; a copy's is as good)."""
    return _row(conn.execute(f"{_ROW} WHERE sha256 = ? AND current = 1 ORDER BY id DESC LIMIT 1",
                             (sha256,)).fetchone())


def rows_with_content(conn: sqlite3.Connection, sha256: str) -> list[LabelledRow]:
    """Every current row with this content, newest first: the places a labelled image may still
    lie (training reads the first one whose file still holds these bytes)."""
    rows = conn.execute(f"{_ROW} WHERE sha256 = ? AND current = 1 ORDER BY id DESC", (sha256,))
    return [r for r in map(_row, rows) if r is not None]


def known_classes(conn: sqlite3.Connection) -> set[str]:
    """Every class a registered model knows or a current label names."""
    names = known_classes_of_models(conn)
    if has_labels_table(conn):
        names.update(lab.class_name for lab in current_labels(conn) if lab.class_name)
    return names


# --- the report's figures ------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassCheck:
    """Operators' checks of one verdict class: how many, how many confirmed."""

    predicted_class: str
    checked: int
    confirmed: int

    @property
    def share_confirmed(self) -> float:
        return self.confirmed / self.checked if self.checked else 0.0


@dataclass(frozen=True)
class LabelDay:
    """Labels made in one interval and still standing (not undone): verdicts checked (labels on an
    `ok` verdict: confirmed or corrected), per class of the verdict; names given to images without a
    verdict; images marked foreign."""

    n_labels: int
    checked: int
    confirmed: int
    named: int  # corrected labels on unknown / rejected / failed images
    foreign: int
    per_class: tuple[ClassCheck, ...]
    new_classes: tuple[str, ...]  # classes labels named that no registered model knows

    @property
    def share_confirmed(self) -> float:
        return self.confirmed / self.checked if self.checked else 0.0


def label_day(conn: sqlite3.Connection, start: str, end: str) -> LabelDay:
    """The figures of labels made in [start, end) (UTC ISO text) that no later undo took back; each
    judged against the verdict of the row it was made on."""
    rows = conn.execute(
        "SELECT l.status, l.class_name, i.status AS verdict, i.predicted_class "
        "FROM labels l LEFT JOIN images i ON i.id = l.image_id "
        f"WHERE l.created_at >= ? AND l.created_at < ? AND {_LIVE.format(t='l')}", (start, end)).fetchall()
    per: dict[str, list[int]] = {}
    named = foreign = 0
    for r in rows:
        if r["status"] == "foreign":
            foreign += 1
        elif r["verdict"] == "ok" and r["predicted_class"]:
            counts = per.setdefault(r["predicted_class"], [0, 0])
            counts[0] += 1
            counts[1] += r["status"] == "confirmed" or r["class_name"] == r["predicted_class"]
        else:
            named += 1
    per_class = tuple(ClassCheck(c, n, k) for c, (n, k) in sorted(per.items()))
    model_classes = known_classes_of_models(conn)
    new = sorted({r["class_name"] for r in rows if r["class_name"] and r["class_name"] not in model_classes})
    return LabelDay(len(rows), sum(c.checked for c in per_class), sum(c.confirmed for c in per_class),
                    named, foreign, per_class, tuple(new))


def known_classes_of_models(conn: sqlite3.Connection) -> set[str]:
    """Every class a registered model knows."""
    names: set[str] = set()
    for (classes,) in conn.execute("SELECT classes FROM models WHERE classes IS NOT NULL"):
        try:
            value = json.loads(classes)
        except ValueError:
            continue
        if isinstance(value, list):
            names.update(c for c in value if isinstance(c, str))
    return names
