"""Which instrument a database belongs to (`[instrument] name`, schema step 6).

A database is one instrument's ledger: its name is written once into the `instrument` table and,
by a trigger, onto every images and samples row. `bind` is the one check every writer makes when it
opens the database (the daemon, `semwatch reprocess`): a database that names another instrument is
refused, because writing one microscope's verdicts into another's ledger (a copied config, a
database path shared by mistake) mixes two instruments' results for good. A deliberate rename
(`semwatch watch --rename-instrument`) keeps the old name in `previous` and re-stamps the rows.
Readers use `read`, which also answers for a database of an older schema (no name yet).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from semwatch.errors import ConfigError
from semwatch.store import db
from semwatch.values import utc_now


@dataclass(frozen=True)
class Instrument:
    name: str
    site: str = ""

    @property
    def label(self) -> str:
        """"name (site)" for headers and titles; the name alone without a site."""
        return f"{self.name} ({self.site})" if self.site else self.name


def read(conn: sqlite3.Connection) -> Instrument | None:
    """The database's instrument; None when it has none yet (older schema, or never bound)."""
    try:
        row = conn.execute("SELECT name, site FROM instrument WHERE id = 1").fetchone()
    except sqlite3.OperationalError:  # no such table: a database before schema step 6
        return None
    return None if row is None else Instrument(str(row[0]), str(row[1] or ""))


def bind(conn: sqlite3.Connection, wanted: Instrument, *, rename: bool = False) -> Instrument:
    """Make `wanted` the database's instrument, or refuse (`ConfigError`, exit 78) when it already
    names another and `rename` is not set. A first bind (a new database, or one migrated from
    before step 6) stamps the rows written without a name. Returns the instrument now recorded."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        have = read(conn)
        if have is not None and have.name != wanted.name and not rename:
            raise ConfigError(
                f"this database belongs to instrument {have.name!r}, not {wanted.name!r} "
                f"([instrument] name): use that instrument's config, another [store] database, or "
                f"`semwatch watch --rename-instrument` to rename it on purpose")
        if have is None:
            conn.execute("INSERT INTO instrument (id, name, site, named_at) VALUES (1, ?, ?, ?)",
                         (wanted.name, wanted.site, utc_now()))
            conn.execute("UPDATE images SET instrument = ? WHERE instrument IS NULL", (wanted.name,))
            conn.execute("UPDATE samples SET instrument = ? WHERE instrument IS NULL", (wanted.name,))
        elif have != wanted:
            renamed = have.name != wanted.name
            conn.execute("UPDATE instrument SET name = ?, site = ?, named_at = ?, "
                         "previous = CASE WHEN ? THEN ? ELSE previous END WHERE id = 1",
                         (wanted.name, wanted.site, utc_now(), renamed, have.name))
            if renamed:
                conn.execute("UPDATE images SET instrument = ?", (wanted.name,))
                conn.execute("UPDATE samples SET instrument = ?", (wanted.name,))
        conn.execute("COMMIT")
    except BaseException:
        db.rollback(conn)
        raise
    return wanted
