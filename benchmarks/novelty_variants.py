"""How well novelty scores tell a left-out composition from the known ones (not a test; a few minutes).

    .venv/bin/python benchmarks/novelty_variants.py WORK_FOLDER [WORK_FOLDER ...]

Reads the work folders `benchmarks/lifecycle_bench.py` leaves (their champion `model-a`, its
training images' cached features in `registry/.feature-cache`, and the evaluation folder: 20 % of
each known class, half of the left-out composition). For the champion's detector as shipped and for
variants computed from the same features, per image (median over its grid tiles, as `classify`
does): the AUROC between known and left-out evaluation images, and the share of each called unknown
with the threshold from the validation images by the product's robust rule (`detector.calibrate_threshold`,
`[train] unknown_spread` 4 and 6).
For choosing a detector, not a product path. Writes benchmarks/results/<date>-novelty-variants.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (pooled, stats) of tiles → tile scores


def auroc(known: np.ndarray, new: np.ndarray) -> float:
    """P(a left-out image scores above a known one), ties half."""
    return float((new[:, None] > known[None, :]).mean() + 0.5 * (new[:, None] == known[None, :]).mean())


def one_folder(work: Path) -> dict[str, object]:
    from semwatch.config import load_settings
    from semwatch.model.classify import Classifier
    from semwatch.model.train.detector import calibrate_threshold
    from semwatch.reading.micrograph import read_micrograph
    from semwatch.values import parse_class

    settings = load_settings(None, environ={}, overrides={
        "model": {"device": "cpu", "runtime": "onnxruntime", "test_time_views": 1}})
    clf = Classifier.load(work / "model-a", settings)
    known_compositions = {parse_class(c).composition for c in clf.classes}
    runner = clf.runner
    assert runner is not None

    def tile_features(paths: list[Path]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for p in paths:
            prepared = clf.prepare(read_micrograph(p, settings))
            x = torch.from_numpy(np.ascontiguousarray(prepared.tiles, dtype=np.float32))
            with torch.inference_mode():
                pooled, stats = runner.features(x)
            out.append((pooled.float(), stats.float()))
        return out

    evaluation = sorted((work / "eval").rglob("*.jpg"))
    left_out = np.array([parse_class(p.parent.name).composition not in known_compositions
                         for p in evaluation])
    ev = tile_features(evaluation)
    val = tile_features([work / "train" / r for r in clf.manifest.split["val"]])
    net = clf.net
    layers = net.layers
    with torch.no_grad():
        logs = torch.log(layers.layer_scores(torch.cat([s for _, s in val])).clamp_min(1e-9))
    centre = logs.median(0).values
    scale = (logs - centre).abs().median(0).values.clamp_min(1e-3) * 1.4826

    def robust_z(st: torch.Tensor) -> torch.Tensor:
        return (torch.log(layers.layer_scores(st).clamp_min(1e-9)) - centre) / scale

    # Training tiles' pooled features for the nearest-neighbour variant, from the feature cache.
    cache = next((work / "registry" / ".feature-cache").iterdir())
    pooled_train = []
    for p in sorted((work / "train").rglob("*.jpg")):
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        f = cache / f"train-{digest}.npz"
        if f.exists():
            z = np.load(f)
            pooled_train.append(z["feats"][: int(z["n_plain"])])
    bank = torch.nn.functional.normalize(torch.tensor(np.concatenate(pooled_train)), dim=1)

    def knn(pf: torch.Tensor, _st: torch.Tensor) -> torch.Tensor:
        d = 1 - torch.nn.functional.normalize(pf, dim=1) @ bank.T
        return d.topk(10, dim=1, largest=False).values[:, -1]

    variants: dict[str, Score] = {
        "shipped: largest layer score (each over its validation median)": lambda _pf, st: layers(st),
        "mean of the layer scores": lambda _pf, st: layers.layer_scores(st).mean(1),
        "largest robust z of the layers' log scores":
            lambda _pf, st: torch.exp(robust_z(st).max(1).values / 4),
        "mean robust z of the layers' log scores": lambda _pf, st: torch.exp(robust_z(st).mean(1) / 4),
        "10th nearest training tile, cosine, pooled features": knn,
    }
    for g in range(len(layers.groups)):
        variants[f"layer {g} alone"] = lambda _pf, st, g=g: layers.layer_scores(st)[:, g]
    rows = {}
    for name, score in variants.items():
        with torch.no_grad():
            s_ev = np.array([float(np.median(score(pf, st).numpy())) for pf, st in ev])
            s_val = np.array([float(np.median(score(pf, st).numpy())) for pf, st in val])
        row: dict[str, object] = {"auroc": round(auroc(s_ev[~left_out], s_ev[left_out]), 3)}
        for spread in (4.0, 6.0):
            t = calibrate_threshold(s_val, settings.replace(train=dataclasses.replace(
                settings.train, unknown_calibration="robust", unknown_spread=spread)))
            row[f"unknown_at_spread_{spread:g}"] = {"known": round(float((s_ev[~left_out] > t).mean()), 3),
                                                    "left_out": round(float((s_ev[left_out] > t).mean()), 3)}
        rows[name] = row
        print(f"{work.name} {name:58} {row}", flush=True)
    return {"work": str(work), "left_out_images": int(left_out.sum()), "known_images": int((~left_out).sum()),
            "known_classes": list(clf.classes), "variants": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, nargs="+", help="work folders of benchmarks/lifecycle_bench.py")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    import host

    commit = host.commit()
    result = {"bench": "novelty_variants", "commit": commit,
              "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": host.summary(),
              "folders": [one_folder(w) for w in args.work]}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{datetime.now(UTC).date()}-novelty-variants.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
