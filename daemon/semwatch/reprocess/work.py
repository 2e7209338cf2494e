"""One file to (re-)classify, and the two halves every engine runs on it.

`read_item` (CPU, no network weights: what a reader thread or a Ray reader task does) turns a
`WorkItem` into tiles or an error; `classify_items` (the network: the local inference loop or a Ray
actor) turns a group of prepared items into verdicts with the daemon's own batching engine
(`engine.predict_images`). Both engines call exactly these two functions, so the same file gets the
same verdict whichever engine ran it. Every value here is picklable: Ray ships them between
processes and machines; of the settings only a `WorkerSettings` travels (no store, no alert URLs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from semwatch.config import (
    ModelSettings,
    QualitySettings,
    ReadingSettings,
    SampleSettings,
    Settings,
    TilingSettings,
    WatchSettings,
)
from semwatch.reading.listing import stat_path
from semwatch.reading.sample import expected_class, sample_key
from semwatch.safefs import Confinement, RefusedFile
from semwatch.values import FileKey, ImageVerdict, MicrographError, is_transient

if TYPE_CHECKING:  # torch: imported only where the network runs
    from semwatch.model.artifact import Manifest
    from semwatch.model.classify import Classifier
    from semwatch.model.engine import PreparedImage

@dataclass(frozen=True)
class WorkerSettings:
    """Exactly the settings that reading, tiling and classifying a file use: all a Ray node is sent.
    The rest of `Settings` stays on the driver: alert URLs and their tokens, the metrics address,
    the database, report and watch folders. `model.path` is blanked (a worker gets the model's
    bytes, not the driver's path)."""

    follow_symlinks: Literal["inside", "never", "always"]
    read_timeout_seconds: float
    reading: ReadingSettings
    quality: QualitySettings
    tiling: TilingSettings
    model: ModelSettings
    samples: SampleSettings

    @classmethod
    def of(cls, settings: Settings) -> WorkerSettings:
        return cls(settings.watch.follow_symlinks, settings.watch.read_timeout_seconds, settings.reading,
                   settings.quality, settings.tiling, dataclasses.replace(settings.model, path=Path()),
                   settings.samples)

    def settings(self) -> Settings:
        """A `Settings` for the library functions (`read_micrograph`, `Classifier.load` take one):
        these sections, the defaults elsewhere."""
        watch = WatchSettings(follow_symlinks=self.follow_symlinks,
                              read_timeout_seconds=self.read_timeout_seconds)
        return Settings(watch=watch, reading=self.reading, quality=self.quality, tiling=self.tiling,
                        model=self.model, samples=self.samples)


@dataclass(frozen=True)
class WorkItem:
    """A file to classify. `supersedes`: the ledger row a new result replaces (a re-classification),
    with `recorded` the version that row is about and `sample_id` the sample it was recorded in
    (kept); None for a version the ledger does not hold yet. `root`: the folder reads are confined
    to and sample keys are relative to."""

    path: str
    root: str
    supersedes: int | None = None
    recorded: FileKey | None = None
    sample_id: str | None = None
    # An archive file the ledger does not hold: the version its listing found, so that a read that
    # never returns (nothing else was learnt of the file) is still recorded failed for it.
    listed: FileKey | None = None


@dataclass(frozen=True)
class Prepared:
    """A work item read and cut into tiles, on its way to the network."""

    item: WorkItem
    key: FileKey
    sha256: str
    sample_id: str
    expected: str | None
    image: PreparedImage


@dataclass(frozen=True)
class Outcome:
    """What became of a work item: a verdict, or an error (`transient`: it may pass if read again;
    `gone`: the file no longer exists). `key` is the version actually read (None if none was)."""

    item: WorkItem
    key: FileKey | None
    sha256: str | None = None
    sample_id: str | None = None
    expected: str | None = None
    verdict: ImageVerdict | None = None
    error: str | None = None
    transient: bool = False
    gone: bool = False


def read_item(item: WorkItem, settings: Settings, manifest: Manifest) -> Prepared | Outcome:
    """Stat, hash (bounded, through `safefs`), decode and tile one file, as the daemon's readers do:
    the same confinement and symlink policy, the same size limit, the same sample key and expected
    class. Errors come back as an `Outcome`, never raised."""
    from semwatch.model.classify import prepare_micrograph
    from semwatch.reading.micrograph import content_sha256, read_micrograph

    path, root = Path(item.path), Path(item.root)
    confine = Confinement(root, settings.watch.follow_symlinks)
    try:
        key = FileKey.of(item.path, stat_path(item.path))
    except OSError as exc:
        gone = isinstance(exc, FileNotFoundError)
        return Outcome(item, None, error=f"cannot read file: {exc.strerror or exc}", gone=gone)
    try:
        sha = content_sha256(item.path, settings, confine=confine)
        micrograph = read_micrograph(path, settings, confine=confine)
    except RefusedFile as exc:
        return Outcome(item, key, error=f"refused: {exc.strerror}")
    except OSError as exc:
        error = f"cannot read file: {exc.strerror or exc}"
        return Outcome(item, key, error=error, transient=True, gone=isinstance(exc, FileNotFoundError))
    except MicrographError as exc:
        return Outcome(item, key, error=str(exc), transient=is_transient(str(exc)))
    sample_id = item.sample_id
    if sample_id is None:
        sample_id = sample_key(path, root, settings.samples, micrograph.metadata)
    expected = expected_class(sample_id, path, settings.samples, confine=confine)
    image = prepare_micrograph(manifest, settings, micrograph)
    return Prepared(item, key, sha, sample_id, expected, image)


def read_bounded(items: Iterable[WorkItem], settings: Settings, manifest: Manifest, *, workers: int,
                 prefetch: int, read: Callable[[WorkItem], Prepared | Outcome] | None = None,
                 name: str = "semwatch-reprocess") -> Iterator[tuple[WorkItem, Prepared | Outcome]]:
    """`read_item` on each item (or `read`), on `workers` threads at most `prefetch` items ahead, in
    input order: a read that has not returned within `[watch] read_timeout_seconds` is given up and
    its outcome says so (`timed_out`, the file recorded failed or its earlier result kept); the
    run goes on. Both engines' readers (a local reader thread, a Ray reader task) go through it."""
    from semwatch.model.engine import prefetched

    seconds = settings.watch.read_timeout_seconds
    fn = read if read is not None else partial(read_item, settings=settings, manifest=manifest)
    return prefetched(fn, items, workers=workers, prefetch=prefetch, timeout=seconds,
                      on_timeout=partial(timed_out, seconds=seconds), name=name)


def classify_items(classifier: Classifier, group: list[Prepared]) -> list[Outcome]:
    """Verdicts for a group of prepared items, their tiles through the network together."""
    from semwatch.model.engine import predict_images

    outputs = predict_images(classifier, [p.image for p in group])
    return [Outcome(p.item, p.key, p.sha256, p.sample_id, p.expected, classifier.verdict(p.image, out))
            for p, out in zip(group, outputs, strict=True)]


def timed_out(item: WorkItem, seconds: float) -> Outcome:
    """A read given up: recorded failed for a listed archive file (`listed`), the earlier result
    kept for a re-classification."""
    return Outcome(item, item.listed, error=f"timed out: reading took longer than {seconds:g} s "
                   "([watch] read_timeout_seconds)", transient=True)
