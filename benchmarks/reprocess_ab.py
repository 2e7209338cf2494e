"""`semwatch reprocess FOLDER --engine local` throughput of two checkouts on the same machine, runs
interleaved (A, B, A, B, ...) so that the load of other work falls alike on both.

    nice -n 10 .venv/bin/python benchmarks/reprocess_ab.py --a /tmp/before --b . --folder ARCHIVE \\
        --model MODEL [--rounds 2] [--out NAME]

Each run is the real command (`python -m semwatch reprocess`, a process of its own with the
checkout's `daemon/` first on PYTHONPATH) ingesting FOLDER into a fresh database; the figure is
images classified per second of wall-clock time, start-up (imports, model load) included, and the
load average around it. Settings are small on purpose ([tiling] max_tiles 6, one test-time view) so
that a run takes about a minute on two loaded cores: the comparison is of the command's path, not of
the network. Writes benchmarks/results/<date>-<out>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import host  # benchmarks/host.py: the machine, for the results file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "daemon"))  # host.py reads the machine through semwatch


def one(checkout: Path, folder: Path, model: Path) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="reprocess-ab-"))
    cfg = work / "config.toml"
    cfg.write_text(f'[watch]\nfolder = "{work / "incoming"}"\n[store]\ndatabase = "{work / "s.db"}"\n'
                   f'results_csv = "{work / "r.csv"}"\n[model]\npath = "{model}"\ndevice = "cpu"\n'
                   'test_time_views = 1\n[tiling]\nmax_tiles = 6\n[report]\nenabled = false\n',
                   encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(checkout / "daemon")}
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "semwatch", "reprocess", str(folder), "--config", str(cfg),
                           "--json"], capture_output=True, text=True, env=env, cwd=work, check=False)
    wall = time.perf_counter() - t0
    summary = next(json.loads(x) for x in done.stdout.splitlines() if '"summary"' in x)
    return {"checkout": str(checkout), "status": done.returncode, "classified": summary["classified"],
            "wall_s": round(wall, 2), "images_per_s": round(summary["classified"] / wall, 3),
            "load_before": [round(x, 2) for x in load0], "load_after": [round(x, 2) for x in os.getloadavg()]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", type=Path, required=True)
    ap.add_argument("--b", type=Path, default=ROOT)
    ap.add_argument("--folder", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="reprocess-ab")
    args = ap.parse_args()
    runs = []
    for _ in range(args.rounds):
        for label, checkout in (("a", args.a), ("b", args.b)):
            r = {"run": label, **one(checkout.resolve(), args.folder.resolve(), args.model.resolve())}
            print(json.dumps(r), flush=True)
            runs.append(r)
    mean = {k: round(sum(float(r["images_per_s"]) for r in runs if r["run"] == k)  # type: ignore[arg-type]
                     / args.rounds, 3) for k in ("a", "b")}
    commit = host.commit()
    record = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "commit": commit,
              "machine": host.summary(), "a": str(args.a), "b": str(args.b), "folder": str(args.folder),
              "runs": runs, "mean_images_per_s": mean,
              "note": "wall-clock incl. start-up; [tiling] max_tiles 6, test_time_views 1; machine shared"}
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    out = ROOT / "benchmarks" / "results" / f"{day}-{args.out}.json"
    out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
