"""What travels through the pipeline and what it calls: a file's job, a tiled image, the rates it
keeps, and the interfaces of the classifier, the reader and the observer (so that the shadow model,
the metrics and tests meet the pipeline here, not in its machinery)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from semwatch.config import Settings
from semwatch.model.engine import Predictor, PreparedImage, TileOutput
from semwatch.safefs import Confinement
from semwatch.values import FileKey, ImageVerdict, Micrograph


class ClassifierLike(Predictor, Protocol):
    """What the pipeline needs of `model.classify.Classifier` (tests may pass their own)."""

    @property
    def model_id(self) -> str: ...

    def prepare(self, micrograph: Micrograph) -> PreparedImage: ...

    def verdict(self, prepared: PreparedImage, output: TileOutput) -> ImageVerdict: ...


class Reader(Protocol):
    """`reading.micrograph.read_micrograph`, or a test's stand-in for it."""

    def __call__(self, path: Path, settings: Settings, *, confine: Confinement) -> Micrograph: ...


class Observer(Protocol):
    """Told of each verdict and inference batch (`service.metrics.Metrics`); must not block."""

    def result(self, status: str, seconds: float | None) -> None: ...

    def batch(self, images: int, tiles: int) -> None: ...


@dataclass(frozen=True)
class Job:
    key: FileKey
    attempts: int
    counted: bool = False  # this attempt is already in the ledger (a copy handed back by its leader)
    settled_at: float = field(default_factory=time.monotonic, compare=False)  # for the latency metric
    # A catch-up job ([model] reprocess_outdated): re-classify ledger row `supersedes`, in its
    # recorded sample. It is not the watcher's: nothing about it goes to the watcher's inbox, and a
    # failure leaves the earlier result current instead of recording anything.
    supersedes: int | None = None
    sample_id: str | None = None
    # Where a catch-up job's reads are confined (`listing.confinement_root`): the watch folder for
    # its files, the file's own folder for a row that `reprocess FOLDER` ingested from an archive.
    root: Path | None = None


@dataclass
class Prepared:
    job: Job
    sha256: str
    sample_id: str
    expected: str | None
    prepared: PreparedImage
    n_tiles: int
    classifier: ClassifierLike | None = None  # the model it was tiled for (None: the pipeline's)


@dataclass
class Rates:
    """Images and tiles per second over a sliding window."""

    window: float = 10.0
    events: deque[tuple[float, int]] = field(default_factory=deque)

    def add(self, tiles: int) -> None:
        self.events.append((time.monotonic(), tiles))

    def rates(self) -> tuple[float, float]:
        now = time.monotonic()
        while self.events and now - self.events[0][0] > self.window:
            self.events.popleft()
        if not self.events:
            return 0.0, 0.0
        span = max(1.0, now - self.events[0][0]) if len(self.events) > 1 else self.window
        return len(self.events) / span, sum(t for _, t in self.events) / span
