"""`semwatch train DATA_DIR --out MODEL_DIR`: one folder per class → a verified model artifact.

Recipe (CPU-friendly; timings in benchmarks/results/HISTORY.md): the ImageNet backbone stays frozen;
its multi-level pooled features are computed once per (tile, augmentation) and a small head is
trained on them with early stopping on validation. Tiles are intensity-equalised, so a session's
brightness/contrast/gamma cannot be learnt; augmentation adds blur, noise, flips and rotations.
Validation images then calibrate the temperature (image-level NLL, tile-level where that has
no finite optimum) and the unknown threshold.
The split is by image, stratified and seeded, and is recorded in the manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from semwatch import __version__
from semwatch.config import Settings
from semwatch.errors import ConfigError, ExitStatus, UserError
from semwatch.model.artifact import SCHEMA_VERSION, Json, Manifest, save_artifact
from semwatch.model.augment import augment_tile, geometric
from semwatch.model.backbone import LAYERS, TileNet, architecture
from semwatch.model.runtime import autocast_for, cpu_bfloat16, select_device
from semwatch.output import Output
from semwatch.reading.tiles import cut_tiles, fit, resample, scale_for, tile_usable, to_network
from semwatch.safefs import path_text, write_atomic
from semwatch.values import ClassInfo, Micrograph, MicrographError, parse_class

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".tif", ".tiff", ".png", ".bmp"}
HEAD_HIDDEN = 512
NOVELTY_K = 64
# Shrinkage of each layer's tied covariance towards a multiple of the identity: a few thousand
# tiles cannot estimate the smallest of 1,280 variances, and their inverse would dominate.
NOVELTY_SHRINK = 0.05
FEATURE_BATCH = 32


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    rel: str  # "<folder>/<file>" relative to the data folder: the split's key
    label: int


@dataclass
class TrainResult:
    model_dir: Path
    manifest: Manifest
    n_train: int
    n_val: int
    n_test: int
    wall_s: float
    skipped: list[str] = field(default_factory=list)

    @property
    def model_id(self) -> str:
        return self.manifest.model_id

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.classes)

    @property
    def validation(self) -> dict[str, Json]:
        return dict(self.manifest.validation)

    def to_json(self) -> dict[str, Json]:
        return {
            "model_dir": path_text(self.model_dir),
            "model_id": self.model_id,
            "classes": list[Json](self.manifest.classes),
            "n_train": self.n_train,
            "n_val": self.n_val,
            "n_test": self.n_test,
            "validation": self.validation,
            "wall_s": round(self.wall_s, 1),
            "skipped": list(self.skipped),
        }


# --- data ----------------------------------------------------------------------------------------


def discover(data_dir: Path, class_map: dict[str, str]) -> tuple[list[ClassInfo], list[LabelledImage]]:
    """Classes from sub-folder names (or `class_map`), images inside them (not recursive)."""
    if not data_dir.is_dir():
        raise UserError(f"data folder not found: {data_dir}")
    folders = sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    names: dict[str, list[Path]] = {}
    for folder in folders:
        name = class_map.get(folder.name, folder.name)
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            names.setdefault(name, []).extend(files)
    if len(names) < 2:
        raise UserError(f"{data_dir}: need at least two class folders with images, found {len(names)}")
    classes = [parse_class(n) for n in sorted(names)]
    images = [
        LabelledImage(p, f"{p.parent.name}/{p.name}", i) for i, c in enumerate(classes) for p in names[c.name]
    ]
    return classes, images


def split_images(
    images: list[LabelledImage], n_classes: int, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[LabelledImage]]:
    """Stratified by class, seeded, by whole image; every class keeps >= 1 training image and,
    where it has >= 2, >= 1 validation image."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[LabelledImage]] = {"train": [], "val": [], "test": []}
    for c in range(n_classes):
        members = [im for im in images if im.label == c]
        order = rng.permutation(len(members))
        members = [members[i] for i in order]
        n = len(members)
        n_val = max(1, round(n * val_fraction)) if n >= 2 else 0
        n_test = min(round(n * test_fraction), max(0, n - n_val - 1))
        out["val"] += members[:n_val]
        out["test"] += members[n_val : n_val + n_test]
        out["train"] += members[n_val + n_test :]
    return out


def fingerprint(images: Sequence[LabelledImage]) -> str:
    """sha256 over (relative path, content hash) of every image: the same data, the same print."""
    digest = hashlib.sha256()
    for im in sorted(images, key=lambda i: i.rel):
        with im.path.open("rb") as fh:
            h = hashlib.file_digest(fh, "sha256").hexdigest()
        digest.update(f"{im.rel}\0{h}\n".encode())
    return digest.hexdigest()


# --- tiles ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    tile_px: int
    tile_physical_px: int
    overlap: float
    max_tiles: int
    std_min: float
    saturated_max: float
    intensity: str
    ref_pixel_nm: float | None
    ref_magnification: float | None


def _factor(m: Micrograph, r: Recipe) -> float:
    return scale_for(m.metadata, r.ref_pixel_nm, r.ref_magnification).factor


def grid_tiles(m: Micrograph, r: Recipe) -> np.ndarray:
    """The tiles inference would see (the same function: same grid, same skipping)."""
    return cut_tiles(
        m.pixels,
        factor=_factor(m, r),
        tile_physical_px=r.tile_physical_px,
        tile_px=r.tile_px,
        overlap=r.overlap,
        max_tiles=r.max_tiles,
        std_min=r.std_min,
        saturated_max=r.saturated_max,
        intensity=r.intensity,
    ).tiles


def training_tiles(
    m: Micrograph, r: Recipe, n_tiles: int, copies: int, rng: np.random.Generator
) -> np.ndarray:
    """`n_tiles` random usable crops, each once plain (flipped/rotated) and `copies` times augmented."""
    image = resample(m.pixels, _factor(m, r))
    size = r.tile_physical_px
    h, w = image.shape
    if h < size or w < size:
        return np.zeros((0, 3, r.tile_px, r.tile_px), np.float32)
    out: list[np.ndarray] = []
    tries = 0
    while len(out) < n_tiles * (1 + copies) and tries < n_tiles * 4:
        tries += 1
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        crop = image[y : y + size, x : x + size]
        if not tile_usable(fit(crop, r.tile_px), r.std_min, r.saturated_max):
            continue
        out.append(geometric(crop, rng))
        out.extend(augment_tile(crop, rng) for _ in range(copies))
    return to_network(out, r.tile_px, r.intensity)


# --- features ------------------------------------------------------------------------------------


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


def _read(path: Path, settings: Settings) -> Micrograph | MicrographError:
    from semwatch.reading.micrograph import read_micrograph

    try:
        return read_micrograph(path, settings)
    except MicrographError as exc:
        return exc


def stream_tiles(
    items: list[LabelledImage],
    make_tiles: Callable[[int, Micrograph], np.ndarray],
    settings: Settings,
    skipped: list[str],
) -> Iterator[tuple[int, np.ndarray]]:
    """`(index, tiles)` of each readable image in order, decoded and tiled on worker threads while
    the consumer runs the network; unreadable images are named in `skipped` (and yield no tiles)."""

    def job(i: int) -> np.ndarray | str:
        m = _read(items[i].path, settings)
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
) -> FeatureSet:
    """Decode and tile on worker threads while the backbone runs; pooled and novelty features per
    tile. Every tile is plain (a grid tile as cut) unless `n_grid` says how many of an image's tiles
    lead as such (`grid_then`)."""
    feats: list[torch.Tensor] = []
    stats: list[torch.Tensor] = []
    labels: list[int] = []
    image_of: list[int] = []
    plain: list[bool] = []
    for i, tiles in stream_tiles(items, make_tiles, settings, skipped):
        lead = len(tiles) if n_grid is None else n_grid.get(i, 0)
        plain += [j < lead for j in range(len(tiles))]
        if len(tiles):
            for s in range(0, len(tiles), FEATURE_BATCH):
                x = torch.from_numpy(tiles[s : s + FEATURE_BATCH]).to(device)
                x = x.contiguous(memory_format=torch.channels_last)
                with torch.inference_mode(), autocast_for(device, settings):
                    f, st = net.backbone.features(x)
                feats.append(f.float().cpu())
                stats.append(st.float().cpu())
            labels += [items[i].label] * len(tiles)
            image_of += [i] * len(tiles)
        tick(1)
    dim, sdim = net.backbone.dim, net.backbone.stats_dim
    return FeatureSet(
        torch.cat(feats) if feats else torch.zeros((0, dim)),
        torch.tensor(labels, dtype=torch.long),
        torch.tensor(image_of, dtype=torch.long),
        torch.tensor([im.label for im in items], dtype=torch.long),
        torch.cat(stats) if stats else torch.zeros((0, sdim)),
        torch.tensor(plain, dtype=torch.bool),
    )


# --- head, calibration, novelty -----------------------------------------------------------------


def image_log_probs(tile_logits: torch.Tensor, image_of: torch.Tensor, n_images: int) -> torch.Tensor:
    """Mean tile log-probability per image, renormalised (as `classify.aggregate` does)."""
    logp = torch.log_softmax(tile_logits, dim=1)
    sums = torch.zeros((n_images, logp.shape[1]), dtype=logp.dtype).index_add_(0, image_of, logp)
    counts = torch.bincount(image_of, minlength=n_images).clamp_min(1).unsqueeze(1)
    return torch.log_softmax(sums / counts, dim=1)


def train_head(
    net: TileNet, train: FeatureSet, val: FeatureSet, n_classes: int, settings: Settings, epochs: int
) -> tuple[int, float]:
    """AdamW on cached features, class-balanced loss, early stopping on validation loss."""
    t = settings.train
    head = net.head
    mean = train.feats.mean(0)
    std = train.feats.std(0).clamp_min(1e-4)
    head.feat_mean.copy_(mean)
    head.feat_std.copy_(std)
    counts = torch.bincount(train.labels, minlength=n_classes).float().clamp_min(1.0)
    weights = (counts.sum() / (n_classes * counts)).clamp(max=20.0)
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=0.05)
    opt = torch.optim.AdamW(head.mlp.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    gen = torch.Generator().manual_seed(t.seed)
    best = (math.inf, 0, {k: v.clone() for k, v in head.state_dict().items()})
    since = 0
    ran = 0
    for epoch in range(epochs):
        ran = epoch + 1
        head.train()
        order = torch.randperm(len(train.feats), generator=gen)
        for s in range(0, len(order), t.batch_size):
            idx = order[s : s + t.batch_size]
            opt.zero_grad()
            loss = loss_fn(head(train.feats[idx]), train.labels[idx])
            loss.backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            if len(val.feats):
                val_loss = float(nn.functional.cross_entropy(head(val.feats), val.labels))
            else:
                val_loss = float(loss_fn(head(train.feats), train.labels))
        if val_loss < best[0] - 1e-4:
            best = (val_loss, epoch + 1, {k: v.clone() for k, v in head.state_dict().items()})
            since = 0
        else:
            since += 1
            if since >= t.patience:
                break
    head.load_state_dict(best[2])
    head.eval()
    return ran, best[0]


TEMPERATURES = np.exp(np.linspace(math.log(0.05), math.log(10.0), 80))


def _best_temperature(nll: Callable[[float], float]) -> tuple[float, bool]:
    """Grid minimum of `nll`, and whether it lies inside the grid (not on its edge)."""
    values = [nll(float(t)) for t in TEMPERATURES]
    best = int(np.argmin(values))
    return float(TEMPERATURES[best]), 0 < best < len(TEMPERATURES) - 1


def calibrate_temperature(net: TileNet, val: FeatureSet) -> tuple[float, str]:
    """The temperature minimising validation images' NLL of the aggregated (image) prediction.

    Averaging tile log-probabilities leaves image verdicts underconfident, so that optimum is
    usually below 1. When every validation image is already right, the image NLL keeps falling as
    the temperature goes to 0 (no finite optimum; it would make every verdict certain): then the
    tile-level NLL, which tile errors keep well-posed, chooses it instead. Returns (T, basis).
    """
    head = net.head
    if not len(val.feats):
        return 1.0, "none"
    head.temperature.fill_(1.0)
    with torch.no_grad():
        logits = head(val.feats)
    n_images = len(val.image_labels)
    seen = torch.bincount(val.image_of, minlength=n_images) > 0

    def image_nll(temp: float) -> float:
        lp = image_log_probs(logits / temp, val.image_of, n_images)[seen]
        return float(nn.functional.nll_loss(lp, val.image_labels[seen]))

    def tile_nll(temp: float) -> float:
        return float(nn.functional.cross_entropy(logits / temp, val.labels))

    temp, interior = _best_temperature(image_nll)
    basis = "image"
    if not interior:
        temp, _ = _best_temperature(tile_nll)
        basis = "tile"
    head.temperature.fill_(temp)
    return temp, basis


def image_novelty(scores: torch.Tensor, image_of: torch.Tensor, n_images: int) -> np.ndarray:
    """Median tile novelty per image (as `classify.aggregate` does)."""
    out = np.full(n_images, np.nan)
    s, idx = scores.numpy(), image_of.numpy()
    for i in range(n_images):
        mine = s[idx == i]
        if len(mine):
            out[i] = float(np.median(mine))
    return out


def validation_metrics(net: TileNet, val: FeatureSet, threshold: float, min_conf: float) -> dict[str, Json]:
    if not len(val.feats):
        return {"n_images": 0}
    n_images = len(val.image_labels)
    with torch.no_grad():
        logits = net.head(val.feats)
    novelty = tile_novelty(net, val)
    seen = torch.bincount(val.image_of, minlength=n_images) > 0
    # as `classify.aggregate` votes: the familiar tiles, or all of an image's tiles if none is
    familiar = ~(novelty > threshold)
    has_familiar = torch.zeros(n_images, dtype=torch.bool).index_fill_(0, val.image_of[familiar], True)
    voters = familiar | ~has_familiar[val.image_of]
    lp = image_log_probs(logits[voters], val.image_of[voters], n_images)[seen]
    conf, pred = lp.exp().max(dim=1)
    truth = val.image_labels[seen]
    nov = image_novelty(novelty, val.image_of, n_images)[seen.numpy()]
    unknown = (nov > threshold) | (conf.numpy() < min_conf)
    return {
        "n_images": int(seen.sum()),
        "n_tiles": len(val.feats),
        "image_accuracy": round(float((pred == truth).float().mean()), 4),
        "tile_accuracy": round(float((logits.argmax(1) == val.labels).float().mean()), 4),
        "unknown_rate": round(float(unknown.mean()), 4),
        "mean_confidence": round(float(conf.mean()), 4),
    }


# --- the whole thing ------------------------------------------------------------------------------


def _reference_scale(items: list[LabelledImage], settings: Settings) -> tuple[float | None, float | None]:
    """Median pixel size and magnification of (a sample of) the training images."""
    sizes: list[float] = []
    mags: list[float] = []
    step = max(1, len(items) // 16)
    for im in items[::step][:16]:
        m = _read(im.path, settings)
        if isinstance(m, Micrograph):
            if m.metadata.pixel_size_nm:
                sizes.append(m.metadata.pixel_size_nm)
            if m.metadata.magnification:
                mags.append(m.metadata.magnification)
    return (float(np.median(sizes)) if sizes else None, float(np.median(mags)) if mags else None)


def _recipe(settings: Settings, train: list[LabelledImage]) -> Recipe:
    """How tiles are cut for this model: the settings' grid at the training images' median scale."""
    tiling = settings.tiling
    ref_nm, ref_mag = _reference_scale(train, settings)
    return Recipe(
        tiling.tile_px,
        tiling.tile_physical_px,
        tiling.overlap,
        tiling.max_tiles,
        tiling.tile_std_min,
        tiling.tile_saturated_max,
        tiling.intensity,
        ref_nm,
        ref_mag,
    )


def _subsample(
    images: list[LabelledImage], n_classes: int, per_class: int | None, seed: int
) -> list[LabelledImage]:
    """At most `per_class` images of each class, chosen at random (seeded), in their original order."""
    if per_class is None:
        return images
    rng = np.random.default_rng(seed)
    kept: list[LabelledImage] = []
    for c in range(n_classes):
        members = [im for im in images if im.label == c]
        order = sorted(rng.permutation(len(members))[:per_class])
        kept += [members[i] for i in order]
    return kept


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


def _features(
    net: TileNet,
    split: dict[str, list[LabelledImage]],
    recipe: Recipe,
    settings: Settings,
    device: torch.device,
    out: Output | None,
) -> Features:
    """Training images as the grid inference cuts (what the novelty detector is fitted on: random
    rotated crops widen its notion of NCM enough to let JPEG-blocked noise through) followed by
    random augmented crops; validation images as the grid."""
    t = settings.train
    skipped: list[str] = []

    def crops(i: int, m: Micrograph) -> np.ndarray:
        rng = np.random.default_rng([t.seed, i])
        return training_tiles(m, recipe, t.tiles_per_image, t.augment_copies, rng)

    n_grid: dict[int, int] = {}
    with Progress(out, len(split["train"]) + len(split["val"]), "features (train)") as bar:
        train = extract_features(net, split["train"], grid_then(crops, recipe, n_grid), settings, device,
                                 bar.tick, skipped, n_grid=n_grid)
        bar.describe("features (val)")
        val = extract_features(net, split["val"], _as_cut(recipe), settings, device, bar.tick, skipped)
    return Features(train, val, skipped)


def _as_cut(recipe: Recipe) -> Callable[[int, Micrograph], np.ndarray]:
    return lambda _i, m: grid_tiles(m, recipe)


def _grid_features(
    net: TileNet,
    split: dict[str, list[LabelledImage]],
    recipe: Recipe,
    settings: Settings,
    device: torch.device,
    out: Output | None,
    label: str,
) -> Features:
    """The training and validation images as the grid inference cuts, and nothing else: all that
    the novelty detector and the calibration describe (after fine-tuning, and for a refit)."""
    skipped: list[str] = []
    with Progress(out, len(split["train"]) + len(split["val"]), label) as bar:
        train, val = (extract_features(net, split[name], _as_cut(recipe), settings, device, bar.tick, skipped)
                      for name in ("train", "val"))
    return Features(train, val, skipped)


@dataclass(frozen=True)
class Fit:
    """What fitting the head, its temperature and the novelty score produced."""

    epochs_run: int
    unknown_threshold: float
    temperature: float
    validation: dict[str, Json]


def fit_head_and_novelty(net: TileNet, features: Features, n_classes: int, settings: Settings,
                         epochs: int, *, head_trained: tuple[int, float] | None = None) -> Fit:
    """Train the head (unless `head_trained` says it was: epochs run, validation loss), calibrate
    its temperature, fit the novelty score and its threshold, and measure the result on the
    validation images."""
    train, val = features.train, features.val
    ran, val_loss = head_trained or train_head(net, train, val, n_classes, settings, epochs)
    temperature, temperature_basis = calibrate_temperature(net, val)
    net.novelty.fit(train.feats, train.labels, n_classes)
    threshold = fit_detector(net, train, val, n_classes, settings)
    validation = validation_metrics(net, val, threshold, settings.model.min_confidence)
    validation.update(val_loss=round(val_loss, 5), temperature=round(temperature, 4),
                      temperature_basis=temperature_basis, epochs_run=ran)
    return Fit(ran, threshold, temperature, validation)


# --- fine-tuning ----------------------------------------------------------------------------------

# Linear warm-up over this share of the fine-tuning steps, then a cosine decay to zero: the head,
# trained on frozen features, must not be torn up by the first large steps of a pretrained backbone.
WARMUP_SHARE = 0.1
# Tiles of several images are shuffled together in a buffer of this many batches (the images come
# class by class; a batch of one class would swing the BatchNorm-free updates from class to class).
SHUFFLE_BATCHES = 4


def backbone_mode(settings: Settings, device: torch.device) -> str:
    """`[train] backbone` resolved: "finetune" or "frozen" ("auto": fine-tune on CUDA only)."""
    mode = settings.train.backbone
    if mode == "auto":
        return "finetune" if device.type == "cuda" else "frozen"
    return mode


def finetune(
    net: TileNet,
    items: list[LabelledImage],
    recipe: Recipe,
    n_classes: int,
    settings: Settings,
    device: torch.device,
    out: Output | None,
) -> dict[str, Json]:
    """Train the whole backbone and the head end to end on freshly augmented training tiles.

    Starts from the head fitted on frozen features. AdamW (the head at 10x the backbone's rate),
    linear warm-up then cosine decay, float16 autocast with gradient scaling on CUDA (bfloat16 on a
    CPU that does it natively). BatchNorm statistics stay those of the pretrained network (batches
    of one or two images' tiles would make poor statistics); drop-connect is on."""
    t = settings.train
    net.to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    net.train()
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    tiles_per_epoch = len(items) * t.tiles_per_image * (1 + t.augment_copies)
    total = max(1, t.finetune_epochs * math.ceil(tiles_per_epoch / t.batch_size))
    warmup = max(1, int(total * WARMUP_SHARE))
    opt = torch.optim.AdamW(
        [
            {"params": net.backbone.parameters(), "lr": t.finetune_learning_rate},
            {"params": net.head.mlp.parameters(), "lr": t.finetune_learning_rate * 10},
        ],
        weight_decay=t.weight_decay,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: (step + 1) / warmup if step < warmup
        else 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    )
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and settings.model.mixed_precision)
    counts = torch.zeros(n_classes).index_add_(0, torch.tensor([im.label for im in items]),
                                               torch.ones(len(items))).clamp_min(1.0)
    loss_fn = nn.CrossEntropyLoss(weight=(counts.sum() / (n_classes * counts)).clamp(max=20.0).to(device),
                                  label_smoothing=0.05)
    rng = np.random.default_rng([t.seed, 7])
    steps, losses = 0, []

    def step(x: np.ndarray, y: np.ndarray) -> None:
        nonlocal steps
        xb = torch.from_numpy(x).to(device).contiguous(memory_format=torch.channels_last)
        yb = torch.from_numpy(y).to(device)
        opt.zero_grad(set_to_none=True)
        with autocast_for(device, settings):
            feats, _ = net.backbone(xb)
            loss = loss_fn(net.head(feats.float()), yb)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if steps < total:
            sched.step()
        steps += 1
        losses.append(float(loss.detach()))

    skipped: list[str] = []
    with Progress(out, len(items) * t.finetune_epochs, "fine-tuning") as bar:
        for epoch in range(t.finetune_epochs):
            order = [items[i] for i in rng.permutation(len(items))]

            def tiles(i: int, m: Micrograph, epoch: int = epoch) -> np.ndarray:
                r = np.random.default_rng([t.seed, i, epoch, 11])
                return training_tiles(m, recipe, t.tiles_per_image, t.augment_copies, r)

            xs: list[np.ndarray] = []
            ys: list[np.ndarray] = []
            for i, batch in stream_tiles(order, tiles, settings, skipped):
                if len(batch):
                    xs.append(batch)
                    ys.append(np.full(len(batch), order[i].label, np.int64))
                bar.tick(1)
                last = i == len(order) - 1
                if sum(len(x) for x in xs) >= SHUFFLE_BATCHES * t.batch_size or (last and xs):
                    x, y = np.concatenate(xs), np.concatenate(ys)
                    perm = rng.permutation(len(x))
                    x, y = x[perm], y[perm]
                    for s in range(0, len(x), t.batch_size):
                        step(x[s : s + t.batch_size], y[s : s + t.batch_size])
                    xs, ys = [], []
    net.eval()
    return {"steps": steps, "epochs": t.finetune_epochs, "warmup_steps": warmup,
            "first_loss": round(losses[0], 4) if losses else None,
            "last_loss": round(float(np.mean(losses[-10:])), 4) if losses else None}


DETECTOR_STATISTIC = ("median over tiles of the largest per-layer squared Mahalanobis distance to the "
                      "nearest class (tied shrunk covariance), each layer scaled by its validation median")


def detector_record() -> dict[str, Json]:
    """The manifest's `novelty` entry for the layer-wise detector."""
    return {"detector": LAYERS, "shrinkage": NOVELTY_SHRINK, "fitted_on": "grid tiles of the training images",
            "layers": "channel means of blocks 1, 3, 5, 7, 10, 14, 15 and of the head"}


def tile_novelty(net: TileNet, fs: FeatureSet) -> torch.Tensor:
    """The novelty score `TileNet.forward` gives these tiles (from their cached features)."""
    with torch.no_grad():
        return net.layers(fs.stats) if net.detector == LAYERS else net.novelty(fs.feats)


def fit_detector(
    net: TileNet, train: FeatureSet, val: FeatureSet, n_classes: int, settings: Settings
) -> float:
    """Fit the layer-wise detector on the training images' grid tiles (`plain`), scale each layer by its
    validation tiles' median, and return the unknown threshold (`novelty_threshold`)."""
    if net.detector == LAYERS:
        keep = train.plain if bool(train.plain.any()) else torch.ones(len(train.labels), dtype=torch.bool)
        net.layers.fit(train.stats[keep], train.labels[keep], n_classes, NOVELTY_SHRINK)
        basis = val.stats if len(val.stats) else train.stats[keep]
        with torch.no_grad():
            net.layers.reference.copy_(net.layers.layer_scores(basis).median(dim=0).values.clamp_min(1e-6))
    return novelty_threshold(net, train, val, settings)


def novelty_threshold(net: TileNet, train: FeatureSet, val: FeatureSet, settings: Settings) -> float:
    """`[train] unknown_quantile` of the validation images' novelty (the training tiles' where no
    validation image has tiles), times `unknown_margin`."""
    t = settings.train
    val_scores = image_novelty(tile_novelty(net, val), val.image_of, len(val.image_labels))
    finite = val_scores[np.isfinite(val_scores)]
    basis = finite if len(finite) else tile_novelty(net, train).numpy()
    return float(np.quantile(basis, t.unknown_quantile)) * t.unknown_margin


def _precision(device: torch.device, settings: Settings) -> str:
    if device.type == "cuda" and settings.model.mixed_precision:
        return "float16"
    if device.type == "cpu" and cpu_bfloat16(settings):
        return "bfloat16"
    return "float32"


def describe_model(
    out_dir: Path,
    data_dir: Path,
    settings: Settings,
    classes: list[ClassInfo],
    images: list[LabelledImage],
    split: dict[str, list[LabelledImage]],
    recipe: Recipe,
    features: Features,
    fit: Fit,
    device: torch.device,
    wall_s: float,
) -> Manifest:
    """The manifest of a model just fitted (its checksums are added by `save_artifact`)."""
    t, tiling = settings.train, settings.tiling
    return Manifest(
        name=out_dir.name,
        classes=tuple(c.name for c in classes),
        class_info=tuple(classes),
        architecture=settings.model.architecture,
        tile_px=tiling.tile_px,
        tile_physical_px=tiling.tile_physical_px,
        overlap=tiling.overlap,
        intensity=tiling.intensity,
        normalisation={
            "intensity": tiling.intensity,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "channels": "grey repeated x3",
        },
        reference_pixel_size_nm=recipe.ref_pixel_nm,
        reference_magnification=recipe.ref_magnification,
        head_hidden=HEAD_HIDDEN,
        novelty_k=NOVELTY_K,
        unknown_threshold=round(fit.unknown_threshold, 5),
        unknown_calibration={
            "quantile": t.unknown_quantile,
            "margin": t.unknown_margin,
            "statistic": DETECTOR_STATISTIC,
        },
        novelty=detector_record(),
        temperature=round(fit.temperature, 5),
        training={
            "data_dir": path_text(data_dir.resolve()),
            "data_fingerprint": fingerprint(images),
            "n_images": len(images),
            "n_train_tiles": len(features.train.feats),
            "seed": t.seed,
            "epochs_run": fit.epochs_run,
            "tiles_per_image": t.tiles_per_image,
            "augment_copies": t.augment_copies,
            "device": str(device),
            "precision": _precision(device, settings),
            "wall_s": round(wall_s, 1),
            "skipped": list(features.skipped),
        },
        # The same figures under two keys: `validation` is what the first models had, `metrics` is
        # what the daemon registers with the model (room for more than validation).
        validation=fit.validation,
        metrics={"validation": fit.validation},
        split={k: tuple(sorted(im.rel for im in v)) for k, v in split.items()},
        semwatch_version=__version__,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def train_model(
    data_dir: Path,
    out_dir: Path,
    settings: Settings,
    *,
    max_images_per_class: int | None = None,
    epochs: int | None = None,
    progress: bool = True,
    out: Output | None = None,
) -> TrainResult:
    """Train on `data_dir` (one folder per class) and write the artifact to `out_dir`; progress on
    `out`'s stderr (the process's by default) unless `progress` is off."""
    started = time.monotonic()
    t = settings.train
    try:
        architecture(settings.model.architecture)
    except ValueError as exc:
        raise ConfigError(f"[model] architecture: {exc}") from None
    torch.manual_seed(t.seed)
    classes, images = discover(data_dir, t.class_map)
    images = _subsample(images, len(classes), max_images_per_class, t.seed)
    split = split_images(images, len(classes), t.val_fraction, t.test_fraction, t.seed)
    recipe = _recipe(settings, split["train"])
    device = select_device(settings.model.device)
    if settings.model.cpu_threads > 0:
        torch.set_num_threads(settings.model.cpu_threads)
    net = TileNet(settings.model.architecture, settings.tiling.tile_px, len(classes), hidden=HEAD_HIDDEN,
                  novelty_k=NOVELTY_K, pretrained=True)
    net.backbone.to(device).to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
    features = _features(net, split, recipe, settings, device, (out or Output()) if progress else None)
    if not len(features.train.feats):
        raise UserError(
            f"{data_dir}: no usable training tiles (all images unreadable or blank)", ExitStatus.INPUT_FAILED
        )
    mode = backbone_mode(settings, device)
    tuned: dict[str, Json] = {}
    head_trained: tuple[int, float] | None = None
    described = features  # what calibration and the novelty detector are fitted on
    if mode == "finetune":
        head_trained = train_head(net, features.train, features.val, len(classes), settings,
                                  epochs or t.epochs)
        tuned = finetune(net, split["train"], recipe, len(classes), settings, device,
                         (out or Output()) if progress else None)
        # The features moved with the backbone: the grid tiles, all that calibration and the
        # detector use once the head is trained, are taken again (not the augmented crops).
        net.head.to("cpu")
        net.backbone.eval()
        described = _grid_features(net, split, recipe, settings, device,
                                   (out or Output()) if progress else None, "features (fine-tuned)")
    net.to("cpu")
    fit = fit_head_and_novelty(net, described, len(classes), settings, epochs or t.epochs,
                               head_trained=head_trained)
    manifest = describe_model(out_dir, data_dir, settings, classes, images, split, recipe, features, fit,
                              device, time.monotonic() - started)
    manifest = dataclasses.replace(manifest, training={**manifest.training, "backbone": mode,
                                                       **({"finetune": tuned} if tuned else {})})
    saved = save_artifact(out_dir, dict(net.state_dict()), manifest)
    return TrainResult(out_dir, saved, len(split["train"]), len(split["val"]), len(split["test"]),
                       time.monotonic() - started, features.skipped)


def refit_novelty(model_dir: Path, data_dir: Path, out_dir: Path, settings: Settings, *,
                  out: Output | None = None) -> Manifest:
    """Give an existing model the layer-wise novelty detector (fitted again, or for the first time on
    a model of schema 1-2) without retraining its head: the split its manifest records, the grid
    tiles of its training images as they are, its threshold calibrated on its validation images.
    Writes a new artifact to `out_dir` (a new model id); the source is not changed. Costs one
    backbone pass over the training and validation images (minutes), not a training run."""
    from semwatch.model.artifact import load_artifact

    state, manifest = load_artifact(model_dir)
    classes = list(manifest.classes)
    net = TileNet(manifest.architecture, manifest.tile_px, len(classes), hidden=manifest.head_hidden,
                  novelty_k=manifest.novelty_k, pretrained=False, detector=LAYERS)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("layers.") for k in missing):
        raise UserError(f"{model_dir}: weights do not match the manifest")
    _, images = discover(data_dir, settings.train.class_map)
    by_rel = {im.rel: im for im in images}
    index = {c: i for i, c in enumerate(classes)}
    split: dict[str, list[LabelledImage]] = {}
    for name in ("train", "val"):
        rels = [r for r in manifest.split.get(name, ()) if r in by_rel]
        if not rels:
            raise UserError(f"{data_dir}: none of the model's '{name}' images are in this folder")
        split[name] = [LabelledImage(by_rel[r].path, r, index[r.split("/")[0]]) for r in rels]
    tiling = settings.tiling
    recipe = Recipe(manifest.tile_px, manifest.tile_physical_px, manifest.overlap or tiling.overlap,
                    tiling.max_tiles, tiling.tile_std_min, tiling.tile_saturated_max, manifest.intensity,
                    manifest.reference_pixel_size_nm, manifest.reference_magnification)
    device = select_device(settings.model.device)
    net.backbone.to(device).to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
    fs = _grid_features(net, split, recipe, settings, device, out, "novelty features")
    net.to("cpu")
    threshold = fit_detector(net, fs.train, fs.val, len(classes), settings)
    validation = {**manifest.validation,
                  **validation_metrics(net, fs.val, threshold, settings.model.min_confidence)}
    t = settings.train
    new = dataclasses.replace(
        manifest,
        name=out_dir.name,
        unknown_threshold=round(threshold, 5),
        unknown_calibration={"quantile": t.unknown_quantile, "margin": t.unknown_margin,
                             "statistic": DETECTOR_STATISTIC},
        novelty={**detector_record(), "fitted_on": "grid tiles of the training images (refit)",
                 "refit_of": manifest.model_id},
        validation=validation,
        metrics={**manifest.metrics, "validation": validation},
        schema_version=SCHEMA_VERSION,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    return save_artifact(out_dir, dict(net.state_dict()), new)


def train_folder(
    data_dir: Path,
    settings: Settings,
    *,
    out_dir: Path,
    epochs: int | None,
    max_images_per_class: int | None,
    split_out: Path | None,
    out: Output,
) -> int:
    """`semwatch train`: train, optionally write the split as JSON to `split_out`, report the model
    (one JSON object with `--json`); images that could not be read are named on stderr (exit 1)."""
    result = train_model(data_dir, out_dir, settings, max_images_per_class=max_images_per_class,
                         epochs=epochs, progress=True, out=out)
    if split_out is not None:
        split = {k: list(v) for k, v in result.manifest.split.items()}
        write_atomic(split_out, (json.dumps(split, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    if out.json:
        out.emit(result.to_json())
    else:
        v = result.validation
        out.line(
            f"model {result.model_id} written to {path_text(result.model_dir)} in {result.wall_s:.0f} s: "
            f"{len(result.classes)} classes, {result.n_train}/{result.n_val}/{result.n_test} images "
            f"train/val/test; validation image accuracy {v.get('image_accuracy', 'n/a')}, "
            f"tile accuracy {v.get('tile_accuracy', 'n/a')}"
        )
    for line in result.skipped:
        out.say(f"skipped {line}")
    return ExitStatus.INPUT_FAILED if result.skipped else ExitStatus.OK
