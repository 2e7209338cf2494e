"""Finding files: inotify events (watchdog) or polling, plus periodic rescans, into the settle gate.

Events are only hints. The folder is scanned at start-up and every `rescan_seconds` (every
`poll_interval_seconds` when polling), so an overflowed inotify queue, a dropped share or a dead
emitter loses nothing. NFS/CIFS/FUSE mounts deliver no inotify events for changes made by other
machines, so `mode = "auto"` polls there (file-system type from /proc/self/mountinfo).

One thread owns all the state (gate, in-flight set, the ledger's finished versions); the
observer's handler and the pipeline talk to it only through its inbox queue.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEventHandler

from semwatch.config import WatchSettings
from semwatch.stability import Candidate, SettleGate, image_of_sidecar
from semwatch.store import FileKey

log = logging.getLogger("semwatch.watcher")

# File systems on which inotify does not see changes made elsewhere: poll them.
NETWORK_FS = frozenset({
    "nfs", "nfs4", "cifs", "smb", "smb2", "smb3", "smbfs", "ncpfs", "afs", "9p", "ceph", "glusterfs",
    "lustre", "gpfs", "beegfs", "davfs", "coda", "ocfs2", "gfs2", "virtiofs", "vboxsf", "vmhgfs",
})
HEALTH_SECONDS = 1.0  # how often the folder and the observer are checked


class WatcherDied(RuntimeError):
    """The inotify observer thread stopped: the daemon exits non-zero so systemd restarts it."""


# --- file-system type --------------------------------------------------------------------------


def _unescape_mount(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def filesystem_type(folder: Path, mountinfo: str | None = None) -> str:
    """The type of the file system holding `folder` ("ext4", "nfs4", "fuse.sshfs" ...), or "unknown"."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "unknown"
    target = os.path.realpath(folder)
    best, best_type = "", "unknown"
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right.split():
            continue
        mount_point = _unescape_mount(fields[4])
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, right.split()[0]
    return best_type


def is_network_fs(fstype: str) -> bool:
    return fstype in NETWORK_FS or (fstype.startswith("fuse") and fstype != "fuseblk")


def resolve_mode(mode: str, folder: Path, mountinfo: str | None = None) -> tuple[str, str]:
    """("inotify" | "polling", file-system type) for the configured mode."""
    fstype = filesystem_type(folder, mountinfo)
    if mode == "auto":
        return ("polling" if is_network_fs(fstype) else "inotify"), fstype
    return mode, fstype


# --- which files ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NameFilter:
    include: tuple[str, ...]
    exclude: tuple[str, ...]

    @classmethod
    def from_settings(cls, settings: WatchSettings) -> NameFilter:
        return cls(tuple(p.lower() for p in settings.include), tuple(p.lower() for p in settings.exclude))

    def wants(self, name: str) -> bool:
        low = name.lower()
        if any(fnmatch.fnmatchcase(low, p) for p in self.exclude):
            return False
        return any(fnmatch.fnmatchcase(low, p) for p in self.include)

    def enters(self, dirname: str) -> bool:
        """Sub-folders matching an exclude pattern (".*" hidden, temporary) are skipped."""
        low = dirname.lower()
        return not any(fnmatch.fnmatchcase(low, p) for p in self.exclude)


def scan(folder: Path, names: NameFilter, recursive: bool) -> Iterator[tuple[str, os.stat_result]]:
    """Every wanted file under `folder` with its stat; unreadable sub-folders are skipped."""
    stack = [str(folder)]
    while stack:
        current = stack.pop()
        try:
            with os.scandir(current) as it:
                entries = list(it)
        except OSError as exc:
            if current == str(folder):
                raise
            log.debug("cannot list %s: %s", current, exc)
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if recursive and names.enters(entry.name):
                        stack.append(entry.path)
                elif names.wants(entry.name) and entry.is_file():
                    yield entry.path, entry.stat()
            except OSError:
                continue


# --- the observer (inotify) ------------------------------------------------------------------------


class _Handler(FileSystemEventHandler):
    """watchdog handler: only puts hints in the inbox; it never raises (that would kill the observer)."""

    def __init__(self, inbox: queue.Queue[tuple[Any, ...]]) -> None:
        super().__init__()
        self.inbox = inbox

    def dispatch(self, event: Any) -> None:
        try:
            kind = event.event_type
            if event.is_directory:
                if kind in ("created", "moved"):
                    self.inbox.put(("dir", os.fsdecode(getattr(event, "dest_path", "") or event.src_path)))
                return
            if kind == "moved":
                self.inbox.put(("gone", os.fsdecode(event.src_path)))
                self.inbox.put(("hint", os.fsdecode(event.dest_path), True))
            elif kind == "deleted":
                self.inbox.put(("gone", os.fsdecode(event.src_path)))
            else:
                self.inbox.put(("hint", os.fsdecode(event.src_path), kind == "closed"))
        except Exception:  # pragma: no cover - defensive: a handler exception stops watchdog for good
            log.exception("event handler error (ignored)")


def _start_observer(folder: Path, recursive: bool, inbox: queue.Queue[tuple[Any, ...]]) -> Any:
    from watchdog.events import (
        DirCreatedEvent,
        DirMovedEvent,
        FileClosedEvent,
        FileCreatedEvent,
        FileDeletedEvent,
        FileModifiedEvent,
        FileMovedEvent,
    )
    from watchdog.observers.inotify import InotifyObserver

    observer = InotifyObserver()
    observer.name = "semwatch-inotify"
    # No open / close-no-write events: the daemon's own reads would echo back as hints.
    wanted = [FileCreatedEvent, FileModifiedEvent, FileMovedEvent, FileClosedEvent, FileDeletedEvent,
              DirCreatedEvent, DirMovedEvent]
    observer.schedule(_Handler(inbox), str(folder), recursive=recursive, event_filter=wanted)
    observer.start()
    return observer


# --- the watcher thread ----------------------------------------------------------------------------


@dataclass
class WatchCounts:
    waiting: int = 0  # in the settle gate
    in_flight: int = 0  # handed to the pipeline, not finished


class Watcher(threading.Thread):
    """Events + scans → settle gate → `submit(candidate)`; the pipeline reports back via `finished`,
    `retry` and `changed`. Ends when `stop()` is called; `error` is set if it died."""

    def __init__(self, settings: WatchSettings, folder: Path, *, mode: str,
                 done: dict[str, tuple[int, int]], pending: dict[str, tuple[int, int, int]],
                 submit: Callable[[Candidate], None],
                 on_gone: Callable[[FileKey], None] | None = None) -> None:
        super().__init__(name="semwatch-watcher", daemon=True)
        self.settings = settings
        self.folder = folder
        self.mode = mode
        self.names = NameFilter.from_settings(settings)
        self.gate = SettleGate(settings.settle_seconds, settings.sidecar_wait_seconds, on_gone=on_gone)
        self.on_gone = on_gone
        self.done = done
        self.pending_attempts = pending
        self.submit = submit
        self.inbox: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.in_flight: dict[str, FileKey] = {}
        self.dirty: set[str] = set()
        self.error: BaseException | None = None
        self.last_alive = time.monotonic()
        self.counts = WatchCounts()
        self.scans = 0
        self.last_scan_seconds = 0.0
        self._stopping = threading.Event()
        self._observer: Any = None
        self._vanished = False
        self._ready = threading.Event()

    # --- called from other threads ----------------------------------------------------------

    def stop(self) -> None:
        self._stopping.set()
        self.inbox.put(("wake",))

    def finished(self, key: FileKey) -> None:
        self.inbox.put(("finished", key))

    def retry(self, key: FileKey, attempts: int, delay: float) -> None:
        self.inbox.put(("retry", key, attempts, delay))

    def changed(self, key: FileKey) -> None:
        self.inbox.put(("changed", key))

    def wait_started(self, timeout: float) -> bool:
        """True once the first scan is done and the observer runs."""
        return self._ready.wait(timeout)

    # --- the thread -------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.error = exc
            log.error("watcher stopped: %s", exc)
            self._ready.set()
        finally:
            self._stop_observer()

    def _run(self) -> None:
        if self.mode == "inotify":
            self._observer = self._try_start_observer()
        t0 = time.monotonic()
        self._rescan()
        # Pending rows of files that vanished while the daemon was down.
        for path, (size, mtime_ns, _attempts) in list(self.pending_attempts.items()):
            if self.on_gone is not None and not os.path.exists(path):  # noqa: PTH110
                self.on_gone(FileKey(path, size, mtime_ns))
                del self.pending_attempts[path]
        log.info("initial scan: %d file(s) to process, %d already done (%.2f s)",
                 len(self.gate) + len(self.in_flight), len(self.done), time.monotonic() - t0)
        self._ready.set()
        next_rescan = time.monotonic() + self._rescan_every()
        next_health = time.monotonic() + HEALTH_SECONDS
        while not self._stopping.is_set():
            now = time.monotonic()
            due = self.gate.next_due()
            timeout = min(next_health - now, next_rescan - now, due if due is not None else 1.0)
            self._drain_inbox(max(0.0, timeout))
            if self._stopping.is_set():
                break
            now = time.monotonic()
            if now >= next_health:
                next_health = now + HEALTH_SECONDS
                self._check_health()
            if now >= next_rescan:
                next_rescan = now + self._rescan_every()
                if not self._vanished:
                    self._rescan()
            for cand in self.gate.ready():
                self.in_flight[cand.key.path] = cand.key
                self.submit(cand)
            self.counts = WatchCounts(len(self.gate), len(self.in_flight))
            self.last_alive = time.monotonic()

    def _rescan_every(self) -> float:
        return self.settings.poll_interval_seconds if self.mode == "polling" else self.settings.rescan_seconds

    def _drain_inbox(self, timeout: float) -> None:
        try:
            item = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            self._handle(item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, item: tuple[Any, ...]) -> None:
        kind = item[0]
        if kind == "hint":
            self._hint(item[1], quick=item[2])
        elif kind == "gone":
            self.gate.discard(item[1])
        elif kind == "dir":
            if self.settings.recursive:
                self._scan_into_gate(Path(item[1]))
        elif kind == "finished":
            key: FileKey = item[1]
            self.in_flight.pop(key.path, None)
            self.done[key.path] = (key.size, key.mtime_ns)
            self._recheck_if_dirty(key.path)
        elif kind == "retry":
            key, attempts, delay = item[1], item[2], item[3]
            self.in_flight.pop(key.path, None)
            self.dirty.discard(key.path)
            self._consider(key.path, attempts_for=key, attempts=attempts, not_before=time.monotonic() + delay)
        elif kind == "changed":
            key = item[1]
            self.in_flight.pop(key.path, None)
            self.dirty.discard(key.path)
            self._consider(key.path)

    def _hint(self, path: str, *, quick: bool) -> None:
        image = image_of_sidecar(path)
        if image is not None:
            self.gate.note_sidecar(image)
            path, quick = image, False  # a sidecar changed: look at its image again
        elif not self.names.wants(os.path.basename(path)):  # noqa: PTH119 - str paths on the hot path
            return
        self._consider(path, quick=quick)

    def _recheck_if_dirty(self, path: str) -> None:
        if path in self.dirty:
            self.dirty.discard(path)
            self._consider(path)

    def _consider(self, path: str, *, quick: bool = False, st: os.stat_result | None = None,
                  attempts_for: FileKey | None = None, attempts: int = 0, not_before: float = 0.0) -> None:
        if path in self.in_flight:
            self.dirty.add(path)  # look again when the pipeline is done with it
            return
        if st is None:
            try:
                st = os.stat(path)  # noqa: PTH116
            except OSError:
                self.gate.discard(path)
                if attempts_for is not None and self.on_gone is not None:
                    self.on_gone(attempts_for)  # a retry whose file vanished meanwhile
                return
        key = FileKey.of(path, st)
        if self.done.get(path) == (key.size, key.mtime_ns):
            return
        row_key = attempts_for  # a retried version has a pending row in the ledger
        if attempts_for is not None and attempts_for != key:
            attempts, not_before = 0, 0.0  # a new version: a fresh start
        prior = self.pending_attempts.pop(path, None)
        if prior is not None:
            row_key = FileKey(path, prior[0], prior[1])
            if prior[:2] == (key.size, key.mtime_ns):
                attempts = max(attempts, prior[2])
        self.gate.offer(path, st, quick=quick, attempts=attempts, not_before=not_before, row_key=row_key)

    def _rescan(self) -> None:
        t0 = time.monotonic()
        self._scan_into_gate(self.folder)
        self.scans += 1
        self.last_scan_seconds = time.monotonic() - t0

    def _scan_into_gate(self, folder: Path) -> None:
        try:
            for path, st in scan(folder, self.names, self.settings.recursive):
                if path in self.gate.candidates or path in self.in_flight:
                    continue
                done = self.done.get(path)
                if done is not None and done == (st.st_size, st.st_mtime_ns):
                    continue
                self._consider(path, st=st)
        except OSError as exc:
            log.warning("cannot scan %s: %s", folder, exc)

    def _check_health(self) -> None:
        exists = self.folder.is_dir()
        if not exists:
            if not self._vanished:
                self._vanished = True
                log.error("watch folder vanished: %s; waiting for it to come back", self.folder)
                self._stop_observer()
            return
        if self._vanished:
            self._vanished = False
            log.warning("watch folder is back: %s; rescanning", self.folder)
            if self.mode == "inotify":
                self._observer = self._try_start_observer()
            self._rescan()
            return
        if self.mode != "inotify" or self._observer is None:
            return
        if not self._observer.is_alive():
            raise WatcherDied("the inotify observer thread died")
        if not all(e.is_alive() for e in self._observer.emitters) or not self._observer.emitters:
            log.warning("inotify watch on %s was lost; re-watching and rescanning", self.folder)
            self._stop_observer()
            self._observer = self._try_start_observer()
            self._rescan()

    def _try_start_observer(self) -> Any:
        try:
            return _start_observer(self.folder, self.settings.recursive, self.inbox)
        except OSError as exc:
            # e.g. the inotify watch limit (fs.inotify.max_user_watches): rescans still find everything.
            log.error("cannot start inotify on %s (%s); polling instead", self.folder, exc)
            self.mode = "polling"
            return None

    def _stop_observer(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            try:
                observer.stop()
                observer.join(timeout=3.0)
            except Exception as exc:  # pragma: no cover - best effort on the way out
                log.debug("observer stop: %s", exc)
