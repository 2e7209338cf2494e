"""The frozen backbone's pass over training tiles: images decoded and tiled on worker threads while
the network runs, pooled features and the novelty detector's statistics per tile (`FeatureSet`)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from semwatch.config import Settings
from semwatch.model.backbone import TileNet
from semwatch.model.runtimes import Runner, TorchRunner
from semwatch.model.train.data import LabelledImage, Recipe, grid_tiles, read_image, training_tiles
from semwatch.model.train.featurecache import CachedFeatures, FeatureCache, content_seed
from semwatch.output import Output
from semwatch.values import Micrograph, MicrographError

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID

FEATURE_BATCH = 32


@dataclass
class FeatureSet:
    feats: torch.Tensor  # (T, D)
    labels: torch.Tensor  # (T,) tile labels
    image_of: torch.Tensor  # (T,) index of the image in its split list
    image_labels: torch.Tensor  # (I,)
    # (T, S) the novelty detector's per-layer statistics; (T,) bool: a tile of the grid inference
    # cuts, as cut (what the detector is fitted on). Empty where a caller has only pooled features.
    stats: torch.Tensor = field(default_factory=lambda: torch.zeros((0, 0)))
    plain: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))


def stream_tiles(
    items: list[LabelledImage],
    make_tiles: Callable[[int, Micrograph], np.ndarray],
    settings: Settings,
    skipped: list[str],
) -> Iterator[tuple[int, np.ndarray]]:
    """`(index, tiles)` of each readable image in order, decoded and tiled on worker threads while
    the consumer runs the network; unreadable images are named in `skipped` (and yield no tiles)."""

    def job(i: int) -> np.ndarray | str:
        m = read_image(items[i].path, settings)
        if isinstance(m, MicrographError):
            return str(m)
        return make_tiles(i, m)

    workers = max(1, settings.watch.reader_threads)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="semwatch-train") as pool:
        # A bounded window of images in flight: enough to keep the backbone busy, little memory.
        window: deque[Future[np.ndarray | str]] = deque()
        upcoming = iter(range(len(items)))
        for i in range(len(items)):
            while len(window) < 2 * workers + 1:
                nxt = next(upcoming, None)
                if nxt is None:
                    break
                window.append(pool.submit(job, nxt))
            result = window.popleft().result()
            if isinstance(result, str):
                skipped.append(f"{items[i].rel}: {result}")
                result = np.zeros((0,), np.float32)
            yield i, result


def grid_then(
    extra: Callable[[int, Micrograph], np.ndarray], recipe: Recipe, n_grid: dict[int, int]
) -> Callable[[int, Micrograph], np.ndarray]:
    """A `make_tiles` giving an image's grid tiles (as inference cuts them) followed by `extra`'s;
    how many lead is noted in `n_grid` (what `extract_features` marks as plain)."""

    def make(i: int, m: Micrograph) -> np.ndarray:
        grid = grid_tiles(m, recipe)
        n_grid[i] = len(grid)
        more = extra(i, m)
        return np.concatenate([grid, more]) if len(more) else grid

    return make


def extract_features(
    net: TileNet,
    items: list[LabelledImage],
    make_tiles: Callable[[int, Micrograph], np.ndarray],
    settings: Settings,
    device: torch.device,
    tick: Callable[[int], None],
    skipped: list[str],
    *,
    n_grid: dict[int, int] | None = None,
    runner: Runner | None = None,
    cache: FeatureCache | None = None,
    shas: Sequence[str] | None = None,
    role: str = "",
    counts: dict[str, int] | None = None,
) -> FeatureSet:
    """Decode and tile on worker threads while the backbone runs; pooled and novelty features per
    tile. Every tile is plain (a grid tile as cut) unless `n_grid` says how many of an image's tiles
    lead as such (`grid_then`). `runner` runs the backbone (`model.runtimes`; eager torch with the
    device's autocast when None): the same forward pass inference runs. With a `cache` (and each
    item's content sha256 in `shas`), an image's features under `role` are read from it when there,
    else computed and kept; `counts` gets "cached" and "computed"."""
    runner = runner or TorchRunner(net.backbone, device, settings)
    per_image: dict[int, CachedFeatures] = {}
    missing: list[int] = []
    for i in range(len(items)):
        hit = cache.load(role, shas[i]) if cache is not None and shas is not None else None
        if hit is None:
            missing.append(i)
        else:
            per_image[i] = hit
            tick(1)
    todo = [items[i] for i in missing]
    for j, tiles in stream_tiles(todo, lambda j, m: make_tiles(missing[j], m), settings, skipped):
        i = missing[j]
        feats: list[np.ndarray] = []
        stats: list[np.ndarray] = []
        for s in range(0, len(tiles), FEATURE_BATCH):
            f, st = runner.features(torch.from_numpy(tiles[s : s + FEATURE_BATCH]))
            feats.append(f.float().cpu().numpy())
            stats.append(st.float().cpu().numpy())
        entry = CachedFeatures(
            np.concatenate(feats) if feats else np.zeros((0, net.backbone.dim), np.float32),
            np.concatenate(stats) if stats else np.zeros((0, net.backbone.stats_dim), np.float32),
            len(tiles) if n_grid is None else n_grid.get(i, 0))
        per_image[i] = entry
        if cache is not None and shas is not None and tiles.ndim == 4:  # not an unreadable image
            cache.save(role, shas[i], entry)
        tick(1)
    if counts is not None:
        counts["cached"] = counts.get("cached", 0) + len(items) - len(missing)
        counts["computed"] = counts.get("computed", 0) + len(missing)
    labels: list[int] = []
    image_of: list[int] = []
    plain: list[bool] = []
    for i in range(len(items)):
        n = len(per_image[i].feats)
        plain += [k < per_image[i].n_plain for k in range(n)]
        labels += [items[i].label] * n
        image_of += [i] * n
    dim, sdim = net.backbone.dim, net.backbone.stats_dim
    parts = [per_image[i] for i in range(len(items)) if len(per_image[i].feats)]
    return FeatureSet(
        torch.from_numpy(np.concatenate([e.feats for e in parts])) if parts else torch.zeros((0, dim)),
        torch.tensor(labels, dtype=torch.long),
        torch.tensor(image_of, dtype=torch.long),
        torch.tensor([im.label for im in items], dtype=torch.long),
        torch.from_numpy(np.concatenate([e.stats for e in parts])) if parts else torch.zeros((0, sdim)),
        torch.tensor(plain, dtype=torch.bool),
    )


class Progress:
    """A rich progress bar with ETA on a terminal; occasional plain lines otherwise; nothing if off."""

    def __init__(self, out: Output | None, total: int, label: str) -> None:
        self.out = out
        self.total = total
        self.done = 0
        self.label = label
        self._bar: RichProgress | None = None
        self._task: TaskID | None = None
        self._last = 0.0
        self._start = time.monotonic()

    def __enter__(self) -> Progress:
        isatty = getattr(self.out.stderr, "isatty", None) if self.out is not None else None
        if self.out is not None and isatty is not None and isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=Console(file=self.out.stderr),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total)
        return self

    def describe(self, label: str) -> None:
        self.label = label
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, description=label)

    def tick(self, n: int) -> None:
        self.done += n
        if self._bar is not None and self._task is not None:
            self._bar.advance(self._task, n)
        elif self.out is not None and (time.monotonic() - self._last > 15 or self.done == self.total):
            self._last = time.monotonic()
            elapsed = self._last - self._start
            eta = elapsed / max(self.done, 1) * (self.total - self.done)
            self.out.say(f"train: {self.label} {self.done}/{self.total} images, ETA {eta:.0f} s")

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


@dataclass
class Features:
    """The cached backbone features of the training and validation images."""

    train: FeatureSet
    val: FeatureSet
    skipped: list[str]  # "<folder>/<file>: why" for images that could not be read
    cached: int | None = None  # images whose features came from the feature cache (None: no cache)


def training_features(
    net: TileNet,
    split: dict[str, list[LabelledImage]],
    recipe: Recipe,
    settings: Settings,
    device: torch.device,
    out: Output | None,
    runner: Runner | None = None,
    *,
    hashes: Mapping[str, str],
    cache: FeatureCache | None = None,
) -> Features:
    """Training images as the grid inference cuts (what the novelty detector is fitted on: random
    rotated crops widen its notion of NCM enough to let JPEG-blocked noise through) followed by
    random augmented crops, drawn from each image's content seed (`hashes`: `rel` → sha256);
    validation images as the grid. Features come from `cache` where it has them."""
    t = settings.train
    skipped: list[str] = []
    train_items, val_items = split["train"], split["val"]

    def crops(i: int, m: Micrograph) -> np.ndarray:
        rng = np.random.default_rng(content_seed(t.seed, hashes[train_items[i].rel]))
        return training_tiles(m, recipe, t.tiles_per_image, t.augment_copies, rng)

    n_grid: dict[int, int] = {}
    counts: dict[str, int] = {}
    with Progress(out, len(train_items) + len(val_items), "features (train)") as bar:
        train = extract_features(net, train_items, grid_then(crops, recipe, n_grid), settings, device,
                                 bar.tick, skipped, n_grid=n_grid, runner=runner, cache=cache,
                                 shas=[hashes[im.rel] for im in train_items], role="train", counts=counts)
        bar.describe("features (val)")
        val = extract_features(net, val_items, _as_cut(recipe), settings, device, bar.tick, skipped,
                               runner=runner, cache=cache, shas=[hashes[im.rel] for im in val_items],
                               role="val", counts=counts)
    return Features(train, val, skipped, counts.get("cached", 0) if cache is not None else None)


def _as_cut(recipe: Recipe) -> Callable[[int, Micrograph], np.ndarray]:
    return lambda _i, m: grid_tiles(m, recipe)


def grid_features(
    net: TileNet,
    split: dict[str, list[LabelledImage]],
    recipe: Recipe,
    settings: Settings,
    device: torch.device,
    out: Output | None,
    label: str,
    runner: Runner | None = None,
) -> Features:
    """The training and validation images as the grid inference cuts, and nothing else: all that
    the novelty detector and the calibration describe (after fine-tuning, and for a refit)."""
    skipped: list[str] = []
    with Progress(out, len(split["train"]) + len(split["val"]), label) as bar:
        train, val = (extract_features(net, split[name], _as_cut(recipe), settings, device, bar.tick, skipped,
                                       runner=runner)
                      for name in ("train", "val"))
    return Features(train, val, skipped)
