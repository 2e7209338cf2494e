"""`semwatch demo`: the whole product end to end, for a first-time user, in a few minutes on a CPU.

1. a model: the one at `[model] path` if it was trained on the demo's data, else a quick one
   trained now (few images per class; the full training command is printed);
2. the daemon (`python -m semwatch watch`) as a subprocess, on an export folder inside `workdir`,
   with a generated config that keeps the database, CSV and reports there too;
3. held-out (test-split) images dropped into the export folder at an instrument's pace, written the
   way instrument software writes them (a temporary name, in chunks, then a rename; sidecar too),
   one sample folder per class with an `expected.txt`, while the live view shows the database;
4. SIGTERM to the daemon, the day's report, and a summary against the true folder labels.

The daemon is a real process, not an in-process `Service`: the demo shows what systemd would run,
and reads its results only through the database, as `semwatch top` does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from rich.console import Console

from semwatch.config import Settings, load_settings
from semwatch.errors import ExitStatus, UserError
from semwatch.output import Output
from semwatch.reading.sidecar import sidecar_path
from semwatch.store import db

if TYPE_CHECKING:
    from semwatch.model.artifact import Manifest
    from semwatch.report.daily import ReportPaths

QUICK_IMAGES_PER_CLASS = 10
QUICK_EPOCHS = 15
CHUNK = 256 * 1024
START_TIMEOUT_S = 120.0
FULL_TRAIN_HINT = ("semwatch train {data} --out {model}   "
                   "(the 737 shared NCM images: about 12 min on a 2-core CPU)")

Say = Callable[[str], None]
Split = Mapping[str, Sequence[str]]  # "train"/"val"/"test" -> paths relative to the data folder


@dataclass(frozen=True)
class Drop:
    """One held-out image and where the demo puts it."""

    source: Path
    true_class: str
    target: Path


@dataclass(frozen=True)
class Verdict:
    """The daemon's final row for a dropped image (read from its database)."""

    status: str
    predicted_class: str | None = None
    composition: str | None = None
    state: str | None = None
    confidence: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class WorkPaths:
    """Where the demo's daemon reads and writes, all inside the work folder."""

    workdir: Path

    @property
    def incoming(self) -> Path:
        return self.workdir / "incoming"

    @property
    def database(self) -> Path:
        return self.workdir / "var" / "semwatch.db"

    @property
    def log(self) -> Path:
        return self.workdir / "daemon.log"

    @property
    def config(self) -> Path:
        return self.workdir / "config.toml"


def _toml_str(path: Path | str) -> str:
    return json.dumps(str(path))  # a JSON string is a valid TOML basic string


# --- model --------------------------------------------------------------------------------------


def read_model(model_dir: Path) -> Manifest | None:
    """The model's verified manifest, or None where there is no usable model (missing, corrupt, edited)."""
    from semwatch.model.artifact import read_manifest

    try:
        return read_manifest(model_dir)
    except UserError:
        return None


def trained_on(manifest: Manifest, data_dir: Path) -> bool:
    """Whether the model was trained on `data_dir`: the same folder, or every image its split names is there
    (the manifest may hold a path relative to where training ran)."""
    trained, here = manifest.training.get("data_dir"), data_dir.resolve()
    if isinstance(trained, str) and Path(trained).is_absolute() and Path(trained).resolve() == here:
        return True
    rels = [rel for part in manifest.split.values() for rel in part]
    return bool(rels) and all((data_dir / rel).is_file() for rel in rels)


def _quick(settings: Settings) -> Settings:
    """Training settings for the demo model: few tiles per image, and a faster rate for few epochs."""
    return settings.replace(train=dataclasses.replace(settings.train, tiles_per_image=8, augment_copies=1,
                                                      learning_rate=1e-3))


def ensure_model(settings: Settings, data_dir: Path, workdir: Path, *, retrain: bool, say: Say) -> Path:
    """A model trained on `data_dir` with a recorded test split: reused if one exists, else quick-trained."""
    candidates = [] if retrain else [settings.model.path, workdir / "model"]
    for model_dir in candidates:
        manifest = read_model(model_dir)
        if manifest is not None and trained_on(manifest, data_dir):
            n = manifest.training.get("n_images", "?")
            say(f"[bold]Model:[/] reusing {model_dir} (trained on {n} images of {data_dir}).")
            return model_dir
    out = workdir / "model"
    say(f"[bold]Model:[/] no model trained on {data_dir} at {settings.model.path}: training a quick "
        f"demo model ({QUICK_IMAGES_PER_CLASS} images per class, {QUICK_EPOCHS} epochs; "
        "about half a minute on a 2-core CPU).\n"
        f"  It is for the demo only. For the real model run:\n  "
        + FULL_TRAIN_HINT.format(data=data_dir, model=settings.model.path))
    from semwatch.model.train import train_model

    if out.exists():
        shutil.rmtree(out)
    started = time.monotonic()
    result = train_model(data_dir, out, _quick(settings), max_images_per_class=QUICK_IMAGES_PER_CLASS,
                         epochs=QUICK_EPOCHS, progress=True)
    say(f"  trained {result.model_id[:12]} on {result.n_train} images in {time.monotonic() - started:.0f} s "
        f"({result.n_test} held out for the demo).")
    return out


# --- images -------------------------------------------------------------------------------------


def held_out(split: Split, data_dir: Path) -> list[Path]:
    """Images the model never trained on: its test split first, then images of `data_dir` in no split
    (a model trained on a subset, like the quick demo model, leaves many)."""
    from semwatch.model.train import IMAGE_SUFFIXES

    seen = {rel for part in split.values() for rel in part}
    test = [data_dir / rel for rel in split.get("test", [])]
    unseen = sorted(p for p in data_dir.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES
                    and not p.parent.name.startswith(".") and f"{p.parent.name}/{p.name}" not in seen)
    return [p for p in test if p.is_file()] + unseen


def choose_images(split: Split, data_dir: Path, class_map: Mapping[str, str], incoming: Path,
                  n: int, seed: int = 0) -> list[Drop]:
    """`n` held-out images, shuffled: the test split first, then unseen images, each taken round-robin
    over classes so that every class shows up."""
    rng = random.Random(seed)
    test = {data_dir / rel for rel in split.get("test", [])}
    pools: list[dict[str, list[Path]]] = [{}, {}]
    for source in held_out(split, data_dir):
        folder = source.parent.name
        pools[0 if source in test else 1].setdefault(class_map.get(folder, folder), []).append(source)
    if not any(pools):
        raise UserError(
            f"no held-out images under {data_dir}: the model was trained on all of them",
            ExitStatus.INPUT_FAILED,
        )
    picked: list[tuple[str, Path]] = []
    for pool in pools:
        for files in pool.values():
            rng.shuffle(files)
        while len(picked) < n and any(pool.values()):
            for name in rng.sample(sorted(pool), len(pool)):  # fewer images than classes: any classes
                if pool[name] and len(picked) < n:
                    picked.append((name, pool[name].pop()))
    rng.shuffle(picked)
    # One sample folder per class; a numbered name because file names repeat across class folders.
    return [Drop(source, name, incoming / f"sample-{name}" / f"{i:03d}_{source.name}")
            for i, (name, source) in enumerate(picked)]


def write_like_an_instrument(drop: Drop) -> None:
    """Copy under a temporary name in chunks, then rename; the sidecar the same way, after the image."""
    drop.target.parent.mkdir(parents=True, exist_ok=True)
    expected = drop.target.parent / "expected.txt"
    if not expected.exists():
        expected.write_text(drop.true_class + "\n", encoding="utf-8")
    pairs = [(drop.source, drop.target)]
    sidecar = Path(sidecar_path(str(drop.source)))
    if sidecar.is_file():
        pairs.append((sidecar, Path(sidecar_path(str(drop.target)))))
    for src, dst in pairs:
        tmp = dst.with_name(f".{dst.name}.part")
        with src.open("rb") as fin, tmp.open("wb") as fout:
            while chunk := fin.read(CHUNK):
                fout.write(chunk)
                fout.flush()
                time.sleep(0.01)  # a slow writer: the daemon must not read a half-written file
        tmp.replace(dst)


# --- daemon -------------------------------------------------------------------------------------


def write_config(settings: Settings, workdir: Path, model_dir: Path) -> Path:
    work = WorkPaths(workdir)
    text = f"""# Generated by `semwatch demo`: the daemon's config for the demo (paths inside {workdir}).
[watch]
folder = {_toml_str(work.incoming)}
settle_seconds = 1.0
rescan_seconds = 10.0
poll_interval_seconds = 0.5

[store]
database = {_toml_str(work.database)}
results_csv = {_toml_str(workdir / "var" / "results.csv")}

[model]
path = {_toml_str(model_dir.resolve())}
device = {_toml_str(settings.model.device)}

[report]
folder = {_toml_str(workdir / "reports")}
timezone = {_toml_str(settings.report.timezone)}
# The demo writes its report itself when it ends.
enabled = false

[samples]
key = "parent"

[logging]
level = "INFO"
"""
    work.config.write_text(text, encoding="utf-8")
    return work.config


def _fresh_workdir(workdir: Path) -> WorkPaths:
    """A fresh export folder, database, reports and log each run (the model is kept for the next run)."""
    work = WorkPaths(workdir)
    for stale in (work.incoming, workdir / "var", workdir / "reports", work.log):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    work.incoming.mkdir(parents=True)
    return work


def start_daemon(work: WorkPaths) -> subprocess.Popen[bytes]:
    """`python -m semwatch watch --plain` on the generated config, its output in the work folder's log."""
    with work.log.open("wb") as log_file:
        cmd = [sys.executable, "-m", "semwatch", "watch", "--plain", "--config", str(work.config)]
        return subprocess.Popen(cmd, cwd=work.workdir, stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def stop_daemon(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """SIGTERM, as systemd does; SIGKILL only if it does not stop in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


def _daemon_state(database: Path) -> str | None:
    if not database.is_file():
        return None
    try:
        conn = db.connect(database, readonly=True)
    except sqlite3.Error:
        return None
    try:
        row = conn.execute("SELECT state FROM daemon WHERE id = 1").fetchone()
        return str(row["state"]) if row is not None else None
    except sqlite3.Error:
        return None
    finally:
        conn.close()


def finished(database: Path, paths: Sequence[str]) -> dict[str, Verdict]:
    """The current verdicts of those `paths` that have a final status (not pending)."""
    if not database.is_file() or not paths:
        return {}
    conn = db.connect(database, readonly=True)
    try:
        marks = ",".join("?" * len(paths))
        rows = conn.execute(
            f"SELECT path, status, predicted_class, composition, state, confidence, error "
            f"FROM images WHERE current = 1 AND status != 'pending' AND path IN ({marks})", list(paths))
        return {r["path"]: Verdict(status=r["status"], predicted_class=r["predicted_class"],
                                   composition=r["composition"], state=r["state"],
                                   confidence=r["confidence"], error=r["error"]) for r in rows}
    except sqlite3.Error:
        return {}
    finally:
        conn.close()


def _sample_verdicts(database: Path) -> list[str]:
    conn = db.connect(database, readonly=True)
    try:
        return [str(r["verdict"]) for r in conn.execute("SELECT verdict FROM samples ORDER BY sample_id")]
    finally:
        conn.close()


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _wait_until_running(proc: subprocess.Popen[bytes], work: WorkPaths, say: Say) -> bool:
    """Until the daemon says `running` in its database; False (and why, with its log) if it never does."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while _daemon_state(work.database) != "running":
        if proc.poll() is not None:
            say(f"[red]the daemon exited (code {proc.returncode}) before it was ready:[/]\n{_tail(work.log)}")
            return False
        if time.monotonic() > deadline:
            say(f"[red]the daemon did not start within {START_TIMEOUT_S:.0f} s:[/]\n{_tail(work.log)}")
            return False
        time.sleep(0.2)
    return True


class _PlainProgress:
    """Without the live view: one line per image written and per verdict, each verdict once."""

    def __init__(self, database: Path, drops: Sequence[Drop], say: Say) -> None:
        self.database = database
        self.paths = [str(d.target) for d in drops]
        self.say = say
        self.reported: set[str] = set()

    def wrote(self, drop: Drop) -> None:
        self.say(f"  wrote {drop.target.relative_to(drop.target.parents[1])}")
        self.verdicts()

    def verdicts(self) -> None:
        for path, v in finished(self.database, self.paths).items():
            if path not in self.reported:
                self.reported.add(path)
                label = v.predicted_class or v.error or "-"
                conf = "" if v.confidence is None else f" {v.confidence:.2f}"
                self.say(f"  {Path(path).name}: {v.status} {label}{conf}")


def _feed(proc: subprocess.Popen[bytes], drops: Sequence[Drop], database: Path, *, interval: float,
          progress: _PlainProgress | None) -> None:
    """Drop the images at the instrument's pace, then wait (bounded) for every verdict."""
    for drop in drops:
        if proc.poll() is not None:
            return
        write_like_an_instrument(drop)
        if progress is not None:
            progress.wrote(drop)
        time.sleep(interval)
    paths = [str(d.target) for d in drops]
    finish_by = time.monotonic() + 60.0 + 5.0 * len(drops)
    while len(finished(database, paths)) < len(paths) and time.monotonic() < finish_by:
        if proc.poll() is not None:
            return
        if progress is not None:
            progress.verdicts()
        time.sleep(0.5)
    if progress is not None:
        progress.verdicts()


def run_with_daemon(proc: subprocess.Popen[bytes], drops: Sequence[Drop], demo_settings: Settings,
                    work: WorkPaths, *, interval: float, live: bool, console: Console) -> int:
    """The demo's middle: wait for the daemon, feed it, with the live view or plain progress lines."""
    if not _wait_until_running(proc, work, console.print):
        return ExitStatus.INPUT_FAILED
    if live:
        from semwatch.views.live import LiveView

        with LiveView(demo_settings, console):
            _feed(proc, drops, work.database, interval=interval, progress=None)
    else:
        _feed(proc, drops, work.database, interval=interval,
              progress=_PlainProgress(work.database, drops, console.print))
    if proc.poll() is not None:
        console.print(f"[red]the daemon exited unexpectedly (code {proc.returncode}):[/]\n{_tail(work.log)}")
        return ExitStatus.INPUT_FAILED
    return ExitStatus.OK


# --- summary ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    n_dropped: int
    n_done: int
    status: dict[str, int]
    accuracy: float | None  # correct class among all dropped images (unknown/failed count as wrong)
    accuracy_ok: float | None  # correct class among images with a verdict
    composition_accuracy: float | None
    state_accuracy: float | None
    sample_verdicts: dict[str, int]


@dataclass(frozen=True)
class _Judged:
    """One `ok` verdict against the image's true folder label."""

    correct: bool
    composition: bool
    state: bool


def _judge(drop: Drop, verdict: Verdict) -> _Judged:
    from semwatch.values import parse_class

    truth = parse_class(drop.true_class)
    composition = verdict.composition == truth.composition
    state = verdict.state == truth.state
    return _Judged(correct=verdict.predicted_class == drop.true_class or (composition and state),
                   composition=composition, state=state)


def _share(count: int, of: int) -> float | None:
    return count / of if of else None


def summarise(drops: Sequence[Drop], verdicts: Mapping[str, Verdict],
              sample_verdicts: Sequence[str]) -> Summary:
    """How the daemon did on the dropped images, against their true folder labels."""
    found = [(d, verdicts.get(str(d.target))) for d in drops]
    status = Counter(v.status if v is not None else "not processed" for _, v in found)
    judged = [_judge(d, v) for d, v in found if v is not None and v.status == "ok"]
    correct = sum(j.correct for j in judged)
    return Summary(
        n_dropped=len(drops), n_done=len(drops) - status["not processed"],
        status=dict(status),
        accuracy=_share(correct, len(drops)), accuracy_ok=_share(correct, len(judged)),
        composition_accuracy=_share(sum(j.composition for j in judged), len(judged)),
        state_accuracy=_share(sum(j.state for j in judged), len(judged)),
        sample_verdicts=dict(Counter(sample_verdicts)),
    )


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _print_results(say: Say, summary: Summary, report: ReportPaths, demo_settings: Settings,
                   work: WorkPaths) -> None:
    say("\n[bold]Results[/]")
    say(f"  database  {work.database}\n  CSV       {demo_settings.store.results_csv}\n"
        f"  report    {report.html}\n"
        f"            ({report.images_csv.name}, {report.samples_csv.name} beside it)")
    statuses = ", ".join(f"{v} {k}" for k, v in sorted(summary.status.items()))
    say(f"  images    {summary.n_done} of {summary.n_dropped} processed: {statuses}")
    say(f"  accuracy  {_pct(summary.accuracy)} of all images have the true class "
        f"({_pct(summary.accuracy_ok)} of those with a verdict; "
        f"composition {_pct(summary.composition_accuracy)}, state {_pct(summary.state_accuracy)})")
    verdicts = ", ".join(f"{v} {k}" for k, v in sorted(summary.sample_verdicts.items()))
    say(f"  samples   {verdicts} (one sample per class, expected class from its expected.txt)")
    say("\nNext: point \\[watch] folder in config.toml at the instrument's export folder and run "
        "`semwatch watch` (or install systemd/semwatch.service); `semwatch top` shows the dashboard.")


# --- the command --------------------------------------------------------------------------------


def run_demo(settings: Settings, *, data: Path | None, workdir: Path, images: int, interval: float,
             retrain: bool, plain: bool, out: Output) -> int:
    """`semwatch demo`: model, daemon, images, report and summary (the steps in the module docstring).

    INPUT_FAILED when the daemon failed or an image got no verdict."""
    console = Console(file=out.stdout, highlight=False, soft_wrap=not out.is_terminal)
    say: Say = console.print
    data_dir = (data or settings.data.ncm_dir).resolve()
    if not data_dir.is_dir():
        raise UserError(f"labelled data folder not found: {data_dir} (use --data or [data] ncm_dir)")
    work = _fresh_workdir(workdir.resolve())
    say(f"[bold]semwatch demo[/] in {work.workdir}\n"
        f"  The daemon will watch {work.incoming} like an SEM export folder; {images} held-out images "
        f"from {data_dir} will be written into it {interval:g} s apart.")

    model_dir = ensure_model(settings, data_dir, work.workdir, retrain=retrain, say=say)
    from semwatch.model.artifact import read_manifest

    split = read_manifest(model_dir).split
    drops = choose_images(split, data_dir, settings.train.class_map, work.incoming, images)
    if len(drops) < images:
        say(f"  (only {len(drops)} held-out images exist for this model; using all of them)")
    demo_settings = load_settings(write_config(settings, work.workdir, model_dir), environ={})

    say(f"[bold]Daemon:[/] python -m semwatch watch --config {work.config}   (log: {work.log})")
    proc = start_daemon(work)
    try:
        code = run_with_daemon(proc, drops, demo_settings, work, interval=interval,
                               live=console.is_terminal and not plain, console=console)
    finally:
        rc = stop_daemon(proc)
    if code != ExitStatus.OK:
        return code
    say(f"[bold]Daemon stopped[/] with SIGTERM (exit {rc}).")

    from semwatch.report.daily import write_report

    today = datetime.now(UTC).astimezone(ZoneInfo(demo_settings.report.timezone)).date()
    report = write_report(demo_settings, today)
    summary = summarise(drops, finished(work.database, [str(d.target) for d in drops]),
                        _sample_verdicts(work.database))
    _print_results(say, summary, report, demo_settings, work)
    if rc != ExitStatus.OK or summary.n_done != summary.n_dropped:
        return ExitStatus.INPUT_FAILED
    return ExitStatus.OK
