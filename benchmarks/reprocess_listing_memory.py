"""Driver memory of `semwatch reprocess FOLDER` for a 1,000,000-file archive: the listing and the work
list, streamed (now) against held whole (how `reprocess` worked before: a list of every work item,
and for Ray one pandas block of 4 items each, all built in the driver before the first result).

    nice -n 10 .venv/bin/python benchmarks/reprocess_listing_memory.py [--files 1000000] [--tree /tmp/x]

What runs is the real code: `reading.listing.scan` over a generated tree of zero-byte `.jpg` files
(1,000 folders of 1,000; created once and reused with --tree), each file looked up in an empty
ledger (`run._archive_items`, the work list `reprocess` hands to the engines), then what each
engine's driver does with the stream: the local engine pulls items one by one (`read_bounded`
keeps a bounded number in flight), the Ray engine cuts them into `ray_engine.CHUNK_ITEMS` chunks of
pandas blocks (Ray itself is not started: the blocks are what the driver builds). No file is read
or classified: this measures the driver's work list, not the network. Each mode runs in a process
of its own; the figure is its peak resident memory (VmHWM) above the same process after its
imports. Writes benchmarks/results/<date>-reprocess-listing-memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import host  # benchmarks/host.py: the machine, for the results file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "daemon"))
PER_FOLDER = 1000


def make_tree(tree: Path, files: int) -> float:
    """`files` zero-byte images in folders of PER_FOLDER; seconds taken (0 if already there)."""
    marker = tree / f".complete-{files}"
    if marker.exists():
        return 0.0
    t0 = time.perf_counter()
    for i in range(0, files, PER_FOLDER):
        folder = tree / f"d{i // PER_FOLDER:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(i, min(i + PER_FOLDER, files)):
            os.close(os.open(folder / f"img{j:07d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))
    marker.touch()
    return time.perf_counter() - t0


def rss_mb() -> float:
    """This process's peak resident memory so far: VmHWM, which starts afresh at exec (getrusage's
    ru_maxrss keeps the forking parent's peak: a child of a 220 MB parent starts "at" 220 MB)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(mode: str, tree: Path) -> dict[str, object]:
    """In this process: the work list for `tree` handled as `mode` does; memory and time."""
    import itertools

    import pandas as pd

    from semwatch.config import load_settings
    from semwatch.reprocess import ray_engine
    from semwatch.reprocess.run import _archive_items
    from semwatch.store.ledger import open_store

    work = Path(tempfile.mkdtemp(prefix="listing-memory-"))
    settings = load_settings(None, environ={}, overrides={
        "watch": {"folder": str(work / "incoming")},
        "store": {"database": str(work / "s.db"), "results_csv": str(work / "results.csv")}})
    store = open_store(settings)
    refused: list[object] = []
    base = rss_mb()
    t0 = time.perf_counter()
    items = _archive_items(store, settings, [tree], "model", refused)  # type: ignore[arg-type]
    count = blocks = 0
    try:
        if mode == "stream-local":  # the local engine's driver: one item at a time
            for _ in items:
                count += 1
        elif mode == "stream-ray":  # the Ray engine's driver: one chunk of blocks at a time
            while chunk := list(itertools.islice(items, ray_engine.CHUNK_ITEMS)):
                built = [pd.DataFrame({"item": chunk[i : i + ray_engine.ITEMS_PER_BLOCK]})
                         for i in range(0, len(chunk), ray_engine.ITEMS_PER_BLOCK)]
                count += len(chunk)
                blocks += len(built)
                del built
        elif mode == "whole-list":  # before: `reprocess` held its whole work list (local engine)
            held = list(items)
            count = len(held)
        elif mode == "whole-ray":  # before: the list, and every block of it built at once (Ray)
            held = list(items)
            built = [pd.DataFrame({"item": held[i : i + ray_engine.ITEMS_PER_BLOCK]})
                     for i in range(0, len(held), ray_engine.ITEMS_PER_BLOCK)]
            count, blocks = len(held), len(built)
        else:
            raise SystemExit(f"unknown mode {mode}")
    finally:
        store.close()
    seconds = time.perf_counter() - t0
    peak = rss_mb()
    return {"mode": mode, "items": count, "blocks": blocks, "seconds": round(seconds, 1),
            "rss_after_imports_mb": round(base, 1), "peak_rss_mb": round(peak, 1),
            "peak_above_imports_mb": round(peak - base, 1),
            "load_after": [round(x, 2) for x in os.getloadavg()]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=1_000_000)
    ap.add_argument("--tree", type=Path, default=Path(tempfile.gettempdir()) / "semwatch-listing-1m")
    ap.add_argument("--modes", default="stream-local,stream-ray,whole-list,whole-ray")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # a child process: one mode
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.tree)))
        return 0
    made = make_tree(args.tree, args.files)
    commit = host.commit()
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    out = ROOT / "benchmarks" / "results" / f"{day}-reprocess-listing-memory.json"
    runs: list[dict[str, object]] = []
    for mode in args.modes.split(","):
        done = subprocess.run([sys.executable, __file__, "--tree", str(args.tree), "--one", mode],
                              capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), flush=True)
        record = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "commit": commit,
                  "machine": host.summary(), "files": args.files, "per_folder": PER_FOLDER,
                  "tree_created_s": round(made, 1), "runs": runs,
                  "note": "zero-byte files, empty ledger; the driver's work list only (nothing read or "
                          "classified); peak RSS per mode in its own process; the machine was shared"}
        out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")  # after each mode
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
