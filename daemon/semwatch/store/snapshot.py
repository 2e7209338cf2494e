"""A read-only snapshot of the daemon database: what the live view and `semwatch top` render.

Readers never write: the database is opened with `mode=ro` and every query is a plain SELECT, so
the daemon's single writer is never blocked. A database that does not exist yet, or whose tables
are not created yet, gives a snapshot that says so instead of an error.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from semwatch.config import Settings
from semwatch.store import db
from semwatch.store.access import ReadRefused, open_readonly
from semwatch.store.browse import NO_OUTDATED, Outdated, SampleRow, count_outdated, day_bounds, sample_row
from semwatch.store.instrument import read as read_instrument
from semwatch.store.model_events import NO_SHADOW, Agreement, shadow_agreement


@dataclass(frozen=True)
class DaemonRow:
    """The `daemon` table's single row (counts and rates written about once a second)."""

    pid: int | None
    hostname: str | None
    started_at: str | None
    heartbeat_at: str | None
    device: str | None
    model_id: str | None
    watch_folder: str | None
    state: str
    waiting: int
    in_progress: int
    done: int
    failed: int
    images_per_s: float
    tiles_per_s: float
    message: str | None


@dataclass(frozen=True)
class RecentImage:
    path: str
    status: str
    sample_id: str | None
    predicted_class: str | None
    composition: str | None
    state: str | None
    confidence: float | None
    processed_at: str | None
    error: str | None
    detected_at: str | None = None


@dataclass(frozen=True)
class Snapshot:
    """Everything one dashboard frame shows; `problem` is set when there is nothing to show."""

    database: Path
    taken_at: datetime
    problem: str | None = None
    daemon: DaemonRow | None = None
    heartbeat_age_s: float | None = None
    stale: bool = False
    status_counts: dict[str, int] = field(default_factory=dict)
    recent: tuple[RecentImage, ...] = ()
    samples: tuple[SampleRow, ...] = ()
    errors: tuple[RecentImage, ...] = ()
    # Current results of another model than the current one (issue 11); the current model is the
    # configured one when the view could read it, else the daemon's.
    outdated: Outdated = NO_OUTDATED
    # The shadow model's agreement with the live verdicts over the last day (issue 20; n = 0: none).
    shadow: Agreement = NO_SHADOW
    instrument: str | None = None  # `store.instrument` label (name and site); None before schema 6


def parse_utc(text: str | None) -> datetime | None:
    """A database timestamp (UTC ISO-8601) as an aware datetime; None for missing or malformed."""
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def take_snapshot(settings: Settings, *, now: datetime | None = None, max_samples: int = 12,
                  max_errors: int = 5, current_model: str | None = None) -> Snapshot:
    """Read the daemon database at `[store] database` read-only. `current_model` is the model id
    results are compared with for the outdated counts (None: the daemon row's model)."""
    path = settings.store.database
    now = now or datetime.now(UTC)
    try:
        conn = open_readonly(path, busy_timeout_ms=settings.store.busy_timeout_ms)
    except ReadRefused as exc:
        return Snapshot(path, now, problem=str(exc))
    try:
        today = day_bounds(now.astimezone(ZoneInfo(settings.report.timezone)).date(),
                           ZoneInfo(settings.report.timezone))
        return _read(conn, path, now, settings.live.recent_rows, max_samples, max_errors,
                     settings.live.stale_seconds, current_model, today)
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return Snapshot(path, now, problem=f"database {path} is not initialised yet")
        return Snapshot(path, now, problem=f"cannot read {path}: {exc}")
    except sqlite3.DatabaseError as exc:
        return Snapshot(path, now, problem=f"cannot read {path}: {exc}")
    finally:
        conn.close()


def _read(conn: db.TrackedConnection, path: Path, now: datetime, n_recent: int, n_samples: int,
          n_errors: int, stale_seconds: float, current_model: str | None,
          today: tuple[str, str]) -> Snapshot:
    # One read transaction: every query sees the same state of the database.
    conn.execute("BEGIN")
    try:
        daemon = read_daemon(conn)
        counts = {r[0]: int(r[1]) for r in conn.execute(
            "SELECT status, COUNT(*) FROM images WHERE current = 1 GROUP BY status")}
        recent = tuple(_image(r) for r in conn.execute(
            "SELECT * FROM images WHERE processed_at IS NOT NULL AND status != 'pending' "
            "ORDER BY processed_at DESC, id DESC LIMIT ?", (n_recent,)))
        samples = tuple(sample_row(r) for r in conn.execute(
            "SELECT * FROM samples ORDER BY updated_at DESC, sample_id LIMIT ?", (n_samples,)))
        # This WHERE and ORDER BY are those of the index images_errors (schema version 2): keep them
        # as they are, or the query reads the whole ledger once a second.
        errors = tuple(_image(r) for r in conn.execute(
            "SELECT * FROM images WHERE error IS NOT NULL AND error != '' "
            "ORDER BY COALESCE(processed_at, detected_at) DESC, id DESC LIMIT ?", (n_errors,)))
        outdated = count_outdated(conn, current_model or (daemon.model_id if daemon else None), today=today)
        shadow = shadow_agreement(conn, since=now - timedelta(days=1))
        instrument = read_instrument(conn)
    finally:
        conn.execute("COMMIT")
    age = heartbeat_age(daemon, now)
    stale = daemon is None or age is None or age > stale_seconds
    return Snapshot(path, now, daemon=daemon, heartbeat_age_s=age, stale=stale, status_counts=counts,
                    recent=recent, samples=samples, errors=errors, outdated=outdated, shadow=shadow,
                    instrument=instrument.label if instrument is not None else None)


def heartbeat_age(daemon: DaemonRow | None, now: datetime) -> float | None:
    """Seconds since the daemon's last heartbeat; None when it never wrote one."""
    beat = parse_utc(daemon.heartbeat_at) if daemon else None
    return None if beat is None else max(0.0, (now - beat).total_seconds())


def read_daemon(conn: sqlite3.Connection) -> DaemonRow | None:
    """The daemon row, None before a daemon first wrote it."""
    row = conn.execute("SELECT * FROM daemon WHERE id = 1").fetchone()
    return _daemon_row(row) if row is not None else None


def _daemon_row(row: sqlite3.Row) -> DaemonRow:
    return DaemonRow(
        pid=row["pid"], hostname=row["hostname"], started_at=row["started_at"],
        heartbeat_at=row["heartbeat_at"], device=row["device"], model_id=row["model_id"],
        watch_folder=row["watch_folder"], state=row["state"] or "stopped",
        waiting=int(row["waiting"] or 0), in_progress=int(row["in_progress"] or 0),
        done=int(row["done"] or 0), failed=int(row["failed"] or 0),
        images_per_s=float(row["images_per_s"] or 0.0), tiles_per_s=float(row["tiles_per_s"] or 0.0),
        message=row["message"],
    )


def _image(row: sqlite3.Row) -> RecentImage:
    return RecentImage(
        path=row["path"], status=row["status"], sample_id=row["sample_id"],
        predicted_class=row["predicted_class"], composition=row["composition"], state=row["state"],
        confidence=row["confidence"], processed_at=row["processed_at"], error=row["error"],
        detected_at=row["detected_at"],
    )
