"""The local engine: this machine's reader threads and the daemon's batching engine.

Files are read and tiled on `[watch] reader_threads` threads (`work.read_bounded`, which Ray's
reader tasks use too) while the network runs on the images before them; images are taken in order
until their tiles fill a batch (`engine.batch_groups`, the rule `semwatch classify` and bench use)
and go through `engine.predict_images` together. A read that does not return within `[watch]
read_timeout_seconds` is given up (the file's outcome says so).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from semwatch.config import Settings
from semwatch.reprocess.work import Outcome, Prepared, WorkItem, classify_items, read_bounded


class LocalEngine:
    name = "local"

    def __init__(self, settings: Settings, model_dir: Path) -> None:
        from semwatch.model.classify import Classifier  # torch: only when the engine is used

        self.settings = settings
        self.classifier = Classifier.load(model_dir, settings)
        self.model_id = self.classifier.model_id
        self.device = self.classifier.device

    def run(self, items: Iterable[WorkItem]) -> Iterator[Outcome]:
        """Each item's outcome, in input order; `items` is consumed as it goes (a bounded number of
        items read ahead), so a stream of any length holds little memory."""
        from semwatch.model.engine import batch_groups

        workers = max(1, self.settings.watch.reader_threads)
        stream = read_bounded(items, self.settings, self.classifier.manifest, workers=workers,
                              prefetch=max(8, 2 * workers))
        for group in batch_groups(stream, _tiles_of, self.classifier.batch_size):
            ready = [r for _, r in group if isinstance(r, Prepared)]
            classified = iter(classify_items(self.classifier, ready) if ready else [])
            for _, r in group:
                yield next(classified) if isinstance(r, Prepared) else r

    def close(self) -> None:
        """Nothing to release (threads end with `run`)."""


def _tiles_of(entry: tuple[WorkItem, Prepared | Outcome]) -> int:
    result = entry[1]
    return len(result.image.tiles) if isinstance(result, Prepared) else 0
