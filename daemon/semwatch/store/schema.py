"""The database schema and its migrations: a database of any earlier `user_version` is brought to
the current one at start-up, all steps in one transaction.

`MIGRATIONS[n - 1]` takes a database from version n - 1 to n; version 0 is an empty file, so a new
database and an old one go through the same steps and cannot drift apart. A released step is never
edited (databases in the field are at its end state): a change is a new step at the end.
`create_schema` runs the missing steps inside one BEGIN IMMEDIATE ... COMMIT and sets `user_version`
in the same transaction (SQLite keeps it in the file header, under the transaction), so a failure
or a kill mid-way leaves the database exactly at the version it had. A database from a newer
semwatch is refused (`SchemaTooNew`): this code cannot know what the newer steps changed.

Each step records itself in `schema_migrations` (from version 2 on; a database migrated from 1 has
no row for 1, whose date nobody wrote down). To look at a database by hand, open it read-only, e.g.
`sqlite3 -readonly var/semwatch.db "SELECT * FROM schema_migrations"`; sqlite-utils and datasette
read it the same way.

Why plain `sqlite3` and not sqlite-utils (which the design notes name): the ledger's value is in
what sqlite-utils abstracts away. The schema needs partial and expression indexes and CHECK
constraints, which its `create_table`/`create_index` cannot state, so the DDL would be SQL anyway;
the single writer owns its transactions (BEGIN IMMEDIATE batches over several tables, busy timeouts,
WAL, read-only URIs for readers, the rollback rules for SQLITE_FULL in `db.rollback`), which
plain connections state directly; its `Migrations` runs each step in a transaction of its own and
keeps its own table instead of `user_version`, where this needs all steps in one; and the daemon
would take on seven more packages (click, pluggy, tabulate, ...) for statements the standard library
runs. A future step that must rebuild a table (SQLite cannot alter a CHECK) may still call
`sqlite_utils.Database(conn).table(...).transform(...)` on this connection: its `atomic()` nests as a
SAVEPOINT inside this transaction (checked with sqlite-utils 4.2.1 on tests/data/semwatch-v1.db: a
later step's failure rolled the rebuilt table back with the rest; CHECKs and indexes were kept).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Sequence

import semwatch
from semwatch.store.db import rollback
from semwatch.values import utc_now

log = logging.getLogger("semwatch.store")

# Version 1, as the first release wrote it (never edit: step 1 must create exactly this).
SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS images (
    id              INTEGER PRIMARY KEY,
    path            TEXT    NOT NULL,
    sha256          TEXT,
    size_bytes      INTEGER NOT NULL,
    mtime_ns        INTEGER NOT NULL,
    status          TEXT    NOT NULL
                    CHECK (status IN ('ok', 'unknown', 'rejected', 'failed', 'pending')),
    sample_id       TEXT,
    predicted_class TEXT,
    composition     TEXT,
    state           TEXT,
    confidence      REAL,
    tile_agreement  REAL,
    n_tiles         INTEGER,
    error           TEXT,
    model_id        TEXT,
    detected_at     TEXT    NOT NULL,
    processed_at    TEXT,
    probabilities   TEXT,
    reasons         TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    current         INTEGER NOT NULL DEFAULT 1 CHECK (current IN (0, 1)),
    csv_written     INTEGER NOT NULL DEFAULT 0,
    UNIQUE (path, size_bytes, mtime_ns)
);
CREATE UNIQUE INDEX IF NOT EXISTS images_one_current ON images (path) WHERE current = 1;
CREATE INDEX IF NOT EXISTS images_sha256 ON images (sha256);
CREATE INDEX IF NOT EXISTS images_sample ON images (sample_id) WHERE current = 1;
CREATE INDEX IF NOT EXISTS images_processed_at ON images (processed_at);
CREATE INDEX IF NOT EXISTS images_status ON images (status);

CREATE TABLE IF NOT EXISTS samples (
    sample_id   TEXT PRIMARY KEY,
    n_images    INTEGER NOT NULL,
    n_counted   INTEGER NOT NULL DEFAULT 0,
    composition TEXT,
    state       TEXT,
    predicted_class TEXT,
    confidence  REAL,
    uniformity  REAL,
    expected    TEXT,
    verdict     TEXT NOT NULL CHECK (verdict IN ('pass', 'fail', 'uncertain', 'unknown')),
    updated_at  TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS models (
    model_id   TEXT PRIMARY KEY,
    name       TEXT,
    classes    TEXT,
    created_at TEXT,
    metrics    TEXT,
    path       TEXT,
    first_used_at TEXT
);

CREATE TABLE IF NOT EXISTS daemon (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    pid          INTEGER,
    hostname     TEXT,
    started_at   TEXT,
    heartbeat_at TEXT,
    device       TEXT,
    model_id     TEXT,
    watch_folder TEXT,
    watch_mode   TEXT,
    waiting      INTEGER NOT NULL DEFAULT 0,
    in_progress  INTEGER NOT NULL DEFAULT 0,
    done         INTEGER NOT NULL DEFAULT 0,
    failed       INTEGER NOT NULL DEFAULT 0,
    images_per_s REAL NOT NULL DEFAULT 0,
    tiles_per_s  REAL NOT NULL DEFAULT 0,
    state        TEXT NOT NULL DEFAULT 'stopped'
                 CHECK (state IN ('starting', 'running', 'stopping', 'stopped')),
    message      TEXT
);
"""

# Version 2. Two partial indexes for the two queries that read the whole `images` table although
# they want a handful of its rows (measured on a 500,000-row ledger: 111 ms -> 0.04 ms and
# 76 ms -> 0.05 ms; each index holds only those rows, so the writer's cost is nil):
# - images_csv_unwritten: the start-up CSV reconcile (`results_csv`), rows not yet in the CSV;
# - images_errors: the live view's "recent errors", read once a second by `semwatch top`
#   (`snapshot._read`; the WHERE and ORDER BY must stay as they are there for SQLite to use it).
# And the log of applied steps, for whoever wonders when a database was upgraded and by what.
SCHEMA_V2 = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version          INTEGER PRIMARY KEY,
    applied_at       TEXT NOT NULL,
    semwatch_version TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS images_csv_unwritten ON images (id) WHERE csv_written = 0;
CREATE INDEX IF NOT EXISTS images_errors ON images (COALESCE(processed_at, detected_at), id)
    WHERE error IS NOT NULL AND error != '';
"""

# Version 3: re-classification (`semwatch reprocess`, issue 11). A version of a file may now have
# several results, one per classification: the newest is current, the older ones stay (current = 0)
# for audit. SQLite cannot drop the table constraint UNIQUE (path, size_bytes, mtime_ns), so the
# table is rebuilt (the documented "12-step" rebuild, inside this step's transaction): the key gains
# `revision` (0 for the first result of a version, +1 per re-classification), and `supersedes`
# names the row a re-classification replaced. Its unique index is what makes a re-classification
# exactly-once: a row can be superseded by one result only, whichever process writes it.
# `reprocess_runs` remembers each run's selection, so that a run killed part-way resumes instead
# of starting over. `images_current_model` serves the "outdated results" counts (current rows of
# another model) read by `top`, the report and the metrics.
_IMAGES_V1_COLUMNS = (
    "id, path, sha256, size_bytes, mtime_ns, status, sample_id, predicted_class, composition, state, "
    "confidence, tile_agreement, n_tiles, error, model_id, detected_at, processed_at, probabilities, "
    "reasons, attempts, current, csv_written"
)
SCHEMA_V3 = f"""
CREATE TABLE images_v3 (
    id              INTEGER PRIMARY KEY,
    path            TEXT    NOT NULL,
    sha256          TEXT,
    size_bytes      INTEGER NOT NULL,
    mtime_ns        INTEGER NOT NULL,
    status          TEXT    NOT NULL
                    CHECK (status IN ('ok', 'unknown', 'rejected', 'failed', 'pending')),
    sample_id       TEXT,
    predicted_class TEXT,
    composition     TEXT,
    state           TEXT,
    confidence      REAL,
    tile_agreement  REAL,
    n_tiles         INTEGER,
    error           TEXT,
    model_id        TEXT,
    detected_at     TEXT    NOT NULL,
    processed_at    TEXT,
    probabilities   TEXT,
    reasons         TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    current         INTEGER NOT NULL DEFAULT 1 CHECK (current IN (0, 1)),
    csv_written     INTEGER NOT NULL DEFAULT 0,
    revision        INTEGER NOT NULL DEFAULT 0,
    supersedes      INTEGER,
    UNIQUE (path, size_bytes, mtime_ns, revision)
);
INSERT INTO images_v3 ({_IMAGES_V1_COLUMNS}) SELECT {_IMAGES_V1_COLUMNS} FROM images;
DROP TABLE images;
ALTER TABLE images_v3 RENAME TO images;
CREATE UNIQUE INDEX images_one_current ON images (path) WHERE current = 1;
CREATE UNIQUE INDEX images_supersedes ON images (supersedes) WHERE supersedes IS NOT NULL;
CREATE INDEX images_sha256 ON images (sha256);
CREATE INDEX images_sample ON images (sample_id) WHERE current = 1;
CREATE INDEX images_processed_at ON images (processed_at);
CREATE INDEX images_status ON images (status);
CREATE INDEX images_csv_unwritten ON images (id) WHERE csv_written = 0;
CREATE INDEX images_errors ON images (COALESCE(processed_at, detected_at), id)
    WHERE error IS NOT NULL AND error != '';
CREATE INDEX images_current_model ON images (model_id) WHERE current = 1;

CREATE TABLE reprocess_runs (
    run_id      INTEGER PRIMARY KEY,
    selection   TEXT NOT NULL,
    model_id    TEXT NOT NULL,
    engine      TEXT NOT NULL,
    started_at  TEXT NOT NULL,
    finished_at TEXT,
    done        INTEGER NOT NULL DEFAULT 0,
    failed      INTEGER NOT NULL DEFAULT 0
);
"""

# Version 4: operators' labels (issue 20, `store.labels`). A label belongs to an image's content
# (sha256), so it follows copies; `path` and `image_id` say where it was made. Insert only: the
# history stays, the newest label of a sha256 that no later `cleared` row `undoes` is its current
# label (an undo is a row of its own naming the label it takes back, at most one per label). A
# confirmed label keeps the class it confirmed (a later re-classification may say otherwise).
# Labels never touch `images`: they are what the next model learns from and what review counts.
SCHEMA_V4 = """
CREATE TABLE labels (
    id          INTEGER PRIMARY KEY,
    sha256      TEXT    NOT NULL,
    status      TEXT    NOT NULL
                CHECK (status IN ('confirmed', 'corrected', 'foreign', 'cleared')),
    class_name  TEXT,
    by          TEXT    NOT NULL,
    note        TEXT,
    created_at  TEXT    NOT NULL,
    path        TEXT,
    image_id    INTEGER,
    undoes      INTEGER,
    CHECK ((class_name IS NOT NULL) = (status IN ('confirmed', 'corrected'))),
    CHECK ((undoes IS NOT NULL) = (status = 'cleared'))
);
CREATE INDEX labels_sha256 ON labels (sha256, id);
CREATE INDEX labels_created_at ON labels (created_at);
CREATE UNIQUE INDEX labels_undoes ON labels (undoes) WHERE undoes IS NOT NULL;
"""

# Version 5: the model lifecycle (issue 20; version 4 is the operators' labels).
# `model_events`: every move of a registry alias (`champion`, `challenger`), so that each result can
# be traced to the model that was live when it was made: which model, from which, who, when, why,
# and the gate's evidence (JSON). `token` is also written into the registry's aliases file, so a move
# whose record was lost (a kill between the file and the commit) is recognised and recorded later.
# `shadow_results`: the verdicts of the `[model] shadow` model on new images, beside (never in) the
# live results: one per content and shadow model, with the live verdict it is compared with.
SCHEMA_V5 = """
CREATE TABLE model_events (
    id                INTEGER PRIMARY KEY,
    at                TEXT NOT NULL,
    alias             TEXT NOT NULL CHECK (alias IN ('champion', 'challenger')),
    model_id          TEXT,
    previous_model_id TEXT,
    action            TEXT NOT NULL,
    by                TEXT NOT NULL,
    reason            TEXT,
    evidence          TEXT,
    token             TEXT UNIQUE
);
CREATE INDEX model_events_alias ON model_events (alias, id);

CREATE TABLE shadow_results (
    id              INTEGER PRIMARY KEY,
    image_id        INTEGER,
    path            TEXT NOT NULL,
    sha256          TEXT NOT NULL,
    model_id        TEXT NOT NULL,
    status          TEXT NOT NULL,
    predicted_class TEXT,
    confidence      REAL,
    probabilities   TEXT,
    live_model_id   TEXT,
    live_status     TEXT,
    live_class      TEXT,
    agrees          INTEGER NOT NULL CHECK (agrees IN (0, 1)),
    created_at      TEXT NOT NULL,
    UNIQUE (sha256, model_id)
);
CREATE INDEX shadow_results_created ON shadow_results (created_at);
CREATE INDEX shadow_results_disagree ON shadow_results (id) WHERE agrees = 0;
"""

# Version 6 (fleet, issue 21): the instrument that writes this database. `instrument` holds its name
# once (one row; `store.instrument.bind` fills it with `[instrument] name` when the daemon first
# opens the database, and refuses another name), and every images and samples row carries it, so a
# row read out of a snapshot, a CSV or a merged table still says which microscope judged it. The
# rows get it from the database itself (a trigger copies the name into each new row), so no writer
# (the daemon, `semwatch reprocess`) has to remember it; rows written before the name was known are
# stamped by `bind`. A later step that rebuilds `images` or `samples` must create its trigger again.
SCHEMA_V6_INSTRUMENT = """
CREATE TABLE instrument (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    name       TEXT NOT NULL,
    site       TEXT NOT NULL DEFAULT '',
    named_at   TEXT NOT NULL,
    previous   TEXT
);
ALTER TABLE images ADD COLUMN instrument TEXT;
ALTER TABLE samples ADD COLUMN instrument TEXT;
CREATE TRIGGER images_instrument AFTER INSERT ON images WHEN NEW.instrument IS NULL
BEGIN
    UPDATE images SET instrument = (SELECT name FROM instrument WHERE id = 1) WHERE id = NEW.id;
END;
CREATE TRIGGER samples_instrument AFTER INSERT ON samples WHEN NEW.instrument IS NULL
BEGIN
    UPDATE samples SET instrument = (SELECT name FROM instrument WHERE id = 1)
    WHERE sample_id = NEW.sample_id;
END;
"""

Migration = Callable[[sqlite3.Connection], None]


def _script(sql: str) -> Migration:
    def step(conn: sqlite3.Connection) -> None:
        for statement in statements(sql):
            conn.execute(statement)

    return step


MIGRATIONS: Sequence[Migration] = (_script(SCHEMA_V1), _script(SCHEMA_V2), _script(SCHEMA_V3),
                                   _script(SCHEMA_V4), _script(SCHEMA_V5),
                                   _script(SCHEMA_V6_INSTRUMENT))
SCHEMA_VERSION = len(MIGRATIONS)
LOGGED_FROM = 2  # the first version whose database has `schema_migrations`
# Who a daemon is, written into `<database>.lock` (`db.lock_database`) so that a command that would
# migrate the database can tell a daemon of another version from one of its own (`ledger.Store`).
VERSION_TAG = f"semwatch {semwatch.__version__} (schema {SCHEMA_VERSION})"


class SchemaTooNew(RuntimeError):
    """The database was written by a newer semwatch (a higher `user_version` than this code knows)."""


def statements(script: str) -> list[str]:
    """The SQL statements of `script`, one by one. `executescript` would COMMIT the open transaction
    before running them; `sqlite3.complete_statement` knows where a statement ends."""
    out: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            out.append(pending.strip())
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete SQL statement: {pending.strip()!r}")
    return out


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def last_migrated_by(conn: sqlite3.Connection) -> str | None:
    """Which semwatch last migrated (or created) the database, and when: its newest
    `schema_migrations` row, e.g. "semwatch 0.1.0 (to schema 3, 2026-12-04T19:00:00.000Z)"; None for a
    database that has no such row (created before version 2 and not migrated since, or not
    semwatch's)."""
    try:
        row = conn.execute("SELECT version, applied_at, semwatch_version FROM schema_migrations "
                           "ORDER BY version DESC LIMIT 1").fetchone()
    except sqlite3.OperationalError:  # no such table
        return None
    if row is None:
        return None
    return f"semwatch {row[2]} (to schema {row[0]}, {row[1]})"


def too_new(conn: sqlite3.Connection, version: int, latest: int = SCHEMA_VERSION) -> str:
    """The message for a database of a newer semwatch: both versions, and who migrated it."""
    by = last_migrated_by(conn)
    return (f"database schema version {version}{f' (last migrated by {by})' if by else ''} is newer "
            f"than this semwatch {semwatch.__version__}'s ({latest}): use the newer "
            f"semwatch, or another [store] database")


def create_schema(conn: sqlite3.Connection, migrations: Sequence[Migration] = MIGRATIONS) -> list[int]:
    """Create the schema, or bring an older one to the current version, in one transaction (all
    steps or none). Returns the versions applied (empty when the database was current). Raises
    `SchemaTooNew` for a database of a newer semwatch; `migrations` is for tests only."""
    latest = len(migrations)
    conn.execute("BEGIN IMMEDIATE")  # the version read and the steps see the same database
    try:
        version = schema_version(conn)
        if version > latest:
            raise SchemaTooNew(too_new(conn, version, latest))
        applied = list(range(version + 1, latest + 1))
        for target in applied:
            migrations[target - 1](conn)
            conn.execute(f"PRAGMA user_version = {target}")
        logged = [(v, utc_now(), semwatch.__version__) for v in applied if v >= LOGGED_FROM]
        if logged:
            conn.executemany(
                "INSERT INTO schema_migrations (version, applied_at, semwatch_version) VALUES (?, ?, ?)",
                logged)
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise
    if applied and version > 0:
        log.info("database schema migrated from version %d to %d", version, latest)
    return applied
