"""The writer's typed inbox: what the pipeline, the watcher and the service ask the single writer to
record. Each message is a frozen value; `Store.apply` turns a batch of them into one transaction.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Literal

from semwatch.values import FileKey, ImageVerdict


@dataclass(frozen=True)
class Pending:
    """A version was queued for processing: insert its ledger row (superseding older versions)."""

    key: FileKey
    detected_at: str
    attempts: int = 0


@dataclass(frozen=True)
class Result:
    """A version was classified."""

    key: FileKey
    sha256: str
    sample_id: str
    verdict: ImageVerdict
    model_id: str
    expected: str | None = None  # expected class for the sample, where known


@dataclass(frozen=True)
class Reclassified:
    """A finished version was classified again (by another model, or on request): the new result
    supersedes row `supersedes`, which stays for audit with `current = 0`. Applied only while that
    row is still the current one of this version, so a repeated or raced message changes nothing."""

    key: FileKey
    supersedes: int
    sha256: str
    sample_id: str
    verdict: ImageVerdict
    model_id: str
    expected: str | None = None


@dataclass(frozen=True)
class Started:
    """A reader is about to read a version: count the attempt first, so that a file that kills the
    daemon while it is read is not retried forever across restarts. `done` is set once committed."""

    key: FileKey
    done: threading.Event | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Refused:
    """A version is recorded failed without being read (a path too long to open, a file that
    would need no attempt to know it cannot be read)."""

    key: FileKey
    detected_at: str
    error: str


@dataclass(frozen=True)
class Attempt:
    """A read failed and will be retried."""

    key: FileKey
    attempts: int
    error: str


@dataclass(frozen=True)
class Failed:
    """A version could not be read after all attempts."""

    key: FileKey
    attempts: int
    error: str
    sha256: str | None = None
    sample_id: str | None = None


@dataclass(frozen=True)
class Gone:
    """A queued version vanished or changed before it was read: drop its pending row."""

    key: FileKey


DaemonState = Literal["starting", "running", "stopping", "stopped"]  # the column's CHECK


@dataclass(frozen=True)
class DaemonStatus:
    """The `daemon` row: counts and rates, written about once a second."""

    state: DaemonState
    waiting: int = 0
    in_progress: int = 0
    done: int = 0
    failed: int = 0
    images_per_s: float = 0.0
    tiles_per_s: float = 0.0
    message: str | None = None


@dataclass(frozen=True)
class ModelSwitched:
    """The daemon now serves another model (a registry alias moved): the `models` row and the
    `daemon` row's model_id."""

    model_id: str
    name: str | None
    classes: tuple[str, ...]
    created_at: str | None
    path: str


@dataclass(frozen=True)
class ShadowResult:
    """The `[model] shadow` model's verdict on a version the live model classified: a row of
    `shadow_results` only (never `images`, samples or results.csv)."""

    path: str
    sha256: str
    verdict: ImageVerdict
    model_id: str
    live: ImageVerdict


Message = (Pending | Started | Result | Reclassified | Attempt | Failed | Refused | Gone | DaemonStatus
           | ModelSwitched | ShadowResult)


def exit_message(code: int) -> str:
    """`daemon.message` of a daemon that stopped with exit status `code` (the live view tells a clean
    stop from a failure by it)."""
    return f"exit {code}"
