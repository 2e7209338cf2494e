"""Operators' labels in the ledger (`store.labels`): keyed on content, history kept, undo goes one
label back, written only inside the write lock, never touching a verdict."""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from conftest import Cli
from dbfixture import make_database
from semwatch.config import Settings
from semwatch.store import db
from semwatch.store.labels import (
    NothingToUndo,
    add_label,
    current_labels,
    label_history,
    label_of,
    undo,
    writing,
)
from semwatch.store.ledger import Store
from semwatch.store.schema import SCHEMA_VERSION

SHA_A = "a" * 64
SHA_B = "b" * 64


@pytest.fixture
def store(settings: Settings) -> Store:
    make_database(settings.store.database, now=datetime.now(UTC), images=[
        {"path": "/export/s1/a.tif", "sha256": SHA_A, "predicted_class": "622_pristine"},
        {"path": "/export/s1/copy-of-a.tif", "sha256": SHA_A, "predicted_class": "622_pristine"},
        {"path": "/export/s2/b.tif", "sha256": SHA_B, "status": "unknown", "predicted_class": None},
    ])
    s = Store(settings.store.database, None)
    yield s  # type: ignore[misc]
    s.close()


def verdicts(conn: sqlite3.Connection) -> list[tuple[object, ...]]:
    return [tuple(r) for r in conn.execute("SELECT * FROM images ORDER BY id")]


def test_a_label_follows_the_content_and_history_is_kept(store: Store) -> None:
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    before = verdicts(store.conn)
    with writing(store) as conn:
        first = add_label(conn, SHA_A, "confirmed", "622_pristine", "ana", path="/export/s1/a.tif",
                          image_id=1)
        add_label(conn, SHA_B, "corrected", "NCA_pristine", "ana", note="new supplier", image_id=3)
    with writing(store) as conn:
        second = add_label(conn, SHA_A, "corrected", "811_cycled", "ben", image_id=2,
                           path="/export/s1/copy-of-a.tif")
    # The copy (another path, the same sha256) carries the newest label of the content.
    current = {lab.sha256: lab for lab in current_labels(store.conn)}
    assert current[SHA_A] == second and current[SHA_A].class_name == "811_cycled"
    assert current[SHA_B].note == "new supplier" and current[SHA_B].status == "corrected"
    assert [lab.id for lab in label_history(store.conn, SHA_A)] == [first.id, second.id]
    assert first.at and first.at.endswith("+00:00") and first.by == "ana"
    assert current_labels(store.conn, [SHA_B]) == [current[SHA_B]]
    assert current_labels(store.conn, []) == []
    assert verdicts(store.conn) == before  # labels never rewrite a verdict


def test_undo_goes_back_one_label_at_a_time(store: Store) -> None:
    with writing(store) as conn:
        first = add_label(conn, SHA_A, "confirmed", "622_pristine", "ana")
        second = add_label(conn, SHA_A, "foreign", None, "ben", note="a stub")
    with writing(store) as conn:
        cleared = undo(conn, SHA_A, "ben")
    assert cleared.status == "cleared" and cleared.undoes == second.id
    assert label_of(store.conn, SHA_A) == first  # the previous label counts again
    with writing(store) as conn:
        assert undo(conn, SHA_A, "ana").undoes == first.id
    assert label_of(store.conn, SHA_A) is None and current_labels(store.conn) == []
    with pytest.raises(NothingToUndo), writing(store) as conn:
        undo(conn, SHA_A, "ana")
    # A new label after the undos counts; the whole story stays in the history.
    with writing(store) as conn:
        third = add_label(conn, SHA_A, "corrected", "811_formation", "cy")
    assert label_of(store.conn, SHA_A) == third
    assert [lab.status for lab in label_history(store.conn, SHA_A)] == [
        "confirmed", "foreign", "cleared", "cleared", "corrected"]
    # The table itself refuses a second undo of one label and a class on a foreign label.
    with pytest.raises(sqlite3.IntegrityError), writing(store) as conn:
        conn.execute("INSERT INTO labels (sha256, status, by, created_at, undoes) "
                     "VALUES (?, 'cleared', 'x', 'now', ?)", (SHA_A, second.id))
    with pytest.raises(sqlite3.IntegrityError), writing(store) as conn:
        conn.execute("INSERT INTO labels (sha256, status, class_name, by, created_at) "
                     "VALUES (?, 'foreign', '622_pristine', 'x', 'now')", (SHA_A,))


def test_a_failed_transaction_applies_nothing(store: Store) -> None:
    with pytest.raises(ValueError), writing(store) as conn:
        add_label(conn, SHA_A, "confirmed", "622_pristine", "ana")
        add_label(conn, SHA_B, "corrected", None, "ana")  # refused: a correction names its class
    assert current_labels(store.conn) == []


def test_labels_are_written_only_under_the_write_lock(store: Store, settings: Settings) -> None:
    with pytest.raises(RuntimeError, match="writing"):
        add_label(store.conn, SHA_A, "confirmed", "622_pristine", "ana")
    other = db.WriteLock(settings.store.database)  # another writer (the daemon) holds the lock
    done = threading.Event()

    def label() -> None:
        with writing(store) as conn:
            add_label(conn, SHA_A, "confirmed", "622_pristine", "ana")
        done.set()

    try:
        with other:
            worker = threading.Thread(target=label)
            worker.start()
            assert not done.wait(0.5)  # waits for the lock (not a timing assertion: it must wait)
        worker.join(30)
        assert done.is_set()
    finally:
        other.close()
    reader = db.connect(settings.store.database, readonly=True)
    try:
        assert [lab.sha256 for lab in current_labels(reader)] == [SHA_A]
    finally:
        reader.close()


def test_a_replaced_database_is_not_labelled(store: Store, settings: Settings, tmp_path: Path) -> None:
    moved = tmp_path / "moved.db"
    settings.store.database.rename(moved)
    Store(settings.store.database, None).close()  # someone put a new database in its place
    with pytest.raises(RuntimeError, match="replaced"), writing(store) as conn:
        add_label(conn, SHA_A, "confirmed", "622_pristine", "ana")


# --- `semwatch label` ------------------------------------------------------------------------------


def _cli_db(tmp_path: Path, ncm_dir: Path) -> tuple[Path, list[Path]]:
    """A config and a database whose rows are real files (a copy of one among them)."""
    import hashlib
    import shutil

    folder = tmp_path / "incoming" / "lot1"
    folder.mkdir(parents=True)
    sources = [sorted((ncm_dir / c).glob("*.jpg"))[0] for c in ("622", "811_cycled")]
    files = [folder / "a.jpg", folder / "b.jpg", folder / "copy of a.jpg"]
    for src, dst in zip([sources[0], sources[1], sources[0]], files, strict=True):
        shutil.copy(src, dst)
    db_path = tmp_path / "semwatch.db"
    make_database(db_path, now=datetime.now(UTC), images=[
        {"path": str(files[0]), "sha256": hashlib.sha256(files[0].read_bytes()).hexdigest(),
         "predicted_class": "622", "composition": "622", "state": "pristine"},
        {"path": str(files[1]), "sha256": hashlib.sha256(files[1].read_bytes()).hexdigest(),
         "status": "unknown", "predicted_class": None},
        {"path": str(files[2]), "sha256": hashlib.sha256(files[2].read_bytes()).hexdigest(),
         "predicted_class": "622", "composition": "622", "state": "pristine"},
    ])
    conn = db.connect(db_path)
    try:  # the model that made these verdicts knows the shared data's class names
        conn.execute("UPDATE models SET classes = '[\"622\", \"811_cycled\"]'")
    finally:
        conn.close()
    (tmp_path / "config.toml").write_text(
        f'[store]\ndatabase = "{db_path}"\nresults_csv = "{tmp_path / "results.csv"}"\n', encoding="utf-8")
    return db_path, files


def _current(db_path: Path) -> dict[str, tuple[str, str | None, str]]:
    conn = db.connect(db_path, readonly=True)
    try:
        return {lab.path or "": (lab.status, lab.class_name, lab.by) for lab in current_labels(conn)}
    finally:
        conn.close()


def test_label_command(cli: Cli, tmp_path: Path, ncm_dir: Path) -> None:
    import json

    db_path, (a, b, _) = _cli_db(tmp_path, ncm_dir)
    r = cli("label", str(a), "--confirm", "--by", "ana", "--note", "checked twice")
    assert r.code == 0, r.err
    assert "confirmed 622 by ana" in r.out
    r = cli("label", str(b), "--class", "NCA_cycled", "--by", "ana", "--json")
    assert r.code == 0, r.err
    record = json.loads(r.out.splitlines()[0])
    assert record["status"] == "corrected" and record["class"] == "NCA_cycled" and record["new_class"]
    # `622_pristine` means the class the model calls `622`: one class, one name. A relative path
    # is relative to the working folder (the cli fixture runs in tmp_path).
    r = cli("label", "incoming/lot1/../lot1/copy of a.jpg", "--class", "622_pristine", "--by", "ben")
    assert r.code == 0, r.err
    labels = _current(db_path)
    # The copy has a's content: its label is a's label now (the newest label of the content).
    assert list(labels.values()) == [("corrected", "NCA_cycled", "ana"), ("corrected", "622", "ben")]
    r = cli("label", str(a), "--undo", "--by", "ben")
    assert r.code == 0 and "label undone" in r.out
    assert _current(db_path)[str(a)] == ("confirmed", "622", "ana")  # back to the confirmation
    # Errors: one line, nothing written.
    for args, message in [
        ((str(b), "--confirm"), "its verdict is unknown, nothing to confirm"),
        ((str(a), "--class", "NCM 622"), "not a class name"),
        ((str(a), "--class", "foreign"), "reserved word"),
        ((str(tmp_path / "nowhere.jpg"), "--foreign"), "not a file the database knows"),
        (("f" * 64, "--foreign"), "no image with sha256"),
        (("--confirm",), "at least one PATH"),
    ]:
        r = cli("label", *args)
        assert r.code != 0 and message in r.err and len(r.err.splitlines()) == 1, (args, r.err)
    assert len(_current(db_path)) == 2
    r = cli("label", str(a), "--confirm", "--foreign")
    assert r.code == 2  # one thing at a time


def test_label_import_is_all_or_nothing(cli: Cli, tmp_path: Path, ncm_dir: Path) -> None:
    db_path, (a, b, copy) = _cli_db(tmp_path, ncm_dir)
    sha_b = _sha(b)
    bad = tmp_path / "labels.csv"
    bad.write_text("path,label,by,note\n"
                   f"{a},confirmed,ana,\n"
                   f",foreign,,\n"
                   f"{copy},622_cycled,ben,a note\n", encoding="utf-8")
    r = cli("label", "--import", str(bad))
    assert r.code != 0 and "labels.csv line 3: neither a path nor a sha256" in r.err
    bad.write_text("sha256,label\n"
                   f"{sha_b},LFP_cycled\n"
                   f"{_sha(a)},not a class\n", encoding="utf-8")
    r = cli("label", "--import", str(bad))
    assert r.code != 0 and "labels.csv line 3: 'not a class' is not a class name" in r.err
    assert _current(db_path) == {}  # the good first row was not applied either
    bad.write_text(f"path,label\n{b},confirmed\n", encoding="utf-8")
    r = cli("label", "--import", str(bad))
    assert r.code != 0 and "line 2" in r.err and "nothing to confirm" in r.err
    bad.write_text(f"file,label\n{b},confirmed\n", encoding="utf-8")
    assert "line 1: the header needs" in cli("label", "--import", str(bad)).err
    good = tmp_path / "good.csv"
    good.write_text("\ufeffPath,Label,By,Note\n"
                    f"{a},confirmed,ana,\n"
                    f"{b},LFP_cycled,,from the supplier's sheet\n"
                    "\n", encoding="utf-8")
    r = cli("label", "--import", str(good), "--by", "importer")
    assert r.code == 0, r.err
    assert _current(db_path) == {str(a): ("confirmed", "622", "ana"),
                                 str(b): ("corrected", "LFP_cycled", "importer")}


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the report --------------------------------------------------------------------------------------


def test_the_report_counts_the_days_labels(settings: Settings) -> None:
    from zoneinfo import ZoneInfo

    from semwatch.report.daily import write_report
    from test_report import _parse

    now = datetime.now(UTC)
    ok = {"status": "ok"}
    make_database(settings.store.database, now=now, images=[
        {**ok, "predicted_class": "622_pristine"}, {**ok, "predicted_class": "622_pristine"},
        {**ok, "predicted_class": "622_pristine"}, {**ok, "predicted_class": "811_cycled"},
        {"status": "rejected", "predicted_class": None}, {**ok, "predicted_class": "811_cycled"},
    ])
    store = Store(settings.store.database, None)
    try:
        with writing(store) as conn:
            sha = [f"{i:064x}" for i in range(6)]  # dbfixture's contents
            add_label(conn, sha[0], "confirmed", "622_pristine", "ana", image_id=1)
            add_label(conn, sha[1], "confirmed", "622_pristine", "ana", image_id=2)
            add_label(conn, sha[2], "corrected", "811_cycled", "ana", image_id=3)
            add_label(conn, sha[3], "confirmed", "811_cycled", "ana", image_id=4)
            add_label(conn, sha[4], "corrected", "NCA_pristine", "ana", image_id=5)
            add_label(conn, sha[5], "foreign", None, "ana", image_id=6)
            add_label(conn, sha[3], "corrected", "622_pristine", "ben", image_id=4)
            undo(conn, sha[3], "ben")  # taken back: the confirmation counts
    finally:
        store.close()
    day = now.astimezone(ZoneInfo(settings.report.timezone)).date()
    page = _parse(write_report(settings, day).html)
    summary = {row[0]: row[1] for row in page.tables["labels"]}
    assert summary == {"verdicts checked": "4", "confirmed": "3 (75 %)",
                       "images without a verdict named": "1", "marked foreign": "1"}
    assert page.tables["labels-per-class"][1:] == [["622_pristine", "3", "2", "67 %"],
                                                   ["811_cycled", "1", "1", "100 %"]]
    assert "NCA_pristine" in "".join(page.text)  # a class no model knows yet is named


# --- training from labels ------------------------------------------------------------------------


@pytest.mark.slow
def test_train_from_the_ledgers_labels(cli: Cli, tmp_path: Path, ncm_dir: Path) -> None:
    """Labelled images are read where they lie (a copy when the original is gone); a gone or
    changed file is skipped and counted; foreign images are not trained; the model records what it
    saw, and learns the class that no model knew."""
    import json
    import shutil

    from semwatch.model.artifact import read_manifest

    lot = tmp_path / "incoming" / "lot1"
    lot.mkdir(parents=True)
    src_622 = sorted((ncm_dir / "622").glob("*.jpg"))[:3]
    src_new = sorted((ncm_dir / "811_cycled").glob("*.jpg"))[:5]
    files: list[tuple[Path, dict[str, object]]] = []
    for i, src in enumerate(src_622):
        files.append((lot / f"p{i}.jpg", {"predicted_class": "622"}))
        shutil.copy(src, lot / f"p{i}.jpg")
    shutil.copy(src_622[0], tmp_path / "incoming" / "copy-of-p0.jpg")
    files.append((tmp_path / "incoming" / "copy-of-p0.jpg", {"predicted_class": "622"}))
    for i, src in enumerate(src_new):
        files.append((lot / f"n{i}.jpg", {"status": "unknown", "predicted_class": None}))
        shutil.copy(src, lot / f"n{i}.jpg")
    db_path = tmp_path / "semwatch.db"
    make_database(db_path, now=datetime.now(UTC), images=[
        {"path": str(p), "sha256": _sha(p), **extra} for p, extra in files])
    (tmp_path / "config.toml").write_text(
        f'[store]\ndatabase = "{db_path}"\n[watch]\nfolder = "{tmp_path / "incoming"}"\n'
        '[model]\ndevice = "cpu"\n[tiling]\nmax_tiles = 4\n'
        '[train]\ntiles_per_image = 2\naugment_copies = 1\nval_fraction = 0.34\ntest_fraction = 0.34\n',
        encoding="utf-8")
    for i in range(3):
        assert cli("label", str(lot / f"p{i}.jpg"), "--confirm").code == 0
    assert cli("label", *(str(lot / f"n{i}.jpg") for i in range(5)), "--class", "NCA_cycled").code == 0
    assert cli("label", str(lot / "n4.jpg"), "--foreign", "--note", "a stub").code == 0
    (lot / "p0.jpg").unlink()  # its copy still holds the content: trained from the copy
    (lot / "n2.jpg").unlink()  # gone
    with (lot / "n3.jpg").open("ab") as fh:  # changed since it was labelled
        fh.write(b"\0")
    r = cli("train", "--labels", "--out", str(tmp_path / "model"), "--epochs", "1", "--json")
    assert r.code == 0, r.err
    assert "1 gone" in r.err and "1 changed" in r.err and "1 foreign (not trained)" in r.err
    summary = json.loads(r.out.strip().splitlines()[-1])
    assert summary["labels"] == {"labelled_images": 5, "foreign": 1, "gone": 1, "changed": 1, "refused": 0,
                                 "in_folder": 0}
    assert summary["images_per_class"] == {"622": 3, "NCA_cycled": 2}
    manifest = read_manifest(tmp_path / "model")
    assert list(manifest.classes) == ["622", "NCA_cycled"]
    assert [(c.composition, c.state) for c in manifest.class_info] == [("622", "pristine"), ("NCA", "cycled")]
    trained = set(manifest.training["trained_on"])  # type: ignore[arg-type]
    kept = (lot / "p1.jpg", lot / "p2.jpg", tmp_path / "incoming" / "copy-of-p0.jpg", lot / "n0.jpg",
            lot / "n1.jpg")
    usable = {_sha(p) for p in kept}
    keys = {k for part in manifest.split.values() for k in part}
    assert {k.removeprefix("ledger/").split(".")[0] for k in keys} == usable
    assert trained and trained <= usable  # the test split is held out
    assert manifest.training["source"] == "ledger labels"
    # Beside a class folder: both sources; an image in both is trained once, with the folder's class.
    folder = tmp_path / "data"
    for name, sources in (("622", [src_622[1], sorted((ncm_dir / "622").glob("*.jpg"))[5]]),
                          ("811_cycled", sorted((ncm_dir / "811_cycled").glob("*.jpg"))[6:8])):
        (folder / name).mkdir(parents=True)
        for src in sources:
            shutil.copy(src, folder / name / src.name)
    r = cli("train", str(folder), "--labels", "--out", str(tmp_path / "both"), "--epochs", "1", "--json")
    assert r.code == 0, r.err
    both = json.loads(r.out.strip().splitlines()[-1])
    assert both["labels"]["in_folder"] == 1 and "also in" in r.err
    assert both["images_per_class"] == {"622": 4, "811_cycled": 2, "NCA_cycled": 2}
    assert read_manifest(tmp_path / "both").training["source"] == f"ledger labels + {folder.resolve()}"
    r = cli("train", "--out", str(tmp_path / "m2"))
    assert r.code == 2 and "DATA_DIR" in r.err


def test_train_labels_key_and_nothing_to_train(cli: Cli, tmp_path: Path, ncm_dir: Path) -> None:
    """`[train] labels = true` is `--labels`; a ledger whose labels give nothing to train says why."""
    (tmp_path / "config.toml").write_text(
        f'[store]\ndatabase = "{tmp_path / "none.db"}"\n[train]\nlabels = true\n', encoding="utf-8")
    r = cli("train", "--out", str(tmp_path / "m"))
    assert r.code == 1 and "no database" in r.err and "no labels to train on" in r.err
    _, (a, _, _) = _cli_db(tmp_path, ncm_dir)  # rewrites config.toml: no [train] labels
    assert cli("label", str(a), "--foreign").code == 0
    r = cli("train", "--labels", "--out", str(tmp_path / "m"))
    assert r.code == 1 and "1 foreign (not trained)" in r.err and "no labelled image can be trained" in r.err
    assert not (tmp_path / "m").exists()
