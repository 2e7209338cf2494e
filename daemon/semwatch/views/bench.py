"""`semwatch bench DATA_DIR --model MODEL_DIR`: pipeline throughput against the bare model.

Both figures come from the same run, in alternating rounds on the same images, and both go through
the daemon's batching engine (`model.engine.predict_images`, the same batches): the pipeline (each
image read with `read_micrograph` and tiled with `prepare` on worker threads while the network
runs, batches filled across images, one verdict per image), then the network alone on those
images' tiles already in memory. Their ratio over all rounds, `pipeline_efficiency`, is the share
of the model's speed that reading, tiling and aggregating leave.

The bare network is also timed in every other runtime this install has for the model (eager torch,
ONNX Runtime, OpenVINO: `model.runtimes`), on one batch group of each round, so the figure the
pipeline is held to is the fastest bare rate on this machine, not only the configured runtime's:
`efficiency_vs_fastest`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from semwatch.config import Settings
from semwatch.errors import ExitStatus, UserError
from semwatch.model.classify import Classifier, outcomes, read_and_prepare
from semwatch.model.engine import PreparedImage, batch_groups, predict_images
from semwatch.model.export import probe_tiles
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
    runtime: str = "torch"
    # Bare tiles/s of the other runtimes (same tiles, one batch group per round): runtime → rate.
    other_runtimes: dict[str, float] = field(default_factory=dict)
    note: str | None = None  # how to make the model faster (no export), said on stderr

    @property
    def fastest_bare(self) -> tuple[str, float]:
        """(runtime, bare tiles/s) of the fastest runtime measured here."""
        rates = {self.runtime: self.model_only_tiles_per_s, **self.other_runtimes}
        best = max(rates, key=lambda k: rates[k])
        return best, rates[best]

    @property
    def efficiency_vs_fastest(self) -> float:
        fastest = self.fastest_bare[1]
        return self.tiles_per_s / fastest if fastest > 0 else 0.0

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
        """Unrounded: a figure derived from the others (`pipeline_efficiency`) must agree with them
        recomputed, whatever their size (on a slow machine, a rate rounded to 2 places is not)."""
        return {
            "images": self.images,
            "failed": self.failed,
            "tiles": self.tiles,
            "wall_s": self.wall_s,
            "images_per_s": self.images / self.wall_s if self.wall_s > 0 else 0.0,
            "tiles_per_s": self.tiles_per_s,
            "model_only_tiles_per_s": self.model_only_tiles_per_s,
            "pipeline_efficiency": self.pipeline_efficiency,
            "rounds": self.rounds,
            "round_efficiencies": list(self.round_efficiencies),
            "batch_size": self.batch_size,
            "reader_threads": self.reader_threads,
            "device": self.device,
            "model_id": self.model_id,
            "runtime": self.runtime,
            "bare_tiles_per_s_by_runtime": {self.runtime: self.model_only_tiles_per_s,
                                            **self.other_runtimes},
            "fastest_runtime": self.fastest_bare[0],
            "efficiency_vs_fastest": self.efficiency_vs_fastest,
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
    others = _other_runtimes(classifier)
    other_tiles = dict.fromkeys(others, 0)
    other_s = dict.fromkeys(others, 0.0)
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
        first = next(batch_groups(prepared, _tiles, classifier.batch_size), [])
        for kind, other in others.items():  # one group each: eager torch can be 10x slower
            t1 = time.perf_counter()
            predict_images(other, first)
            other_s[kind] += time.perf_counter() - t1
            other_tiles[kind] += sum(len(x.tiles) for x in first)
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
        runtime=classifier.runtime,
        other_runtimes={k: other_tiles[k] / other_s[k] for k in others if other_s[k] > 0},
        note=classifier.runtime_note,
    )


def _other_runtimes(classifier: Classifier) -> dict[str, Classifier]:
    """The same classifier in each other runtime this install can run the model in (warmed up)."""
    from semwatch.model.artifact import export_bytes
    from semwatch.model.runtimes import Choice, build, candidates

    if classifier.model_dir is None:
        return {}
    graph = export_bytes(classifier.model_dir, classifier.manifest)
    out: dict[str, Classifier] = {}
    for kind in candidates(graph, classifier.torch_device):
        if kind == classifier.runtime:
            continue
        runner = build(kind, classifier.net.backbone, graph, classifier.torch_device, classifier.settings)
        out[kind] = replace(classifier, runner=runner, choice=Choice(kind, {}, False, "bench"))
        runner.features(torch.from_numpy(probe_tiles(classifier.batch_size, classifier.manifest.tile_px)))
    return out


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
            f"{result.tiles_per_s:.1f} tiles/s; model alone {result.model_only_tiles_per_s:.1f} tiles/s "
            f"({result.runtime}); pipeline efficiency {result.pipeline_efficiency:.2f}"
        )
        bare = r["bare_tiles_per_s_by_runtime"]
        assert isinstance(bare, dict)
        out.line("bare model per runtime: " + ", ".join(f"{k} {v:.1f} tiles/s" for k, v in bare.items())
                 + f"; fastest {result.fastest_bare[0]}; pipeline vs fastest bare "
                 f"{result.efficiency_vs_fastest:.2f}")
    if result.note:
        out.say(result.note)
    return ExitStatus.INPUT_FAILED if result.failed else ExitStatus.OK


def _tiles(image: PreparedImage) -> int:
    return len(image.tiles)
