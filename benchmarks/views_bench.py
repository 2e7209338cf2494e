"""What `[model] test_time_views` buys and costs, on the held-out split (not a test; minutes on a CPU).

    nice -n 10 .venv/bin/python benchmarks/views_bench.py [--model /tmp/bench/ncm] [--split test]

Every held-out tile is run once (timed: the bare network's tile rate), the unsure ones (below
0.999) in the other 7 dihedral views too; then each setting (views 1/2/4/8 for the tiles below
`test_time_below` = 0.9, 0.99, 0.999) is replayed from those outputs exactly as
`Classifier.predict` combines them: tile accuracy, image accuracy, verdicts that differ from one
view, expected calibration error (tiles and images), and the network passes per tile, hence the
tile rate relative to the bare network. Writes
benchmarks/results/<date>-views-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

import host  # benchmarks/host.py: the machine, for the results file

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
BELOW = (0.9, 0.99, 0.999)  # `test_time_below` settings replayed


def main(argv: list[str] | None = None) -> int:
    import torch

    from semwatch.config import load_settings
    from semwatch.model.classify import VIEWS, Classifier
    from semwatch.model.engine import TileOutput
    from semwatch.model.evaluate import expected_calibration_error
    from semwatch.reading.micrograph import read_micrograph

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("/tmp/bench/ncm"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    settings = load_settings(None, environ={}, overrides={
        "model": {"device": "cpu", "cpu_precision": args.precision, "test_time_views": 1}})
    clf = Classifier.load(args.model, settings)
    rels = clf.manifest.split[args.split]
    index = {c: i for i, c in enumerate(clf.classes)}
    prepared = [clf.prepare(read_micrograph(DATA / "ncm-sem" / r, settings)) for r in rels]
    truth_img = np.array([index[r.split("/")[0]] for r in rels])
    tiles = np.concatenate([p.tiles for p in prepared])
    truth = np.concatenate([[t] * len(p.tiles) for t, p in zip(truth_img, prepared, strict=True)])
    bs = settings.model.batch_size
    logp = np.zeros((8, len(tiles), len(clf.classes)), np.float32)
    novelty = np.zeros(len(tiles), np.float32)
    x_all = torch.from_numpy(tiles)
    with torch.inference_mode(), clf._autocast():
        clf._look(x_all[:bs])  # warm-up
        started = time.perf_counter()
        for s in range(0, len(tiles), bs):
            lp, nov = clf._look(x_all[s : s + bs])
            logp[:, s : s + bs] = lp.numpy()  # every view starts as the tile as it is
            novelty[s : s + bs] = nov.numpy()
        seconds = time.perf_counter() - started
        # The other views only of the tiles any setting below looks at again (all tiles for the
        # "every tile" rows would cost 8 passes over the split on two busy cores).
        again = np.flatnonzero(np.exp(logp[0]).max(1) < max(BELOW))
        for v, view in enumerate(VIEWS[1:], start=1):
            for s in range(0, len(again), bs):
                rows = again[s : s + bs]
                logp[v, rows] = clf._look(view(x_all[rows]))[0].numpy()
    bare_rate = len(tiles) / seconds
    rows = []
    for views in (1, 2, 4, 8):
        for below in BELOW:
            if views == 1 and below != BELOW[0]:
                continue
            first = logp[0]
            unsure = np.exp(first).max(1) < below if views > 1 else np.zeros(len(tiles), bool)
            lp = first.copy()
            lp[unsure] = logp[:views, unsure].mean(0)
            probs = np.exp(lp - lp.max(1, keepdims=True))
            probs /= probs.sum(1, keepdims=True)
            verdicts = []
            start = 0
            for p in prepared:
                n = len(p.tiles)
                out = TileOutput(probs[start : start + n].astype(np.float32), novelty[start : start + n])
                start += n
                verdicts.append(clf.verdict(p, out))
            img_pred = np.array([int(np.argmax([v.probabilities[c] for c in clf.classes])) for v in verdicts])
            img_conf = np.array([v.confidence for v in verdicts])
            passes = 1 + float(unsure.mean()) * (views - 1)
            rows.append({
                "views": views,
                "below": below,
                "unsure_share": round(float(unsure.mean()), 4),
                "tile_accuracy": round(float((probs.argmax(1) == truth).mean()), 4),
                "image_accuracy": round(float((img_pred == truth_img).mean()), 4),
                "images_ok": sum(v.status == "ok" for v in verdicts),
                "tile_ece": round(expected_calibration_error(probs.max(1), probs.argmax(1) == truth), 4),
                "image_ece": round(expected_calibration_error(img_conf, img_pred == truth_img), 4),
                "passes_per_tile": round(passes, 3),
                "tile_rate_vs_bare": round(1 / passes, 3),
                "verdicts": [(v.status, v.predicted_class) for v in verdicts],
            })
    base = rows[0]["verdicts"]
    for r in rows:
        r["verdicts_changed_vs_1_view"] = sum(a != b for a, b in zip(r.pop("verdicts"), base, strict=True))
    record = {
        "model_id": clf.model_id, "split": args.split, "n_images": len(rels), "n_tiles": len(tiles),
        "device": f"cpu ({'bfloat16' if args.precision != 'float32' else 'float32'} autocast), "
                  f"{host.summary()}",
        "precision": args.precision,
        "bare_tiles_per_s": round(bare_rate, 1),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": rows,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    target = args.results / f"{stamp}-views-cpu-{args.precision}.json"
    target.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
