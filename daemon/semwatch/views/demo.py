"""`semwatch demo`: the whole product end to end, for a first-time user, in a few minutes on a CPU.

1. a model: the one at `[model] path` if it was trained on the demo's data, else a quick one
   trained now (few images per class; the full training command is printed);
2. the daemon (`python -m semwatch watch`) as a subprocess, on an export folder inside `--workdir`,
   with a generated config that keeps the database, CSV and reports there too;
3. held-out (test-split) images dropped into the export folder at an instrument's pace, written the
   way instrument software writes them (a temporary name, in chunks, then a rename; sidecar too),
   one sample folder per class with an `expected.txt`, while the live view shows the database;
4. SIGTERM to the daemon, the day's report, and a summary against the true folder labels.
"""

from __future__ import annotations

import argparse
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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from rich.console import Console

from semwatch.config import Settings, load_settings
from semwatch.errors import ExitStatus, UserError
from semwatch.store import db

QUICK_IMAGES_PER_CLASS = 10
QUICK_EPOCHS = 15
QUICK_TRAIN = {"tiles_per_image": 8, "augment_copies": 1, "learning_rate": 1e-3}  # few epochs: a faster rate
CHUNK = 256 * 1024
START_TIMEOUT_S = 120.0
FULL_TRAIN_HINT = ("semwatch train {data} --out {model}   "
                   "(the 737 shared NCM images: about 12 min on a 2-core CPU)")


@dataclass(frozen=True)
class Drop:
    """One held-out image and where the demo puts it."""

    source: Path
    true_class: str
    target: Path


def _toml_str(path: Path | str) -> str:
    return json.dumps(str(path))  # a JSON string is a valid TOML basic string


# --- model --------------------------------------------------------------------------------------


def _manifest(model_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((model_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _trained_on(manifest: dict[str, Any], data_dir: Path) -> bool:
    """Whether the model was trained on `data_dir`: the same folder, or every image its split names is there
    (the manifest may hold a path relative to where training ran)."""
    trained = manifest.get("training", {}).get("data_dir")
    if trained and Path(trained).is_absolute() and Path(trained).resolve() == data_dir.resolve():
        return True
    rels = [rel for part in manifest.get("split", {}).values() for rel in part]
    return bool(rels) and all((data_dir / rel).is_file() for rel in rels)


def ensure_model(settings: Settings, data_dir: Path, workdir: Path, *, retrain: bool,
                 say: Any) -> Path:
    """A model trained on `data_dir` with a recorded test split: reused if one exists, else quick-trained."""
    candidates = [] if retrain else [settings.model.path, workdir / "model"]
    for model_dir in candidates:
        manifest = _manifest(model_dir)
        if manifest is not None and _trained_on(manifest, data_dir):
            n = manifest.get("training", {}).get("n_images", "?")
            say(f"[bold]Model:[/] reusing {model_dir} (trained on {n} images of {data_dir}).")
            return model_dir
    out = workdir / "model"
    say(f"[bold]Model:[/] no model trained on {data_dir} at {settings.model.path}: training a quick "
        f"demo model ({QUICK_IMAGES_PER_CLASS} images per class, {QUICK_EPOCHS} epochs; "
        "about half a minute on a 2-core CPU).\n"
        f"  It is for the demo only. For the real model run:\n  "
        + FULL_TRAIN_HINT.format(data=data_dir, model=settings.model.path))
    from semwatch.model.train import train_model

    quick = settings.replace(train=_replace(settings.train, **QUICK_TRAIN))
    if out.exists():
        shutil.rmtree(out)
    started = time.monotonic()
    result = train_model(data_dir, out, quick, max_images_per_class=QUICK_IMAGES_PER_CLASS,
                         epochs=QUICK_EPOCHS, progress=True)
    say(f"  trained {result.model_id[:12]} on {result.n_train} images in {time.monotonic() - started:.0f} s "
        f"({result.n_test} held out for the demo).")
    return out


def _replace(section: Any, **values: Any) -> Any:
    import dataclasses

    return dataclasses.replace(section, **values)


# --- images -------------------------------------------------------------------------------------


def held_out(manifest: dict[str, Any], data_dir: Path) -> list[Path]:
    """Images the model never trained on: its test split first, then images of `data_dir` in no split
    (a model trained on a subset, like the quick demo model, leaves many)."""
    from semwatch.model.train import IMAGE_SUFFIXES

    split = manifest.get("split", {})
    seen = {rel for part in split.values() for rel in part}
    test = [data_dir / rel for rel in split.get("test", [])]
    unseen = sorted(p for p in data_dir.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES
                    and not p.parent.name.startswith(".") and f"{p.parent.name}/{p.name}" not in seen)
    return [p for p in test if p.is_file()] + unseen


def choose_images(manifest: dict[str, Any], data_dir: Path, class_map: dict[str, str], incoming: Path,
                  n: int, seed: int = 0) -> list[Drop]:
    """`n` held-out images, shuffled: the test split first, then unseen images, each taken round-robin
    over classes so that every class shows up."""
    rng = random.Random(seed)
    test = {data_dir / rel for rel in manifest.get("split", {}).get("test", [])}
    pools: list[dict[str, list[Path]]] = [{}, {}]
    for source in held_out(manifest, data_dir):
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
    drops = []
    for i, (name, source) in enumerate(picked):
        # One sample folder per class; a numbered name because file names repeat across class folders.
        target = incoming / f"sample-{name}" / f"{i:03d}_{source.name}"
        drops.append(Drop(source, name, target))
    return drops


def write_like_an_instrument(drop: Drop) -> None:
    """Copy under a temporary name in chunks, then rename; the sidecar the same way, after the image."""
    drop.target.parent.mkdir(parents=True, exist_ok=True)
    expected = drop.target.parent / "expected.txt"
    if not expected.exists():
        expected.write_text(drop.true_class + "\n", encoding="utf-8")
    pairs = [(drop.source, drop.target)]
    sidecar = drop.source.with_name(drop.source.name + ".txt")
    if sidecar.is_file():
        pairs.append((sidecar, drop.target.with_name(drop.target.name + ".txt")))
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
    config = workdir / "config.toml"
    text = f"""# Generated by `semwatch demo`: the daemon's config for the demo (paths inside {workdir}).
[watch]
folder = {_toml_str(workdir / "incoming")}
settle_seconds = 1.0
rescan_seconds = 10.0
poll_interval_seconds = 0.5

[store]
database = {_toml_str(workdir / "var" / "semwatch.db")}
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
    config.write_text(text, encoding="utf-8")
    return config


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


def _finished(database: Path, paths: list[str]) -> dict[str, dict[str, Any]]:
    """Current rows of `paths` with a final status."""
    if not database.is_file() or not paths:
        return {}
    conn = db.connect(database, readonly=True)
    try:
        marks = ",".join("?" * len(paths))
        rows = conn.execute(
            f"SELECT path, status, predicted_class, composition, state, confidence, sample_id, error "
            f"FROM images WHERE current = 1 AND status != 'pending' AND path IN ({marks})", paths)
        return {r["path"]: dict(r) for r in rows}
    except sqlite3.Error:
        return {}
    finally:
        conn.close()


def _samples(database: Path) -> list[dict[str, Any]]:
    conn = db.connect(database, readonly=True)
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM samples ORDER BY sample_id")]
    finally:
        conn.close()


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
    except OSError:
        return ""


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


def summarise(drops: list[Drop], rows: dict[str, dict[str, Any]], samples: list[dict[str, Any]]) -> Summary:
    from semwatch.values import parse_class

    status: Counter[str] = Counter()
    correct = comp = state = n_ok = 0
    for d in drops:
        row = rows.get(str(d.target))
        if row is None:
            status["not processed"] += 1
            continue
        status[row["status"]] += 1
        if row["status"] != "ok":
            continue
        n_ok += 1
        truth = parse_class(d.true_class)
        correct += row["predicted_class"] == d.true_class or (
            row["composition"] == truth.composition and row["state"] == truth.state)
        comp += row["composition"] == truth.composition
        state += row["state"] == truth.state
    n = len(drops)
    return Summary(
        n_dropped=n, n_done=sum(v for k, v in status.items() if k != "not processed"), status=dict(status),
        accuracy=correct / n if n else None, accuracy_ok=correct / n_ok if n_ok else None,
        composition_accuracy=comp / n_ok if n_ok else None, state_accuracy=state / n_ok if n_ok else None,
        sample_verdicts=dict(Counter(s["verdict"] for s in samples)),
    )


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


# --- the command --------------------------------------------------------------------------------


def demo_command(args: argparse.Namespace, settings: Settings) -> int:
    console = Console(highlight=False, soft_wrap=not sys.stdout.isatty())
    say = console.print
    data_dir = (args.data or settings.data.ncm_dir).resolve()
    if not data_dir.is_dir():
        raise UserError(f"labelled data folder not found: {data_dir} (use --data or [data] ncm_dir)")
    if args.images < 1 or args.interval < 0:
        raise UserError("--images must be >= 1 and --interval >= 0")
    workdir = args.workdir.resolve()
    incoming, database = workdir / "incoming", workdir / "var" / "semwatch.db"
    # A fresh export folder, database and reports each run (the model is kept for the next run).
    for stale in (incoming, workdir / "var", workdir / "reports", workdir / "daemon.log"):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    incoming.mkdir(parents=True)
    say(f"[bold]semwatch demo[/] in {workdir}\n"
        f"  The daemon will watch {incoming} like an SEM export folder; {args.images} held-out images "
        f"from {data_dir} will be written into it {args.interval:g} s apart.")

    model_dir = ensure_model(settings, data_dir, workdir, retrain=args.retrain, say=say)
    manifest = _manifest(model_dir)
    assert manifest is not None
    drops = choose_images(manifest, data_dir, settings.train.class_map, incoming, args.images)
    if len(drops) < args.images:
        say(f"  (only {len(drops)} held-out images exist for this model; using all of them)")
    config = write_config(settings, workdir, model_dir)
    demo_settings = load_settings(config, environ={})

    log_path = workdir / "daemon.log"
    say(f"[bold]Daemon:[/] python -m semwatch watch --config {config}   (log: {log_path})")
    with log_path.open("wb") as log_file:
        cmd = [sys.executable, "-m", "semwatch", "watch", "--plain", "--config", str(config)]
        proc = subprocess.Popen(cmd, cwd=workdir, stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        code = _run_with_daemon(proc, drops, demo_settings, database, log_path, args, console)
    finally:
        rc = stop_daemon(proc)
    if code:
        return code
    say(f"[bold]Daemon stopped[/] with SIGTERM (exit {rc}).")

    from semwatch.report.daily import write_report

    today = datetime.now(UTC).astimezone(ZoneInfo(demo_settings.report.timezone)).date()
    report = write_report(demo_settings, today)
    rows = _finished(database, [str(d.target) for d in drops])
    summary = summarise(drops, rows, _samples(database))
    say("\n[bold]Results[/]")
    say(f"  database  {database}\n  CSV       {demo_settings.store.results_csv}\n"
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
    if rc != 0:
        return 1
    return 0 if summary.n_done == summary.n_dropped else 1


def _run_with_daemon(proc: subprocess.Popen[bytes], drops: list[Drop], demo_settings: Settings,
                     database: Path, log_path: Path, args: argparse.Namespace, console: Console) -> int:
    say = console.print
    deadline = time.monotonic() + START_TIMEOUT_S
    while _daemon_state(database) != "running":
        if proc.poll() is not None:
            say(f"[red]the daemon exited (code {proc.returncode}) before it was ready:[/]\n{_tail(log_path)}")
            return 1
        if time.monotonic() > deadline:
            say(f"[red]the daemon did not start within {START_TIMEOUT_S:.0f} s:[/]\n{_tail(log_path)}")
            return 1
        time.sleep(0.2)

    live_view = console.is_terminal and not args.plain
    view = None
    if live_view:
        from semwatch.views.live import LiveView

        view = LiveView(demo_settings, console)
        view.start()
    paths = [str(d.target) for d in drops]
    reported: set[str] = set()

    def plain_progress() -> None:
        for path, row in _finished(database, paths).items():
            if path not in reported:
                reported.add(path)
                label = row["predicted_class"] or row["error"] or "-"
                conf = "" if row["confidence"] is None else f" {row['confidence']:.2f}"
                console.print(f"  {Path(path).name}: {row['status']} {label}{conf}")

    try:
        for drop in drops:
            if proc.poll() is not None:
                break
            write_like_an_instrument(drop)
            if not live_view:
                console.print(f"  wrote {drop.target.relative_to(drop.target.parents[1])}")
                plain_progress()
            time.sleep(args.interval)
        finish_by = time.monotonic() + 60.0 + 5.0 * len(drops)
        while len(_finished(database, paths)) < len(paths) and time.monotonic() < finish_by:
            if proc.poll() is not None:
                break
            if not live_view:
                plain_progress()
            time.sleep(0.5)
        if not live_view:
            plain_progress()
    finally:
        if view is not None:
            view.stop()
    if proc.poll() is not None:
        say(f"[red]the daemon exited unexpectedly (code {proc.returncode}):[/]\n{_tail(log_path)}")
        return 1
    return 0
