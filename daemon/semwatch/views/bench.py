"""`semwatch bench DATA_DIR --model MODEL_DIR`: pipeline throughput against the bare model.

Both figures come from the same run, in alternating rounds on the same images, and both go through
the daemon's batching engine (`model.engine.predict_images`, the same batches): the pipeline (each
image read with `read_micrograph` and tiled with `prepare` on worker threads while the network
runs, batches filled across images, one verdict per image), then the network alone on those
images' tiles already in memory. Their ratio over all rounds, `pipeline_efficiency`, is the share
of the model's speed that reading, tiling and aggregating leave.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from semwatch.config import Settings
from semwatch.errors import ExitStatus, UserError
from semwatch.model.classify import Classifier, outcomes, read_and_prepare
from semwatch.model.engine import PreparedImage, batch_groups, predict_images
from semwatch.model.train import IMAGE_SUFFIXES
from semwatch.output import Output

WARMUP_ROUNDS = 2
# Images per round when the number of rounds is not given. A shared CPU changes speed within
# seconds; short rounds (about 2 s here) put the same drift into both figures instead of into their
# ratio, and longer ones scattered it (measurements: benchmarks/results/HISTORY.md).
IMAGES_PER_ROUND = 15


@dataclass(frozen=True)
class BenchResult:
    """One bench run; `to_json` is the `--json` record."""

    images: int  # classified (read, tiled and given a verdict)
    failed: int  # could not be read
    tiles: int
    wall_s: float  # pipeline time, all rounds
    model_tiles: int  # tiles the bare network ran (the same images' tiles)
    model_s: float  # bare-network time, all rounds
    rounds: int
    round_efficiencies: list[float]
    batch_size: int
    reader_threads: int
    device: str
    model_id: str

    @property
    def tiles_per_s(self) -> float:
        return self.tiles / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def model_only_tiles_per_s(self) -> float:
        return self.model_tiles / self.model_s if self.model_s > 0 else 0.0

    @property
    def pipeline_efficiency(self) -> float:
        bare = self.model_only_tiles_per_s
        return self.tiles_per_s / bare if bare > 0 else 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "images": self.images,
            "failed": self.failed,
            "tiles": self.tiles,
            "wall_s": round(self.wall_s, 3),
            "images_per_s": round(self.images / self.wall_s, 3) if self.wall_s > 0 else 0.0,
            "tiles_per_s": round(self.tiles_per_s, 2),
            "model_only_tiles_per_s": round(self.model_only_tiles_per_s, 2),
            "pipeline_efficiency": round(self.pipeline_efficiency, 4),
            "rounds": self.rounds,
            "round_efficiencies": [round(x, 3) for x in self.round_efficiencies],
            "batch_size": self.batch_size,
            "reader_threads": self.reader_threads,
            "device": self.device,
            "model_id": self.model_id,
        }


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


def _warm_up(classifier: Classifier, paths: Sequence[Path], data_dir: Path) -> None:
    """First calls allocate memory and pick kernels: run the engine on real tiles before timing."""
    for p in paths:
        item = read_and_prepare(classifier, p)
        if isinstance(item, PreparedImage) and len(item.tiles):
            copies = max(1, -(-classifier.batch_size // len(item.tiles)))
            for _ in range(WARMUP_ROUNDS):
                predict_images(classifier, [item] * copies)
            return
    raise UserError(f"{data_dir}: no readable image with usable tiles")


def run_bench(
    data_dir: Path, model_dir: Path, settings: Settings, *, max_images: int = 120, rounds: int | None = None
) -> BenchResult:
    """Alternating rounds: the pipeline on a slice of the images, then the network alone on exactly
    those images' tiles. A CPU shared with other work changes speed within seconds; alternating
    puts the same drift into both figures instead of into their ratio."""
    classifier = Classifier.load(model_dir, settings)
    paths = bench_images(data_dir, max_images)
    _warm_up(classifier, paths, data_dir)
    if rounds is None:
        rounds = round(len(paths) / IMAGES_PER_ROUND)
    rounds = max(1, min(rounds, len(paths)))
    images = failed = tiles = model_tiles = 0
    wall = model_s = 0.0
    ratios: list[float] = []
    for r in range(rounds):
        chunk = paths[r * len(paths) // rounds : (r + 1) * len(paths) // rounds]
        started = time.perf_counter()
        round_tiles = 0
        for o in outcomes(classifier, chunk):
            if o.output is None:
                failed += 1
            else:
                images += 1
                round_tiles += len(o.output)
        round_s = time.perf_counter() - started
        # The bare network on the same images' tiles, read and tiled beforehand (untimed), in the
        # groups the pipeline forms (images until their tiles fill a batch): the network's cost per
        # tile depends on the batch, so other groups would measure the batching, not the plumbing.
        read = [read_and_prepare(classifier, p) for p in chunk]
        prepared = [x for x in read if isinstance(x, PreparedImage)]
        t0 = time.perf_counter()
        for group in batch_groups(prepared, _tiles, classifier.batch_size):
            predict_images(classifier, group)
        round_model_s = time.perf_counter() - t0
        round_model_tiles = sum(len(x.tiles) for x in prepared)
        wall += round_s
        model_s += round_model_s
        tiles += round_tiles
        model_tiles += round_model_tiles
        if round_s > 0 and round_model_s > 0 and round_model_tiles:
            ratios.append((round_tiles / round_s) / (round_model_tiles / round_model_s))
    return BenchResult(
        images=images,
        failed=failed,
        tiles=tiles,
        wall_s=wall,
        model_tiles=model_tiles,
        model_s=model_s,
        rounds=rounds,
        round_efficiencies=ratios,
        batch_size=classifier.batch_size,
        reader_threads=settings.watch.reader_threads,
        device=classifier.device,
        model_id=classifier.model_id,
    )


def bench_folder(
    data_dir: Path, settings: Settings, *, model_dir: Path | None, max_images: int, rounds: int | None,
    out: Output,
) -> int:
    """`semwatch bench`: one summary line, or the figures as one JSON object (`--json`); exit
    status 1 if an image could not be read."""
    from semwatch.model.registry import live_model_dir

    result = run_bench(data_dir, model_dir or live_model_dir(settings.model), settings, max_images=max_images,
                       rounds=rounds)
    r = result.to_json()
    if out.json:
        out.emit(r)
    else:
        out.line(
            f"{r['images']} images, {r['tiles']} tiles in {result.wall_s:.1f} s on {r['device']}: "
            f"{result.images / result.wall_s if result.wall_s > 0 else 0.0:.2f} images/s, "
            f"{result.tiles_per_s:.1f} tiles/s; model alone {result.model_only_tiles_per_s:.1f} tiles/s; "
            f"pipeline efficiency {result.pipeline_efficiency:.2f}"
        )
    return ExitStatus.INPUT_FAILED if result.failed else ExitStatus.OK


def _tiles(image: PreparedImage) -> int:
    return len(image.tiles)
