"""The settle gate: a file is handed on only when it has stopped changing.

Nothing portable says "this file is completely written", so a candidate must keep the same size
and mtime (its sidecar's too) for `settle_seconds`; a close-after-write or rename event shortens
that wait. A JPEG in a folder where the instrument writes `<name>.jpg.txt` sidecars waits (bounded)
for its own (named by `reading.sidecar.sidecar_path`, the reader's rule). A file whose last bytes
are not an end-of-image marker (JPEG, PNG) is held a little longer, since a writer that pauses
looks stable; the reader's decode is the final check.
"""

from __future__ import annotations

import heapq
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from semwatch.reading.listing import stat_path
from semwatch.reading.sidecar import SIDECAR_IMAGE_SUFFIXES, image_of_sidecar, sidecar_path
from semwatch.safefs import UNCONFINED, Confinement, open_regular
from semwatch.values import FileKey

QUICK_SETTLE_SECONDS = 0.2  # after close-after-write / moved-in: the writer said it is done
RECHECK_SECONDS = 0.1  # a candidate is stat-ed at most this often
JPEG_SUFFIXES = (".jpg", ".jpeg")


def _folder(path: str) -> str:
    """The key of the sidecar-folder cache (one spelling for whoever reads or writes it)."""
    return str(Path(path).parent)


def looks_complete(path: str, st: os.stat_result, confine: Confinement = UNCONFINED) -> bool:
    """Whether the file ends like a complete image: JPEG end-of-image marker, PNG IEND chunk.

    Other formats (TIFF, BMP) have no trailer; for them only stability and the decode count.
    Anything but a regular file is "complete": the reader refuses it at once, without opening it
    (here it is opened only through `safefs`, never blocking on a FIFO, never following a link
    `confine` forbids).
    """
    lower = path.lower()
    size = st.st_size
    if not stat.S_ISREG(st.st_mode):
        return True
    if size == 0:
        return False
    if lower.endswith(JPEG_SUFFIXES):
        marker, window = b"\xff\xd9", 64  # some writers pad after EOI
    elif lower.endswith(".png"):
        marker, window = b"IEND", 12
    else:
        return True
    try:
        fd, _ = open_regular(path, confine=confine)
        try:
            tail = os.pread(fd, window, max(0, size - window))
        finally:
            os.close(fd)
    except OSError:
        return True  # let the reader say what is wrong with it
    return marker in tail


def _stat(path: str) -> os.stat_result | None:
    try:
        return stat_path(path)
    except OSError:
        return None


@dataclass
class Candidate:
    key: FileKey
    detected_at: float  # wall clock, when first seen
    first_seen: float  # monotonic
    stable_since: float  # monotonic: last change of the file or its sidecar
    sidecar: tuple[int, int] | None = None
    quick: bool = False
    attempts: int = 0
    not_before: float = 0.0  # monotonic: retry back-off
    next_check: float = 0.0
    row_key: FileKey | None = None  # the version whose `pending` ledger row exists (after an attempt)


@dataclass
class SettleGate:
    """Candidates waiting to settle. Single-threaded: owned by the watcher thread.

    Each candidate is looked at when it could next be ready (its settle time, a retry's back-off,
    a short recheck while it waits for a sidecar or an end marker), from a heap: a flood of 10,000
    files costs one stat per file per settle period, not one per file per loop."""

    settle_seconds: float
    sidecar_wait_seconds: float
    on_gone: Callable[[FileKey], None] | None = None  # a candidate with a ledger row vanished
    confine: Confinement = UNCONFINED  # where the end-marker check may read (the watch folder)
    candidates: dict[str, Candidate] = field(default_factory=dict)
    _sidecar_dirs: dict[str, tuple[bool, float]] = field(default_factory=dict)
    _heap: list[tuple[float, int, str]] = field(default_factory=list)
    _seq: int = 0

    def __len__(self) -> int:
        return len(self.candidates)

    def _schedule(self, path: str, cand: Candidate, at: float) -> None:
        cand.next_check = at
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, path))

    def offer(self, path: str, st: os.stat_result, *, quick: bool = False, attempts: int = 0,
              not_before: float = 0.0, row_key: FileKey | None = None) -> None:
        """A file was seen (event, scan or retry): add it, or note a change / a close hint."""
        now = time.monotonic()
        key = FileKey.of(path, st)
        cand = self.candidates.get(path)
        if cand is None:
            cand = Candidate(key, time.time(), now, now, quick=quick, attempts=attempts,
                             not_before=not_before, row_key=row_key)
            self.candidates[path] = cand
            self._schedule(path, cand, max(now, not_before))
            return
        if cand.key != key:
            cand.key, cand.stable_since, cand.quick, cand.attempts = key, now, quick, 0
            cand.not_before = 0.0
        elif quick:
            cand.quick = True
        self._schedule(path, cand, max(now, cand.not_before))

    def discard(self, path: str) -> None:
        """The file is gone: forget it (and its pending ledger row, if it has one)."""
        cand = self.candidates.pop(path, None)
        if cand is not None and cand.row_key is not None and self.on_gone is not None:
            self.on_gone(cand.row_key)

    def discard_below(self, folder: str) -> None:
        """A folder moved away: forget the candidates in it (each would vanish at its next look)."""
        prefix = folder.rstrip(os.sep) + os.sep
        for path in [p for p in self.candidates if p.startswith(prefix)]:
            self.discard(path)

    def next_due(self) -> float | None:
        """Seconds until the next candidate needs a look (None: nothing waits)."""
        while self._heap:
            at, _, path = self._heap[0]
            cand = self.candidates.get(path)
            if cand is None or cand.next_check != at:
                heapq.heappop(self._heap)  # stale: discarded or rescheduled since
                continue
            return max(0.0, at - time.monotonic())
        return None

    def ready(self, limit: int = 2000) -> list[Candidate]:
        """Candidates that have settled (at most `limit` per call); they leave the gate."""
        now, wall = time.monotonic(), time.time()
        out: list[Candidate] = []
        looked = 0
        while self._heap and self._heap[0][0] <= now and looked < limit:
            at, _, path = heapq.heappop(self._heap)
            cand = self.candidates.get(path)
            if cand is None or cand.next_check != at:
                continue
            looked += 1
            wait = self._look(path, cand, now, wall)
            if wait is None:
                del self.candidates[path]
                out.append(cand)
            elif path in self.candidates:
                self._schedule(path, cand, now + max(RECHECK_SECONDS, wait))
        return out

    def _look(self, path: str, cand: Candidate, now: float, wall: float) -> float | None:
        """None if the candidate is ready, else seconds until it is worth another look."""
        if now < cand.not_before:
            return cand.not_before - now
        st = _stat(path)
        if st is None:
            self.discard(path)  # gone before it settled
            return 0.0
        key = FileKey.of(path, st)
        settle = min(self.settle_seconds, QUICK_SETTLE_SECONDS) if cand.quick else self.settle_seconds
        if key != cand.key:
            cand.key, cand.stable_since, cand.quick, cand.attempts = key, now, False, 0
            return self.settle_seconds
        newest_mtime = st.st_mtime
        if path.lower().endswith(SIDECAR_IMAGE_SUFFIXES):
            sc = _stat(sidecar_path(path))
            sig = (sc.st_size, sc.st_mtime_ns) if sc is not None else None
            if sig != cand.sidecar:
                cand.sidecar, cand.stable_since = sig, now
            if sc is not None:
                newest_mtime = max(newest_mtime, sc.st_mtime)
                self.note_sidecar(path)
            elif self._expects_sidecar(path) and now - cand.first_seen < (
                self.settle_seconds + self.sidecar_wait_seconds
            ):
                return RECHECK_SECONDS
        # Stable since we started watching it, or (a backlog found at start-up) not modified
        # for the settle time according to its mtime.
        mtime_age = wall - newest_mtime
        age = max(now - cand.stable_since, mtime_age if 0 <= mtime_age < 10 * 365 * 86400 else 0.0)
        if age < settle:
            return settle - age
        grace = max(2.0, 3 * self.settle_seconds)  # a retry has had its grace already
        held = cand.attempts == 0 and now - cand.stable_since < grace
        if held and not looks_complete(path, st, self.confine):
            # A change resets the clock when it is seen (an event, or this look); until then
            # there is nothing to learn before the grace ends (a flood of empty files must not
            # be stat-ed ten times a second each).
            return max(RECHECK_SECONDS, min(1.0, grace - (now - cand.stable_since)))
        return None

    def note_sidecar(self, image_path: str) -> None:
        """A sidecar exists beside `image_path`: record its folder as a sidecar folder. This replaces
        a cached "no sidecars" taken before the folder's first sidecar was written, which would
        otherwise let the next images of a new session folder go without theirs."""
        self._sidecar_dirs[_folder(image_path)] = (True, time.monotonic())

    def _expects_sidecar(self, path: str) -> bool:
        """Whether the image's folder holds `*.jpg.txt` sidecars (the instrument writes them).
        A "no" is cached for 2 s (a backlog of thousands of JPEGs must not rescan the folder for
        each); a "yes" from `note_sidecar` replaces it at once."""
        folder = _folder(path)
        now = time.monotonic()
        cached = self._sidecar_dirs.get(folder)
        if cached is not None and now - cached[1] < 2.0:
            return cached[0]
        found = False
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    if image_of_sidecar(entry.name) is not None:
                        found = True
                        break
        except OSError:
            pass
        self._sidecar_dirs[folder] = (found, now)
        if len(self._sidecar_dirs) > 4096:
            self._sidecar_dirs.clear()
        return found
