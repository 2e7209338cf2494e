"""The daemon follows the registry: a new champion is served without a restart, and the shadow
model follows its alias.

The status loop calls `ModelWatch.check` about once a second; it looks at the aliases file's
identity (inode, size, mtime: the file is replaced on every move) and at SIGHUP. When either
changed, the champion (`model.registry.live_model_dir`) is compared with the model served; a
different one is loaded (on this thread: the pipeline keeps classifying meanwhile), then handed to
the pipeline (`Pipeline.switch`: files already tiled finish with the old model, every row names
the model that made it) and recorded (`ModelSwitched`: the `models` and `daemon` rows). A model
that does not load is logged and the old one kept: a bad promotion never stops the daemon.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from semwatch.config import Settings
from semwatch.errors import UserError
from semwatch.model.artifact import configured_model_id
from semwatch.model.registry import Registry, live_model_dir, registry_of
from semwatch.safefs import path_text
from semwatch.service.pipeline import Pipeline
from semwatch.service.shadow import Shadow, same_tiling
from semwatch.store.messages import ModelSwitched
from semwatch.store.writer import Writer

if TYPE_CHECKING:
    from semwatch.model.classify import Classifier

log = logging.getLogger("semwatch.models")


def load_classifier(settings: Settings, model_dir: object) -> Classifier:
    from pathlib import Path

    from semwatch.model.classify import Classifier

    return Classifier.load(Path(str(model_dir)), settings)


class ModelWatch:
    def __init__(self, settings: Settings, pipeline: Pipeline, writer: Writer, *,
                 on_switch: Callable[[str], None] | None = None,
                 on_challenger: Callable[[str | None], None] | None = None) -> None:
        self.settings = settings
        self.registry: Registry | None = registry_of(settings.model)
        self.pipeline = pipeline
        self.writer = writer
        self.on_switch = on_switch  # a new champion served (the daemon's catch-up, metrics, alerts)
        self.on_challenger = on_challenger  # the challenger alias moved (alerts)
        self.challenger: str | None = None
        self.hup = threading.Event()
        # Unknown at first: the first check compares the champion with the model loaded at start
        # (the aliases may have moved while it loaded).
        self.signature: tuple[int, int, int] | bool | None = False
        self.shadow: Shadow | None = None
        self.switches = 0

    def start(self) -> None:
        """Load the shadow model, if one is configured; note the challenger (not news at start)."""
        self.challenger = self._challenger()
        self._follow_shadow()

    def _challenger(self) -> str | None:
        try:
            return self.registry.read_aliases().challenger if self.registry is not None else None
        except UserError:
            return self.challenger  # an unreadable file is logged by the champion's check

    def check(self) -> None:
        """About once a second, from the status loop."""
        if self.registry is None:
            if self.hup.is_set():
                self.hup.clear()
                self._follow_champion()
            return
        signature = self.registry.signature()
        if signature == self.signature and not self.hup.is_set():
            return
        self.hup.clear()
        self.signature = signature
        self._follow_champion()
        self._follow_shadow()
        challenger = self._challenger()
        if challenger != self.challenger:
            self.challenger = challenger
            if self.on_challenger is not None:
                self.on_challenger(challenger)

    def _follow_champion(self) -> None:
        try:
            model_dir = live_model_dir(self.settings.model)
        except UserError as exc:
            log.error("model registry: %s; keeping model %s", exc, self.pipeline.classifier.model_id)
            return
        model_id = configured_model_id(model_dir)
        current = self.pipeline.classifier.model_id
        if model_id is None or model_id == current:
            return
        try:
            classifier = load_classifier(self.settings, model_dir)
        except (UserError, OSError) as exc:
            log.error("the new champion %s does not load (%s); keeping model %s", model_id, exc, current)
            return
        self.pipeline.switch(classifier)
        m = classifier.manifest
        self.writer.put(ModelSwitched(classifier.model_id, m.name or None, tuple(classifier.classes),
                                      m.created_at or None, path_text(model_dir)))
        self.switches += 1
        log.info("now serving model %s (was %s): files read from now on are classified by it",
                 classifier.model_id, current)
        if self.on_switch is not None:
            self.on_switch(classifier.model_id)

    def _follow_shadow(self) -> None:
        name = self.settings.model.shadow
        if not name or self.registry is None:
            return
        try:
            model_id: str | None = self.registry.resolve(name)
        except UserError:
            model_id = None  # e.g. no challenger right now
        if self.shadow is not None and self.shadow.model_id == model_id:
            return
        if model_id is None:
            self._set_shadow(None)
            return
        try:
            classifier = load_classifier(self.settings, self.registry.model_dir(model_id))
        except (UserError, OSError) as exc:
            log.error("shadow model %s does not load: %s", model_id, exc)
            self._set_shadow(None)
            return
        if not same_tiling(self.pipeline.classifier, classifier):
            log.warning("shadow model %s tiles images differently from the live model; not run", model_id)
            self._set_shadow(None)
            return
        self._set_shadow(Shadow(classifier, self.writer, busy=self.pipeline.live_work_waiting,
                                batch_size=self.settings.model.batch_size))
        log.info("shadow model %s runs beside the live model (verdicts in shadow_results)", model_id)

    def _set_shadow(self, shadow: Shadow | None) -> None:
        self.shadow = shadow
        self.pipeline.after_batch = shadow.after_batch if shadow is not None else None
