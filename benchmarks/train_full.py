"""Full-size training and the classifier's accuracy/speed figures (not a test; minutes on a CPU).

    nice -n 10 .venv/bin/python benchmarks/train_full.py [--data ../shared/data] [--out models/ncm]
        [--cpu-precision float32] [--backbone frozen|finetune] [--ood]

Trains with the default settings on DATA/ncm-sem (unless --reuse and a model exists), then
reports on the held-out test split: plain and under intensity jitter; the vendor TIFFs as they
are (refused mostly by scale); and `semwatch bench`. `--ood` adds `benchmarks/ood_bench.py`, the
out-of-distribution check at the model's own scale. `--cpu-precision float32` measures the
training time of a CPU without native bfloat16 (the issue's 30-minute budget). Prints one JSON
object (with the CPU, device and precision it ran on) and writes it to OUT/benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import host  # benchmarks/host.py: the machine, for the results file

ROOT = Path(__file__).resolve().parents[1]

KEYS = (
    "n_images",
    "n_tiles",
    "image_accuracy",
    "tile_accuracy",
    "composition_accuracy",
    "state_accuracy",
    "macro_f1",
    "ece",
    "unknown_rate",
    "rejected_rate",
)


def main(argv: list[str] | None = None) -> int:
    import torch

    from semwatch.config import load_settings
    from semwatch.model.classify import Classifier
    from semwatch.model.evaluate import evaluate_model
    from semwatch.model.train import train_model
    from semwatch.views.bench import run_bench

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "ncm")
    parser.add_argument("--reuse", action="store_true", help="skip training when OUT holds a model")
    parser.add_argument("--bench-images", type=int, default=240)
    parser.add_argument("--cpu-precision", choices=("auto", "float32", "bfloat16"), default="auto")
    parser.add_argument("--backbone", choices=("auto", "frozen", "finetune"), default="auto")
    parser.add_argument("--ood", action="store_true", help="then run benchmarks/ood_bench.py on the model")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="overrides [train] finetune_epochs")
    parser.add_argument("--max-images-per-class", type=int, default=None,
                        help="train on at most this many images per class (a quick check of the script)")
    args = parser.parse_args(argv)
    settings = load_settings(None, environ={}, overrides={
        "model": {"device": "auto", "cpu_precision": args.cpu_precision},
        "train": {"backbone": args.backbone,
                  **({"finetune_epochs": args.finetune_epochs} if args.finetune_epochs else {})},
    })
    ncm, vendor = args.data / "ncm-sem", args.data / "vendor-tiff"
    summary: dict[str, Any] = {"machine": host.describe(), "cpu_precision": args.cpu_precision,
                               "backbone": args.backbone}

    if not (args.reuse and (args.out / "manifest.json").is_file()):
        result = train_model(ncm, args.out, settings, progress=True,
                             max_images_per_class=args.max_images_per_class)
        summary["train"] = result.to_json()
        print(f"trained in {result.wall_s:.0f} s", file=sys.stderr)
    weights = args.out / "model.safetensors"
    summary["model_dir"] = str(args.out)
    summary["model_size_mb"] = round(weights.stat().st_size / 1e6, 2)

    for name, jitter in (("test", False), ("test_jitter", True)):
        t0 = time.monotonic()
        evaluation = evaluate_model(ncm, args.out, settings, split="test", intensity_jitter=jitter, seed=7)
        report = evaluation.to_json()
        summary[name] = {k: report[k] for k in KEYS} | {
            "confusion": report["confusion"],
            "wall_s": round(time.monotonic() - t0, 1),
        }
        print(f"{name}: {json.dumps(summary[name])}", file=sys.stderr)

    clf = Classifier.load(args.out, settings)
    foreign = sorted(p for p in vendor.rglob("*") if p.suffix.lower() in (".tif", ".tiff"))
    verdicts = []
    for v in clf.classify_paths(foreign):
        if isinstance(v, Exception):
            verdicts.append({"error": str(v)})
        else:
            verdicts.append(
                {
                    "path": v.path.name,
                    "status": v.status,
                    "confidence": v.confidence,
                    "reasons": list(v.reasons),
                }
            )
    summary["vendor_tiff"] = {
        "n": len(verdicts),
        "unknown_rate": round(sum(v.get("status") == "unknown" for v in verdicts) / max(1, len(verdicts)), 4),
        "verdicts": verdicts,
    }
    summary["bench"] = run_bench(ncm, args.out, settings, max_images=args.bench_images).to_json()
    if torch.cuda.is_available():
        summary["gpu_peak_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    text = json.dumps(summary, indent=2)
    (args.out / "benchmark.json").write_text(text + "\n", encoding="utf-8")
    print(text)
    if args.ood:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import ood_bench

        return ood_bench.main(["--model", str(args.out), "--label", args.out.name])
    return 0


if __name__ == "__main__":
    sys.exit(main())
