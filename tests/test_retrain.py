"""The lifecycle's automation (issue 20, item 8): `semwatch models retrain` and the daemon's nightly
job that runs it, on real shared images, a real database and registry, tiny models.

The evaluation folder holds images of a class the champion cannot know (the operator's new class,
"NCA_cycled", taught from labels), so the gate's decision is not left to chance: the champion is
wrong on every one, a challenger that learnt the class is right on most.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import threading
import time
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from conftest import Cli
from dbfixture import make_database, model_events
from semwatch.config import load_settings
from semwatch.lifecycle.retrain import AUTO_PROMOTE, RETRAIN, count_new_labels
from semwatch.model.artifact import read_manifest
from semwatch.model.registry import Registry
from semwatch.service.events import model_event
from semwatch.service.notify import Alerts
from semwatch.service.retrainjob import AUTO_USER, NightlyRetrain, log_path
from semwatch.service.scheduler import ReportScheduler
from semwatch.store import db
from semwatch.store.model_events import ModelEvent

NEW_CLASS = "NCA_cycled"  # the operator's name for images the shared data calls 811_cycled


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _link(root: Path, cls: str, paths: list[Path]) -> None:
    (root / cls).mkdir(parents=True, exist_ok=True)
    for p in paths:
        (root / cls / p.name).symlink_to(p)


def _outcome(log_text: str) -> dict[str, object]:
    """The retraining's outcome, as the daemon logged it (the last `retraining: {...}` line)."""
    lines = [line.split("retraining: ", 1)[1] for line in log_text.splitlines() if "retraining: {" in line]
    assert lines, log_text
    return dict(json.loads(lines[-1]))


@pytest.fixture
def lab(tmp_path: Path, ncm_dir: Path, tiny_model: Path) -> Path:
    """A database whose rows are real files in the watch folder (622 verdicts, and unknowns that are
    the new class), a class folder to train beside the labels, an evaluation folder of the new class,
    and the tiny model as `[model] path` (the first champion). Its config file."""
    incoming = tmp_path / "incoming" / "lot1"
    incoming.mkdir(parents=True)
    known = sorted((ncm_dir / "622").glob("*.jpg"))
    new = sorted((ncm_dir / "811_cycled").glob("*.jpg"))
    rows: list[dict[str, object]] = []
    for i, src in enumerate(known[:2]):
        shutil.copy(src, incoming / f"k{i}.jpg")
        rows.append({"path": str(incoming / f"k{i}.jpg"), "sha256": _sha(incoming / f"k{i}.jpg"),
                     "predicted_class": "622"})
    for i, src in enumerate(new[:5]):
        shutil.copy(src, incoming / f"n{i}.jpg")
        rows.append({"path": str(incoming / f"n{i}.jpg"), "sha256": _sha(incoming / f"n{i}.jpg"),
                     "status": "unknown", "predicted_class": None})
    database = tmp_path / "semwatch.db"
    make_database(database, now=datetime.now(UTC), images=rows)
    train, evaluation = tmp_path / "train", tmp_path / "eval"
    _link(train, "622", known[2:6])
    _link(train, "333", sorted((ncm_dir / "333").glob("*.jpg"))[:4])
    _link(evaluation, NEW_CLASS, new[5:11])
    config = tmp_path / "config.toml"
    config.write_text(
        f'[watch]\nfolder = "{tmp_path / "incoming"}"\n'
        f'[store]\ndatabase = "{database}"\nresults_csv = "{tmp_path / "results.csv"}"\n'
        f'[model]\npath = "{tiny_model}"\nregistry = "{tmp_path / "registry"}"\ndevice = "cpu"\n'
        # Tiny models' own novelty thresholds are far too tight (see test_lifecycle_scenario): here
        # the gate is to judge classes, so nothing is called unknown.
        'runtime = "onnxruntime"\nunknown_threshold = 1000000.0\nmin_confidence = 0.0\ntest_time_views = 1\n'
        '[tiling]\nmax_tiles = 4\n'
        '[train]\ntiles_per_image = 3\naugment_copies = 1\nepochs = 30\npatience = 30\ntest_fraction = 0.0\n'
        f'[lifecycle]\neval_folder = "{evaluation}"\ntrain_folder = "{train}"\nretrain_after_labels = 3\n'
        '[report]\nenabled = false\n', encoding="utf-8")
    return config


def test_retrain_waits_for_labels_then_trains_gates_and_registers(cli: Cli, lab: Path,
                                                                   tiny_model: Path) -> None:
    """Below the label count nothing is trained; then a challenger is trained beside the class
    folder, gated and registered with its evidence; its watermark makes the next run wait again."""
    folder = lab.parent / "incoming" / "lot1"
    config = ("--config", lab)
    assert cli("label", folder / "k0.jpg", "--confirm", "--by", "op", *config).code == 0
    r = cli("models", "retrain", "--json", *config)  # [lifecycle] retrain_after_labels = 3
    assert r.code == 0, r.err
    assert json.loads(r.out.splitlines()[-1]) == {"trained": False, "new_labels": 1, "needed": 3}
    assert not (lab.parent / "registry").exists() or not Registry(lab.parent / "registry").ids()

    assert cli("label", *(folder / f"n{i}.jpg" for i in range(4)), "--class", NEW_CLASS, "--by", "op",
               *config).code == 0
    r = cli("models", "retrain", "--json", "--by", "tester", *config)
    assert r.code == 0, r.err
    outcome = json.loads(r.out.splitlines()[-1])
    assert outcome["trained"] and outcome["new_labels"] == 5 and not outcome["promoted"]
    assert outcome["decision"] == "better", r.out  # the champion cannot name the new class
    registry = Registry(lab.parent / "registry")
    aliases = registry.read_aliases()
    assert aliases.challenger == outcome["model_id"]
    assert aliases.champion == read_manifest(tiny_model).model_id  # [model] path, made champion
    manifest = registry.manifest(outcome["model_id"])
    assert NEW_CLASS in manifest.classes and {"622", "333"} <= set(manifest.classes)
    moves = model_events(lab.parent / "semwatch.db")
    assert [(m["alias"], m["action"]) for m in moves] == [("champion", "initial"), ("challenger", RETRAIN)]
    evidence = json.loads(str(moves[-1]["evidence"]))
    assert evidence["new_labels"] == 5 and evidence["gate"]["decision"] == "better"
    assert evidence["images_per_class"][NEW_CLASS] == 4
    assert moves[-1]["by"] == "tester"
    conn = db.connect(lab.parent / "semwatch.db", readonly=True)
    try:
        count = count_new_labels(conn)
    finally:
        conn.close()
    assert (count.since, count.new) == (evidence["labels_through"], 0) and count.newest == count.since
    r = cli("models", "retrain", "--min-labels", "1", *config)
    assert r.code == 0 and "nothing trained" in r.out, r.out + r.err


@pytest.mark.timeout(900)
def test_the_daemons_nightly_job_promotes_only_a_better_challenger(cli: Cli, lab: Path, tiny_model: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """The nightly job (a real `semwatch models retrain` subprocess, `auto_promote`) promotes a
    challenger the gate finds better, recorded as the automation's; its progress is in the log file.
    A second run, against a champion that knows the class too, promotes only if the gate says better."""
    text = lab.read_text(encoding="utf-8")
    lab.write_text(text.replace("[lifecycle]\n", "[lifecycle]\nauto_promote = true\n"), encoding="utf-8")
    folder = lab.parent / "incoming" / "lot1"
    assert cli("label", *(folder / f"n{i}.jpg" for i in range(4)), "--class", NEW_CLASS,
               "--config", lab).code == 0
    settings = load_settings(lab, environ={})
    job = NightlyRetrain(settings)
    assert job.command()[:3] == [sys.executable, "-m", "semwatch"] and "--promote-if-better" in job.command()
    with caplog.at_level(logging.INFO, logger="semwatch.retrain"):
        job()
    outcome = _outcome(caplog.text)
    assert outcome["trained"] and outcome["promoted"], caplog.text
    registry = Registry(lab.parent / "registry")
    assert registry.read_aliases().champion == outcome["model_id"]
    assert registry.read_aliases().challenger is None
    moves = model_events(lab.parent / "semwatch.db")
    assert [(m["alias"], m["action"], m["by"]) for m in moves][1:] == [
        ("challenger", RETRAIN, AUTO_USER), ("champion", AUTO_PROMOTE, AUTO_USER),
        ("challenger", "promoted", AUTO_USER)]
    assert "train:" in log_path(settings.store.database).read_text(encoding="utf-8")

    # Alerts say what the daemon's registry watch saw, with the record of the move.
    alerts = Alerts(settings, targets=[])
    alerts.model_moved("champion", str(outcome["model_id"]))
    sent = alerts.queue.get_nowait()
    assert sent is not None
    assert sent.kind == "model_promoted" and AUTO_PROMOTE in sent.body and "gate: better" in sent.body

    # Not due until more labels come; then against a champion that knows the class.
    assert cli("label", folder / "n4.jpg", "--class", NEW_CLASS, "--config", lab).code == 0
    text = lab.read_text(encoding="utf-8")
    lab.write_text(text.replace("retrain_after_labels = 3", "retrain_after_labels = 1"), encoding="utf-8")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="semwatch.retrain"):
        NightlyRetrain(load_settings(lab, environ={}))()
    second = _outcome(caplog.text)
    assert second["trained"] and second["promoted"] == (second["decision"] == "better"), second
    assert registry.read_aliases().champion == (second["model_id"] if second["promoted"]
                                                else outcome["model_id"])


class _Hung(NightlyRetrain):
    """Fault injection: a retraining that never ends."""

    def command(self) -> list[str]:
        return [sys.executable, "-c", "import time; time.sleep(120)"]


def test_a_hung_retraining_is_stopped_by_its_timeout_and_by_the_daemons_stop(
        settings_retrain: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = load_settings(settings_retrain, environ={})
    with caplog.at_level(logging.INFO, logger="semwatch.retrain"):
        started = time.monotonic()
        _Hung(settings)()  # retrain_timeout_minutes = 0.02: 1.2 s
        assert time.monotonic() - started < 30
    assert "still running after" in caplog.text and "nothing registered" in caplog.text

    hung = _Hung(load_settings(settings_retrain, environ={}, overrides={"lifecycle": {
        "retrain_timeout_minutes": 10.0}}))
    scheduler = ReportScheduler(hung.settings, after_nightly=hung, stop_timeout=20.0)
    worker = threading.Thread(target=scheduler.nightly)
    worker.start()
    deadline = time.monotonic() + 30
    while hung._proc is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hung._proc is not None
    started = time.monotonic()
    scheduler.stop()  # as the daemon's stop: the subprocess is ended, not waited for
    worker.join(20)
    assert not worker.is_alive() and time.monotonic() - started < 15
    assert hung._proc is None
    hung()  # none starts after a stop
    assert hung._proc is None


@pytest.fixture
def settings_retrain(tmp_path: Path) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(f'[store]\ndatabase = "{tmp_path / "semwatch.db"}"\n[report]\nenabled = false\n'
                      '[lifecycle]\nretrain_after_labels = 1\nretrain_timeout_minutes = 0.02\n',
                      encoding="utf-8")
    return config


def test_the_nightly_report_comes_before_the_retraining(tmp_path: Path) -> None:
    """With reports on, the night's report is written first (it shows the day as served); with
    reports off the scheduler still runs the retraining and catches up no reports."""
    order: list[str] = []

    class Job:
        def __call__(self) -> None:
            order.append("retrain" if not (tmp_path / "reports").exists()
                         else f"retrain after {sorted(p.name for p in (tmp_path / 'reports').iterdir())}")

        def cancel(self) -> None:
            order.append("cancel")

    make_database(tmp_path / "semwatch.db", now=datetime.now(UTC), images=[])
    on = load_settings(None, environ={}, overrides={
        "store": {"database": str(tmp_path / "semwatch.db"), "results_csv": str(tmp_path / "r.csv")},
        "report": {"folder": str(tmp_path / "reports"), "timezone": "UTC"}})
    day = date(2026, 12, 3)
    scheduler = ReportScheduler(on, after_nightly=Job(),
                                clock=lambda: datetime(2026, 12, 3, 23, 55, tzinfo=UTC))
    scheduler.nightly()
    assert order == [f"retrain after {[day.isoformat()]}"]
    off = load_settings(None, environ={}, overrides={
        "store": {"database": str(tmp_path / "semwatch.db")}, "report": {"enabled": False}})
    scheduler = ReportScheduler(off, after_nightly=Job(),
                                clock=lambda: datetime(2026, 12, 5, 23, 55, tzinfo=UTC))
    assert scheduler.missed_days() == []
    scheduler.nightly()
    scheduler.stop()
    assert order[1:] == [f"retrain after {[day.isoformat()]}", "cancel"]


def test_model_alerts_name_the_move_and_the_gate() -> None:
    move = ModelEvent(7, "2026-12-04T23:58:00+00:00", "challenger", "abc123def4567890", "0f0f", RETRAIN,
                      AUTO_USER, "5 new label(s)", {"gate": {"decision": "not significantly worse"}}, "t")
    event = model_event("challenger", "abc123def4567890", move)
    assert event.kind == "challenger_ready" and "gate: not significantly worse" in event.title
    assert "5 new label(s)" in event.body and "semwatch models show abc123def4567890" in event.body
    assert model_event("champion", "abc", None).kind == "model_promoted"
