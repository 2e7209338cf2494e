"""The queries of the interactive console (`semwatch top`): filtered pages of images and samples,
one image or sample in detail, and what changed since the last poll.

Every query here is sized for a ledger of 500,000 rows read about once a second: pages walk the
primary key (`ORDER BY id DESC LIMIT n`) or an index (`images_status`, `images_sample`,
`images_processed_at`), and a poll reads only rows written since the previous one (`id >` the last
high-water mark) plus the few rows that were pending. The only query that may read many rows is a
search by name (`path LIKE '%...%'`), run once when the search changes, never per poll. The
connection is the read-only one of `db.connect(..., readonly=True)`; no transaction is held open
between polls, so the daemon's WAL checkpoints are never held back.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from semwatch.store import selection

IMAGE_STATUSES = ("ok", "unknown", "rejected", "failed", "pending")
VERDICTS = ("pass", "fail", "uncertain", "unknown")

# The highest code point: `x >= p AND x < p || MAX_CHAR` is a prefix match an index can serve
# (LIKE 'p%' cannot: it is case-insensitive by default).
_MAX_CHAR = "\U0010ffff"


@dataclass(frozen=True)
class ImageFilter:
    """What the images table shows; None / "" means no restriction."""

    status: str | None = None
    predicted_class: str | None = None
    sample: str = ""  # sample id prefix
    day: tuple[str, str] | None = None  # [start, end) UTC timestamps of processed_at (`day_bounds`)
    search: str = ""  # substring of the stored path (file name or folder), case-insensitive


@dataclass(frozen=True)
class SampleFilter:
    verdict: str | None = None
    predicted_class: str | None = None
    sample: str = ""
    day: tuple[str, str] | None = None  # of updated_at


@dataclass(frozen=True)
class ImageRow:
    """One current image as a table row."""

    id: int
    path: str
    status: str
    sample_id: str | None
    predicted_class: str | None
    confidence: float | None
    model_id: str | None
    processed_at: str | None
    detected_at: str | None
    error: str | None


@dataclass(frozen=True)
class EarlierResult:
    """A superseded result of the same path (an older version of the file, or another model's)."""

    status: str
    predicted_class: str | None
    model_id: str | None
    processed_at: str | None


@dataclass(frozen=True)
class ImageDetail:
    row: ImageRow
    composition: str | None
    state: str | None
    tile_agreement: float | None
    n_tiles: int | None
    probabilities: tuple[tuple[str, float], ...]  # most probable first
    reasons: tuple[str, ...]
    attempts: int
    sha256: str | None
    size_bytes: int
    current: bool
    earlier: tuple[EarlierResult, ...]


@dataclass(frozen=True)
class SampleRow:
    """A `samples` row as the views show it (the console, `top --once`, the live view)."""

    sample_id: str
    n_images: int
    composition: str | None
    state: str | None
    predicted_class: str | None
    confidence: float | None
    uniformity: float | None
    expected: str | None
    verdict: str
    updated_at: str


@dataclass(frozen=True)
class SampleDetail:
    sample: SampleRow
    images: tuple[ImageRow, ...]  # its current images, newest first (at most `limit`)
    class_counts: tuple[tuple[str, int], ...]  # predicted class (or status) -> images, most first
    n_counted: int


@dataclass(frozen=True)
class Outdated:
    """Current finished results made by a model other than `model_id`."""

    model_id: str | None
    today: int
    total: int


NO_OUTDATED = Outdated(None, 0, 0)  # no current model known: nothing can be called outdated


@dataclass(frozen=True)
class Changes:
    """What a poll found: new or finished rows matching the filter, and ids that left it."""

    high_water: int
    rows: tuple[ImageRow, ...]
    gone: frozenset[int]  # ids no longer current (superseded) or no longer matching


def day_bounds(day: date, zone: ZoneInfo) -> tuple[str, str]:
    """A local calendar day as [start, end) UTC timestamps in the database's format."""
    start = datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)
    end = datetime.combine(day + timedelta(days=1), time(0), tzinfo=zone).astimezone(UTC)
    return (start.isoformat(timespec="milliseconds"), end.isoformat(timespec="milliseconds"))


_IMAGE_COLUMNS = ("id, path, status, sample_id, predicted_class, confidence, model_id, processed_at, "
                  "detected_at, error")


def _image_where(f: ImageFilter) -> tuple[list[str], list[object]]:
    where = ["current = 1"]
    args: list[object] = []
    if f.status:
        where.append("status = ?")
        args.append(f.status)
    if f.predicted_class:
        where.append("predicted_class = ?")
        args.append(f.predicted_class)
    if f.sample:
        where.append("sample_id >= ? AND sample_id < ?")
        args += [f.sample, f.sample + _MAX_CHAR]
    if f.day is not None:
        where.append("processed_at >= ? AND processed_at < ?")
        args += list(f.day)
    if f.search:
        where.append("path LIKE ? ESCAPE '\\'")
        args.append("%" + _like_escape(f.search) + "%")
    return where, args


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def list_images(conn: sqlite3.Connection, f: ImageFilter, *, limit: int) -> tuple[ImageRow, ...]:
    """The newest `limit` current images matching `f`, newest first."""
    where, args = _image_where(f)
    rows = conn.execute(f"SELECT {_IMAGE_COLUMNS} FROM images WHERE {' AND '.join(where)} "
                        "ORDER BY id DESC LIMIT ?", (*args, limit))
    return tuple(_image_row(r) for r in rows)


def high_water(conn: sqlite3.Connection) -> int:
    """The largest row id (the primary key's last entry: no scan)."""
    return int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM images").fetchone()[0])


def pending_ids(conn: sqlite3.Connection) -> frozenset[int]:
    """Ids of the current pending rows (the daemon's queue: a handful; index `images_status`)."""
    return frozenset(int(r[0]) for r in conn.execute(
        "SELECT id FROM images WHERE status = 'pending' AND current = 1"))


def changes_since(conn: sqlite3.Connection, f: ImageFilter, *, after: int, watched: Iterable[int],
                  limit: int) -> Changes:
    """Rows written after id `after` that match `f`, and the rows of `watched` (the ids shown, and
    the ids that were pending) as they are now: matching ones in `rows`, the others in `gone`."""
    top = high_water(conn)
    where, args = _image_where(f)
    new = [_image_row(r) for r in conn.execute(
        f"SELECT {_IMAGE_COLUMNS} FROM images WHERE id > ? AND id <= ? AND {' AND '.join(where)} "
        "ORDER BY id DESC LIMIT ?", (after, top, *args, limit))]
    watched = sorted(set(watched))
    still: dict[int, ImageRow] = {}
    for chunk in range(0, len(watched), 500):  # SQLite's bound-parameter limit is far above 500
        ids = watched[chunk:chunk + 500]
        marks = ", ".join("?" * len(ids))
        for r in conn.execute(f"SELECT {_IMAGE_COLUMNS} FROM images WHERE id IN ({marks}) AND "
                              f"{' AND '.join(where)}", (*ids, *args)):
            still[int(r["id"])] = _image_row(r)
    gone = frozenset(i for i in watched if i not in still)
    return Changes(top, (*new, *still.values()), gone)


def image_detail(conn: sqlite3.Connection, image_id: int) -> ImageDetail | None:
    row = conn.execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()
    if row is None:
        return None
    earlier = tuple(
        EarlierResult(r["status"], r["predicted_class"], r["model_id"], r["processed_at"])
        for r in conn.execute(  # the UNIQUE (path, ...) index: the rows of one path
            "SELECT status, predicted_class, model_id, processed_at FROM images "
            "WHERE path = ? AND id != ? ORDER BY id DESC LIMIT 10", (row["path"], image_id)))
    return ImageDetail(
        row=_image_row(row), composition=row["composition"], state=row["state"],
        tile_agreement=row["tile_agreement"], n_tiles=row["n_tiles"],
        probabilities=_probabilities(row["probabilities"]), reasons=_reasons(row["reasons"]),
        attempts=int(row["attempts"] or 0), sha256=row["sha256"], size_bytes=int(row["size_bytes"]),
        current=bool(row["current"]), earlier=earlier)


def _probabilities(text: str | None) -> tuple[tuple[str, float], ...]:
    try:
        raw = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return ()
    if not isinstance(raw, dict):
        return ()
    pairs = [(str(k), float(v)) for k, v in raw.items() if isinstance(v, int | float)]
    return tuple(sorted(pairs, key=lambda kv: -kv[1]))


def _reasons(text: str | None) -> tuple[str, ...]:
    try:
        raw = json.loads(text) if text else []
    except json.JSONDecodeError:
        return (str(text),)
    return tuple(str(r) for r in raw) if isinstance(raw, list) else (str(raw),)


def list_samples(conn: sqlite3.Connection, f: SampleFilter, *, limit: int) -> tuple[SampleRow, ...]:
    """The `limit` most recently updated samples matching `f` (the samples table holds one row per
    sample, far fewer rows than images)."""
    where = ["1"]
    args: list[object] = []
    if f.verdict:
        where.append("verdict = ?")
        args.append(f.verdict)
    if f.predicted_class:
        where.append("predicted_class = ?")
        args.append(f.predicted_class)
    if f.sample:
        where.append("sample_id >= ? AND sample_id < ?")
        args += [f.sample, f.sample + _MAX_CHAR]
    if f.day is not None:
        where.append("updated_at >= ? AND updated_at < ?")
        args += list(f.day)
    rows = conn.execute(f"SELECT * FROM samples WHERE {' AND '.join(where)} "
                        "ORDER BY updated_at DESC, sample_id LIMIT ?", (*args, limit))
    return tuple(sample_row(r) for r in rows)


def sample_detail(conn: sqlite3.Connection, sample_id: str, *, limit: int = 500) -> SampleDetail | None:
    row = conn.execute("SELECT * FROM samples WHERE sample_id = ?", (sample_id,)).fetchone()
    if row is None:
        return None
    images = tuple(_image_row(r) for r in conn.execute(  # index images_sample
        f"SELECT {_IMAGE_COLUMNS} FROM images WHERE sample_id = ? AND current = 1 "
        "ORDER BY id DESC LIMIT ?", (sample_id, limit)))
    counts = conn.execute(
        "SELECT COALESCE(predicted_class, status) AS c, COUNT(*) AS n FROM images "
        "WHERE sample_id = ? AND current = 1 GROUP BY c ORDER BY n DESC, c", (sample_id,))
    return SampleDetail(sample_row(row), images, tuple((str(r["c"]), int(r["n"])) for r in counts),
                        int(row["n_counted"] or 0))


def known_classes(conn: sqlite3.Connection) -> tuple[str, ...]:
    """Every class any recorded model knows (the `models` table: one row per model)."""
    names: set[str] = set()
    for (text,) in conn.execute("SELECT classes FROM models"):
        try:
            raw = json.loads(text) if text else []
        except json.JSONDecodeError:
            continue
        if isinstance(raw, list):
            names.update(str(c) for c in raw)
    return tuple(sorted(names))


def count_outdated(conn: sqlite3.Connection, model_id: str | None, *, today: tuple[str, str]) -> Outdated:
    """Current results made by another model than `model_id`: processed in `today` ([start, end)
    UTC) and in all (`selection.count_outdated`)."""
    if model_id is None:
        return NO_OUTDATED
    return Outdated(model_id, selection.count_outdated(conn, model_id, since=today[0], until=today[1]),
                    selection.count_outdated(conn, model_id))


def status_counts(conn: sqlite3.Connection, *, day: tuple[str, str] | None = None) -> dict[str, int]:
    """Current images by status: of one day ([start, end) UTC of processed_at, an index range), or
    of the whole ledger (a full scan: about 0.2 s on 500,000 rows)."""
    if day is not None:
        return {r[0]: int(r[1]) for r in conn.execute(
            "SELECT status, COUNT(*) FROM images WHERE processed_at >= ? AND processed_at < ? "
            "AND current = 1 GROUP BY status", day)}
    return {r[0]: int(r[1]) for r in conn.execute(
        "SELECT status, COUNT(*) FROM images WHERE current = 1 GROUP BY status")}


def _image_row(r: sqlite3.Row) -> ImageRow:
    return ImageRow(
        id=int(r["id"]), path=r["path"], status=r["status"], sample_id=r["sample_id"],
        predicted_class=r["predicted_class"], confidence=r["confidence"], model_id=r["model_id"],
        processed_at=r["processed_at"], detected_at=r["detected_at"], error=r["error"])


def sample_row(r: sqlite3.Row) -> SampleRow:
    return SampleRow(
        sample_id=r["sample_id"], n_images=int(r["n_images"] or 0), composition=r["composition"],
        state=r["state"], predicted_class=r["predicted_class"], confidence=r["confidence"],
        uniformity=r["uniformity"], expected=r["expected"], verdict=r["verdict"],
        updated_at=r["updated_at"])


def ordered(rows: Sequence[ImageRow]) -> list[ImageRow]:
    """Rows newest first (the order of every images table)."""
    return sorted(rows, key=lambda r: -r.id)
