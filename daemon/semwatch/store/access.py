"""The two ways into the database: `open_writer` for every process that writes it, `open_readonly`
for every command that only reads it. A new command picks one of these; none opens the file itself.

- **Writers** (the daemon, `semwatch reprocess`, any future writer) get a `ledger.Store`: created or
  migrated under the write lock (`db.WriteLock`, the database's folder), refused while a daemon of
  another semwatch version holds the database (exit 75, naming both), and checked to be the same
  file (st_dev, st_ino) under the lock before every batch (`Store.batch`, `writer.commit_batch`).
- **Readers** (`top`, `report`, `reprocess --dry-run`, ...) get a read-only connection: never a new
  file (a mistyped path is an error), never a migration (an older schema is refused with a message
  saying what migrates it, or read through a migrated copy in memory where the caller asks), and a
  database of a newer semwatch is refused (78), as the writers refuse it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Literal

import semwatch
from semwatch.config import Settings
from semwatch.errors import ConfigError, ExitStatus, UserError
from semwatch.store import db
from semwatch.store.instrument import Instrument
from semwatch.store.ledger import HeldByOtherVersion, Store
from semwatch.store.schema import (
    SCHEMA_VERSION,
    VERSION_TAG,
    SchemaTooNew,
    create_schema,
    last_migrated_by,
    schema_version,
    too_new,
)

__all__ = ["ReadRefused", "lock_daemon", "open_readonly", "open_writer"]


class ReadRefused(UserError):
    """A read-only command cannot read the database: missing, not initialised, of another schema
    version, or not a database. One line for the user; `exit_status` says which."""


def open_writer(settings: Settings, *, rename_instrument: bool = False) -> Store:
    """The writer's Store on `[store] database` and `results_csv`, checked up front: an unusable
    one, or one of another `[instrument] name` (unless `rename_instrument`), is a configuration
    error (78), a daemon of another version holding it 75."""
    csv_path = settings.store.results_csv
    try:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "ab"):
            pass
    except OSError as exc:
        reason = exc.strerror or exc
        raise ConfigError(f"[store] results_csv cannot be written: {csv_path}: {reason}") from None
    try:
        return Store(settings.store.database, csv_path, busy_timeout_ms=settings.store.busy_timeout_ms,
                     sample_settings=settings.samples,
                     instrument=Instrument(settings.instrument.resolved_name(), settings.instrument.site),
                     rename_instrument=rename_instrument)
    except HeldByOtherVersion as exc:
        raise UserError(str(exc), ExitStatus.LOCKED) from None
    except SchemaTooNew as exc:
        raise ConfigError(f"[store] database {settings.store.database}: {exc}") from None
    except (sqlite3.Error, OSError, RuntimeError) as exc:
        raise ConfigError(f"[store] database cannot be used: {settings.store.database}: {exc}") from None


def lock_daemon(database: Path) -> int:
    """The daemon's exclusive `<database>.lock`, with this semwatch's version written into it (what
    `open_writer` of another version reads before it would migrate). Raises `db.DatabaseLocked`."""
    return db.lock_database(database, VERSION_TAG)


def open_readonly(path: Path, *, busy_timeout_ms: int = 10000, check_same_thread: bool = True,
                  older: Literal["refuse", "copy"] = "refuse") -> db.TrackedConnection:
    """A read-only connection to the database at `path`, of the current schema. Raises `ReadRefused`
    when there is no database file (nothing is created), when it is empty, not initialised or not a
    database, when its schema is newer (status 78) or, with `older="refuse"`, older than this
    semwatch's. With `older="copy"` an older database is copied into memory and the copy migrated:
    the caller reads what a migrated database would hold, and the file is not changed."""
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise ReadRefused(f"no database yet at {path}: it {what} (has the daemon run? is [store] "
                          "database right?)",
                          ExitStatus.INPUT_FAILED)
    try:
        conn = db.connect(path, readonly=True, busy_timeout_ms=busy_timeout_ms,
                          check_same_thread=check_same_thread)
    except sqlite3.Error as exc:
        raise ReadRefused(f"cannot open database {path}: {exc}", ExitStatus.INPUT_FAILED) from None
    try:
        version = schema_version(conn)
        if version == 0:
            raise ReadRefused(f"database {path} is not initialised yet (or not a semwatch database)",
                              ExitStatus.INPUT_FAILED)
        if version > SCHEMA_VERSION:
            raise ReadRefused(f"database {path}: {too_new(conn, version)}", ExitStatus.CONFIG)
        if version < SCHEMA_VERSION:
            if older == "refuse":
                by = last_migrated_by(conn)
                who = f" (last migrated by {by})" if by else ""
                raise ReadRefused(
                    f"database {path} has schema version {version}{who}, "
                    f"older than this semwatch {semwatch.__version__}'s ({SCHEMA_VERSION}); "
                    "a read-only command does not migrate it: `semwatch watch` or `semwatch reprocess` "
                    "of this version will (or read it with the semwatch that wrote it)",
                    ExitStatus.INPUT_FAILED)
            return _migrated_copy(conn)
    except sqlite3.DatabaseError as exc:  # "file is not a database", a damaged file
        conn.close()
        raise ReadRefused(f"cannot read database {path}: {exc}", ExitStatus.INPUT_FAILED) from None
    except BaseException:
        conn.close()
        raise
    return conn


def _migrated_copy(conn: db.TrackedConnection) -> db.TrackedConnection:
    """An in-memory copy of `conn`'s database brought to the current schema; `conn` is closed."""
    copy = sqlite3.connect(":memory:", factory=db.TrackedConnection, isolation_level=None,
                           check_same_thread=False)
    assert isinstance(copy, db.TrackedConnection)
    db.track(copy)
    try:
        conn.backup(copy)
        copy.row_factory = sqlite3.Row
        create_schema(copy)
    except BaseException:
        copy.close()
        raise
    finally:
        conn.close()
    return copy
