"""`semwatch reprocess` with the local engine: archive ingestion, outdated rows after a model change,
exactly once through kill -9, beside a running daemon, and the daemon's own idle catch-up."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Cli
from semwatch.config import Settings
from semwatch.model.artifact import load_artifact, read_manifest, save_artifact
from semwatch.store import db
from semwatch.store.ledger import Store
from semwatch.store.messages import Pending, Reclassified, Result
from semwatch.store.selection import Selection, count_outdated, select_rows
from semwatch.values import FileKey, ImageVerdict, utc_now
from test_daemon import Daemon, copy_image, daemon_factory, ncm_images

__all__ = ["daemon_factory"]  # the fixture, used by the daemon tests here

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def model_v2(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model under another name: another model id, the same weights (so verdicts must not
    change, which makes a re-classification checkable to the last digit)."""
    state, manifest = load_artifact(tiny_model)
    out = tmp_path_factory.mktemp("model_v2") / "model"
    save_artifact(out, state, dataclasses.replace(manifest, name=f"{manifest.name}-v2"))
    shutil.copy(tiny_model / "backbone.onnx", out / "backbone.onnx")  # the same weights, the same graph
    return out


def write_config(root: Path, model: Path, **model_keys: object) -> Path:
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in model_keys.items())
    config = root / "config.toml"
    config.write_text(
        f'[watch]\nfolder = "{root / "incoming"}"\n'
        f'[store]\ndatabase = "{root / "db" / "semwatch.db"}"\n'
        f'results_csv = "{root / "db" / "results.csv"}"\n'
        f'[model]\npath = "{model}"\ndevice = "cpu"\n{extra}', encoding="utf-8")
    return config


def make_archive(root: Path, ncm_dir: Path, per_class: int = 2) -> list[Path]:
    files = []
    for lot, cls in (("lotA", "333"), ("lotB", "622_cycled")):
        for src in ncm_images(ncm_dir, cls, per_class):
            files.append(copy_image(src, root / lot / src.name))
    return files


def rows(database: Path) -> list[dict[str, object]]:
    conn = db.connect(database, readonly=True)
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM images ORDER BY id")]
    finally:
        conn.close()


def csv_ids(path: Path) -> list[int]:
    with path.open(newline="", encoding="utf-8") as fh:
        return [int(r["id"]) for r in csv.DictReader(fh)]


def assert_exactly_once(root: Path) -> list[dict[str, object]]:
    """One current row per path, nothing pending, and each finished row in the CSV exactly once."""
    all_rows = rows(root / "db" / "semwatch.db")
    current = [r for r in all_rows if r["current"] == 1]
    assert len({r["path"] for r in current}) == len(current)
    assert not [r for r in all_rows if r["status"] == "pending"]
    ids = csv_ids(root / "db" / "results.csv")
    assert len(ids) == len(set(ids)), "a CSV line was written twice"
    assert sorted(ids) == sorted(int(str(r["id"])) for r in all_rows)
    return current


def summary(out: str) -> dict[str, object]:
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    return next(r for r in lines if r["event"] == "summary")


def test_an_archive_is_ingested_once(cli: Cli, tmp_path: Path, tiny_model: Path, ncm_dir: Path) -> None:
    write_config(tmp_path, tiny_model)
    files = make_archive(tmp_path / "archive", ncm_dir)
    (tmp_path / "archive" / "lotB" / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    run = cli("reprocess", "archive", "--json")  # relative (in tmp_path): the ledger gets absolute paths
    assert run.code == 1, run.err  # the broken file is recorded failed
    assert summary(run.out) == {"event": "summary", "engine": "local",
                                "model_id": read_manifest(tiny_model).model_id,
                                "classified": 4, "failed": 1, "kept": 0, "gone": 0, "stale": 0}
    current = assert_exactly_once(tmp_path)
    broken = str(tmp_path / "archive/lotB/broken.jpg")
    assert {r["path"] for r in current} == {str(f) for f in files} | {broken}
    by_name = {Path(str(r["path"])).name: r for r in current}
    assert by_name["broken.jpg"]["status"] == "failed" and by_name["broken.jpg"]["error"]
    assert {r["sample_id"] for r in current if r["status"] != "failed"} == {"lotA", "lotB"}
    errors = [json.loads(line) for line in run.out.splitlines() if '"error"' in line]
    assert [(Path(e["path"]).name, e["kept"]) for e in errors] == [("broken.jpg", False)]  # said, once
    again = cli("reprocess", "archive", "--json")
    assert summary(again.out)["classified"] == 0 and summary(again.out)["kept"] == 1  # broken: tried, kept
    assert len(rows(tmp_path / "db" / "semwatch.db")) == 5


def test_outdated_results_are_reclassified_after_a_model_change(
        cli: Cli, tmp_path: Path, tiny_model: Path, model_v2: Path, ncm_dir: Path) -> None:
    # One runtime for both (to the last digit: `auto` measures each model on its own, and float32
    # ONNX Runtime and bfloat16 torch differ in the fourth).
    write_config(tmp_path, tiny_model, runtime="onnxruntime")
    make_archive(tmp_path / "archive", ncm_dir)
    assert cli("reprocess", str(tmp_path / "archive")).code == 0
    before = {r["path"]: r for r in assert_exactly_once(tmp_path)}
    write_config(tmp_path, model_v2, runtime="onnxruntime")
    v2 = read_manifest(model_v2).model_id
    plan = cli("reprocess", "--dry-run", "--json")
    assert json.loads(plan.out)["files"] == 4 and json.loads(plan.out)["reclassify"] == 4
    run = cli("reprocess", "--json")
    assert run.code == 0, run.err
    assert summary(run.out)["classified"] == 4
    after = assert_exactly_once(tmp_path)
    for r in after:
        old = before[r["path"]]
        assert r["model_id"] == v2 and r["supersedes"] == old["id"] and r["revision"] == 1
        assert (r["status"], r["predicted_class"], r["probabilities"], r["sample_id"]) == (
            old["status"], old["predicted_class"], old["probabilities"], old["sample_id"])
    history = [r for r in rows(tmp_path / "db" / "semwatch.db") if r["current"] == 0]
    assert {r["id"] for r in history} == {r["id"] for r in before.values()}  # kept for audit
    conn = db.connect(tmp_path / "db" / "semwatch.db", readonly=True)
    try:
        assert count_outdated(conn, v2) == 0
        assert conn.execute("SELECT count(*) FROM samples").fetchone()[0] == 2
    finally:
        conn.close()
    assert summary(cli("reprocess", "--json").out)["classified"] == 0  # nothing left to do


def test_archive_folders_take_no_selection(cli: Cli, tmp_path: Path, tiny_model: Path) -> None:
    write_config(tmp_path, tiny_model)
    (tmp_path / "archive").mkdir()
    run = cli("reprocess", "archive", "--all")
    assert run.code == 2 and "take no --outdated/--all" in run.err
    missing = cli("reprocess", "nowhere")
    assert missing.code == 2 and "not a folder: nowhere" in missing.err
    bad_date = cli("reprocess", "--since", "26.11.2026")
    assert bad_date.code == 2 and "not a date" in bad_date.err


def verdict(path: str, cls: str = "333") -> ImageVerdict:
    return ImageVerdict(path=Path(path), status="ok", predicted_class=cls, composition=cls[:3],
                        state="pristine", confidence=0.9, tile_agreement=1.0, n_tiles=4,
                        probabilities={cls: 0.9}, reasons=(), model_id="old")


def test_selection_and_stale_reclassification(tmp_path: Path) -> None:
    """The filters pick the right rows; a Reclassified for a row that is no longer current, or sent
    twice, changes nothing."""
    store = Store(tmp_path / "s.db", tmp_path / "r.csv")
    try:
        keys = [FileKey(f"/x/{lot}/{i}.jpg", 10 + i, 100 + i) for lot in ("a", "b") for i in range(2)]
        for k in keys:
            result = Result(k, "h" + k.path, k.path.split("/")[2], verdict(k.path), "old")
            store.append_csv(store.apply([Pending(k, utc_now()), result]))
        conn = store.conn
        assert [r.key for r in select_rows(conn, Selection(), "new")] == keys
        paths = lambda s: [r.key.path for r in select_rows(conn, s, "new")]  # noqa: E731
        assert paths(Selection(sample="b")) == ["/x/b/0.jpg", "/x/b/1.jpg"]
        assert paths(Selection(path_glob="*/a/1.jpg")) == ["/x/a/1.jpg"]
        assert list(select_rows(conn, Selection(), "old")) == []  # nothing outdated for its own model
        assert len(list(select_rows(conn, Selection("all"), "old"))) == 4
        today = utc_now()[:10]
        from datetime import date, timedelta
        d = date.fromisoformat(today)
        assert len(list(select_rows(conn, Selection(since=d, until=d), "new"))) == 4
        assert list(select_rows(conn, Selection(since=d + timedelta(days=1)), "new")) == []
        assert list(select_rows(conn, Selection(until=d - timedelta(days=1)), "new")) == []
        first = next(select_rows(conn, Selection(), "new"))
        msg = Reclassified(first.key, first.id, "h", "a", verdict(first.key.path, "523"), "new")
        assert len(store.apply([msg, msg])) == 1  # the second is stale at once
        assert store.apply([msg]) == []
        wrong = Reclassified(FileKey(first.key.path, 999, 1), keys.index(first.key) + 2, "h", "a",
                             verdict(first.key.path), "new")
        assert store.apply([wrong]) == []  # not that version
        current = conn.execute("SELECT id, model_id, supersedes FROM images WHERE path = ? AND current = 1",
                               (first.key.path,)).fetchall()
        assert [tuple(r) for r in current] == [(5, "new", first.id)]
        assert count_outdated(conn, "new") == 3
    finally:
        store.close()


def test_a_hung_read_is_given_up_and_does_not_hold_up_the_next_ones(settings: Settings) -> None:
    """`work.read_bounded` (both engines' readers): with one reading thread, a read that never
    returns is given up after `[watch] read_timeout_seconds` and the next items are read on a fresh
    thread, not queued behind the stuck one (they would all time out)."""
    import threading

    from semwatch.reprocess.work import Outcome, WorkItem, read_bounded

    release = threading.Event()
    settings = settings.replace(watch=dataclasses.replace(settings.watch, read_timeout_seconds=2.0))
    items = [WorkItem(f"/archive/{name}.jpg", "/archive", listed=FileKey(f"/archive/{name}.jpg", 1, 2))
             for name in ("hung", "b", "c")]

    def read(item: WorkItem) -> Outcome:
        if item.path.endswith("hung.jpg"):
            release.wait(60)  # as a read on a dead share: only the test lets it go, at the end
        return Outcome(item, item.listed, error="read")

    try:
        results = [r for _, r in read_bounded(items, settings, None, workers=1, prefetch=3,  # type: ignore[arg-type]
                                              read=read)]
    finally:
        release.set()
    assert [r.error for r in results] == [
        "timed out: reading took longer than 2 s ([watch] read_timeout_seconds)", "read", "read"]
    assert results[0].key == items[0].listed  # a listed archive file is recorded failed for its version


def test_the_work_list_is_a_stream(tmp_path: Path) -> None:
    """The ledger is read a page at a time by id (rows committed between pages on the same
    connection are not taken again); the archive listing, read entry by entry, finds every file.
    (The memory this saves is measured by benchmarks/reprocess_listing_memory.py.)"""
    from semwatch.reading.listing import NameFilter, scan
    from semwatch.store.selection import count_rows, paged_rows

    store = Store(tmp_path / "s.db", tmp_path / "r.csv")
    try:
        keys = [FileKey(f"/x/a/{i}.jpg", 10 + i, 100 + i) for i in range(5)]
        for k in keys:
            store.append_csv(store.apply([Pending(k, utc_now()), Result(k, "h" + k.path, "a", verdict(k.path),
                                                                         "old")]))
        conn = store.conn
        assert count_rows(conn, Selection(), "new") == 5
        pages = paged_rows(conn, Selection(), "new", page=2)
        taken = []
        for row in pages:  # re-classify each as it comes, as `reprocess` does between pages
            taken.append(row.key)
            store.apply([Reclassified(row.key, row.id, "h", "a", verdict(row.key.path), "new")])
        assert taken == keys
        assert list(paged_rows(conn, Selection(), "new", page=2)) == []
    finally:
        store.close()
    archive = tmp_path / "archive"
    for i in range(3):
        (archive / f"d{i}").mkdir(parents=True)
        for j in range(3):
            (archive / f"d{i}" / f"{j}.jpg").write_bytes(b"")
    (archive / "d1" / "skip.txt").write_bytes(b"")
    listed = [path for path, _ in scan(archive, NameFilter(("*.jpg",), ("*.txt",)), recursive=True)]
    assert sorted(listed) == sorted(str(archive / f"d{i}" / f"{j}.jpg") for i in range(3) for j in range(3))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_killed_mid_run_then_rerun_is_exactly_once(cli: Cli, tmp_path: Path, tiny_model: Path,
                                                   ncm_dir: Path, sig: int) -> None:
    write_config(tmp_path, tiny_model)
    files = [copy_image(src, tmp_path / "archive" / cls / src.name)
             for cls in ("333", "523", "811") for src in ncm_images(ncm_dir, cls, 8)]
    database = tmp_path / "db" / "semwatch.db"
    proc = subprocess.Popen([sys.executable, "-m", "semwatch", "reprocess", "archive"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300  # start-up (torch, the model) on a loaded 2-core machine
        while True:  # kill it once some, not all, results are committed
            try:
                done = len([r for r in rows(database) if r["status"] != "pending"])
            except sqlite3.OperationalError:  # not yet created (the file exists before its tables)
                done = 0
            if done >= 1:
                break
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(sig)
        code = proc.wait(30)
        if sig == signal.SIGTERM:  # the batch in hand is committed, then a clean exit
            assert code == 143 and proc.stderr is not None
            assert "terminated: what was done is recorded" in proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stderr:
            proc.stderr.close()
    killed_at = len(rows(database))
    assert 1 <= killed_at < len(files), "the kill came too late to test anything"
    run = cli("reprocess", "archive", "--json")
    assert run.code == 0, run.err
    assert summary(run.out)["classified"] == len(files) - killed_at
    current = assert_exactly_once(tmp_path)
    assert sorted(str(r["path"]) for r in current) == sorted(map(str, files))
    assert len(rows(database)) == len(files)


def model_line(d: Daemon, model: Path, *extra: str) -> None:
    """Point a test daemon's config at another model (and add [model] keys)."""
    text = d.config.read_text(encoding="utf-8")
    lines = [(f'path = "{model}"' if line.startswith("path = ") else line) for line in text.splitlines()]
    at = lines.index("[model]") + 1
    d.config.write_text("\n".join([*lines[:at], *extra, *lines[at:]]) + "\n", encoding="utf-8")


def test_reprocess_beside_a_running_daemon(daemon_factory: Callable[..., Daemon], tiny_model: Path,
                                           model_v2: Path, ncm_dir: Path) -> None:
    """Both write one database (a write lock per batch): the daemon's new files and `--all` results
    land exactly once; a reprocess with another model than the daemon's is refused."""
    d: Daemon = daemon_factory()
    first = [copy_image(src, d.folder / "s1" / src.name) for src in ncm_images(ncm_dir, "333", 3)]
    d.start()
    d.wait_finished(first)
    command = [sys.executable, "-m", "semwatch", "reprocess", "--all", "--config", str(d.config), "--json"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    later = [copy_image(src, d.folder / "s2" / src.name) for src in ncm_images(ncm_dir, "622", 3)]
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err.decode()
    assert summary(out.decode())["classified"] == 3
    d.wait_finished(later)
    d.assert_exactly_once()
    current = d.rows("current = 1")
    assert sorted(r["supersedes"] is not None for r in current) == [False] * 3 + [True] * 3
    other = d.root / "other.toml"
    other.write_text(d.config.read_text(encoding="utf-8").replace(str(tiny_model), str(model_v2)),
                     encoding="utf-8")
    refused = subprocess.run([sys.executable, "-m", "semwatch", "reprocess", "--config", str(other)],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 75 and "restart the daemon with the new model" in refused.stderr
    rc, _ = d.stop()
    assert rc == 0
    d.assert_exactly_once()


def test_the_daemon_catches_up_on_outdated_results_when_idle(daemon_factory: Callable[..., Daemon],
                                                            model_v2: Path, ncm_dir: Path) -> None:
    d: Daemon = daemon_factory()
    old = [copy_image(src, d.folder / "s1" / src.name) for src in ncm_images(ncm_dir, "333", 3)]
    d.start()
    before = {r["path"]: r for r in d.wait_finished(old)}
    d.stop()
    model_line(d, model_v2, "reprocess_outdated = true")
    v2 = read_manifest(model_v2).model_id
    d.start()
    new = copy_image(ncm_images(ncm_dir, "811", 1)[0], d.folder / "s2" / "new.jpg")
    deadline = time.monotonic() + 120
    while True:
        current = d.rows("current = 1")
        if len(current) == 4 and all(r["model_id"] == v2 and r["status"] != "pending" for r in current):
            break
        assert time.monotonic() < deadline, d.log_text()[-3000:]
        time.sleep(0.2)
    for r in current:
        if r["path"] != str(new):
            assert r["supersedes"] == before[r["path"]]["id"]
            assert r["probabilities"] == before[r["path"]]["probabilities"]  # same weights
    rc, _ = d.stop()
    assert rc == 0
    d.assert_exactly_once()
    assert "outdated result(s) will be re-classified" in d.log_text()


def test_the_catch_up_reclassifies_rows_that_reprocess_ingested_from_an_archive(
        daemon_factory: Callable[..., Daemon], model_v2: Path, ncm_dir: Path) -> None:
    """Archive rows (outside the watch folder) are read under their own folder's confinement, as
    `reprocess` reads them: re-classified, not refused as links leaving the watch folder."""
    d: Daemon = daemon_factory()
    archive = d.root / "archive"  # beside the watch folder, not in it
    files = make_archive(archive, ncm_dir, per_class=2)
    command = [sys.executable, "-m", "semwatch", "reprocess", str(archive), "--config", str(d.config),
               "--json"]
    ingest = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert ingest.returncode == 0, ingest.stderr
    assert summary(ingest.stdout)["classified"] == len(files)
    before = {r["path"]: r for r in d.rows("current = 1")}
    assert set(before) == {str(f) for f in files}
    model_line(d, model_v2, "reprocess_outdated = true")
    v2 = read_manifest(model_v2).model_id
    d.start()
    deadline = time.monotonic() + 180
    while True:
        current = d.rows("current = 1")
        if all(r["model_id"] == v2 for r in current):
            break
        assert time.monotonic() < deadline, d.log_text()[-3000:]
        time.sleep(0.2)
    rc, _ = d.stop()
    assert rc == 0
    d.assert_exactly_once()
    current = d.rows("current = 1")
    assert {r["path"] for r in current} == set(before)
    for r in current:
        assert r["supersedes"] == before[r["path"]]["id"] and r["revision"] == 1
        assert r["probabilities"] == before[r["path"]]["probabilities"]  # same weights
        assert r["sample_id"] == before[r["path"]]["sample_id"]
    assert "outside the watch folder" not in d.log_text()
    d.start()  # the next start has nothing left to catch up on, and says nothing about it
    rc, _ = d.stop()
    assert rc == 0
    assert d.log_text().count("will be re-classified") == 1
