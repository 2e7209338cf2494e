"""The values that flow through semwatch, one way:

path → Micrograph (pixels + Metadata + Quality) → tiles → probabilities → ImageVerdict
→ SampleVerdict → store / CSV / report.

They live together because every stage reads the one before it; each stage's code lives in
its own module (reading/micrograph.py, reading/tiles.py, model/engine.py, model/classify.py,
store/samples.py, store/ledger.py ...). Also here: class names (`ClassInfo`), the ledger's key
(`FileKey`) and the one timestamp format, which several layers share.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

ImageStatus = Literal["ok", "unknown", "rejected"]
SampleVerdictKind = Literal["pass", "fail", "uncertain", "unknown"]


class MicrographError(Exception):
    """A file that cannot be read as a micrograph; the message is one clear line."""


# Read failures that may pass on their own (a copy still in progress, a share that hiccups): these
# are retried; any other failure of a file that has stopped changing would fail the same way again.
TRANSIENT_READ_ERRORS = ("truncated", "cannot read file", "permission denied", "not enough memory")


def is_transient(error: str) -> bool:
    """Whether a read error (a `MicrographError` message) may pass if the file is read again."""
    return error.lower().startswith(TRANSIENT_READ_ERRORS)


@dataclass(frozen=True)
class Metadata:
    """What the instrument says about an image; None where it does not say."""

    vendor: str | None = None
    instrument: str | None = None
    pixel_size_nm: float | None = None
    magnification: float | None = None
    voltage_kv: float | None = None
    detector: str | None = None
    acquired_at: datetime | None = None
    session: str | None = None  # acquisition folder / session name where the metadata names one
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Quality:
    focus: float
    saturated_fraction: float
    dynamic_range: float
    ok: bool
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class Micrograph:
    """One decoded image: the specimen area as float32 grey in [0, 1], data bar removed."""

    path: Path
    format: str  # "tiff", "jpeg", "png", "bmp"
    width: int  # of the file's image, data bar included
    height: int
    bit_depth: int
    pixels: np.ndarray = field(repr=False)  # float32 (height - databar_rows, width)
    databar_rows: int
    metadata: Metadata
    quality: Quality


@dataclass(frozen=True)
class ImageVerdict:
    path: Path
    status: ImageStatus
    predicted_class: str | None
    composition: str | None
    state: str | None
    confidence: float
    tile_agreement: float
    n_tiles: int
    probabilities: dict[str, float]
    reasons: tuple[str, ...] = ()
    model_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        out["reasons"] = list(self.reasons)
        return out


@dataclass(frozen=True)
class SampleVerdict:
    sample_id: str
    n_images: int
    composition: str | None
    state: str | None
    confidence: float
    uniformity: float
    expected: str | None
    verdict: SampleVerdictKind


@dataclass(frozen=True)
class ClassInfo:
    """A class name and what it says: `<composition>` or `<composition>_<state>`."""

    name: str
    composition: str | None
    state: str | None


# The one rule for class names (`parse_class`); README "Class names" says the same.
_COMPOSITION = r"[A-Za-z0-9][A-Za-z0-9.+-]{0,39}"
_STATE = r"[a-z0-9][a-z0-9-]{0,39}"
_CLASS_NAME = re.compile(rf"({_COMPOSITION})(?:_({_STATE}))?")
# Words that mean something else where a class name may stand (a label, a verdict's status).
RESERVED_CLASS_NAMES = frozenset({"confirmed", "corrected", "foreign", "cleared", "confirm", "undo",
                                  "unknown", "rejected", "failed", "pending", "none", "null"})
CLASS_NAME_RULE = ("<composition> or <composition>_<state>: the composition is letters, digits, "
                   "'.', '+' or '-' (starting with a letter or digit, e.g. 622, NCA, LFP, 811Zr), "
                   "the state lower-case letters, digits or '-' (e.g. pristine, formation, cycled); "
                   "one '_' between them, at most 40 characters each; no state means pristine")


def parse_class(name: str) -> ClassInfo:
    """The single rule for class names, for the classes a model is trained on (folders,
    `[train] class_map`, labels) and for a label naming a class no model knows yet:
    `<composition>` or `<composition>_<state>` (`CLASS_NAME_RULE`). The part before the one `_` is
    the composition, the part after it the state, so a new class states its own split:
    `NCA` = (NCA, pristine), `LFP_cycled` = (LFP, cycled), `811Zr_formation` = (811Zr, formation).
    A missing state means pristine (the shared data's folders are `622`, `622_cycled`, ...).
    Raises ValueError (one line, naming the rule) for a name that does not follow it."""
    match = _CLASS_NAME.fullmatch(name)
    if match is None or name.lower() in RESERVED_CLASS_NAMES:
        why = "a reserved word" if match is not None else "not a class name"
        raise ValueError(f"{name!r} is {why}: class names are {CLASS_NAME_RULE}")
    return ClassInfo(name, match.group(1), match.group(2) or "pristine")


@dataclass(frozen=True, order=True)
class FileKey:
    """One version of a file: the ledger's key."""

    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | Path, st: os.stat_result) -> FileKey:
        return cls(str(path), st.st_size, st.st_mtime_ns)


def utc_now() -> str:
    """UTC ISO-8601 with milliseconds, the format of every timestamp in the database."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def utc_from_epoch(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
