"""The shadow model's cost on daemon throughput (`[model] shadow`, issue 20).

    nice -n 10 .venv/bin/python benchmarks/shadow_bench.py --model MODEL_DIR [--images 12] [--rounds 2]

One daemon process per mode (no shadow / the shadow = the same network under another model id, so
the shadow costs exactly one more network pass per image), alternating rounds on fresh image sets
(unique copies: the daemon reuses results for identical contents). The clock starts when a round's
files are dropped and stops when the last live result is in the database (what an operator waits
for); the shadow's verdicts are counted separately (how many it got to, and when the last one came).
Then `--paced` images one at a time, `--pace` seconds apart (as an instrument exports them): the
latency from each drop to its live verdict, and the shadow's coverage there.
Writes benchmarks/results/<date>-shadow-<device>.json with the commit, date and machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
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

from daemonproc import Daemon, ncm_images, unique_copy  # noqa: E402 (benchmarks/ on the path above)


def shadow_copy(model: Path, out: Path) -> Path:
    """The same weights under another name (another model id): a shadow as costly as the live model."""
    from semwatch.model.artifact import load_artifact, save_artifact

    state, manifest = load_artifact(model)
    save_artifact(out, state, dataclasses.replace(manifest, name=f"{manifest.name}-shadow"))
    return out


def shadow_count(d: Daemon, sub: Path, quiet: float = 5.0) -> int:
    """Shadow verdicts for the files under `sub`, once their count has not grown for `quiet` s (the
    shadow runs only while no live work waits, and keeps a small backlog: in a burst it may not get
    to every image, by design)."""
    last, since = -1, time.monotonic()
    while time.monotonic() - since < quiet:
        rows = d.query(f"SELECT count(*) FROM shadow_results WHERE path LIKE '{sub}/%'")
        n = int(rows[0][0]) if rows else 0
        if n != last:
            last, since = n, time.monotonic()
        time.sleep(0.1)
    return last


def configure(d: Daemon, registry: Path, shadow: bool) -> None:
    text = d.config.read_text(encoding="utf-8")
    extra = [f"registry = {json.dumps(str(registry))}", 'device = "cpu"']
    if shadow:
        extra.append('shadow = "challenger"')
    d.config.write_text(text.replace("[model]\n", "[model]\n" + "\n".join(extra) + "\n"), encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ncm-sem")
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--paced", type=int, default=10, help="images dropped one at a time per round")
    parser.add_argument("--pace", type=float, default=3.0, help="seconds between two paced images")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    from host import commit as host_commit
    from host import describe, summary

    sources = ncm_images(args.data)
    work = Path(tempfile.mkdtemp(prefix="shadow-bench-"))
    registry = work / "registry"
    shadow_model = shadow_copy(args.model, work / "shadow-model")
    config = _models_config(work, registry, args.model)
    for model, alias in ((args.model, "champion"), (shadow_model, "challenger")):
        subprocess.run([sys.executable, "-m", "semwatch", "models", "register", str(model), "--alias", alias,
                        "--config", str(config)], check=True, cwd=work)
    rounds: list[dict[str, Any]] = []
    tag = 0
    daemons = {}
    try:
        for mode in ("plain", "shadow"):
            folder = work / f"in-{mode}"
            folder.mkdir()
            d = Daemon(work / mode, args.model, folder, settle=0.5)
            configure(d, registry, mode == "shadow")
            d.start()
            daemons[mode] = d
        for r in range(args.rounds):
            for mode, d in daemons.items():
                sub = work / f"in-{mode}" / f"round{r}"
                t0 = time.monotonic()
                for i in range(args.images):
                    tag += 1
                    unique_copy(sources[(tag * 37) % len(sources)], sub / f"{i:04d}.jpg", tag)
                d.wait_count(f"path LIKE '{sub}/%' AND status != 'pending'", args.images, 3600)
                live = time.monotonic() - t0
                shadow_n = shadow_count(d, sub) if mode == "shadow" else 0
                rounds.append({"round": r, "mode": mode, "kind": "burst", "images": args.images,
                               "live_images_per_s": round(args.images / live, 4),
                               "shadow_verdicts": shadow_n,
                               "shadow_done_s": round(time.monotonic() - t0, 2)})
                print(json.dumps(rounds[-1]), flush=True)
                # Paced: one image every `--pace` seconds, as an instrument exports them; the
                # latency from the drop to the live verdict is what an operator waits for.
                sub = work / f"in-{mode}" / f"paced{r}"
                latencies: list[float] = []
                for i in range(args.paced):
                    tag += 1
                    t1 = time.monotonic()
                    unique_copy(sources[(tag * 37) % len(sources)], sub / f"{i:04d}.jpg", tag)
                    d.wait_count(f"path LIKE '{sub}/%' AND status != 'pending'", i + 1, 600)
                    latencies.append(time.monotonic() - t1)
                    time.sleep(max(0.0, args.pace - (time.monotonic() - t1)))
                shadow_n = shadow_count(d, sub) if mode == "shadow" else 0
                rounds.append({"round": r, "mode": mode, "kind": "paced", "images": args.paced,
                               "pace_s": args.pace,
                               "latency_median_s": round(statistics.median(latencies), 3),
                               "latency_max_s": round(max(latencies), 3), "shadow_verdicts": shadow_n})
                print(json.dumps(rounds[-1]), flush=True)
    finally:
        for d in daemons.values():
            d.stop()
    def median(mode: str, kind: str, key: str) -> float:
        return statistics.median(x[key] for x in rounds if x["mode"] == mode and x["kind"] == kind)

    plain = median("plain", "burst", "live_images_per_s")
    shadow = median("shadow", "burst", "live_images_per_s")
    commit = host_commit()
    result = {"bench": "shadow", "commit": commit, "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": describe(), "machine_summary": summary(),
              "load_average_end": list(os.getloadavg()),
              "images_per_round": args.images, "rounds": rounds,
              "live_images_per_s_median": {"no_shadow": plain, "shadow": shadow},
              "live_throughput_ratio": round(shadow / plain, 3),
              "burst_shadow_coverage": round(sum(x["shadow_verdicts"] for x in rounds if x["mode"] == "shadow"
                                                 and x["kind"] == "burst")
                                             / max(1, sum(x["images"] for x in rounds if x["mode"] == "shadow"
                                                          and x["kind"] == "burst")), 3),
              "paced_latency_median_s": {"no_shadow": median("plain", "paced", "latency_median_s"),
                                         "shadow": median("shadow", "paced", "latency_median_s")},
              "paced_shadow_coverage": round(sum(x["shadow_verdicts"] for x in rounds if x["mode"] == "shadow"
                                                 and x["kind"] == "paced")
                                             / max(1, sum(x["images"] for x in rounds if x["mode"] == "shadow"
                                                          and x["kind"] == "paced")), 3)}
    args.out.mkdir(parents=True, exist_ok=True)
    device = "gpu" if result["machine"]["gpu"] else "cpu"
    path = args.out / f"{datetime.now(UTC).date()}-shadow-{device}.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("live_images_per_s_median", "live_throughput_ratio")}))
    print(path)
    return 0


def _models_config(work: Path, registry: Path, model: Path) -> Path:
    """A config for the registry commands (their own database: the moves are not what is measured)."""
    config = work / "models.toml"
    config.write_text(
        f"[store]\ndatabase = {json.dumps(str(work / 'models.db'))}\n"
        f"results_csv = {json.dumps(str(work / 'models.csv'))}\n"
        f"[model]\npath = {json.dumps(str(model))}\nregistry = {json.dumps(str(registry))}\n",
        encoding="utf-8")
    return config


if __name__ == "__main__":
    raise SystemExit(main())
