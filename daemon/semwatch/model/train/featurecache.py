"""Backbone features kept between trainings, by image content (`[train] cache_features`).

A challenger is trained on the champion's images plus the lab's new labels, with the same frozen
backbone: recomputing every training tile's features (most of a training run on a CPU) would
repeat the champion's work. With a registry, each image's features are kept in
`<registry>/.feature-cache/<key>/<role>-<sha256>.npz`: pooled features, the novelty detector's
statistics and how many of its tiles lead as cut (the grid), float32 as computed, so a run that
reads them trains the very model a run without them would (a test checks the model id). `key` is
a hash of everything that decides an image's tiles and their features: the backbone's export
(sha256) and the runtime that runs it, the training recipe (tile size and scale, intensity, the
reference scale), the augmentation (seed, tiles per image, copies; each image's crops are drawn
from its content's own seed), the `[reading]` and `[tiling]` settings and the semwatch version.
Anything else changes the key, and the old folders are deleted (the newest `KEEP_KEYS` stay).
Written atomically; an entry that cannot be read is computed again. No library keeps arrays by
content key with atomic writes and pruning for us here (joblib.Memory hashes the arguments,
i.e. whole micrographs, on every call), so this small module does.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semwatch import __version__
from semwatch.config import Settings
from semwatch.model.artifact import canonical_sha256
from semwatch.model.train.data import Recipe
from semwatch.safefs import write_atomic

FOLDER = ".feature-cache"
KEEP_KEYS = 2  # the current key and the one before it (a challenger trained with older settings)


@dataclass(frozen=True)
class CachedFeatures:
    feats: np.ndarray  # (T, D) float32
    stats: np.ndarray  # (T, S) float32
    n_plain: int  # the first n_plain tiles are the grid as inference cuts it


@dataclass(frozen=True)
class FeatureCache:
    folder: Path  # <registry>/.feature-cache/<key>

    def _path(self, role: str, sha256: str) -> Path:
        return self.folder / f"{role}-{sha256}.npz"

    def load(self, role: str, sha256: str) -> CachedFeatures | None:
        try:
            with np.load(self._path(role, sha256), allow_pickle=False) as z:
                feats, stats, n_plain = z["feats"], z["stats"], int(z["n_plain"])
        except (OSError, ValueError, KeyError):  # missing, or not an entry we wrote: computed again
            return None
        if feats.ndim != 2 or stats.ndim != 2 or len(feats) != len(stats):
            return None
        return CachedFeatures(feats.astype(np.float32, copy=False), stats.astype(np.float32, copy=False),
                              n_plain)

    def save(self, role: str, sha256: str, entry: CachedFeatures) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, feats=entry.feats, stats=entry.stats, n_plain=np.int64(entry.n_plain))
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(self._path(role, sha256), buffer.getvalue())
        except OSError:  # a full disk costs the cache, not the training
            pass


def cache_key(settings: Settings, recipe: Recipe, export_sha256: str, runtime: str) -> str:
    t = settings.train
    return canonical_sha256({
        "export": export_sha256, "runtime": runtime, "recipe": dataclasses.asdict(recipe),
        "seed": t.seed, "tiles_per_image": t.tiles_per_image, "augment_copies": t.augment_copies,
        "reading": dataclasses.asdict(settings.reading), "tiling": dataclasses.asdict(settings.tiling),
        "semwatch": __version__,
    })[:32]


def open_cache(settings: Settings, recipe: Recipe, export_sha256: str | None,
               runtime: str) -> FeatureCache | None:
    """The cache for this training, or None (no registry, `cache_features` off, no export to key
    the backbone by); older keys' folders pruned."""
    registry = settings.model.registry
    if registry is None or not settings.train.cache_features or export_sha256 is None:
        return None
    root = registry / FOLDER
    folder = root / cache_key(settings, recipe, export_sha256, runtime)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        folder.touch()  # the newest key by mtime
        others = sorted((p for p in root.iterdir() if p.is_dir() and p != folder),
                        key=lambda p: p.stat().st_mtime_ns, reverse=True)
    except OSError:
        return None
    for old in others[KEEP_KEYS - 1:]:
        shutil.rmtree(old, ignore_errors=True)
    return FeatureCache(folder)


def content_seed(seed: int, sha256: str) -> list[int]:
    """The augmentation's seed for an image: the run's seed and its content (not its place in the
    list, which moves when labelled images are added)."""
    return [seed, int(sha256[:15], 16)]
