"""Scale tolerance: held-out NCM images as if taken at other magnifications (not a test; minutes).

    nice -n 10 .venv/bin/python benchmarks/scale_bench.py [--model /tmp/bench/ncm] [--per-class 1]

A x500 image zoomed by M/500 (cropped to the SNE frame when enlarged, smaller when reduced) is what
the same specimen looks like at xM. Two variants per magnification:
- `sidecar`: its sidecar says xM, so the reader resamples it back to the model's scale (the daemon's
  case: what the resampling costs in accuracy and in refusals);
- `unscaled`: its sidecar still says x500, so the network sees the wrong scale (how far the model
  itself tolerates a scale error, e.g. a miscalibrated magnification).
Reports refused share and image accuracy (closed-set) per magnification and variant. Writes
benchmarks/results/<date>-scale-<label>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np

import host  # benchmarks/host.py: the machine, for the results file

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
BAR = 65
MAGNIFICATIONS = (300, 400, 650, 800)


def zoomed(src: Path, mag: int, out: Path, sidecar_mag: int) -> Path:
    img = cv2.imread(str(src), cv2.IMREAD_GRAYSCALE)
    specimen, bar = img[:-BAR], img[-BAR:]
    z = mag / 500
    h, w = specimen.shape
    size = (round(w * z), round(h * z))
    big = cv2.resize(specimen, size, interpolation=cv2.INTER_CUBIC if z > 1 else cv2.INTER_AREA)
    if z > 1:  # the frame stays 1280 wide: the centre of the enlarged field
        y0, x0 = (big.shape[0] - h) // 2, (big.shape[1] - w) // 2
        big = big[y0 : y0 + h, x0 : x0 + w]
    bar = cv2.resize(bar, (big.shape[1], BAR), interpolation=cv2.INTER_AREA)
    path = out / f"{src.parent.name}__{src.stem}__x{mag}_{sidecar_mag}.jpg"
    cv2.imwrite(str(path), np.vstack([big, bar]), [cv2.IMWRITE_JPEG_QUALITY, 95])
    text = src.with_name(src.name + ".txt").read_bytes().decode("utf-8-sig")
    text = re.sub(r"Magnification : x\d+", f"Magnification : x{sidecar_mag}", text)
    path.with_name(path.name + ".txt").write_text(text, encoding="utf-8", newline="")
    return path


def main(argv: list[str] | None = None) -> int:
    from semwatch.config import load_settings
    from semwatch.model.classify import Classifier, outcomes
    from semwatch.values import ImageVerdict

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("/tmp/bench/ncm"))
    parser.add_argument("--per-class", type=int, default=1)
    parser.add_argument("--label", default="run")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    settings = load_settings(None, environ={}, overrides={"model": {"device": "cpu"}})
    clf = Classifier.load(args.model, settings)
    chosen: dict[str, list[str]] = {}
    for rel in clf.manifest.split["test"]:
        if (DATA / "ncm-sem" / (rel + ".txt")).exists():
            chosen.setdefault(rel.split("/")[0], []).append(rel)
    sources = [DATA / "ncm-sem" / r for rels in chosen.values() for r in rels[: args.per_class]]
    rows = []
    with tempfile.TemporaryDirectory(prefix="semwatch-scale-") as tmp:
        jobs = [(mag, variant, zoomed(src, mag, Path(tmp), mag if variant == "sidecar" else 500), src)
                for mag in MAGNIFICATIONS for variant in ("sidecar", "unscaled") for src in sources]
        verdicts = {o.path: o.result for o in outcomes(clf, [j[2] for j in jobs])}
        for mag in MAGNIFICATIONS:
            for variant in ("sidecar", "unscaled"):
                mine = [j for j in jobs if j[0] == mag and j[1] == variant]
                refused = right = 0
                why: dict[str, int] = {}
                for _, _, path, src in mine:
                    v = verdicts[path]
                    if not isinstance(v, ImageVerdict):
                        refused += 1
                        continue
                    best = max(v.probabilities, key=v.probabilities.__getitem__)
                    right += best == src.parent.name
                    if v.status != "ok":
                        refused += 1
                        for r in v.reasons:
                            key = re.split(r"[(:\d]", r, maxsplit=1)[0].strip()
                            why[key] = why.get(key, 0) + 1
                rows.append({"magnification": mag, "variant": variant, "n": len(mine),
                             "refused": round(refused / len(mine), 3),
                             "image_accuracy": round(right / len(mine), 3), "reasons": why})
                print(json.dumps(rows[-1]), flush=True)
    record = {"model_id": clf.model_id, "machine": host.summary(),
              "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
              "max_scale_ratio": settings.tiling.max_scale_ratio, "rows": rows}
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{stamp}-scale-{args.label}.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
