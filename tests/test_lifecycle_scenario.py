"""The lifecycle end to end on real shared data, through the CLI and a real daemon, small enough for
CI (tiny models, a few images):

a model trained without one composition (all of its classes left out) meets that composition in the
export folder and calls it `unknown`; an operator labels a few of those images (`semwatch label
--class`) and confirms verdicts that are right (`--confirm`); a challenger trained with the labels
(`semwatch train DATA_DIR --labels`) is registered and passes the gate; it is promoted while the
daemon runs, the outdated results are classified again and the earlier unknowns become right;
`semwatch models rollback` restores the old champion, with its record.

The composition left out is one constant, `LEFT_OUT`: nothing below (nor in the product) knows which
one it is, so any of the four compositions can be left out the same way. The environment chooses
another without an edit: `SEMWATCH_SCENARIO_LEFT_OUT=622 pytest tests/test_lifecycle_scenario.py`.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import pytest

from conftest import Cli
from semwatch.model.artifact import read_manifest
from semwatch.model.registry import Registry
from semwatch.store import db
from semwatch.values import parse_class
from test_daemon import Daemon, copy_image

pytestmark = pytest.mark.slow

NCM_COMPOSITIONS = ("333", "523", "622", "811")
# The composition the first model never sees. Nothing else here (nor in the product) names it. Runs
# here (2026-12-04, UNKNOWN_THRESHOLD 3.0): 523, 622, 333 and 811 left out each pass (at 4.0, 622
# did not: the tiny champion named 3 of 6 622 images "523" at confidence 1.0; pristine 523 and 622
# were imaged in one session, same brightness/contrast, see the data README).
LEFT_OUT = os.environ.get("SEMWATCH_SCENARIO_LEFT_OUT", "523")
# One state per composition (the pristine one, the largest class of each), so that leaving out a
# composition leaves out all of its classes and each known class gets more images than 12 classes
# of 2 would: with 10 classes of 2 images the tiny challenger was unsure of everything (2026-12-04).
STATE = ""  # "" = pristine; "formation" or "cycled" picks that state of every composition instead
PER_CLASS = 12  # training images per known class (10 train, 2 validation)
ARRIVING = 6  # images of the left-out composition that reach the export folder
LABELLED = 4  # of those, labelled by the operator (the rest stay unlabelled)
EVAL_NEW = 4  # further images of the left-out composition in the evaluation folder
EVAL_KNOWN = 2  # evaluation images per known class
FAMILIAR = 3  # images per known class that arrive too (the operator confirms those named right)
# Few tiles per image keep it short; the head's epochs cost little (the backbone is frozen, its
# features computed once), and a head trained to the end (no early stop) is sure enough of what it
# learnt. No held-out test split: with 4 labelled images of the new class, the default 15 % test and
# 15 % validation left the challenger 2 to learn from, and it was unsure (0.65-0.93) even of those;
# the gate has its evaluation folder.
TINY = """
[train]
tiles_per_image = 4
augment_copies = 1
epochs = 40
patience = 40
test_fraction = 0.0
[tiling]
max_tiles = 6
"""
# What the tiny models showed on the shared 2-core machine (2026-12-04), novelty = the median tile's
# score (`classify.aggregate`). The detector separates the left-out composition, but a tiny model's
# own threshold, calibrated on one or two validation images per class, is far too tight: it called
# most of the known classes' held-out images "unlike the training images" too. Champion scores of
# the left-out composition: 523 3.6-5.3, 622 3.6-5.7, 333 9.8-30, 811 10-12.6; of known held-out
# images 2.0-3.9 (a few over 3: those are unknown, which the test allows). So the scenario sets the
# threshold (`[model] unknown_threshold`, the product's setting for that) for both models and keeps
# the product's default `min_confidence` 0.9; the confidence limit alone does not help at this size
# (the tiny champion was sure, 1.0, of a wrong class for left-out 523 and 622 images). Full models
# calibrate their own threshold: benchmarks/ood_bench.py, benchmarks/lifecycle_bench.py.
MIN_CONFIDENCE = 0.9
UNKNOWN_THRESHOLD = 3.0


def cls_name(composition: str) -> str:
    return f"{composition}_{STATE}" if STATE else composition


def link_folder(root: Path, files: dict[str, list[Path]]) -> Path:
    for cls, paths in files.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for p in paths:
            (root / cls / p.name).symlink_to(p)
            sidecar = p.with_name(p.name + ".txt")
            if sidecar.exists():
                (root / cls / sidecar.name).symlink_to(sidecar)
    return root


def current(database: Path) -> dict[str, dict[str, object]]:
    conn = db.connect(database, readonly=True)
    try:
        return {r["path"]: dict(r) for r in conn.execute("SELECT * FROM images WHERE current = 1")}
    finally:
        conn.close()


def csv_rows(path: Path) -> dict[str, dict[str, str]]:
    """The newest results.csv row of each path (the CSV is a log: a re-classification appends)."""
    with path.open(encoding="utf-8", newline="") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def wait_for(cond: object, d: Daemon, what: str, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert d.proc is not None and d.proc.poll() is None, f"daemon died:\n{d.log_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{what}:\n{d.log_text()[-3000:]}"
        time.sleep(0.3)


def verdicts(rows: dict[str, dict[str, object]], paths: list[Path]) -> list[tuple[object, ...]]:
    """What to show when an assertion fails: each verdict with its confidence and reasons."""
    return [(rows[str(p)]["status"], rows[str(p)]["predicted_class"], rows[str(p)]["confidence"],
             rows[str(p)]["reasons"]) for p in paths]


@pytest.mark.timeout(2400)  # two trainings and three models' verdicts on a shared 2-core machine
def test_a_left_out_composition_is_learnt_from_labels_promoted_live_and_rolled_back(
        cli: Cli, tmp_path: Path, ncm_dir: Path) -> None:
    new_class = cls_name(LEFT_OUT)
    known = [cls_name(c) for c in NCM_COMPOSITIONS if c != LEFT_OUT]
    images = {c: sorted((ncm_dir / c).glob("*.jpg")) for c in [*known, new_class]}
    new = images[new_class]
    assert len(new) >= ARRIVING + EVAL_NEW
    assert all(len(images[c]) >= PER_CLASS + EVAL_KNOWN + FAMILIAR for c in known)
    train_dir = link_folder(tmp_path / "train", {c: images[c][:PER_CLASS] for c in known})
    eval_folder = link_folder(tmp_path / "eval", {
        new_class: new[ARRIVING:ARRIVING + EVAL_NEW],
        **{c: images[c][-FAMILIAR - EVAL_KNOWN:-FAMILIAR] for c in known}})

    # The daemon's configuration; `semwatch train` reads the same file (tiny settings, the database
    # whose labels it learns from).
    model_a, model_b = tmp_path / "model-a", tmp_path / "model-b"
    d = Daemon(tmp_path / "d", model_a)
    text = d.config.read_text(encoding="utf-8").replace(
        "[model]\n", f'[model]\nregistry = "{tmp_path / "registry"}"\nreprocess_outdated = true\n'
        f"test_time_views = 1\nmin_confidence = {MIN_CONFIDENCE}\nunknown_threshold = {UNKNOWN_THRESHOLD}\n")
    d.config.write_text(text + TINY + f'[lifecycle]\neval_folder = "{eval_folder}"\n', encoding="utf-8")
    config = ("--config", d.config)
    try:
        trained = cli("train", train_dir, "--out", model_a, *config)
        assert trained.code == 0, trained.err
        assert not [c for c in read_manifest(model_a).classes if parse_class(c).composition == LEFT_OUT]
        assert cli("models", "register", model_a, "--alias", "champion", *config).code == 0
        a = read_manifest(model_a).model_id

        # The left-out composition and a few images of each known class arrive at the running daemon.
        arriving = [copy_image(p, d.folder / "lotN" / p.name) for p in new[:ARRIVING]]
        familiar = [copy_image(p, d.folder / "lotK" / c / p.name)
                    for c in known for p in images[c][-FAMILIAR:]]
        d.start()
        d.wait_finished([*arriving, *familiar], timeout=600)
        before = current(d.database)
        assert {before[str(p)]["model_id"] for p in [*arriving, *familiar]} == {a}
        statuses = [before[str(p)]["status"] for p in arriving]
        assert statuses.count("unknown") >= ARRIVING // 2 + 1, verdicts(before, arriving)  # it says so
        assert not [p for p in arriving if before[str(p)]["predicted_class"] == new_class]

        # The operator names the class of some unknowns and confirms the verdicts that are right.
        labelled = arriving[:LABELLED]
        done = cli("label", *labelled, "--class", new_class, "--by", "operator", *config)
        assert done.code == 0, done.err
        right_known = [p for p in familiar if before[str(p)]["status"] == "ok"
                       and before[str(p)]["predicted_class"] == p.parent.name]
        assert right_known, verdicts(before, familiar)  # something to confirm
        done = cli("label", *right_known, "--confirm", "--by", "operator", *config)
        assert done.code == 0, done.err

        # A challenger from the class folders plus the labelled ledger images.
        trained = cli("train", train_dir, "--labels", "--out", model_b, *config)
        assert trained.code == 0, trained.err
        manifest_b = read_manifest(model_b)
        b = manifest_b.model_id
        assert new_class in manifest_b.classes
        assert cli("models", "register", model_b, *config).code == 0
        compared = cli("models", "compare", "--json", *config)
        assert compared.code == 0, compared.err
        decision = json.loads(compared.out.splitlines()[-1])
        assert decision["decision"] in ("better", "not significantly worse"), compared.out
        promoted = cli("models", "promote", "--by", "operator", *config)
        assert promoted.code == 0, promoted.out + promoted.err

        # The running daemon switches, and classifies the outdated results again.
        wait_for(lambda: d.query("SELECT model_id FROM daemon")[0]["model_id"] == b, d, "no switch")
        wait_for(lambda: all(r["model_id"] == b for r in current(d.database).values()), d,
                 "outdated results were not re-classified")
        after = current(d.database)
        right = [p for p in arriving if after[str(p)]["status"] == "ok"
                 and after[str(p)]["predicted_class"] == new_class]
        assert len(right) >= ARRIVING // 2 + 1, verdicts(after, arriving)
        assert all(after[str(p)]["supersedes"] == before[str(p)]["id"] for p in arriving)

        # Rollback: the old champion again, with its record; the daemon follows.
        rolled = cli("models", "rollback", "--reason", "scenario", "--by", "operator", *config)
        assert rolled.code == 0, rolled.err
        assert Registry(tmp_path / "registry").read_aliases().champion == a
        wait_for(lambda: d.query("SELECT model_id FROM daemon")[0]["model_id"] == a, d, "no rollback")
        moves = d.query("SELECT action, model_id FROM model_events WHERE alias = 'champion' ORDER BY id")
        assert [(m["action"], m["model_id"]) for m in moves] == [
            ("register", a), ("promote", b), ("rollback", a)]
        shown = cli("models", "show", "champion", *config)
        assert shown.code == 0 and "rollback" in shown.out, shown.out + shown.err
        # reprocess_outdated: back to the champion's verdicts, each file one current row again.
        wait_for(lambda: all(r["model_id"] == a for r in current(d.database).values()), d,
                 "outdated results were not re-classified after the rollback")
        rc, _ = d.stop()
        assert rc == 0
        d.assert_exactly_once()
        final, rows = current(d.database), csv_rows(d.csv)
        assert len(final) == ARRIVING + len(familiar)
        for path, row in final.items():
            assert rows[path]["model_id"] == row["model_id"] == a, path
            assert rows[path]["status"] == row["status"], path
    finally:
        d.close()
