"""results.csv, the live CSV derived from the ledger: every finished row appended once.

A file begun by an earlier release keeps its header's columns (`_columns_of`).
Each append is one `os.write` on an O_APPEND descriptor (the header first when the file is new),
so a reader never sees half a line; a write that fails (a full disk) is cut back, so the retry does
not extend half a line. After a kill -9 between the database and the CSV, a torn last line is
dropped and the rows the ledger has not marked `csv_written` are appended unless their ids are
already in the file (`Store.reconcile_csv`). A new database starts its ids at 1, so a CSV left by an
earlier database is moved aside, never deleted.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from semwatch.store.csvfile import RESULTS_COLUMNS, csv_bytes, reasons_text

log = logging.getLogger("semwatch.store")


def records(conn: sqlite3.Connection, row_ids: Sequence[int]) -> list[dict[str, object]]:
    """The CSV records of the ledger rows `row_ids`, in id order."""
    out: list[dict[str, object]] = []
    cols = ", ".join(RESULTS_COLUMNS)
    for chunk in _chunks(list(row_ids), 500):
        marks = ",".join("?" * len(chunk))
        for r in conn.execute(f"SELECT {cols} FROM images WHERE id IN ({marks}) ORDER BY id", chunk):
            record: dict[str, object] = {c: r[c] for c in RESULTS_COLUMNS}
            record["reasons"] = reasons_text(r["reasons"])
            out.append(record)
    return out


def append(path: Path, rows: Sequence[Mapping[str, object]]) -> None:
    """Append `rows` in one O_APPEND write (header first if the file is new): all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        before = os.fstat(fd).st_size
        columns = _columns_of(path) if before else RESULTS_COLUMNS
        view = memoryview(csv_bytes(columns, rows, header=before == 0))
        try:
            while view:
                written = os.write(fd, view)
                view = view[written:]
        except OSError:
            os.ftruncate(fd, before)  # a full disk must not leave half a line for the retry to extend
            raise
    finally:
        os.close(fd)


def _columns_of(path: Path) -> tuple[str, ...]:
    """The columns an existing file's header names: a file begun by an earlier release keeps its
    columns (a column added since, such as `instrument`, is left out of it), so no file mixes two
    column lists and a spreadsheet reading it keeps working; a new file has every column."""
    with open(path, "rb") as fh:
        first = fh.readline(4096).rstrip(b"\n").decode("utf-8", "replace")
    named = tuple(next(csv.reader([first]), []))
    return named if named and set(named) <= set(RESULTS_COLUMNS) else RESULTS_COLUMNS


def ids_in_file(path: Path) -> set[int]:
    """The row ids already in the CSV; a last line cut off by a crash (no newline) is removed."""
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
    next(reader, None)  # the header
    for row in reader:
        try:
            ids.add(int(row[0]))
        except (IndexError, ValueError):  # an empty or foreign line
            continue
    return ids


def set_aside_orphan(path: Path) -> None:
    """Move a non-empty CSV left by an earlier database to `<stem>.before-<UTC time><suffix>`."""
    try:
        if path.stat().st_size == 0:
            return
    except FileNotFoundError:
        return
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.stem}.before-{stamp}{path.suffix}")
    path.rename(aside)
    log.warning("new database: the results CSV of an earlier database was moved to %s", aside)


def _chunks(items: list[int], n: int) -> Iterator[list[int]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]
