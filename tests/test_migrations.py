"""Schema migrations, on a database written by the user_version 1 release (tests/data, made by
make_semwatch_v1.py): migrated in one transaction, nothing lost, every reader still works, a
failure half-way changes nothing, a newer database is refused."""

from __future__ import annotations

import csv
import os
import shutil
import sqlite3
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from semwatch.config import Settings
from semwatch.errors import UserError
from semwatch.report.daily import write_report
from semwatch.store import db
from semwatch.store.ledger import Store, find_verdict_by_content, load_ledger
from semwatch.store.schema import SCHEMA_VERSION, SchemaTooNew, create_schema
from semwatch.store.snapshot import take_snapshot

DATA = Path(__file__).parent / "data"
DAY = date(2026, 3, 2)  # every timestamp of the v1 database is on this (UTC) day
ODD_NAME = os.fsdecode(b"/export/lotA/caf\xe9-\xff.tif")  # not UTF-8: stored as \xNN text
V1_TABLES = ("images", "samples", "models", "daemon")
# The columns version 1 wrote (version 3 adds revision and supersedes, which old rows get as 0, NULL).
V1_IMAGE_COLUMNS = (
    "id, path, sha256, size_bytes, mtime_ns, status, sample_id, predicted_class, composition, state, "
    "confidence, tile_agreement, n_tiles, error, model_id, detected_at, processed_at, probabilities, "
    "reasons, attempts, current, csv_written")


@pytest.fixture
def v1(settings: Settings) -> Settings:
    """The settings with the v1 database and its results CSV copied to their paths."""
    shutil.copy(DATA / "semwatch-v1.db", settings.store.database)
    shutil.copy(DATA / "semwatch-v1.results.csv", settings.store.results_csv)
    return settings


def raw(path: Path) -> sqlite3.Connection:
    """A plain connection that does not migrate (to look at the file as it is)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.row_factory = sqlite3.Row
    return conn


def rows(path: Path) -> dict[str, list[tuple[object, ...]]]:
    conn = raw(path)
    try:
        columns = {t: V1_IMAGE_COLUMNS if t == "images" else "*" for t in V1_TABLES}
        columns["samples"] = ("sample_id, n_images, n_counted, composition, state, predicted_class, "
                              "confidence, uniformity, expected, verdict, updated_at")  # v1's columns
        return {t: [tuple(r) for r in conn.execute(f"SELECT {columns[t]} FROM {t} ORDER BY rowid")]
                for t in V1_TABLES}
    finally:
        conn.close()


def schema_of(path: Path) -> tuple[int, set[tuple[str, str]]]:
    """(user_version, {(name, sql)} of every table and index)."""
    conn = raw(path)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        objects = {(r["name"], r["sql"]) for r in conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")}
        return version, objects
    finally:
        conn.close()


def test_the_fixture_is_a_version_1_database(v1: Settings) -> None:
    version, objects = schema_of(v1.store.database)
    assert version == 1 and SCHEMA_VERSION >= 4  # 4+: steps added since (fleet: instrument)
    assert "schema_migrations" not in {name for name, _ in objects}
    counts = {t: len(r) for t, r in rows(v1.store.database).items()}
    assert counts == {"images": 9, "samples": 3, "models": 1, "daemon": 1}


def test_v1_database_is_migrated_and_nothing_is_lost(v1: Settings) -> None:
    before = rows(v1.store.database)
    store = Store(v1.store.database, v1.store.results_csv)
    try:
        assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        log = store.conn.execute("SELECT version, semwatch_version FROM schema_migrations").fetchall()
        # version 1's date was never written
        assert [tuple(r) for r in log] == [(v, "0.1.0") for v in range(2, SCHEMA_VERSION + 1)]
        extra = store.conn.execute("SELECT DISTINCT revision, supersedes FROM images").fetchall()
        assert [tuple(r) for r in extra] == [(0, None)]  # every old row is its version's first result
        ledger = load_ledger(store.conn)
        assert ledger.pending == {"/export/lotC/later.tif": (3000, 9, 0)}
        assert ledger.done[ODD_NAME] == (1002, 3)  # the name that opens the file again
        assert ledger.done["/export/lotB/b1.tif"] == (2100, 5)  # the current version, not the old one
        assert len(ledger.done) == 7
        again = find_verdict_by_content(store.conn, "a" * 64, "model-v1", Path("/export/copy.tif"))
        assert again is not None and again.predicted_class == "622_cycled" and again.confidence == 0.95
        # The row killed between database and CSV is appended once, through the new index.
        plan = " ".join(r[3] for r in store.conn.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM images WHERE csv_written = 0 AND status != 'pending' "
            "ORDER BY id"))
        assert "images_csv_unwritten" in plan
        assert store.reconcile_csv() == 1
        assert store.reconcile_csv() == 0
    finally:
        store.close()
    assert rows(v1.store.database) == {**before, "images": [
        (*r[:-1], 1) if r[0] == 5 else r for r in before["images"]]}  # only b2's csv_written changed
    with v1.store.results_csv.open(encoding="utf-8", newline="") as fh:
        lines = list(csv.DictReader(fh))
    assert [r["id"] for r in lines] == ["1", "2", "3", "4", "8", "6", "9", "5"]
    assert lines[-1]["reasons"] == "far from the training data"
    assert not list(v1.store.results_csv.parent.glob("*.before-*"))  # an old database's CSV is its own


def test_readers_refuse_the_v1_database_until_a_writer_migrates_it(v1: Settings) -> None:
    """A read-only command never migrates: before a daemon (or reprocess) of this version has
    migrated the old database, `semwatch top` and the report say so in one line and leave the file
    exactly as it was; after the migration they read what the old daemon wrote."""
    before = v1.store.database.read_bytes()
    snap = take_snapshot(v1, now=datetime(2026, 3, 2, 9, tzinfo=UTC))
    assert snap.problem is not None and "schema version 1" in snap.problem
    with pytest.raises(UserError, match=r"schema version 1.*does not migrate it"):
        write_report(v1, DAY)
    assert v1.store.database.read_bytes() == before
    Store(v1.store.database, v1.store.results_csv).close()
    snap = take_snapshot(v1, now=datetime(2026, 3, 2, 9, tzinfo=UTC))
    assert snap.problem is None and snap.daemon is not None
    assert (snap.daemon.state, snap.daemon.message, snap.daemon.done) == ("stopped", "exit 0", 6)
    assert snap.status_counts == {"ok": 4, "unknown": 1, "failed": 2, "pending": 1}
    assert [Path(e.path).name for e in snap.errors][:2] == ["x" * 300 + ".tif", "broken.tif"]
    assert {s.sample_id: s.verdict for s in snap.samples} == {"lotA": "pass", "lotB": "unknown",
                                                               "lotC": "unknown"}
    paths = write_report(v1, DAY)
    assert (paths.n_images, paths.n_samples) == (8, 3)  # every finished version of the day
    assert "caf\\xe9-\\xff.tif" in paths.images_csv.read_text(encoding="utf-8")


def test_migration_is_idempotent_and_matches_a_new_database(v1: Settings, tmp_path: Path) -> None:
    Store(v1.store.database, v1.store.results_csv).close()
    first = schema_of(v1.store.database)
    store = Store(v1.store.database, v1.store.results_csv)
    try:
        assert create_schema(store.conn) == []  # nothing left to apply
        logged = store.conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0]
        assert logged == SCHEMA_VERSION - 1
    finally:
        store.close()
    assert schema_of(v1.store.database) == first
    fresh = tmp_path / "fresh.db"
    Store(fresh, None).close()
    assert schema_of(fresh) == first  # a new database and a migrated one cannot drift apart
    conn = raw(fresh)
    try:
        assert [r[0] for r in conn.execute("SELECT version FROM schema_migrations")] == list(
            range(2, SCHEMA_VERSION + 1))
    finally:
        conn.close()


def test_a_failure_half_way_leaves_version_1(v1: Settings) -> None:
    """The second statement of step 2 fails (an authorizer refuses it, as a full disk or a kill
    would stop it): the log table and the first index it made are rolled back with it."""
    before_rows, before_schema = rows(v1.store.database), schema_of(v1.store.database)

    def refuse_errors_index(action: int, arg1: str | None, *_: object) -> int:
        if action == sqlite3.SQLITE_CREATE_INDEX and arg1 == "images_errors":
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    conn = db.connect(v1.store.database)
    try:
        conn.set_authorizer(refuse_errors_index)
        with pytest.raises(sqlite3.DatabaseError, match="not authorized"):
            create_schema(conn)
        assert not conn.in_transaction
    finally:
        conn.close()
    assert schema_of(v1.store.database) == before_schema
    assert rows(v1.store.database) == before_rows
    Store(v1.store.database, v1.store.results_csv).close()  # and the next start migrates it
    assert schema_of(v1.store.database)[0] == SCHEMA_VERSION


def test_a_newer_database_is_refused_untouched(v1: Settings) -> None:
    conn = raw(v1.store.database)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    before = schema_of(v1.store.database)
    with pytest.raises(SchemaTooNew) as refused:
        Store(v1.store.database, v1.store.results_csv)
    message = str(refused.value)
    assert "\n" not in message
    assert f"version {SCHEMA_VERSION + 1} is newer" in message and f"({SCHEMA_VERSION})" in message
    assert isinstance(refused.value, RuntimeError)  # the daemon reports it as a configuration error
    assert schema_of(v1.store.database) == before
