"""Thumbnails of the day's failed and unknown images, as base64 JPEG for embedding in the page.

The files are untrusted and may have changed since they were processed (replaced by a FIFO, a
link out of the folder, a giant TIFF), so they are read only through `read_micrograph`: the watch
folder's confinement, no blocking opens, the `[reading]` limits. Grad-CAM where a model is
available and the image has usable tiles, else the plain image; none (and the reason, shown in
the page) when the file cannot or may not be read now. A thumbnail never costs the report.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from semwatch.config import Settings
from semwatch.safefs import Confinement, path_from_text

if TYPE_CHECKING:
    from semwatch.model.classify import Classifier

log = logging.getLogger("semwatch.report")

THUMB_PX = 360


@dataclass(frozen=True)
class Thumbnail:
    """One flagged image as the page shows it; `jpeg` is None when there is no picture (`kind`
    then says why)."""

    name: str
    path: str
    status: str
    jpeg: str | None
    kind: str
    detail: str
    sample_id: str | None
    confidence: float | None
    judged: str = ""  # what the caption says of the verdict (`report.daily.DayImage.judged`)


def thumbnail(stored_path: str, settings: Settings, classifier: Classifier | None) -> tuple[str | None, str]:
    """(base64 JPEG or None, what it shows) for an image row's path (`path_text` form)."""
    from semwatch.reading.micrograph import read_micrograph

    confine = Confinement(settings.watch.folder, settings.watch.follow_symlinks)
    try:
        micrograph = read_micrograph(Path(path_from_text(stored_path)), settings, confine=confine)
    except Exception as exc:  # MicrographError, or a reader bug: either way no thumbnail, no report lost
        return None, f"not readable now: {_first_line(exc)}"
    if classifier is not None:
        try:
            if len(classifier.prepare(micrograph).tiles):
                return _encode(classifier.explain(micrograph)), "Grad-CAM"
        except Exception as exc:  # the plain image still says something
            log.debug("no Grad-CAM for %s: %s", stored_path, exc)
    try:
        return _encode(_plain(micrograph.pixels)), "image"
    except Exception as exc:
        return None, f"no thumbnail: {_first_line(exc)}"


def load_classifier(settings: Settings) -> Classifier | None:
    """The configured model for Grad-CAM thumbnails; None (plain thumbnails) when there is none or
    it does not load."""
    from semwatch.model.registry import live_model_dir

    model_dir = live_model_dir(settings.model, strict=False)
    if not (model_dir / "manifest.json").is_file():
        return None
    try:
        from semwatch.model.classify import Classifier

        return Classifier.load(model_dir, settings)
    except Exception as exc:
        log.info("report thumbnails without Grad-CAM: %s", exc)
        return None


def _encode(rgb: np.ndarray) -> str:
    """A JPEG (a micrograph thumbnail as PNG is ~8x larger, and the HTML embeds up to a dozen)."""
    import cv2

    h, w = rgb.shape[:2]
    scale = THUMB_PX / max(h, w)
    if scale < 1:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:  # pragma: no cover - encoding uint8 RGB does not fail
        raise ValueError("cannot encode thumbnail")
    return base64.b64encode(buf.tobytes()).decode("ascii")


def _plain(pixels: np.ndarray) -> np.ndarray:
    """The reader's grey specimen area, contrast-stretched, as 8-bit RGB (the plain thumbnail)."""
    import cv2

    grey = np.asarray(pixels, dtype=np.float32)
    lo, hi = np.percentile(grey, (0.5, 99.5))
    grey = np.clip((grey - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)
    return np.asarray(cv2.cvtColor((grey * 255).astype(np.uint8), cv2.COLOR_GRAY2RGB))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
