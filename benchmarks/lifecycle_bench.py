"""The lifecycle scenario on the full shared data (issue 20), with `semwatch train`'s defaults:

    nice -n 10 .venv/bin/python benchmarks/lifecycle_bench.py [--left-out 523] [--labels 0.5] [--cold]
    benchmarks/avx2only/run .venv/bin/python benchmarks/lifecycle_bench.py --tag avx2   # AVX2 only

A champion trained on the class folders without one composition (all of its classes) serves a real
daemon; the composition's arriving images are classified (before: how many unknown, how many right);
an operator labels a share of them with their true class (`semwatch label --class`); then, timed from
the last label: `semwatch train DATA --labels`, `models register`, `models compare`, `models promote`;
the daemon switches and re-classifies the outdated results (after: right on the labelled and on the
unlabelled arriving images, i.e. the ones the challenger never saw). Every step is the CLI, as in
tests/test_lifecycle_scenario.py (the same scenario with tiny models). Split by image, seeded: of each
known class 80 % train, 20 % the evaluation folder; of each left-out class half arrives, half goes
to the evaluation folder. Writes benchmarks/results/<date>-lifecycle-<device>.json with the commit,
date and machine. A full training takes 5-20 minutes on 2 CPU cores: expect about an hour in all.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "daemon"))
sys.path.insert(0, str(REPO / "benchmarks"))


def semwatch(*args: object, config: Path, cwd: Path) -> str:
    """One CLI command (a subprocess, as an operator runs it); its stdout; fails loudly."""
    done = subprocess.run([sys.executable, "-m", "semwatch", *map(str, args), "--config", str(config)],
                          capture_output=True, text=True, cwd=cwd)
    if done.returncode != 0:
        raise SystemExit(f"semwatch {' '.join(map(str, args))}: exit {done.returncode}\n{done.stderr}")
    return done.stdout


def link(root: Path, cls: str, paths: list[Path]) -> None:
    (root / cls).mkdir(parents=True, exist_ok=True)
    for p in paths:
        (root / cls / p.name).symlink_to(p)
        if p.with_name(p.name + ".txt").exists():
            (root / cls / (p.name + ".txt")).symlink_to(p.with_name(p.name + ".txt"))


def current(database: Path) -> dict[str, dict[str, Any]]:
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return {r["path"]: dict(r) for r in conn.execute(
            "SELECT path, status, predicted_class, model_id FROM images WHERE current = 1")}
    finally:
        conn.close()


def wait(cond: Any, proc: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise SystemExit(f"the daemon exited {proc.returncode} while waiting: {what}")
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out: {what}")
        time.sleep(1.0)


def score(rows: dict[str, dict[str, Any]], truth: dict[Path, str]) -> dict[str, Any]:
    got = [rows.get(str(p), {}) for p in truth]
    right = sum(1 for r, t in zip(got, truth.values(), strict=True)
                if r.get("status") == "ok" and r.get("predicted_class") == t)
    unknown = sum(1 for r in got if r.get("status") == "unknown")
    return {"images": len(truth), "right": right, "unknown": unknown,
            "accuracy": round(right / len(truth), 4) if truth else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ncm-sem")
    parser.add_argument("--left-out", default="523", help="the composition the champion never sees")
    parser.add_argument("--labels", type=float, default=0.5, help="share of the arriving images labelled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cold", action="store_true",
                        help="empty the registry's feature and score caches before the challenger (the "
                             "worst case: a champion trained elsewhere, or a first retraining)")
    parser.add_argument("--tag", default="", help="suffix of the results file (e.g. avx2)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    from host import commit as host_commit
    from host import describe, summary
    from semwatch.values import parse_class

    rng = random.Random(args.seed)
    load_at_start = list(os.getloadavg())
    work = Path(tempfile.mkdtemp(prefix="lifecycle-bench-"))
    train_dir, eval_dir, incoming = work / "train", work / "eval", work / "incoming"
    arriving: dict[Path, str] = {}
    for folder in sorted(p for p in args.data.iterdir() if p.is_dir()):
        images = sorted(folder.glob("*.jpg"))
        rng.shuffle(images)
        if parse_class(folder.name).composition == args.left_out:
            half = len(images) // 2
            for p in images[:half]:
                dst = incoming / folder.name / p.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, dst)
                if p.with_name(p.name + ".txt").exists():
                    shutil.copyfile(p.with_name(p.name + ".txt"), dst.with_name(dst.name + ".txt"))
                arriving[dst] = folder.name
            link(eval_dir, folder.name, images[half:])
        else:
            cut = round(len(images) * 0.8)
            link(train_dir, folder.name, images[:cut])
            link(eval_dir, folder.name, images[cut:])
    # Every image whose running share crosses a whole number is labelled: the share, spread evenly.
    labelled = {p: c for i, (p, c) in enumerate(sorted(arriving.items()))
                if int((i + 1) * args.labels) > int(i * args.labels)}
    unlabelled = {p: c for p, c in arriving.items() if p not in labelled}
    incoming_live = work / "watch"
    incoming_live.mkdir()
    database = work / "semwatch.db"
    config = work / "config.toml"
    config.write_text(
        f"[watch]\nfolder = {json.dumps(str(incoming_live))}\nsettle_seconds = 0.5\n"
        f"[store]\ndatabase = {json.dumps(str(database))}\n"
        f"results_csv = {json.dumps(str(work / 'results.csv'))}\n"
        f"[model]\npath = {json.dumps(str(work / 'model-a'))}\n"
        f"registry = {json.dumps(str(work / 'registry'))}\n"
        f"reprocess_outdated = true\n[report]\nenabled = false\n"
        f"[lifecycle]\neval_folder = {json.dumps(str(eval_dir))}\n", encoding="utf-8")
    timings: dict[str, float] = {}
    t = time.monotonic()
    semwatch("train", train_dir, "--out", work / "model-a", config=config, cwd=work)
    timings["train_champion_s"] = round(time.monotonic() - t, 1)
    semwatch("models", "register", work / "model-a", "--alias", "champion", config=config, cwd=work)
    log = open(work / "daemon.log", "ab")  # noqa: SIM115 (open for the daemon's whole life)
    proc = subprocess.Popen([sys.executable, "-m", "semwatch", "watch", "--config", str(config), "--plain"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=work)
    try:
        moved = {}
        for p in arriving:  # into the watched folder, as an export would
            dst = incoming_live / p.relative_to(incoming)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if p.with_name(p.name + ".txt").exists():
                shutil.copyfile(p.with_name(p.name + ".txt"), dst.with_name(dst.name + ".txt"))
            shutil.copyfile(p, dst)
            moved[p] = dst
        arriving = {moved[p]: c for p, c in arriving.items()}
        labelled = {moved[p]: c for p, c in labelled.items()}
        unlabelled = {moved[p]: c for p, c in unlabelled.items()}
        wait(lambda: all(r["status"] != "pending" for r in current(database).values())
             and len(current(database)) == len(arriving), proc, "the arriving images", 3600)
        before = {"all": score(current(database), arriving), "labelled": score(current(database), labelled),
                  "unlabelled": score(current(database), unlabelled)}
        print(json.dumps({"before": before}), flush=True)
        for cls in sorted(set(labelled.values())):
            semwatch("label", *[p for p, c in labelled.items() if c == cls], "--class", cls, "--by", "bench",
                     config=config, cwd=work)
        if args.cold:
            for cache in (".feature-cache", ".gate-scores"):
                shutil.rmtree(work / "registry" / cache, ignore_errors=True)
        t0 = time.monotonic()
        semwatch("train", train_dir, "--labels", "--out", work / "model-b", config=config, cwd=work)
        timings["train_challenger_s"] = round(time.monotonic() - t0, 1)
        semwatch("models", "register", work / "model-b", config=config, cwd=work)
        t = time.monotonic()
        compared = json.loads(
            semwatch("models", "compare", "--json", config=config, cwd=work).splitlines()[-1])
        timings["compare_s"] = round(time.monotonic() - t, 1)
        t = time.monotonic()
        semwatch("models", "promote", "--by", "bench", config=config, cwd=work)
        timings["promote_s"] = round(time.monotonic() - t, 1)
        timings["last_label_to_promoted_s"] = round(time.monotonic() - t0, 1)
        b = json.loads(semwatch("models", "show", "champion", "--json", config=config, cwd=work)
                       .splitlines()[-1]).get("model_id")
        t = time.monotonic()
        wait(lambda: all(r["model_id"] == b for r in current(database).values()), proc,
             "re-classification with the challenger", 3600)
        timings["reclassified_s"] = round(time.monotonic() - t, 1)
        after = {"all": score(current(database), arriving), "labelled": score(current(database), labelled),
                 "unlabelled": score(current(database), unlabelled)}
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
    commit = host_commit()
    result = {"bench": "lifecycle", "commit": commit, "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": describe(), "machine_summary": summary(),
              "load_average": {"start": load_at_start, "end": list(os.getloadavg())},
              "left_out": args.left_out, "labelled_share": args.labels, "seed": args.seed,
              "caches": "emptied before the challenger" if args.cold else "as the champion left them",
              "arriving": len(arriving), "labelled": len(labelled), "timings": timings,
              "before": before, "after": after,
              "gate": {k: compared.get(k) for k in ("decision", "champion", "challenger")}, "work": str(work)}
    args.out.mkdir(parents=True, exist_ok=True)
    device = "gpu" if result["machine"]["gpu"] else "cpu"
    tag = "".join(f"-{t}" for t in (args.tag, "cold" if args.cold else "") if t)
    path = args.out / f"{datetime.now(UTC).date()}-lifecycle-{args.left_out}-{device}{tag}.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({"timings": timings, "before": before["all"], "after": after["all"]}))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
