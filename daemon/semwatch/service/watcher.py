"""Finding files: inotify events or polling, plus periodic rescans, into the settle gate.

Events are only hints. The folder is scanned at start-up and every `rescan_seconds` (every
`poll_interval_seconds` when polling), so an overflowed inotify queue, a dropped share or a dead
emitter loses nothing. NFS/CIFS/FUSE mounts deliver no inotify events for changes made by other
machines, so `mode = "auto"` polls there (file-system type from /proc/self/mountinfo).

One thread owns all the state (gate, in-flight set, the ledger's finished versions); the inotify
thread and the pipeline talk to it only through its `Inbox` (typed messages, `service.inbox`).
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, assert_never

from semwatch.config import WatchSettings
from semwatch.liveness import Stage
from semwatch.reading.listing import NameFilter, TooLong, scan, stat_path
from semwatch.reading.sidecar import image_of_sidecar
from semwatch.safefs import PATH_MAX, Confinement
from semwatch.service.inbox import (
    Changed,
    Finished,
    FolderAppeared,
    FolderGone,
    Hint,
    Inbox,
    Rescan,
    Retry,
    Wake,
    WatcherMessage,
)
from semwatch.service.logs import PER_FILE
from semwatch.service.stability import Candidate, SettleGate
from semwatch.store.messages import Refused
from semwatch.values import FileKey, utc_from_epoch

if TYPE_CHECKING:
    from inotify_simple import Event

log = logging.getLogger("semwatch.watcher")

# File systems on which inotify does not see changes made elsewhere: poll them.
NETWORK_FS = frozenset({
    "nfs", "nfs4", "cifs", "smb", "smb2", "smb3", "smbfs", "ncpfs", "afs", "9p", "ceph", "glusterfs",
    "lustre", "gpfs", "beegfs", "davfs", "coda", "ocfs2", "gfs2", "virtiofs", "vboxsf", "vmhgfs",
})
HEALTH_SECONDS = 1.0  # how often the folder and the observer are checked


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


# --- the observer (inotify) ------------------------------------------------------------------------

class InotifyWatch(threading.Thread):
    """One inotify descriptor watching the folder and its sub-folders down to `depth` levels.

    Written on inotify_simple rather than watchdog: watchdog adds recursive watches with a
    recursive os.walk (Python 3.11), so a tree 1,500 levels deep kills its thread with a
    RecursionError, and it has no depth limit. Here watches are added breadth-first up to the
    limit (deeper folders are found by rescans); a full kernel queue or watch table asks for a
    rescan. It only ever puts hints in the watcher's inbox (`Hint`, `FolderAppeared`, `FolderGone`,
    `Rescan`)."""

    def __init__(self, folder: Path, *, recursive: bool, depth: int, names: NameFilter,
                 inbox: Inbox) -> None:
        super().__init__(name="semwatch-inotify", daemon=True)
        from inotify_simple import INotify
        from inotify_simple import flags as f

        self.folder = str(folder)
        self.recursive = recursive
        self.depth = depth if recursive else 0
        self.names = names
        self.inbox = inbox
        self.f = f
        self.mask = (f.CREATE | f.MODIFY | f.CLOSE_WRITE | f.MOVED_TO | f.MOVED_FROM | f.DELETE
                     | f.DELETE_SELF | f.MOVE_SELF | f.DONT_FOLLOW | f.ONLYDIR | f.EXCL_UNLINK)
        self.inotify = INotify()
        self.paths: dict[int, tuple[str, int]] = {}  # wd -> (folder path, depth)
        self.error: BaseException | None = None
        self._stop_event = threading.Event()
        self._full = False
        try:
            self._add_tree(self.folder, 0)
        except BaseException:
            self.inotify.close()
            raise

    def stop(self) -> None:
        self._stop_event.set()

    def _add_tree(self, top: str, depth: int) -> None:
        """Watch `top` and its sub-folders breadth-first down to the depth limit."""
        queue_: deque[tuple[str, int]] = deque([(top, depth)])
        while queue_:
            path, level = queue_.popleft()
            try:
                wd = self.inotify.add_watch(path, self.mask)
            except OSError as exc:
                if path == self.folder:
                    raise
                if exc.errno == errno.ENOSPC and not self._full:
                    self._full = True
                    log.warning("inotify watch limit reached (fs.inotify.max_user_watches); "
                                "deeper folders are found by rescans")
                continue
            self.paths[wd] = (path, level)
            if level >= self.depth:
                continue
            try:
                with os.scandir(path) as it:
                    for entry in it:
                        if entry.is_dir(follow_symlinks=False) and self.names.enters(entry.name):
                            queue_.append((entry.path, level + 1))
            except OSError:
                continue

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                events = self.inotify.read(timeout=250)
                for event in events:
                    self._event(event)
        except BaseException as exc:
            self.error = exc
            log.error("inotify thread stopped: %s", exc)
        finally:
            self.inotify.close()

    def _event(self, event: Event) -> None:
        f = self.f
        mask = event.mask
        if mask & f.Q_OVERFLOW:
            self.inbox.put(Rescan())
            return
        if mask & f.IGNORED:
            self.paths.pop(event.wd, None)
            return
        where = self.paths.get(event.wd)
        if where is None:
            return
        folder, level = where
        if mask & (f.DELETE_SELF | f.MOVE_SELF):
            return  # IN_IGNORED follows; the health check notices a vanished top folder
        path = os.path.join(folder, os.fsdecode(event.name)) if event.name else folder  # noqa: PTH118
        if mask & f.ISDIR:
            if mask & (f.CREATE | f.MOVED_TO) and self.recursive and self.names.enters(event.name):
                if level < self.depth:
                    self._add_tree(path, level + 1)
                self.inbox.put(FolderAppeared(path))  # what it already holds is scanned
            elif mask & f.MOVED_FROM:
                self._forget(path)
                self.inbox.put(FolderGone(path))
            return
        # A deleted or moved-away file is a hint like any other: the watcher finds it gone.
        self.inbox.put(Hint(path, closed=bool(mask & (f.CLOSE_WRITE | f.MOVED_TO))))

    def _forget(self, folder: str) -> None:
        """A folder moved away: stop watching it and what is below it."""
        prefix = folder + os.sep
        for wd, (path, _) in list(self.paths.items()):
            if path == folder or path.startswith(prefix):
                self.paths.pop(wd, None)
                try:
                    self.inotify.rm_watch(wd)
                except OSError:
                    pass


# --- the watcher thread ----------------------------------------------------------------------------


@dataclass
class WatchCounts:
    waiting: int = 0  # in the settle gate
    in_flight: int = 0  # handed to the pipeline, not finished


class Watcher(threading.Thread):
    """Events + scans → settle gate → `submit(candidate)`. Everything else reaches it through
    `inbox`: the inotify thread's hints, and the pipeline's `Finished`, `Retry` and `Changed` for
    each file it was handed. Ends when `stop()` is called; `error` is set if it died."""

    def __init__(self, settings: WatchSettings, folder: Path, *, mode: str, inbox: Inbox,
                 done: dict[str, tuple[int, int]], pending: dict[str, tuple[int, int, int]],
                 submit: Callable[[Candidate], None],
                 on_gone: Callable[[FileKey], None] | None = None,
                 on_refused: Callable[[Refused], None] | None = None,
                 stage: Stage | None = None) -> None:
        super().__init__(name="semwatch-watcher", daemon=True)
        self.settings = settings
        self.folder = folder
        self.mode = mode
        self.inbox = inbox
        self.names = NameFilter.from_settings(settings)
        self.gate = SettleGate(settings.settle_seconds, settings.sidecar_wait_seconds, on_gone=on_gone,
                               confine=Confinement(folder, settings.follow_symlinks))
        self.on_gone = on_gone
        self.done = done
        self.pending_attempts = pending
        self.submit = submit
        self.on_refused = on_refused
        self.stage = stage or Stage("watcher")
        self.in_flight: dict[str, FileKey] = {}
        self.dirty: set[str] = set()
        self.error: BaseException | None = None
        self.counts = WatchCounts()
        self._stopping = threading.Event()
        self._observer: InotifyWatch | None = None
        self._observer_deaths: list[float] = []
        self._inotify_retry_at = 0.0
        self._vanished = False
        self._ready = threading.Event()

    # --- called from other threads ----------------------------------------------------------

    def observer_restarts(self, window: float = 300.0) -> int:
        """inotify observer deaths in the last `window` seconds (kept for its own back-off)."""
        now = time.monotonic()
        return sum(1 for t in list(self._observer_deaths) if now - t < window)

    def stop(self) -> None:
        self._stopping.set()
        self.inbox.put(Wake())

    def wait_started(self, timeout: float) -> bool:
        """True once the first scan is done and the observer runs."""
        return self._ready.wait(timeout)

    # --- the thread -------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._start()
            self._ready.set()
            self._loop()
        except BaseException as exc:
            self.error = exc
            log.error("watcher stopped: %s", exc)
            self._ready.set()
        finally:
            self._stop_observer()

    def _start(self) -> None:
        """The observer, the first scan, and the pending rows of files that vanished while the
        daemon was down."""
        if self.mode == "inotify":
            self._observer = self._try_start_observer()
        t0 = time.monotonic()
        self._rescan()
        for path, (size, mtime_ns, _attempts) in list(self.pending_attempts.items()):
            if self.on_gone is not None and not os.path.exists(path):  # noqa: PTH110
                self.on_gone(FileKey(path, size, mtime_ns))
                del self.pending_attempts[path]
        log.info("initial scan: %d file(s) to process, %d already done (%.2f s)",
                 len(self.gate) + len(self.in_flight), len(self.done), time.monotonic() - t0)

    def _loop(self) -> None:
        """Wait for the inbox, the next candidate due, a health check or a rescan; then hand on
        what has settled."""
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
            self._hand_on()

    def _hand_on(self) -> None:
        self.stage.busy("handing settled files on")
        for cand in self.gate.ready():
            self.in_flight[cand.key.path] = cand.key
            self.submit(cand)
        self.counts = WatchCounts(len(self.gate), len(self.in_flight))
        self.stage.idle()

    def _drain_inbox(self, timeout: float) -> None:
        try:
            message = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return
        self.stage.busy("handling file events")
        while True:
            self._handle(message)
            self.stage.beat()
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, message: WatcherMessage) -> None:
        match message:
            case Hint(path, closed):
                self._hint(path, quick=closed)
            case FolderAppeared(path):
                if self.settings.recursive:
                    self._scan_into_gate(Path(path))
            case FolderGone(path):
                self.gate.discard_below(path)
            case Rescan():
                log.warning("inotify queue overflowed; rescanning %s", self.folder)
                self._rescan()
            case Finished(key):
                self.in_flight.pop(key.path, None)
                self.done[key.path] = (key.size, key.mtime_ns)
                if key.path in self.dirty:  # it changed while the pipeline had it
                    self.dirty.discard(key.path)
                    self._consider(key.path)
            case Retry(key, attempts, delay):
                self.in_flight.pop(key.path, None)
                self.dirty.discard(key.path)
                self._consider(key.path, attempts_for=key, attempts=attempts,
                               not_before=time.monotonic() + delay)
            case Changed(key):
                self.in_flight.pop(key.path, None)
                self.dirty.discard(key.path)
                self._consider(key.path)
            case Wake():
                pass
            case _:
                assert_never(message)

    def _hint(self, path: str, *, quick: bool) -> None:
        image = image_of_sidecar(path)
        if image is not None:
            self.gate.note_sidecar(image)
            path, quick = image, False  # a sidecar changed: look at its image again
        elif not self.names.wants(os.path.basename(path)):  # noqa: PTH119 - str paths on the hot path
            return
        self._consider(path, quick=quick)

    def _consider(self, path: str, *, quick: bool = False, st: os.stat_result | None = None,
                  attempts_for: FileKey | None = None, attempts: int = 0, not_before: float = 0.0) -> None:
        if path in self.in_flight:
            self.dirty.add(path)  # look again when the pipeline is done with it
            return
        if st is None:
            try:
                st = stat_path(path)
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
        self._scan_into_gate(self.folder)

    def _scan_into_gate(self, folder: Path) -> None:
        self.stage.busy(f"scanning {folder}")
        too_long: list[TooLong] = []
        try:
            for path, st in scan(folder, self.names, self.settings.recursive, too_long):
                self.stage.beat()
                if path in self.gate.candidates or path in self.in_flight:
                    continue
                done = self.done.get(path)
                if done is not None and done == (st.st_size, st.st_mtime_ns):
                    continue
                self._consider(path, st=st)
        except OSError as exc:
            log.warning("cannot scan %s: %s", folder, exc)
        for item in too_long:
            self._refuse(item.path, item.st, f"path too long to open ({len(os.fsencode(item.path))} bytes; "
                         f"the limit is {PATH_MAX - 1})")

    def _refuse(self, path: str, st: os.stat_result, reason: str) -> None:
        """Record a file failed without reading it (once per version)."""
        key = FileKey.of(path, st)
        if self.done.get(path) == (key.size, key.mtime_ns):
            return
        self.done[path] = (key.size, key.mtime_ns)
        log.error("failed: %s: %s", path[:300], reason, extra=PER_FILE)
        if self.on_refused is not None:
            self.on_refused(Refused(key, utc_from_epoch(time.time()), reason))

    def _check_health(self) -> None:
        if self._check_folder() and self.mode == "inotify":
            self._check_observer()

    def _check_folder(self) -> bool:
        """Whether the folder is there and was there at the last check. A vanished folder stops
        the observer; when it comes back, the observer restarts and it is rescanned."""
        if not self.folder.is_dir():
            if not self._vanished:
                self._vanished = True
                log.error("watch folder vanished: %s; waiting for it to come back", self.folder)
                self._stop_observer()
            return False
        if self._vanished:
            self._vanished = False
            log.warning("watch folder is back: %s; rescanning", self.folder)
            if self.mode == "inotify":
                self._observer = self._try_start_observer()
            self._rescan()
            return False
        return True

    def _check_observer(self) -> None:
        """A dead inotify thread (a bug, a hostile tree) is restarted, with one line, and the folder
        rescanned; dying again and again falls back to rescans for a while instead of a restart loop."""
        if self._observer is None:
            if self._inotify_retry_at and time.monotonic() >= self._inotify_retry_at:
                self._inotify_retry_at = 0.0
                self._observer = self._try_start_observer()
            return
        if self._observer.is_alive():
            return
        reason = self._observer.error
        self._stop_observer()
        now = time.monotonic()
        self._observer_deaths = [t for t in self._observer_deaths if now - t < 300] + [now]
        if len(self._observer_deaths) >= 3:
            log.error("inotify thread died %d times in 5 minutes (%s); rescanning every %.0f s instead, "
                      "retrying inotify in 10 minutes", len(self._observer_deaths), reason,
                      self.settings.poll_interval_seconds)
            self._inotify_retry_at = now + 600.0
        else:
            log.warning("inotify thread died (%s); restarting it and rescanning", reason)
            self._observer = self._try_start_observer()
        self._rescan()

    def _rescan_every(self) -> float:
        polling = self.mode == "polling" or (self.mode == "inotify" and self._observer is None)
        return self.settings.poll_interval_seconds if polling else self.settings.rescan_seconds

    def _try_start_observer(self) -> InotifyWatch | None:
        try:
            observer = InotifyWatch(self.folder, recursive=self.settings.recursive,
                                    depth=self.settings.watch_depth, names=self.names, inbox=self.inbox)
        except (OSError, ImportError) as exc:
            # e.g. the inotify instance limit (fs.inotify.max_user_instances): rescans find everything.
            log.error("cannot start inotify on %s (%s); polling instead", self.folder, exc)
            self.mode = "polling"
            return None
        observer.start()
        return observer

    def _stop_observer(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(timeout=3.0)
