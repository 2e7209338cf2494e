"""Several instruments, one view (issue 21): the instrument's identity in the database, snapshots
that are safe to share, `semwatch fleet top` and `fleet report` over them, whatever state they are
in; and three real daemons exporting to one folder."""

from __future__ import annotations

import csv
import fcntl
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from conftest import Cli
from dbfixture import make_database
from semwatch.config import Settings
from semwatch.errors import ConfigError
from semwatch.safefs import path_text
from semwatch.service.fleet_export import Exporter
from semwatch.store.export import part_path, snapshots_of
from semwatch.store.fleet import check_file, find_snapshots
from semwatch.store.instrument import Instrument
from semwatch.store.instrument import read as read_instrument
from semwatch.store.ledger import Store
from semwatch.store.schema import SCHEMA_VERSION


def raw(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    return conn


def consistent(path: Path, *, samples: bool = True) -> dict[str, object]:
    """A snapshot's promises: a whole database in rollback-journal mode, every row stamped with its
    instrument, each sample's counts those of its current images (one transaction's state; not
    for `dbfixture`'s databases, whose samples are written by hand)."""
    conn = raw(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        name = conn.execute("SELECT name FROM instrument").fetchone()[0]
        for table in ("images", "samples"):
            other = conn.execute(f"SELECT count(*) FROM {table} WHERE instrument IS NOT ?", (name,))
            assert other.fetchone()[0] == 0, table
        wrong = [] if not samples else conn.execute(
            "SELECT s.sample_id FROM samples s WHERE s.n_images != (SELECT count(*) FROM images i "
            "WHERE i.sample_id = s.sample_id AND i.current = 1 AND i.status != 'pending') "
            "OR s.n_counted != (SELECT count(*) FROM images i WHERE i.sample_id = s.sample_id "
            "AND i.current = 1 AND i.status = 'ok')").fetchall()
        assert wrong == [], [tuple(r) for r in wrong]
        done = conn.execute("SELECT count(*) FROM images WHERE current = 1 AND status != 'pending'")
        return {"instrument": name, "done": done.fetchone()[0]}
    finally:
        conn.close()


def table_rows(text: str) -> dict[str, list[str]]:
    """`fleet top --once`'s table: instrument → its cells (a wrapped cell's lines joined)."""
    rows: dict[str, list[str]] = {}
    last: list[str] | None = None
    for line in text.splitlines():
        if line.count("│") < 4:
            continue
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells[0] or last is None:
            last = rows[cells[0]] = cells
        else:
            last[:] = [f"{a} {b}".strip() for a, b in zip(last, cells, strict=True)]
    return rows


def with_instrument(settings: Settings, name: str, **fleet: object) -> Settings:
    import dataclasses

    return settings.replace(instrument=dataclasses.replace(settings.instrument, name=name),
                            fleet=dataclasses.replace(settings.fleet, **fleet))


# --- instrument identity ---------------------------------------------------------------------------


def test_a_database_takes_its_instrument_and_refuses_another(settings: Settings) -> None:
    database = settings.store.database
    # Rows written before the name was known (a database of an older schema, migrated).
    make_database(database, now=datetime.now(UTC), images=[{}, {"status": "failed"}], samples=[{}])
    store = Store(database, None, instrument=Instrument("sem-1", "lab B"))
    try:
        assert read_instrument(store.conn) == Instrument("sem-1", "lab B")
        assert {r[0] for r in store.conn.execute("SELECT instrument FROM images")} == {"sem-1"}
        assert {r[0] for r in store.conn.execute("SELECT instrument FROM samples")} == {"sem-1"}
        # New rows get the name from the database itself (the trigger), whoever writes them.
        store.conn.execute("INSERT INTO images (path, size_bytes, mtime_ns, status, detected_at) "
                           "VALUES ('/x.tif', 1, 1, 'pending', '2026-01-01')")
        store.conn.execute("INSERT INTO samples (sample_id, n_images, verdict, updated_at) "
                           "VALUES ('new', 0, 'unknown', '2026-01-01')")
        new_image = store.conn.execute("SELECT instrument FROM images WHERE path = '/x.tif'").fetchone()
        new_sample = store.conn.execute("SELECT instrument FROM samples WHERE sample_id = 'new'").fetchone()
        assert new_image[0] == new_sample[0] == "sem-1"
    finally:
        store.close()
    with pytest.raises(ConfigError, match=r"belongs to instrument 'sem-1', not 'sem-2'.*--rename-instrument"):
        Store(database, None, instrument=Instrument("sem-2"))
    Store(database, None, instrument=Instrument("sem-1", "lab B")).close()  # the same name: fine
    store = Store(database, None, instrument=Instrument("sem-2"), rename_instrument=True)
    try:
        row = store.conn.execute("SELECT name, site, previous FROM instrument").fetchone()
        assert tuple(row) == ("sem-2", "", "sem-1")
        assert {r[0] for r in store.conn.execute("SELECT instrument FROM images")} == {"sem-2"}
    finally:
        store.close()


def test_top_and_the_report_name_the_instrument(cli: Cli, settings: Settings, tmp_path: Path) -> None:
    make_database(settings.store.database, now=datetime.now(UTC), images=[{}], samples=[{}])
    Store(settings.store.database, None, instrument=Instrument("sem-7", "line 3")).close()
    (tmp_path / "config.toml").write_text(
        f'[store]\ndatabase = "{settings.store.database}"\n[report]\nfolder = "{tmp_path / "reports"}"\n'
        f'[model]\npath = "{tmp_path / "no-model"}"\n', encoding="utf-8")
    run = cli("top", "--once")
    assert run.code == 0 and "semwatch — sem-7 (line 3)" in run.out, run.out + run.err
    run = cli("report")
    assert run.code == 0, run.err
    html = (tmp_path / "reports" / str(datetime.now(UTC).date()) / "report.html").read_text(encoding="utf-8")
    assert "<title>semwatch report" in html and "sem-7 (line 3)" in html.split("</h1>")[0]


def test_the_report_as_a_reader_needs_it(settings: Settings) -> None:
    """Issue 21's look in a browser: an unknown image's novelty, not its confidence 1.00; a failed
    image's reason once; a sample no image voted for without confidence or uniformity; failing and
    uncertain samples first; the last 30 days."""
    import dataclasses
    import json
    from datetime import timedelta

    from dbfixture import iso
    from semwatch.report.daily import write_report
    from semwatch.report.thumbnails import thumbnail
    from test_report import _parse

    folder = settings.watch.folder
    folder.mkdir(parents=True)
    broken = folder / "lot3" / "x.tif"
    broken.parent.mkdir()
    broken.write_bytes(b"II*\x00 not really a TIFF")
    reason = thumbnail(path_text(broken), settings, None)[1].removeprefix("not readable now: ")
    novelty = ("unlike the training images: the specimen does not look like the NCM cathodes the model "
               "knows (novelty 3.41 > 1.52, 6 of 6 tiles)")
    now = datetime.now(UTC)
    old = now - timedelta(days=3)
    make_database(settings.store.database, now=now, images=[
        {"path": str(folder / "lot1" / "a.tif"), "sample_id": "a-lot"},
        {"path": str(folder / "s1" / "b.tif"), "sample_id": "s1"},
        {"path": str(folder / "lot2" / "u.tif"), "status": "unknown", "confidence": 1.0, "sample_id": "lot2",
         "predicted_class": None, "reasons": json.dumps([novelty])},
        {"path": str(broken), "status": "failed", "error": reason, "confidence": None, "sample_id": "lot3"},
        {"path": "/old/1.tif", "processed_at": iso(old), "status": "unknown", "sample_id": "old"},
        {"path": "/old/2.tif", "processed_at": iso(old), "sample_id": "old"},
    ], samples=[
        {"sample_id": "a-lot", "verdict": "pass", "n_counted": 1},
        {"sample_id": "lot2", "verdict": "unknown", "confidence": 1.0, "uniformity": 1.0, "n_counted": 0},
        {"sample_id": "lot3", "verdict": "unknown", "confidence": 1.0, "uniformity": 1.0, "n_counted": 0},
        {"sample_id": "s1", "verdict": "fail", "n_counted": 1},
    ])
    Store(settings.store.database, None, instrument=Instrument("sem-1")).close()
    settings = settings.replace(report=dataclasses.replace(settings.report, thumbnails=5))
    page = _parse(write_report(settings, now.date(), now=now).html)
    text = "".join(page.text)
    assert "novelty 3.41 > threshold 1.52" in text
    caption = text[text.index("u.tif (sample"):][:120]
    assert "confidence" not in caption, caption
    assert text.count(reason) == 1 + 1  # the failed image's caption, and its row in the table
    samples = page.tables["samples"]
    assert [r[0] for r in samples[1:]] == ["s1", "lot2", "lot3", "a-lot"]  # fail, unknown, pass
    assert samples[2][4:6] == ["–", "–"] and samples[4][4:6] == ["0.90", "0.95"]
    trend = page.tables["trend"]
    assert len(trend) == 31 and trend[1][:4] == [str(now.date()), "4", "1", "25 %"]
    assert trend[4][:4] == [str(old.date()), "2", "0", "50 %"]


def test_results_csv_names_the_instrument_and_an_old_file_keeps_its_columns(settings: Settings) -> None:
    from semwatch.store.csvfile import RESULTS_COLUMNS
    from semwatch.store.results_csv import append

    fresh, old = settings.store.results_csv, settings.store.results_csv.with_name("old.csv")
    rows = [{"id": 1, "path": "/a.tif", "instrument": "sem-1"}]
    append(fresh, rows)
    old.write_text(",".join(c for c in RESULTS_COLUMNS if c != "instrument") + "\n", encoding="utf-8")
    append(old, rows)
    with fresh.open(encoding="utf-8", newline="") as fh:
        assert [r["instrument"] for r in csv.DictReader(fh)] == ["sem-1"]
    with old.open(encoding="utf-8", newline="") as fh:
        lines = list(csv.reader(fh))
    assert "instrument" not in lines[0] and len(lines[1]) == len(lines[0])  # one column list per file


# --- snapshots -----------------------------------------------------------------------------------


def test_export_writes_whole_snapshots_and_prunes(cli: Cli, settings: Settings, tmp_path: Path) -> None:
    database = settings.store.database
    make_database(database, now=datetime.now(UTC), images=[{}, {"status": "unknown"}], samples=[{}])
    Store(database, None, instrument=Instrument("SEM 1/ä")).close()
    config = tmp_path / "config.toml"
    config.write_text(f'[store]\ndatabase = "{database}"\n[instrument]\nname = "SEM 1/ä"\n'
                      f'[fleet]\nkeep = 2\n', encoding="utf-8")
    share = tmp_path / "share"
    written = []
    for _ in range(3):
        run = cli("export", "--to", share)
        assert run.code == 0, run.err
        written.append(Path(run.out.strip()))
    kept = snapshots_of(share, "SEM 1/ä")
    assert kept == written[1:] and all(p.name.startswith("SEM_1__.") for p in kept)
    assert sorted(p.name for p in share.iterdir()) == sorted(p.name for p in kept)  # no part file left
    assert consistent(kept[-1], samples=False) == {"instrument": "SEM 1/ä", "done": 2}
    assert not list(database.parent.glob(f".{database.name}.snapshot-*"))  # the private copy is gone
    run = cli("export")
    assert run.code == 78 and "[fleet] export_folder is empty" in run.err


def test_a_share_that_blocks_or_is_full_costs_only_that_snapshot(settings: Settings, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    database = settings.store.database
    make_database(database, now=datetime.now(UTC), images=[{}], samples=[{}])
    Store(database, None, instrument=Instrument("sem-1")).close()
    share = tmp_path / "share"
    share.mkdir()
    blocked = with_instrument(settings, "sem-1", export_timeout_seconds=3.0)
    os.mkfifo(part_path(share, "sem-1"))  # opening it for writing blocks, as a hung mount does
    result = Exporter(blocked, share).export()
    assert result.path is None and result.problem is not None and "not written within 3 s" in result.problem
    assert snapshots_of(share, "sem-1") == []
    part_path(share, "sem-1").unlink()
    monkeypatch.setenv("SEMWATCH_TEST_EXPORT_FAULT", "enospc")
    result = Exporter(blocked, share).export()
    assert result.path is None and "No space left on device" in (result.problem or "")
    monkeypatch.delenv("SEMWATCH_TEST_EXPORT_FAULT")
    lock = os.open(database.with_name(database.name + ".export.lock"), os.O_RDWR)
    try:  # one snapshot of a database at a time (the daemon's and `semwatch export`)
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = Exporter(blocked, share).export()
        assert result.path is None and "another snapshot of" in (result.problem or "")
    finally:
        os.close(lock)
    result = Exporter(blocked, share).export()  # the share is back: the next one is written
    assert result.path is not None and consistent(result.path, samples=False)["instrument"] == "sem-1"


# --- reading snapshots in every state ------------------------------------------------------------


@pytest.fixture
def fleet_folder(tmp_path: Path) -> Iterator[Path]:
    """Four instruments' snapshots: fine, truncated, not a database, of a newer schema."""
    share = tmp_path / "share"
    share.mkdir()
    for i, name in enumerate(("alpha", "bravo", "charlie", "delta")):
        database = tmp_path / f"{name}.db"
        make_database(database, now=datetime.now(UTC),
                      images=[{}, {"status": "failed"}] + [{"status": "unknown"}] * i,
                      samples=[{"verdict": "fail"}])
        Store(database, None, instrument=Instrument(name)).close()
        src = sqlite3.connect(database)
        dst = sqlite3.connect(share / f"{name}.20260101T000000.000Z.semwatch.db")
        src.backup(dst)
        dst.execute("PRAGMA journal_mode = DELETE")
        src.close()
        dst.close()
    bravo = share / "bravo.20260101T000000.000Z.semwatch.db"
    with open(bravo, "r+b") as fh:
        fh.truncate(bravo.stat().st_size // 2)
    (share / "charlie.20260101T000000.000Z.semwatch.db").write_bytes(b"not a database" * 100)
    conn = sqlite3.connect(share / "delta.20260101T000000.000Z.semwatch.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    (share / ".alpha.semwatch.db.part").write_bytes(b"half")  # a write in progress: not a snapshot
    yield share


def test_fleet_top_shows_broken_snapshots_as_such(cli: Cli, fleet_folder: Path) -> None:
    assert [p.name.split(".")[0] for p in find_snapshots([fleet_folder])] == ["alpha", "bravo", "charlie",
                                                                              "delta"]
    assert "truncated" in (check_file(fleet_folder / "bravo.20260101T000000.000Z.semwatch.db") or "")
    assert "WAL" in (check_file(fleet_folder.parent / "alpha.db") or "")  # a live database is no snapshot
    missing = fleet_folder.parent / "echo.semwatch.db"
    run = cli("fleet", "top", "--once", fleet_folder, missing)
    assert run.code == 1, run.err
    rows = table_rows(run.out)
    assert set(rows) == {"alpha", "bravo", "charlie", "delta", "echo"}
    assert rows["alpha"][4:8] == ["2", "1", "0%", "1"]  # images, failed, unknown share, fail samples
    assert rows["bravo"][1].startswith("broken: truncated")
    assert rows["charlie"][1].startswith("broken: not an SQLite database")
    assert rows["delta"][1].startswith("newer schema")
    assert rows["echo"][1] == "MISSING"


def test_fleet_report_survives_broken_snapshots(cli: Cli, fleet_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(f'[report]\nfolder = "{tmp_path / "reports"}"\n', encoding="utf-8")
    run = cli("fleet", "report", fleet_folder)
    assert run.code == 1 and "(4 instruments, 3 unreadable)" in run.out, run.err
    folder = tmp_path / "reports" / f"fleet-{datetime.now(UTC).date()}"
    html = (folder / "report.html").read_text(encoding="utf-8")
    assert "broken: truncated" in html and "newer schema" in html and "<h2>alpha</h2>" in html
    with (folder / "images.csv").open(encoding="utf-8", newline="") as fh:
        assert {r["instrument"] for r in csv.DictReader(fh)} == {"alpha"}


def test_fleet_console_opens_an_instrument_in_tops_console(fleet_folder: Path, settings: Settings) -> None:
    from semwatch.views.fleet_console import FleetApp, instrument_console

    async def drive() -> None:
        app = FleetApp(settings, [fleet_folder])
        async with app.run_test(size=(120, 24)) as pilot:
            await pilot.pause()
            assert [c.name for c in app.cards] == ["alpha", "bravo", "charlie", "delta"]
            await pilot.press("down")  # bravo: broken, nothing to open
            await pilot.press("enter")
            await pilot.pause()
            assert app.is_running
            await pilot.press("up")
            await pilot.press("enter")
            await pilot.pause()
        assert app.return_value == (0, fleet_folder / "alpha.20260101T000000.000Z.semwatch.db")
        console = instrument_console(settings, app.return_value[1])
        async with console.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            assert "instrument alpha" in str(console.summary())
            assert len(console.images) == 2  # its Images tab: the snapshot's rows

    import asyncio

    asyncio.run(drive())


# --- three daemons, one folder ---------------------------------------------------------------------


@pytest.mark.slow
def test_three_daemons_one_fleet(cli: Cli, tmp_path: Path, tiny_model: Path, ncm_dir: Path) -> None:
    from test_daemon import Daemon, copy_image, ncm_images

    share = tmp_path / "share"
    names = ("sem-a", "sem-b", "sem-c")
    daemons = {n: Daemon(tmp_path / n, tiny_model, settle_seconds=0.2) for n in names}
    counts = {"sem-a": 1, "sem-b": 2, "sem-c": 3}
    kept = tmp_path / "seen"
    kept.mkdir()
    stop_watching = threading.Event()

    def watch_snapshots() -> None:
        """Consistency under load: a copy of every snapshot that appears while the daemons write
        (a finished snapshot never changes, so a file copy of it is exact; pruned ones are gone)."""
        while not stop_watching.wait(0.2):
            for path in share.glob("*.semwatch.db"):
                if not (kept / path.name).exists():
                    try:
                        shutil.copyfile(path, kept / path.name)
                    except FileNotFoundError:
                        (kept / path.name).unlink(missing_ok=True)

    watcher = threading.Thread(target=watch_snapshots, name="test-snapshots")
    (tmp_path / "config.toml").write_text(
        f'[fleet]\nexport_folder = "{share}"\nstale_seconds = 8.0\n'
        f'[report]\nfolder = "{tmp_path / "reports"}"\n', encoding="utf-8")
    try:
        for name, d in daemons.items():
            with open(d.config, "a", encoding="utf-8") as fh:
                fh.write(f'[instrument]\nname = "{name}"\nsite = "hall 2"\n'
                         f'[fleet]\nexport_folder = "{share}"\nexport_minutes = 0.03\nkeep = 2\n'
                         f'export_timeout_seconds = 10.0\n')
            d.start(wait_ready=False)
        watcher.start()
        for d in daemons.values():
            d.wait_note("READY=1", 180)
        images = {n: [copy_image(src, d.folder / "lot1" / src.name)
                      for src in ncm_images(ncm_dir, "622", counts[n])] for n, d in daemons.items()}
        for n, d in daemons.items():
            d.wait_finished(images[n])
        # Each instrument's newest snapshot catches up with its database.
        deadline = datetime.now(UTC).timestamp() + 60
        while True:
            newest = {p.name.split(".")[0]: p for p in find_snapshots([share])}
            try:
                done = {n: consistent(newest[n])["done"] if n in newest else -1 for n in names}
            except (sqlite3.Error, FileNotFoundError):  # pruned while read: look again
                continue
            if done == counts:
                break
            assert datetime.now(UTC).timestamp() < deadline, done
            time.sleep(0.3)
        run = cli("fleet", "top", "--once")
        assert run.code == 0, run.out + run.err
        rows = table_rows(run.out)
        assert sorted(rows) == [f"{n} (hall 2)" for n in names]
        for n in names:
            assert rows[f"{n} (hall 2)"][1] == "running" and rows[f"{n} (hall 2)"][4] == str(counts[n])
        run = cli("fleet", "report")
        assert run.code == 0 and "(3 instruments, 0 unreadable)" in run.out, run.out + run.err
        with (tmp_path / "reports" / f"fleet-{datetime.now(UTC).date()}" / "images.csv").open(
                encoding="utf-8", newline="") as fh:
            per = [r["instrument"] for r in csv.DictReader(fh)]
        assert {n: per.count(n) for n in names} == counts
        # sem-a's share blocks (a FIFO where its part file goes): its snapshots are abandoned, yet
        # it classifies a new image; once the share is back, the next snapshot has it.
        a = daemons["sem-a"]
        fifo = part_path(share, "sem-a")
        fifo.unlink(missing_ok=True)
        os.mkfifo(fifo)
        blocked_at = len(a.log_text().split("not written within"))
        more = [copy_image(src, a.folder / "lot2" / src.name) for src in ncm_images(ncm_dir, "811", 1)]
        a.wait_finished(more)
        deadline = time.monotonic() + 120
        while len(a.log_text().split("not written within")) == blocked_at:
            assert time.monotonic() < deadline, a.log_text()[-3000:]
            time.sleep(0.5)
        fifo.unlink()
        counts["sem-a"] += 1
        deadline = time.monotonic() + 120
        while consistent(max(snapshots_of(share, "sem-a")))["done"] != counts["sem-a"]:
            assert time.monotonic() < deadline, a.log_text()[-3000:]
            time.sleep(0.5)
        # One killed: stale once its heartbeat and snapshot age past stale_seconds; one stopped and
        # its snapshot cut short: broken; the third unaffected.
        daemons["sem-c"].kill9()
        assert daemons["sem-b"].stop()[0] == 0
        newest_b = max(snapshots_of(share, "sem-b"))
        with open(newest_b, "r+b") as fh:
            fh.truncate(newest_b.stat().st_size - 4096)
        deadline = datetime.now(UTC).timestamp() + 60
        while True:
            run = cli("fleet", "top", "--once")
            lines = table_rows(run.out)
            if lines.get("sem-c (hall 2)", ["", ""])[1] == "STALE (no heartbeat)":
                break
            assert datetime.now(UTC).timestamp() < deadline, run.out
            time.sleep(0.5)
        assert run.code == 1
        assert lines["sem-a (hall 2)"][1] == "running"
        assert lines["sem-b"][1].startswith("broken: truncated")
        # The database is sem-a's: another name is refused (exit 78) unless renamed on purpose.
        assert a.stop()[0] == 0
        a.config.write_text(a.config.read_text(encoding="utf-8").replace('name = "sem-a"', 'name = "sem-z"'),
                            encoding="utf-8")
        a.start(wait_ready=False)
        assert a.proc is not None and a.proc.wait(120) == 78
        assert "belongs to instrument 'sem-a', not 'sem-z'" in a.log_text()
    finally:
        stop_watching.set()
        if watcher.is_alive():
            watcher.join()
        for d in daemons.values():
            d.close()
    seen = sorted(kept.glob("*.semwatch.db"))
    assert len(seen) >= 6, seen
    for path in seen:  # every snapshot seen while the daemons wrote opens and is consistent
        assert consistent(path)["instrument"] in names
