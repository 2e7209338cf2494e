"""`semwatch bench DATA_DIR --model MODEL_DIR`: pipeline throughput against the bare model.

Both figures come from the same run and the same batch size, in alternating rounds: the whole
pipeline (decode, tile on worker threads while the network runs, batches filled across images) on
a slice of the images, then the network alone on those images' tiles already in memory. Their
ratio over all rounds, `pipeline_efficiency`, says how much of the model's speed the pipeline keeps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from semwatch.config import Settings
from semwatch.errors import UserError
from semwatch.model.classify import Classifier, PreparedImage, _read_and_prepare, outcomes
from semwatch.model.train import IMAGE_SUFFIXES

WARMUP_BATCHES = 2
# Images per round when the number of rounds is not given. This machine's speed drifts within
# seconds; rounds of ~2 s each put the same drift into both figures (rounds of 30 images scattered
# the efficiency of one run between 0.80 and 0.93, rounds of 15 between 0.90 and 0.94).
IMAGES_PER_ROUND = 15


def bench_images(data_dir: Path, max_images: int) -> list[Path]:
    """Up to `max_images` images under `data_dir`, taken round-robin over its sub-folders."""
    if not data_dir.is_dir():
        raise UserError(f"data folder not found: {data_dir}")
    files = sorted(p for p in data_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{data_dir}: no images found")
    by_folder: dict[Path, list[Path]] = {}
    for f in files:
        by_folder.setdefault(f.parent, []).append(f)
    out: list[Path] = []
    queues = list(by_folder.values())
    while len(out) < max_images and any(queues):
        for q in queues:
            if q and len(out) < max_images:
                out.append(q.pop(0))
    return out


def run_bench(
    data_dir: Path, model_dir: Path, settings: Settings, *, max_images: int = 120, rounds: int | None = None
) -> dict[str, Any]:
    """Alternating rounds: the pipeline on a slice of the images, then the network alone on exactly
    those images' tiles. A CPU shared with other work changes speed within seconds; alternating
    puts the same drift into both figures instead of into their ratio."""
    classifier = Classifier.load(model_dir, settings)
    paths = bench_images(data_dir, max_images)
    batch = settings.model.batch_size
    # Warm up the network (first calls allocate and pick kernels) on real tiles.
    sample: PreparedImage | None = None
    for p in paths:
        item = _read_and_prepare(classifier, p, settings, None)
        if isinstance(item, PreparedImage) and len(item.tiles):
            sample = item
            break
    if sample is None:
        raise UserError(f"{data_dir}: no readable image with usable tiles")
    warm = np.concatenate([sample.tiles] * max(1, -(-batch // len(sample.tiles))))[:batch]
    for _ in range(WARMUP_BATCHES):
        classifier.predict(warm)

    n_images = n_tiles = n_failed = 0
    wall = model_s = 0.0
    model_tiles = 0
    ratios: list[float] = []
    if rounds is None:
        rounds = round(len(paths) / IMAGES_PER_ROUND)
    rounds = max(1, min(rounds, len(paths)))
    for r in range(rounds):
        chunk = paths[r * len(paths) // rounds : (r + 1) * len(paths) // rounds]
        started = time.perf_counter()
        round_tiles = 0
        for o in outcomes(classifier, chunk, settings):
            if o.output is None:
                n_failed += 1
                continue
            n_images += 1
            round_tiles += len(o.output.probabilities)
        round_s = time.perf_counter() - started
        # The bare network on the same tiles, already in memory (prepared untimed), same batches.
        prepared = [_read_and_prepare(classifier, p, settings, None) for p in chunk]
        kept = [x.tiles for x in prepared if isinstance(x, PreparedImage) and len(x.tiles)]
        tiles = np.concatenate(kept) if kept else warm[:0]
        t0 = time.perf_counter()
        for s in range(0, len(tiles), batch):
            classifier.predict(tiles[s : s + batch])
        round_model_s = time.perf_counter() - t0
        n_tiles += round_tiles
        wall += round_s
        model_s += round_model_s
        model_tiles += len(tiles)
        if round_s > 0 and round_model_s > 0 and len(tiles):
            ratios.append((round_tiles / round_s) / (len(tiles) / round_model_s))
    model_rate = model_tiles / model_s if model_s > 0 else 0.0
    tiles_per_s = n_tiles / wall if wall > 0 else 0.0
    return {
        "images": n_images,
        "failed": n_failed,
        "tiles": n_tiles,
        "wall_s": round(wall, 3),
        "images_per_s": round(n_images / wall, 3) if wall > 0 else 0.0,
        "tiles_per_s": round(tiles_per_s, 2),
        "model_only_tiles_per_s": round(model_rate, 2),
        "pipeline_efficiency": round(tiles_per_s / model_rate, 4) if model_rate > 0 else 0.0,
        "rounds": rounds,
        "round_efficiencies": [round(x, 3) for x in ratios],
        "batch_size": batch,
        "reader_threads": settings.watch.reader_threads,
        "device": classifier.device,
        "model_id": classifier.model_id,
    }


def bench_command(args: argparse.Namespace, settings: Settings) -> int:
    if args.max_images <= 0:
        raise UserError("--max-images must be > 0")
    if args.rounds is not None and args.rounds <= 0:
        raise UserError("--rounds must be > 0")
    model_dir = Path(args.model) if args.model else settings.model.path
    result = run_bench(Path(args.data_dir), model_dir, settings, max_images=args.max_images,
                       rounds=args.rounds)
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        r = result
        print(
            f"{r['images']} images, {r['tiles']} tiles in {r['wall_s']:.1f} s on {r['device']}: "
            f"{r['images_per_s']:.2f} images/s, {r['tiles_per_s']:.1f} tiles/s; model alone "
            f"{r['model_only_tiles_per_s']:.1f} tiles/s; pipeline efficiency {r['pipeline_efficiency']:.2f}"
        )
    return 1 if result["failed"] else 0
