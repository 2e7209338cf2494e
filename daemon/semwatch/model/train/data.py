"""Training data: the labelled images, their split, their fingerprint, and the tiles cut from them.

An image's `rel` is its key: the split is decided over it, the manifest records it (`split`), and
`refit_novelty` finds a model's images again by it. For class folders it is "<folder>/<file>"; for
images from another source (the lab's labels) the caller gives any stable, unique text (e.g.
"sha256:<hex>"). The split is a seeded permutation of each class's images in the order given, so a
caller must give them in a stable order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semwatch.config import Settings
from semwatch.errors import UserError
from semwatch.model.augment import augment_tile, geometric
from semwatch.reading.tiles import cut_tiles, fit, resample, scale_for, tile_usable, to_network
from semwatch.safefs import UNCONFINED, path_text
from semwatch.values import ClassInfo, Micrograph, MicrographError, parse_class

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".tif", ".tiff", ".png", ".bmp"}


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    rel: str  # the image's key (the split's, the manifest's): "<folder>/<file>" for class folders
    label: int  # index into the classes trained


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
    try:  # the one class-name rule (`values.parse_class`)
        classes = [parse_class(n) for n in sorted(names)]
    except ValueError as exc:
        raise UserError(f"{data_dir}: {exc} (rename the folder or map it in [train] class_map)") from None
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


def check_images(classes: Sequence[ClassInfo], images: Sequence[LabelledImage]) -> None:
    """Refuse a list that cannot be trained: fewer than two classes with images, a label outside
    `classes`, or two images with the same key."""
    bad = [im for im in images if not 0 <= im.label < len(classes)]
    if bad:
        raise UserError(f"{bad[0].rel}: label {bad[0].label} is not one of the {len(classes)} classes")
    seen: set[str] = set()
    for im in images:
        if im.rel in seen:
            raise UserError(f"{im.rel}: two images with the same key")
        seen.add(im.rel)
    if len({im.label for im in images}) < 2:
        raise UserError("need images of at least two classes to train")


def content_hashes(images: Sequence[LabelledImage], settings: Settings) -> dict[str, str]:
    """`rel` → sha256 of each image's content, read through the one safe open (bounded by
    `[reading] max_file_mb`); `UserError` naming an image that cannot be read."""
    from semwatch.reading.micrograph import content_sha256

    out: dict[str, str] = {}
    for im in images:
        try:
            out[im.rel] = content_sha256(im.path, settings, confine=UNCONFINED)
        except OSError as exc:
            raise UserError(f"{path_text(im.path)}: cannot read ({exc.strerror or exc})") from None
    return out


def fingerprint(images: Sequence[LabelledImage], hashes: Mapping[str, str] | None = None) -> str:
    """sha256 over (key, content hash) of every image: the same data, the same print. `hashes`:
    the content hashes already taken (`content_hashes`), else each file is hashed here."""
    digest = hashlib.sha256()
    for im in sorted(images, key=lambda i: i.rel):
        if hashes is not None:
            h = hashes[im.rel]
        else:
            with im.path.open("rb") as fh:
                h = hashlib.file_digest(fh, "sha256").hexdigest()
        digest.update(f"{im.rel}\0{h}\n".encode())
    return digest.hexdigest()


def subsample(
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


def read_image(path: Path, settings: Settings) -> Micrograph | MicrographError:
    from semwatch.reading.micrograph import read_micrograph

    try:
        return read_micrograph(path, settings)
    except MicrographError as exc:
        return exc


def _reference_scale(items: list[LabelledImage], settings: Settings) -> tuple[float | None, float | None]:
    """Median pixel size and magnification of (a sample of) the training images."""
    sizes: list[float] = []
    mags: list[float] = []
    step = max(1, len(items) // 16)
    for im in items[::step][:16]:
        m = read_image(im.path, settings)
        if isinstance(m, Micrograph):
            if m.metadata.pixel_size_nm:
                sizes.append(m.metadata.pixel_size_nm)
            if m.metadata.magnification:
                mags.append(m.metadata.magnification)
    return (float(np.median(sizes)) if sizes else None, float(np.median(mags)) if mags else None)


def recipe_for(settings: Settings, train: list[LabelledImage]) -> Recipe:
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
