"""The daemon's automatic retraining (`[lifecycle] retrain_after_labels`): after the nightly report,
`semwatch models retrain` in a subprocess (semwatch.lifecycle.retrain).

A subprocess, not a thread: training takes minutes of every core and gigabytes of memory, and a
process can be given a lower CPU priority (the live model keeps first call on the cores if the
night shift is still imaging), bounded in time and killed when the daemon stops, none of which a
thread allows. It runs with the daemon's own config file and environment, so it sees the same
settings. Its progress goes to `<database>.retrain.log` (replaced each run); its outcome, one JSON
line, to the daemon's log. The alerts (`challenger_ready`, `model_promoted`) come from the daemon's
registry watch (`service.modelswap`), which sees the alias moves the command makes.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

from semwatch.config import Settings
from semwatch.safefs import path_text

log = logging.getLogger("semwatch.retrain")

AUTO_USER = "semwatch (automatic)"  # `by` of the moves the daemon's retraining makes
NICE = 10  # below the daemon (and below an operator's shell)


def log_path(database: Path) -> Path:
    return database.with_name(database.name + ".retrain.log")


class NightlyRetrain:
    """Callable from the report worker: one retraining run, bounded by `retrain_timeout_minutes`;
    `cancel` (from the daemon's stop) ends a run in progress."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._cancelled = False

    def command(self) -> list[str]:
        lc = self.settings.lifecycle
        cmd = [sys.executable, "-m", "semwatch", "models", "retrain", "--json", "--by", AUTO_USER,
               "--min-labels", str(max(1, lc.retrain_after_labels))]
        if lc.auto_promote:
            cmd.append("--promote-if-better")
        if self.settings.source is not None:
            cmd += ["--config", str(self.settings.source)]
        return cmd

    def __call__(self) -> None:
        timeout = self.settings.lifecycle.retrain_timeout_minutes * 60
        logfile = log_path(self.settings.store.database)
        with open(logfile, "wb") as err, self._lock:
            if self._cancelled:
                return
            self._proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=err,
                                          stdin=subprocess.DEVNULL)
            try:
                os.setpriority(os.PRIO_PROCESS, self._proc.pid, NICE)
            except OSError:  # already gone, or not allowed: it runs at the daemon's priority
                pass
        proc = self._proc
        log.info("retraining: `semwatch models retrain` started (pid %d, progress in %s)", proc.pid,
                 path_text(logfile))
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            log.error("retraining: still running after %.0f minutes ([lifecycle] retrain_timeout_minutes); "
                      "stopped, nothing registered", timeout / 60)
            return
        finally:
            with self._lock:
                self._proc = None
        if proc.returncode != 0:
            if not self._cancelled:
                log.error("retraining failed (exit %d); see %s: %s", proc.returncode, path_text(logfile),
                          _last_line(logfile))
            return
        lines = stdout.decode("utf-8", "replace").strip().splitlines()
        try:
            outcome = json.loads(lines[-1]) if lines else {}
        except ValueError:
            outcome = {"output": lines[-1][:200]}
        log.info("retraining: %s", json.dumps(outcome, sort_keys=True))

    def cancel(self) -> None:
        """End a run in progress (terminate, then kill); none starts after this."""
        with self._lock:
            self._cancelled = True
            proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.warning("retraining stopped with the daemon (nothing registered; it runs again tonight)")


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - 4096))
            tail = fh.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return "-"
    return tail[-1][:300] if tail else "-"
