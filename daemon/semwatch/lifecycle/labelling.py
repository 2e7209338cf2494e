"""`semwatch label`: operators' labels from the command line, a CSV file, or the console.

Every label goes through `write_labels`: it resolves each target (a file the database knows, a
sha256, or an image row id), checks the class name against the one rule (`values.parse_class`),
and writes all of them in one transaction under the database's write lock (`store.labels.writing`),
so a bulk import with one bad row changes nothing. The console calls the same function. Which class
a confirmation confirms is the verdict's class at that moment; a class no model knows yet is
allowed if it follows the rule (it is what the next model learns).
"""

from __future__ import annotations

import csv
import getpass
import io
import os
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from semwatch.config import Settings
from semwatch.errors import ExitStatus, UserError
from semwatch.output import Output
from semwatch.safefs import path_text, printable
from semwatch.store import labels as lab
from semwatch.store.ledger import Store
from semwatch.values import parse_class

Action = Literal["class", "confirm", "foreign", "undo"]
SHA256 = re.compile(r"[0-9a-fA-F]{64}")
MAX_IMPORT_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class LabelChange:
    """One thing an operator says about one image. `ref` is a path or a sha256 (ignored when
    `image_id`, a ledger row, is given); `where` names it in errors (e.g. "labels.csv line 7")."""

    ref: str
    action: Action
    class_name: str | None = None
    by: str | None = None
    note: str | None = None
    image_id: int | None = None
    where: str | None = None


@dataclass(frozen=True)
class Applied:
    """A label as written, with the row it was made on and whether its class is new to every model."""

    label: lab.Label
    new_class: bool

    def to_json(self) -> dict[str, object]:
        a = self.label
        return {"event": "label", "sha256": a.sha256, "path": a.path, "image_id": a.image_id,
                "status": a.status, "class": a.class_name, "by": a.by, "note": a.note, "at": a.at,
                "undoes": a.undoes, "new_class": self.new_class}


def login_name() -> str:
    """Who labels when `--by` is not given: the login name."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return f"uid {os.getuid()}"


def open_label_store(settings: Settings) -> Store:
    """The database, opened to write labels: it must exist (the daemon creates it; labelling an
    image needs its verdict)."""
    database = settings.store.database
    if not database.exists():
        raise UserError(f"no database at {path_text(database)}: the daemon has classified nothing yet")
    try:
        return Store(database, None, busy_timeout_ms=settings.store.busy_timeout_ms,
                     sample_settings=settings.samples)
    except (sqlite3.Error, OSError, RuntimeError) as exc:
        raise UserError(f"[store] database cannot be used: {path_text(database)}: {exc}",
                        ExitStatus.CONFIG) from None


def write_labels(settings: Settings, changes: Sequence[LabelChange]) -> list[Applied]:
    """Resolve, check and write `changes`, all or none (the first problem is a `UserError` naming
    its `where` and nothing is written)."""
    if not changes:
        return []
    store = open_label_store(settings)
    try:
        with lab.writing(store) as conn:
            known = lab.known_classes(conn)
            return [_apply(conn, change, known) for change in changes]
    except sqlite3.Error as exc:
        raise UserError(f"labels not written: {exc}") from None
    finally:
        store.close()


def _apply(conn: sqlite3.Connection, change: LabelChange, known: set[str]) -> Applied:
    where = f"{change.where}: " if change.where else ""
    row = _resolve(conn, change, where)
    by = change.by or login_name()
    if change.action == "undo":
        try:
            return Applied(lab.undo(conn, row.sha256, by, note=change.note), False)
        except lab.NothingToUndo:
            raise UserError(f"{where}{printable(row.path)} has no label to undo") from None
    if change.action == "foreign":
        return Applied(lab.add_label(conn, row.sha256, "foreign", None, by, note=change.note,
                                     path=row.path, image_id=row.image_id), False)
    if change.action == "confirm":
        if row.status != "ok" or not row.predicted_class:
            raise UserError(f"{where}{printable(row.path)}: its verdict is {row.status}, nothing to "
                            "confirm: name its class instead")
        name = row.predicted_class
        return Applied(lab.add_label(conn, row.sha256, "confirmed", name, by, note=change.note,
                                     path=row.path, image_id=row.image_id), False)
    name = canonical_class(change.class_name or "", known, where)
    new = name not in known
    known.add(name)
    return Applied(lab.add_label(conn, row.sha256, "corrected", name, by, note=change.note,
                                 path=row.path, image_id=row.image_id), new)


def canonical_class(name: str, known: set[str], where: str = "") -> str:
    """`name` checked by the one rule; a known class that means the same (`622_pristine` and
    `622`: no state is pristine) is used instead, so one class never gets two names."""
    try:
        info = parse_class(name)
    except ValueError as exc:
        raise UserError(f"{where}{exc}") from None
    if name in known:
        return name
    for other in sorted(known):
        try:
            same = parse_class(other)
        except ValueError:
            continue
        if (same.composition, same.state) == (info.composition, info.state):
            return other
    return name


def _resolve(conn: sqlite3.Connection, change: LabelChange, where: str) -> lab.LabelledRow:
    if change.image_id is not None:
        row = lab.row_by_id(conn, change.image_id)
        if row is None:
            raise UserError(f"{where}image {change.image_id} has no content recorded (still pending?)")
        return row
    ref = change.ref.strip()
    if SHA256.fullmatch(ref):
        row = lab.row_by_sha256(conn, ref.lower())
        if row is None:
            raise UserError(f"{where}no image with sha256 {ref} in the database")
        return row
    path = Path(ref).expanduser()
    for candidate in dict.fromkeys((path.absolute(), path.resolve())):
        row = lab.row_by_path(conn, path_text(candidate))
        if row is not None:
            return row
    raise UserError(f"{where}{printable(path_text(path))}: not a file the database knows "
                    "(give a path the daemon classified, or a sha256)")


# --- the command -----------------------------------------------------------------------------------


def label_files(settings: Settings, refs: Sequence[str], action: Action, *, class_name: str | None = None,
                by: str | None = None, note: str | None = None, out: Output) -> int:
    """`semwatch label PATH... --class NAME | --confirm | --foreign | --undo`."""
    changes = [LabelChange(ref, action, class_name, by, note) for ref in refs]
    _tell(out, write_labels(settings, changes))
    return ExitStatus.OK


def import_labels(settings: Settings, csv_file: Path, *, by: str | None = None, note: str | None = None,
                  out: Output) -> int:
    """`semwatch label --import FILE.csv`: columns `path` or `sha256`, `label` (a class name,
    `confirmed` or `foreign`), optional `by` and `note`; all rows or none."""
    changes = read_label_csv(csv_file, by=by, note=note)
    _tell(out, write_labels(settings, changes))
    return ExitStatus.OK


def read_label_csv(csv_file: Path, *, by: str | None = None, note: str | None = None) -> list[LabelChange]:
    """The rows of a label CSV as changes, each knowing its line; a malformed row is a `UserError`
    naming its line (the file is the operator's own, not the watched folder's: read whole, bounded)."""
    name = printable(path_text(csv_file))
    try:
        with open(csv_file, "rb") as fh:
            data = fh.read(MAX_IMPORT_BYTES + 1)
    except OSError as exc:
        raise UserError(f"{name}: {exc.strerror or exc}") from None
    if len(data) > MAX_IMPORT_BYTES:
        raise UserError(f"{name}: larger than {MAX_IMPORT_BYTES // (1024 * 1024)} MiB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{name}: not UTF-8 text (byte {exc.start})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    if "label" not in header or not ({"path", "sha256"} & set(header)):
        raise UserError(f"{name} line 1: the header needs a 'label' column and a 'path' or 'sha256' "
                        f"column (found: {', '.join(header) or 'nothing'})")
    changes: list[LabelChange] = []
    try:
        for row in reader:
            where = f"{name} line {reader.line_num}"
            if None in row:
                raise UserError(f"{where}: more cells than the header has columns")
            cells = {k: (v or "").strip() for k, v in row.items()}
            if not any(cells.values()):
                continue  # a blank line
            ref = cells.get("sha256") or cells.get("path") or ""
            if not ref:
                raise UserError(f"{where}: neither a path nor a sha256")
            value = cells.get("label", "")
            if not value:
                raise UserError(f"{where}: no label")
            word = value.lower()
            action: Action = ("confirm" if word in ("confirmed", "confirm") else
                              "foreign" if word == "foreign" else "class")
            changes.append(LabelChange(ref, action, value if action == "class" else None,
                                       cells.get("by") or by, cells.get("note") or note, where=where))
    except csv.Error as exc:
        raise UserError(f"{name} line {reader.line_num}: {exc}") from None
    if not changes:
        raise UserError(f"{name}: no labels in it")
    return changes


def _tell(out: Output, applied: Sequence[Applied]) -> None:
    for a in applied:
        if out.json:
            out.emit(a.to_json())
            continue
        label = a.label
        what = {"confirmed": f"confirmed {label.class_name}", "corrected": f"labelled {label.class_name}",
                "foreign": "marked foreign", "cleared": "label undone"}[label.status]
        new = " (a class no model knows yet)" if a.new_class else ""
        out.line(f"{printable(label.path or label.sha256)}: {what}{new} by {printable(label.by)}")
    if out.json:
        out.emit({"event": "summary", "labels": len(applied)})
    else:
        out.line(f"{len(applied)} label(s) written")
