"""Daemon speed figures: throughput vs the bare model, latency, backlog, memory, idle CPU.

    nice -n 10 .venv/bin/python benchmarks/daemon_bench.py --model models/ncm [--images 200]
        [--memory-images 1000] [--backlog 10000] [--burst 500] [--idle-seconds 30]
        [--flood 10000] [--only throughput,latency,backlog,idle,burst,memory,flood]

Each figure runs the real daemon (`python -m semwatch watch`) as a subprocess on a temporary
folder filled from the shared NCM data (symlinks, or copies with a unique trailing byte string
where distinct contents are needed: the daemon reuses results for identical contents). Prints
one JSON object per measurement and a summary with the issue's targets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    from semwatch.model.classify import Classifier

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "daemon"))
sys.path.insert(0, str(REPO / "benchmarks"))

from daemonproc import Daemon, ncm_images, unique_copy  # noqa: E402 (benchmarks/ on the path above)


def throughput(model: Path, sources: list[Path], work: Path, images: int,
               rounds: int) -> list[dict[str, Any]]:
    """Bare model and daemon, alternating on fresh image sets (the machine's load varies; the
    daemon reuses results for identical contents, so every round uses other images).

    Bare: `Classifier.classify_paths` (parallel read + prepare, the daemon's batching engine) after
    loading.
    Daemon: already running with the model loaded; the clock starts when the round's files are
    dropped into its folder (old mtimes: no settle wait) and stops when the last result is in the
    database, so it includes event handling, hashing, SQLite, CSV and sample updates.
    """
    from semwatch.config import load_settings
    from semwatch.model.classify import Classifier

    clf = Classifier.load(model, load_settings(None))
    step = max(1, len(sources) // (images * (rounds + 1)))
    pool = sources[::step]
    clf.classify_paths(pool[-4:])  # warm-up
    folder = work / "tp-in"
    folder.mkdir()
    # The round's files are links to the shared data, outside the watch folder: a daemon refuses
    # those by default ([watch] follow_symlinks = "inside"), so the bench allows them.
    d = Daemon(work / "tp", model, folder, follow_symlinks="always")
    out: list[dict[str, Any]] = []
    try:
        d.start()
        for r in range(rounds):
            paths = pool[r * images : (r + 1) * images]
            t0 = time.monotonic()
            res = clf.classify_paths(paths)
            bare = len(paths) / (time.monotonic() - t0)
            network = _network_only(clf, paths)
            sub = folder / f"round{r}"
            sub.mkdir()
            t0 = time.monotonic()
            for i, p in enumerate(paths):
                (sub / f"{i:05d}.jpg").symlink_to(p)
            d.wait_count(f"path LIKE '{sub}/%' AND status != 'pending'", len(paths), 3600)
            daemon = len(paths) / (time.monotonic() - t0)
            failed = d.count(f"path LIKE '{sub}/%' AND status = 'failed'")
            if failed:
                raise SystemExit(f"throughput round {r}: the daemon failed {failed} image(s); see {d.log}")
            out.append({"bench": "throughput_round", "round": r, "images": len(paths),
                        "bare_images_per_s": round(bare, 3), "daemon_images_per_s": round(daemon, 3),
                        "ratio": round(daemon / bare, 3), "network_only_images_per_s": round(network, 3),
                        "ratio_vs_network_only": round(daemon / network, 3), "device": clf.device,
                        "bare_errors": sum(1 for x in res if isinstance(x, Exception))})
    finally:
        d.stop()
    return out


def _network_only(clf: Classifier, paths: list[Path]) -> float:
    """Images/s of the network alone through the daemon's batching engine (tiles prepared
    beforehand, untimed), run in a worker thread like the daemon's inference thread: the upper
    bound for any pipeline around it."""
    import threading

    from semwatch.model.engine import predict_images
    from semwatch.reading.micrograph import read_micrograph

    prepared = [clf.prepare(read_micrograph(p, clf.settings)) for p in paths]
    took: list[float] = []

    def run() -> None:
        t0 = time.monotonic()
        predict_images(clf, prepared)
        took.append(time.monotonic() - t0)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return len(paths) / took[0]


def latency(model: Path, sources: list[Path], work: Path, settle: float, repeats: int,
            mode: str) -> dict[str, Any]:
    folder = work / f"lat-{mode}-in"
    folder.mkdir()
    d = Daemon(work / f"lat-{mode}", model, folder, settle=settle, mode=mode)
    lat: list[float] = []
    try:
        d.start()
        time.sleep(2.0)
        for i in range(repeats):
            dst = folder / f"lat_{i}.jpg"
            data = sources[i % len(sources)].read_bytes() + i.to_bytes(8, "little")
            with open(dst, "wb") as fh:
                fh.write(data)
            t_written = time.monotonic()
            d.wait_count(f"path = '{dst}' AND status != 'pending'", 1, 60)
            lat.append(time.monotonic() - t_written)
            time.sleep(1.0)
    finally:
        d.stop()
    return {"bench": "latency", "mode": mode, "settle_seconds": settle, "repeats": repeats,
            "median_s": round(statistics.median(lat), 2), "max_s": round(max(lat), 2),
            "budget_s": settle + 2.0, "all": [round(x, 2) for x in lat]}


def backlog(model: Path, sources: list[Path], work: Path, n: int) -> dict[str, Any]:
    folder = work / "bl-in"
    for i in range(n):
        sub = folder / f"day{i // 500:03d}"
        if i % 500 == 0:
            sub.mkdir(parents=True)
        (sub / f"img_{i:05d}.jpg").symlink_to(sources[i % len(sources)])
    d = Daemon(work / "bl", model, folder, follow_symlinks="always")  # links to the shared data
    try:
        d.start()
        ready = time.monotonic()
        t1 = d.wait_count("1", n, 120)
    finally:
        d.stop()
    return {"bench": "backlog", "files": n, "listed_and_queued_s": round(t1 - d.started, 2),
            "after_running_s": round(t1 - ready, 2), "budget_s": 10.0}


def flood(model: Path, work: Path, n: int) -> dict[str, Any]:
    """A hostile flood: `n` empty `.tif` files dropped into a running daemon. Drain rate (files
    recorded failed per second, from the first file written to the last row), the daemon's CPU
    seconds and its log lines over the flood."""
    folder = work / "fl-in"
    folder.mkdir()
    d = Daemon(work / "fl", model, folder)
    try:
        d.start()
        assert d.proc is not None
        proc = psutil.Process(d.proc.pid)
        cpu0 = sum(proc.cpu_times()[:2])
        lines0 = len(d.log.read_bytes().splitlines())
        t0 = time.monotonic()
        for i in range(n):
            (folder / f"empty_{i:05d}.tif").write_bytes(b"")
        written = time.monotonic()
        t1 = d.wait_count("status = 'failed'", n, 600)
        cpu = sum(proc.cpu_times()[:2]) - cpu0
        time.sleep(11.0)  # the per-file summary line of the last interval
        lines = len(d.log.read_bytes().splitlines()) - lines0
    finally:
        d.stop()
    return {"bench": "flood", "files": n, "write_s": round(written - t0, 2), "drain_s": round(t1 - t0, 2),
            "files_per_s": round(n / (t1 - t0), 1), "daemon_cpu_s": round(cpu, 2), "log_lines": lines,
            "target_files_per_s": 200}


def memory(model: Path, sources: list[Path], work: Path, n: int) -> dict[str, Any]:
    folder = work / "mem-in"
    d = Daemon(work / "mem", model, folder, rescan_seconds=3600.0)
    folder.mkdir()
    samples: list[tuple[int, float]] = []
    try:
        d.start()
        assert d.proc is not None
        proc = psutil.Process(d.proc.pid)
        batch = 100
        for start in range(0, n, batch):
            for i in range(start, min(n, start + batch)):
                unique_copy(sources[i % len(sources)], folder / f"{i // 500:03d}" / f"m_{i:05d}.jpg", i)
            d.wait_count("status != 'pending'", min(n, start + batch), 3600)
            samples.append((min(n, start + batch), proc.memory_info().rss / 2**20))
            for i in range(start, min(n, start + batch)):  # keep the disk small; rows stay
                (folder / f"{i // 500:03d}" / f"m_{i:05d}.jpg").unlink()
    finally:
        d.stop()
    base = samples[min(1, len(samples) - 1)][1]
    return {"bench": "memory", "images": n, "rss_mb_after_first_200": round(base, 1),
            "rss_mb_end": round(samples[-1][1], 1), "growth_mb": round(samples[-1][1] - base, 1),
            "budget_mb": 50.0, "curve": [(k, round(v, 1)) for k, v in samples]}


def burst(model: Path, sources: list[Path], work: Path, n: int) -> dict[str, Any]:
    """n distinct files written at once into a running daemon: all processed, each exactly once."""
    folder = work / "burst-in"
    folder.mkdir()
    d = Daemon(work / "burst", model, folder, settle=0.5)
    try:
        d.start()
        t0 = time.monotonic()
        for i in range(n):
            unique_copy(sources[i % len(sources)], folder / f"b{i % 10}" / f"burst_{i:04d}.jpg", 10**6 + i)
        written = time.monotonic() - t0
        t1 = d.wait_count("status != 'pending'", n, 7200)
        rows = d.query("SELECT count(*), count(DISTINCT path), sum(current) FROM images")[0]
        csv_lines = len((d.root / "results.csv").read_text(encoding="utf-8").splitlines()) - 1
    finally:
        d.stop()
    return {"bench": "burst", "files": n, "write_s": round(written, 2), "all_done_s": round(t1 - t0, 1),
            "images_per_s": round(n / (t1 - t0), 3), "rows": rows[0], "distinct_paths": rows[1],
            "current_rows": rows[2], "csv_lines": csv_lines}


def idle_cpu(model: Path, work: Path, seconds: float, mode: str) -> dict[str, Any]:
    folder = work / f"idle-{mode}-in"
    folder.mkdir()
    for i in range(200):
        (folder / f"old_{i}.txt").write_text("x")  # files that are listed but never processed
    d = Daemon(work / f"idle-{mode}", model, folder, mode=mode)
    try:
        d.start()
        assert d.proc is not None
        time.sleep(3.0)
        proc = psutil.Process(d.proc.pid)
        c0 = proc.cpu_times()
        t0 = time.monotonic()
        time.sleep(seconds)
        c1 = proc.cpu_times()
        took = time.monotonic() - t0
    finally:
        d.stop()
    used = (c1.user - c0.user) + (c1.system - c0.system)
    return {"bench": "idle_cpu", "mode": mode, "seconds": round(took, 1),
            "cpu_percent": round(100 * used / took, 3), "budget_percent": 1.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    data_root = Path(os.environ.get("SEMWATCH_DATA", REPO.parent / "shared" / "data"))
    ap.add_argument("--data", type=Path, default=data_root / "ncm-sem")
    ap.add_argument("--images", type=int, default=60, help="images per throughput round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating bare/daemon throughput rounds")
    ap.add_argument("--memory-images", type=int, default=1000)
    ap.add_argument("--backlog", type=int, default=10000)
    ap.add_argument("--burst", type=int, default=500, help="distinct files dropped at once")
    ap.add_argument("--idle-seconds", type=float, default=30.0)
    ap.add_argument("--latency-repeats", type=int, default=5)
    ap.add_argument("--flood", type=int, default=10000, help="empty files dropped at once")
    ap.add_argument("--only", default="throughput,latency,backlog,idle,burst,memory,flood")
    args = ap.parse_args()
    which = set(args.only.split(","))
    sources = ncm_images(args.data)
    if not sources:
        raise SystemExit(f"no images under {args.data}")
    results: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="semwatch-bench-"))
    try:
        def report(r: dict[str, Any]) -> None:
            results.append(r)
            print(json.dumps(r), flush=True)

        if "throughput" in which:
            rounds = throughput(args.model, sources, work, args.images, args.rounds)
            for r in rounds:
                report(r)
            median = statistics.median(r["ratio"] for r in rounds)
            report({"bench": "throughput_ratio", "median_ratio": median, "target": 0.85})
        if "latency" in which:
            report(latency(args.model, sources, work, 2.0, args.latency_repeats, "inotify"))
            report(latency(args.model, sources, work, 2.0, args.latency_repeats, "polling"))
        if "backlog" in which:
            report(backlog(args.model, sources, work, args.backlog))
        if "idle" in which:
            report(idle_cpu(args.model, work, args.idle_seconds, "inotify"))
            report(idle_cpu(args.model, work, args.idle_seconds, "polling"))
        if "burst" in which:
            report(burst(args.model, sources, work, args.burst))
        if "memory" in which:
            report(memory(args.model, sources, work, args.memory_images))
        if "flood" in which:
            report(flood(args.model, work, args.flood))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
