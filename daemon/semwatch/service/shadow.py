"""`[model] shadow`: a second model (a registry alias or id, e.g. the challenger) also looks at new
images, to show how it would do on the lab's live stream before anyone promotes it.

It runs on the inference thread after each live batch, on the images that batch classified (their
tiles are reused: the shadow must tile exactly like the live model, else it is not run), and only
while no tiled image waits for the live model: between two of its own batches it looks again and
yields, so a new file waits at most one shadow batch. What it cannot get to is kept in a small
backlog (the oldest dropped first, counted). Its verdicts go to the writer as `ShadowResult`
(table `shadow_results`), never to `images`, sample verdicts, results.csv or alerts.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from semwatch.model.engine import predict_images
from semwatch.safefs import path_text
from semwatch.service.jobs import ClassifierLike, Prepared
from semwatch.store.messages import ShadowResult
from semwatch.store.writer import Writer
from semwatch.values import ImageVerdict

log = logging.getLogger("semwatch.shadow")

BACKLOG = 16  # images (their tiles are held in memory)
TILING_KEYS = ("tile_px", "tile_physical_px", "intensity", "reference_pixel_size_nm",
               "reference_magnification")


def same_tiling(a: object, b: object) -> bool:
    """Whether two models' manifests cut the same tiles (so the live tiles can be reused)."""
    ma, mb = getattr(a, "manifest", None), getattr(b, "manifest", None)
    if ma is None or mb is None:
        return True
    return all(getattr(ma, k, None) == getattr(mb, k, None) for k in TILING_KEYS)


class Shadow:
    def __init__(self, classifier: ClassifierLike, writer: Writer, *, busy: Callable[[], bool],
                 batch_size: int) -> None:
        self.classifier = classifier
        self.writer = writer
        self.busy = busy
        self.batch_size = batch_size
        self.backlog: deque[tuple[Prepared, ImageVerdict]] = deque()
        self.done = 0
        self.dropped = 0

    @property
    def model_id(self) -> str:
        return self.classifier.model_id

    def after_batch(self, done: list[tuple[Prepared, ImageVerdict]]) -> None:
        """The pipeline's `after_batch` (inference thread)."""
        for item, live in done:
            if live.model_id == self.classifier.model_id or not same_tiling(item.classifier, self.classifier):
                continue
            self.backlog.append((item, live))
        while len(self.backlog) > BACKLOG:
            self.backlog.popleft()
            self.dropped += 1
        while self.backlog and not self.busy():
            self._run_one_batch()

    def _run_one_batch(self) -> None:
        batch: list[tuple[Prepared, ImageVerdict]] = []
        tiles = 0
        while self.backlog and (not batch or tiles + self.backlog[0][0].n_tiles <= self.batch_size):
            entry = self.backlog.popleft()
            batch.append(entry)
            tiles += entry[0].n_tiles
        outputs = predict_images(self.classifier, [p.prepared for p, _ in batch])
        for (p, live), out in zip(batch, outputs, strict=True):
            verdict = self.classifier.verdict(p.prepared, out)
            self.writer.put(ShadowResult(path_text(p.job.key.path), p.sha256, verdict,
                                         self.classifier.model_id, live))
            self.done += 1
