"""The backbone's speed per runtime on this machine (not a test; a minute or two on a CPU).

    nice -n 10 .venv/bin/python benchmarks/runtime_bench.py [--model MODEL_DIR] [--rounds 4]
    benchmarks/avx2only/run .venv/bin/python benchmarks/runtime_bench.py --tag avx2   # as on AVX2 only

One batch of 32 real 288-px grid tiles (shared NCM images, cut as inference cuts them) through the
backbone in each runtime semwatch has (`model.runtimes`: eager torch with the CPU's autocast, eager
torch float32, ONNX Runtime, OpenVINO float32), in interleaved rounds after one warm-up pass each:
tiles/s best and median of the rounds, and the largest difference of each output (pooled features,
novelty statistics) against torch float32. The graph is the model's export (`--model`) or, without
a model, the pretrained backbone's (what every frozen model has). `ONEDNN_MAX_CPU_ISA` caps torch's
oneDNN kernels only; `benchmarks/avx2only/run` (CPUID masked) caps every runtime at AVX2.
Writes benchmarks/results/<date>-runtime-cpu[-TAG].json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

import host  # benchmarks/host.py: the machine, for the results file

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def real_tiles(n: int, settings: object) -> np.ndarray:
    """`n` grid tiles of shared NCM images, one class after another, as inference cuts them."""
    from semwatch.reading.micrograph import read_micrograph
    from semwatch.reading.tiles import cut_tiles

    out: list[np.ndarray] = []
    folders = sorted(p for p in (DATA / "ncm-sem").iterdir() if p.is_dir())
    for folder in folders * 4:
        for path in sorted(folder.glob("*.jpg"))[len(out) % 3 :][:1]:
            m = read_micrograph(path, settings)  # type: ignore[arg-type]
            out.extend(cut_tiles(m.pixels, factor=1.0, tile_physical_px=288, tile_px=288, overlap=0.0,
                                 max_tiles=4, std_min=0.0, saturated_max=1.0, intensity="equalize").tiles)
        if len(out) >= n:
            break
    return np.stack(out[:n]).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    import torch

    from semwatch.config import Settings, load_settings
    from semwatch.model import runtimes
    from semwatch.model.artifact import export_bytes, load_artifact
    from semwatch.model.backbone import TileNet
    from semwatch.model.export import ONNX_FILE, export_backbone

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path,
                        help="a model with an export (default: the pretrained backbone)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tag", default="", help="suffix of the results files (e.g. avx2)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cuda: torch float16 autocast and float32, ONNX Runtime's CUDA provider")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)

    base = load_settings(None, environ={})
    tile_px = 288
    if args.model is not None:
        state, manifest = load_artifact(args.model)
        net = TileNet(manifest.architecture, manifest.tile_px, len(manifest.classes),
                      hidden=manifest.head_hidden, novelty_k=manifest.novelty_k, pretrained=False,
                      detector=manifest.detector)
        net.load_state_dict(state)
        graph = export_bytes(args.model, manifest)
        if graph is None:
            sys.exit(f"{args.model} has no export: semwatch models export {args.model}")
        source = f"model {manifest.model_id}"
    else:
        net = TileNet("efficientnet-lite0", tile_px, 2, hidden=512, novelty_k=64, pretrained=True)
        with tempfile.TemporaryDirectory() as tmp:
            export_backbone(net.backbone, tile_px, Path(tmp))
            graph = (Path(tmp) / ONNX_FILE).read_bytes()
        source = "pretrained efficientnet-lite0 backbone"
    backbone = net.backbone.eval()
    x = torch.from_numpy(real_tiles(args.batch, base))
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    backbone.to(device)

    def settings(**model: object) -> Settings:
        return load_settings(None, environ={}, overrides={"model": {"device": args.device, **model}})

    auto = "torch float16 autocast" if args.device == "cuda" else "torch (cpu_precision auto)"
    runners = {
        auto: runtimes.build("torch", backbone, graph, device, settings()),
        "torch float32": runtimes.build("torch", backbone, graph, device,
                                        settings(cpu_precision="float32", mixed_precision=False)),
    }
    # `auto`'s candidates, and OpenVINO on the CPU (named only: `auto` never imports it)
    extra = ["openvino"] if device.type == "cpu" and runtimes.available("openvino") else []
    for kind in [*runtimes.candidates(graph, device), *extra]:
        if kind != "torch":
            runners[kind] = runtimes.build(kind, backbone, graph, device, settings())
    reference = runners["torch float32"].features(x)
    differences: dict[str, dict[str, float]] = {}
    for name, runner in runners.items():
        got = runner.features(x)  # also the warm-up pass
        differences[name] = {out: float((g.cpu() - r.cpu()).abs().max()) for out, g, r in
                             zip(("pooled", "stats"), got, reference, strict=True)}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            t0 = time.perf_counter()
            runner.features(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    eager = args.batch / min(times["torch float32"])
    rows = {name: {"tiles_per_s_best": round(args.batch / min(t), 2),
                   "tiles_per_s_median": round(args.batch / statistics.median(t), 2),
                   "x_torch_float32": round(args.batch / min(t) / eager, 2),
                   "largest_difference_vs_torch_float32": {k: float(f"{v:.3g}")
                                                           for k, v in differences[name].items()}}
            for name, t in times.items()}
    commit = host.commit()
    record = {
        "benchmark": "runtime_bench", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "host": host.describe(), "cpu_flags": runtimes.cpu_signature(), "versions": runtimes.versions(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
        "graph": source, "batch": args.batch, "tile_px": tile_px, "rounds": args.rounds,
        "tiles": "real grid tiles of shared NCM images", "device": args.device, "runtimes": rows,
        "note": "rounds are interleaved so that load from other work hits every runtime alike; the load "
                "average at the start is in host",
    }
    args.results.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.now(UTC).date()}-runtime-{args.device}" + (f"-{args.tag}" if args.tag else "")
    (args.results / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    lines = [f"# Backbone runtimes on {host.summary()}", "",
             f"commit {commit}, {record['date']}; {source}; batch {args.batch} x {tile_px} px real tiles; "
             f"best of {args.rounds} interleaved rounds; ONEDNN_MAX_CPU_ISA="
             f"{record['onednn_max_cpu_isa'] or '(unset)'} (torch only). CPU flags: "
             f"{', '.join(record['host']['cpu_flags'])} (torch dispatches {record['host']['kernel_isa']}). "
             f"Load average at the start {record['host']['load_average'][0]:.1f}.", "",
             "| runtime | tiles/s best | median | x torch float32 | largest difference (pooled / stats) |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        d = r["largest_difference_vs_torch_float32"]
        lines.append(f"| {name} | {r['tiles_per_s_best']} | {r['tiles_per_s_median']} | "
                     f"{r['x_torch_float32']} | {d['pooled']} / {d['stats']} |")
    (args.results / f"{stem}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
