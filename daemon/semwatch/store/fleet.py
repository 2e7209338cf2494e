"""Many instruments' snapshots, read for `semwatch fleet` (the console and the report).

A source is a snapshot file (`store.export`) or a folder of them; in a folder the newest snapshot of
each instrument (by file-name prefix) stands for it. Each is opened read-only and immutable (a
snapshot never changes after its rename; `immutable=1` also takes no locks, which network shares
handle badly) and checked before any query: a file that is missing, shorter than its header says
(half-written, truncated), not a database, of a newer schema, or unreadable is an `Instrument` card
with `problem` set, never an exception. One broken snapshot costs only its own card.
"""

from __future__ import annotations

import sqlite3
import struct
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from semwatch.config import Settings
from semwatch.errors import ConfigError
from semwatch.store import db
from semwatch.store.browse import Outdated, count_outdated
from semwatch.store.export import SUFFIX
from semwatch.store.instrument import read as read_instrument
from semwatch.store.schema import SCHEMA_VERSION, schema_version
from semwatch.store.snapshot import DaemonRow, heartbeat_age, read_daemon

HEADER = b"SQLite format 3\x00"


@dataclass(frozen=True)
class Card:
    """One instrument as its newest snapshot shows it (`problem` set: what is wrong with it)."""

    path: Path
    name: str  # the instrument's name (from the snapshot; the file name's prefix when unreadable)
    site: str = ""
    problem: str | None = None
    snapshot_age_s: float | None = None  # since the snapshot was written (its file's mtime)
    daemon: DaemonRow | None = None
    heartbeat_age_s: float | None = None  # of the heartbeat recorded in it, as of now
    stale: bool = True
    images_today: int = 0
    failed_today: int = 0
    unknown_today: int = 0
    fail_samples_today: int = 0
    outdated: Outdated | None = None

    @property
    def unknown_share(self) -> float | None:
        return self.unknown_today / self.images_today if self.images_today else None

    @property
    def label(self) -> str:
        return f"{self.name} ({self.site})" if self.site else self.name

    @property
    def model_id(self) -> str | None:
        return self.daemon.model_id if self.daemon is not None else None


def sources_of(settings: Settings, sources: Sequence[Path]) -> tuple[Path, ...]:
    """The snapshots to read: those given, else `[fleet] export_folder`."""
    if sources:
        return tuple(sources)
    if settings.fleet.export_folder is None:
        raise ConfigError("[fleet] export_folder is empty: name snapshot files or folders")
    return (settings.fleet.export_folder,)


def find_snapshots(sources: Iterable[Path]) -> list[Path]:
    """The snapshot of each instrument: a file as given (even a missing one, shown as missing), a
    folder's newest `*.semwatch.db` per instrument prefix. In name order."""
    chosen: dict[str, Path] = {}
    for source in sources:
        if source.is_dir():
            for path in sorted(source.glob(f"*{SUFFIX}")):  # part files start with a dot: not matched
                if path.name.startswith("."):
                    continue
                chosen[f"{source}/{path.name.split('.', 1)[0]}"] = path  # sorted: the newest wins
        else:
            chosen[str(source)] = source
    return sorted(chosen.values(), key=lambda p: (p.name, str(p)))


def check_file(path: Path) -> str | None:
    """Why `path` cannot be a whole SQLite database, from its 100-byte header and its size; None
    when it looks whole."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            header = fh.read(100)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    if len(header) < 100 or not header.startswith(HEADER):
        return "broken: not an SQLite database (empty or half-written?)"
    page_size = struct.unpack(">H", header[16:18])[0]
    page_size = 65536 if page_size == 1 else page_size
    pages = struct.unpack(">I", header[28:32])[0]
    if size < page_size * pages:
        return f"broken: truncated ({size} of {page_size * pages} bytes: half-written or cut short)"
    if header[18] == 2:  # WAL mode: a live database (its latest writes are in -wal), not a snapshot
        return "a live database (WAL mode), not a snapshot: share snapshots (semwatch export)"
    return None


@contextmanager
def open_snapshot(path: Path) -> Iterator[db.TrackedConnection]:
    """A read-only, immutable connection to a snapshot (closed on exit)."""
    conn = db.connect(path, readonly=True, immutable=True)
    try:
        yield conn
    finally:
        conn.close()


def read_card(path: Path, *, today: tuple[str, str], stale_seconds: float,
              now: datetime | None = None) -> Card:
    """The card of one snapshot; never raises for what is in (or missing from) the file."""
    now = now or datetime.now(UTC)
    fallback = path.name.split(".", 1)[0]
    problem = check_file(path)
    if problem is not None:
        return Card(path, fallback, problem=problem)
    age = max(0.0, now.timestamp() - path.stat().st_mtime)
    try:
        with open_snapshot(path) as conn:
            version = schema_version(conn)
            if version > SCHEMA_VERSION:
                return Card(path, fallback, problem=f"newer schema (version {version}; this semwatch "
                                                    f"reads up to {SCHEMA_VERSION}): upgrade semwatch",
                            snapshot_age_s=age)
            return _read(conn, path, fallback, age, today, stale_seconds, now)
    except sqlite3.DatabaseError as exc:
        return Card(path, fallback, problem=f"broken: {exc}", snapshot_age_s=age)


def _read(conn: sqlite3.Connection, path: Path, fallback: str, age: float, today: tuple[str, str],
          stale_seconds: float, now: datetime) -> Card:
    instrument = read_instrument(conn)
    daemon = read_daemon(conn)
    counts = {r[0]: int(r[1]) for r in conn.execute(
        "SELECT status, count(*) FROM images WHERE processed_at >= ? AND processed_at < ? "
        "AND current = 1 AND status != 'pending' GROUP BY status", today)}
    fails = conn.execute(
        "SELECT count(*) FROM samples WHERE verdict = 'fail' AND updated_at >= ? AND updated_at < ?",
        today).fetchone()[0]
    outdated = count_outdated(conn, daemon.model_id if daemon else None, today=today)
    beat = heartbeat_age(daemon, now)
    # A stopped daemon's snapshot is stale too: its instrument is not being watched.
    stale = (daemon is None or beat is None or beat > stale_seconds or age > stale_seconds
             or daemon.state == "stopped")
    return Card(path, instrument.name if instrument else fallback, instrument.site if instrument else "",
                snapshot_age_s=age, daemon=daemon, heartbeat_age_s=beat, stale=stale,
                images_today=sum(counts.values()), failed_today=counts.get("failed", 0),
                unknown_today=counts.get("unknown", 0), fail_samples_today=int(fails), outdated=outdated)


def read_cards(sources: Iterable[Path], *, today: tuple[str, str], stale_seconds: float,
               now: datetime | None = None) -> list[Card]:
    return [read_card(p, today=today, stale_seconds=stale_seconds, now=now) for p in find_snapshots(sources)]
