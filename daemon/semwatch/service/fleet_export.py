"""Snapshots for the fleet view, bounded in time: the daemon's schedule and `semwatch export`.

Each snapshot is written by a child process (`python -m semwatch.store.export`, see `store.export`)
given `[fleet] export_timeout_seconds`; at the deadline it is killed and the snapshot abandoned (its
part file is overwritten by the next one). A thread blocked in a write to a hung share cannot be
stopped, a process can: the daemon's thread only waits on the child with a timeout, so a share that
hangs or fills never stalls the daemon or its shutdown. A child that will not even die (a process
in uninterruptible sleep on a hard NFS mount) is left behind and no new one is started until it
is gone, so a dead share never piles up processes.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from semwatch.config import Settings
from semwatch.errors import ConfigError, ExitStatus, UserError
from semwatch.output import Output
from semwatch.safefs import path_text

log = logging.getLogger("semwatch.fleet")


@dataclass
class ExportResult:
    path: Path | None  # the snapshot written, None when it was not
    problem: str | None = None
    seconds: float = 0.0


class Exporter:
    """Runs one snapshot child at a time, each within the deadline."""

    def __init__(self, settings: Settings, folder: Path) -> None:
        self.settings = settings
        self.folder = folder
        self.instrument = settings.instrument.resolved_name()
        database = settings.store.database
        self.scratch = database.with_name(f".{database.name}.snapshot-{os.getpid()}")
        self.lingering: subprocess.Popen[bytes] | None = None  # a child that would not die
        self._lock = threading.Lock()
        self._running: subprocess.Popen[bytes] | None = None

    def export(self) -> ExportResult:
        """One snapshot, or why not (never raises for the share's problems)."""
        t0 = time.monotonic()
        if self.lingering is not None:
            if self.lingering.poll() is None:
                return ExportResult(None, "the previous snapshot's process is still stuck on the share")
            self.lingering = None
        argv = [sys.executable, "-m", "semwatch.store.export", str(self.settings.store.database),
                str(self.folder), self.instrument, str(self.settings.fleet.keep), str(self.scratch)]
        with self._lock:
            proc = self._running = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                    stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=self.settings.fleet.export_timeout_seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
            try:
                proc.communicate(timeout=2.0)
            except subprocess.TimeoutExpired:
                self.lingering = proc
            return ExportResult(None, f"not written within {self.settings.fleet.export_timeout_seconds:g} s "
                                      f"(a hung or slow share?): abandoned", time.monotonic() - t0)
        finally:
            with self._lock:
                self._running = None
            if self.lingering is None:
                self.scratch.unlink(missing_ok=True)
        if proc.returncode != 0:
            reason = err.decode("utf-8", "replace").strip().splitlines()
            return ExportResult(None, reason[-1] if reason else f"exit {proc.returncode}",
                                time.monotonic() - t0)
        return ExportResult(Path(out.decode("utf-8", "surrogateescape").strip()), None, time.monotonic() - t0)

    def cancel(self) -> None:
        """Kill a snapshot in progress (the daemon is stopping)."""
        with self._lock:
            if self._running is not None and self._running.poll() is None:
                self._running.kill()


class SnapshotScheduler:
    """The daemon's attachment: a snapshot at start and every `[fleet] export_minutes`."""

    def __init__(self, settings: Settings) -> None:
        folder = settings.fleet.export_folder
        assert folder is not None
        self.settings = settings
        self.exporter = Exporter(settings, folder)
        self.period = settings.fleet.export_minutes * 60.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="semwatch-fleet-export", daemon=True)
        self.written = 0
        self.failed = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.exporter.cancel()
        self._thread.join(5.0)

    def _run(self) -> None:
        folder = self.exporter.folder
        while not self._stop.is_set():
            try:
                folder.mkdir(parents=True, exist_ok=True)
                result = self.exporter.export()
            except OSError as exc:  # the share is not there (yet): try again next time
                result = ExportResult(None, f"{exc.strerror or exc}")
            if self._stop.is_set():
                return
            if result.path is not None:
                self.written += 1
                log.info("snapshot %s (%.1f s)", path_text(result.path), result.seconds)
            else:
                self.failed += 1
                log.warning("snapshot to %s failed: %s", path_text(folder), result.problem)
            self._stop.wait(self.period)


def export_now(settings: Settings, *, to: Path | None, out: Output) -> int:
    """`semwatch export [--to FOLDER]`: one snapshot of `[store] database` into FOLDER (default
    `[fleet] export_folder`), within the same deadline as the daemon's; its path, or JSON."""
    folder = to if to is not None else settings.fleet.export_folder
    if folder is None:
        raise ConfigError("[fleet] export_folder is empty: give a folder with --to")
    if not settings.store.database.is_file():
        raise UserError(f"no database at {settings.store.database} (has the daemon run?)",
                        ExitStatus.INPUT_FAILED)
    folder.mkdir(parents=True, exist_ok=True)
    result = Exporter(settings, folder).export()
    if result.path is None:
        raise UserError(f"snapshot to {path_text(folder)} failed: {result.problem}", ExitStatus.INPUT_FAILED)
    if out.json:
        out.emit({"snapshot": path_text(result.path), "seconds": round(result.seconds, 3)})
    else:
        out.line(path_text(result.path))
    return ExitStatus.OK
