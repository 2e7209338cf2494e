"""`semwatch reprocess` throughput: the bare classifier, the local engine, Ray (private local Ray) and
a real two-node Ray cluster on this machine, each ingesting the same archive into a fresh database.

    nice -n 10 .venv/bin/python benchmarks/reprocess_bench.py --model /tmp/bench/ncm \\
        [--folders 811,523,333,622,811_cycled] [--order bare,local,ray,cluster,ray,local] [--out NAME]

Every engine run is the real command path (`reprocess.run.reprocess` with a fresh database and
results.csv), timed two ways: `wall` from the call to its return (planning, engine start-up: Ray's
start and the model actors' loading included) and `run` from the engine being ready to its last
outcome. The bare classifier is the network alone on the same images' tiles (read and tiled
beforehand, untimed), in the groups the engines form, like `semwatch bench`'s bare side. Other
work on this machine changes its speed: the runs are interleaved (local, ray, cluster, ray, local:
drift over time falls alike on each engine's mean) and each
figure carries the load average at its start and end. The two-node cluster is started here
(`ray start --head --num-cpus=1` and a second `ray start --address=... --num-cpus=1`, loopback
only) and stopped after, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "daemon"))

if TYPE_CHECKING:
    from semwatch.config import Settings
    from semwatch.reprocess.run import Engine
    from semwatch.reprocess.work import Outcome, WorkItem

DEFAULT_FOLDERS = "811,523,333,622,811_cycled"  # 516 of the 737 NCM images


class Timed:
    """An engine wrapped to note when it was ready and when its last outcome came."""

    def __init__(self, inner: Engine, ready: float) -> None:
        self.inner, self.ready, self.last, self.count = inner, ready, 0.0, 0
        self.name, self.model_id, self.device = inner.name, inner.model_id, inner.device

    def run(self, items: Iterable[WorkItem]) -> Iterator[Outcome]:
        for outcome in self.inner.run(items):
            self.count += 1
            self.last = time.perf_counter()
            yield outcome

    def close(self) -> None:
        self.inner.close()


def settings_for(work: Path, model: Path, scale: dict[str, object],
                 model_keys: dict[str, object] | None = None) -> Settings:
    from semwatch.config import load_settings

    return load_settings(None, environ={}, overrides={
        "watch": {"folder": str(work / "incoming")},
        "store": {"database": str(work / "semwatch.db"), "results_csv": str(work / "results.csv")},
        "report": {"folder": str(work / "reports")},
        "model": {"path": str(model), "device": "cpu", **(model_keys or {})},
        "scale": scale,
    })


def engine_run(kind: str, folders: list[Path], model: Path, scale: dict[str, object],
               model_keys: dict[str, object] | None = None) -> dict[str, object]:
    """One `reprocess` of `folders` into a fresh database with engine `kind` ("local" or "ray")."""
    import io

    from semwatch.output import Output
    from semwatch.reprocess import run as rp
    from semwatch.store.db import connect

    work = Path(tempfile.mkdtemp(prefix=f"reprocess-bench-{kind}-"))
    timed: list[Timed] = []
    make = rp._engine

    def engine(name: rp.EngineName, settings: Settings, model_dir: Path) -> Engine:
        t = Timed(make(name, settings, model_dir), ready=time.perf_counter())
        timed.append(t)
        return t

    rp._engine = engine  # the bench's timing hook, nothing else changes
    load0 = os.getloadavg()
    try:
        settings = settings_for(work, model, scale, model_keys)
        t0 = time.perf_counter()
        status = rp.reprocess(settings, rp.ReprocessRequest(folders=tuple(folders), engine=kind),  # type: ignore[arg-type]
                              out=Output(json=True, stdout=io.StringIO(), stderr=sys.stderr))
        wall = time.perf_counter() - t0
        conn = connect(settings.store.database)
        try:
            rows = conn.execute("SELECT count(*), count(DISTINCT path) FROM images WHERE current = 1 "
                                "AND status != 'failed'").fetchone()
        finally:
            conn.close()
        csv_lines = sum(1 for _ in settings.store.results_csv.open(encoding="utf-8")) - 1
    finally:
        rp._engine = make
        shutil.rmtree(work, ignore_errors=True)
    t = timed[0]
    return {"engine": kind, "device": t.device, "status": int(status), "images": t.count,
            "current_rows": rows[0], "distinct_paths": rows[1], "csv_lines": csv_lines,
            "wall_s": round(wall, 2), "run_s": round(t.last - t.ready, 2),
            "startup_s": round(wall - (t.last - t.ready), 2),
            "images_per_s": round(t.count / (t.last - t.ready), 3),
            "wall_images_per_s": round(t.count / wall, 3),
            "load_before": [round(x, 2) for x in load0], "load_after": [round(x, 2) for x in os.getloadavg()]}


def bare(folders: list[Path], model: Path, max_images: int,
         model_keys: dict[str, object] | None = None) -> dict[str, object]:
    """The network alone on the images' tiles, in the engines' groups (`engine.batch_groups`)."""
    from semwatch.model.classify import Classifier, read_and_prepare
    from semwatch.model.engine import PreparedImage, batch_groups, predict_images

    settings = settings_for(Path(tempfile.gettempdir()), model, {}, model_keys)
    classifier = Classifier.load(model, settings)
    paths = sorted(p for f in folders for p in f.rglob("*.jpg"))[:max_images]
    prepared = [x for x in (read_and_prepare(classifier, p) for p in paths) if isinstance(x, PreparedImage)]
    predict_images(classifier, prepared[:6])  # warm-up: kernels chosen, memory allocated
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    for group in batch_groups(prepared, lambda p: len(p.tiles), classifier.batch_size):
        predict_images(classifier, group)
    seconds = time.perf_counter() - t0
    return {"engine": "bare", "device": classifier.device, "images": len(prepared),
            "tiles": sum(len(p.tiles) for p in prepared), "run_s": round(seconds, 2),
            "images_per_s": round(len(prepared) / seconds, 3),
            "load_before": [round(x, 2) for x in load0], "load_after": [round(x, 2) for x in os.getloadavg()]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TwoNodeCluster:
    """`ray start --head` and a second node, one CPU each, on loopback; `ray stop` on exit."""

    def __init__(self) -> None:
        self.ray = str(Path(sys.executable).parent / "ray")
        self.port = free_port()
        self.temp = Path(tempfile.mkdtemp(prefix="rb-"))  # short: Ray's socket paths have a limit
        self.address = f"127.0.0.1:{self.port}"

    def __enter__(self) -> TwoNodeCluster:
        common = ["--num-cpus=1", "--num-gpus=0", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                  f"--temp-dir={self.temp}"]
        try:
            self._ray("start", "--head", f"--port={self.port}", "--include-dashboard=false", *common)
            self._ray("start", f"--address={self.address}", *common)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        # Only this cluster's processes, found by its own temp folder on their command lines:
        # `ray stop` would stop every Ray of this user on the machine (a test's, another bench's).
        import psutil

        mine = [p for p in psutil.process_iter(["pid", "cmdline"])
                if any(str(self.temp) in a for a in (p.info["cmdline"] or ()))]
        for p in mine:
            p.terminate()
        _, alive = psutil.wait_procs(mine, timeout=10)
        for p in alive:
            p.kill()
        shutil.rmtree(self.temp, ignore_errors=True)

    def _ray(self, *args: str) -> None:
        # Token authentication (Ray >= 2.5x): the head turns it on when ~/.ray/auth_token exists, a
        # joining node only when told to; both share this user's token file here.
        env = {**os.environ, "RAY_AUTH_MODE": "token"}
        done = subprocess.run([self.ray, *args], capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            raise SystemExit(f"ray {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("/tmp/bench/ncm"))
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ncm-sem")
    ap.add_argument("--folders", default=DEFAULT_FOLDERS, help="sub-folders of --data (comma-separated)")
    ap.add_argument("--order", default="bare,local,ray,cluster,ray,local",
                    help="runs in this order: bare, local, ray, cluster")
    ap.add_argument("--scale", default="{}", help="[scale] overrides as JSON, for ray and cluster")
    ap.add_argument("--bare-images", type=int, default=120)
    ap.add_argument("--out", default="", help="write benchmarks/results/<date>-<out>.json and .md")
    args = ap.parse_args()
    folders = [args.data / f for f in args.folders.split(",")]
    scale = json.loads(args.scale)
    runs: list[dict[str, object]] = []
    import torch

    threads = torch.get_num_threads()  # `[model] cpu_threads` > 0 changes it for the whole process
    for kind in args.order.split(","):
        torch.set_num_threads(threads)
        # "bare1", "local1": the same with `[model] cpu_threads = 1`, one torch thread like each
        # Ray model actor (cpus_per_worker = 1): the figure that separates the engine from threading.
        one: dict[str, object] | None = {"cpu_threads": 1} if kind.endswith("1") else None
        if kind.startswith("bare"):
            r = bare(folders, args.model, args.bare_images, one)
        elif kind == "cluster":
            os.environ["RAY_AUTH_MODE"] = "token"  # the driver too (see TwoNodeCluster._ray)
            with TwoNodeCluster() as cluster:
                r = engine_run("ray", folders, args.model, {**scale, "ray_address": cluster.address})
                r["engine"] = "cluster"
        else:
            r = engine_run(kind.rstrip("1"), folders, args.model, scale if kind == "ray" else {}, one)
        r["engine"] = kind
        print(json.dumps(r), flush=True)
        runs.append(r)
        if args.out:  # after every run: a long bench stopped early keeps what it measured
            write_results(args, runs, summarise(runs))
    print(json.dumps(summarise(runs)), flush=True)
    return 0


def summarise(runs: list[dict[str, object]]) -> dict[str, object]:
    def mean(kind: str, key: str = "images_per_s") -> float | None:
        values = [float(r[key]) for r in runs if r["engine"] == kind]  # type: ignore[arg-type]
        return round(sum(values) / len(values), 3) if values else None

    out: dict[str, object] = {k: mean(k) for k in ("bare", "local", "ray", "cluster", "bare1", "local1")}
    for k in ("local", "ray", "cluster"):
        out[f"{k}_wall"] = mean(k, "wall_images_per_s")
    local1, bare1 = out["local1"], out["bare1"]
    if isinstance(local1, float) and local1 > 0:
        for k in ("ray", "cluster"):
            v = out[k]
            out[f"{k}/local1"] = round(v / local1, 3) if isinstance(v, float) else None
    if isinstance(bare1, float) and bare1 > 0 and isinstance(local1, float):
        out["local1/bare1"] = round(local1 / bare1, 3)
    local = out["local"]
    if isinstance(local, float) and local > 0:
        for k in ("ray", "cluster"):
            v = out[k]
            out[f"{k}/local"] = round(v / local, 3) if isinstance(v, float) else None
            w, lw = out[f"{k}_wall"], out["local_wall"]
            both = isinstance(w, float) and isinstance(lw, float)
            out[f"{k}/local_wall"] = round(w / lw, 3) if both else None  # type: ignore[operator]
    b = out["bare"]
    if isinstance(b, float) and b > 0:
        for k in ("local", "ray", "cluster"):
            v = out[k]
            out[f"{k}/bare"] = round(v / b, 3) if isinstance(v, float) else None
    return out


def write_results(args: argparse.Namespace, runs: list[dict[str, object]],
                  summary: dict[str, object]) -> None:
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    base = REPO / "benchmarks" / "results" / f"{day}-{args.out}"
    from host import commit as host_commit  # benchmarks/host.py (this script's folder is on the path)

    commit = host_commit()
    record = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "commit": commit,
              "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
              "folders": args.folders, "model": str(args.model), "scale": args.scale,
              "runs": runs, "summary": summary}
    base.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    lines = [f"# reprocess_bench {record['date']} (commit {commit})", "",
             "| run | engine/device | images | images/s (run) | images/s (wall) | start-up s | load avg |",
             "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(runs, 1):
        lines.append(f"| {i} | {r['engine']}: {r['device']} | {r['images']} | {r['images_per_s']} | "
                     f"{r.get('wall_images_per_s', '-')} | {r.get('startup_s', '-')} | "
                     f"{r['load_before']} -> {r['load_after']} |")
    lines += ["", "Summary: " + ", ".join(f"{k} {v}" for k, v in summary.items()), ""]
    base.with_suffix(".md").write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
