"""`semwatch watch`: the daemon in the foreground (systemd runs exactly this).

Start-up: check the watch folder (missing → configuration error, exit 78), load the model
(missing or refused → exit 78, so systemd does not restart into the same error), open the
database, reconcile the CSV after a crash, start writer → pipeline → watcher, then READY=1.
About once a second: the `daemon` row, STATUS=, and WATCHDOG=1 only while the watcher, the
pipeline and the writer are alive. SIGTERM/SIGINT: stop taking files, finish work in flight
(`[watch] stop_timeout_seconds`), exit 0; a second signal exits at once (nothing is lost: queued
files stay `pending` and are processed at the next start). A dead watcher, writer or inference
thread exits 1 so systemd restarts the service.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from semwatch.config import ConfigError, Settings
from semwatch.errors import UserError
from semwatch.sdnotify import Notifier

log = logging.getLogger("semwatch")

EXIT_OK = 0
EXIT_FAILED = 1
STATUS_SECONDS = 1.0
TRIM_SECONDS = 30.0  # hand freed heap memory back to the system this often


# --- logging ---------------------------------------------------------------------------------------


class _StderrHandler(logging.Handler):
    """Writes to the current sys.stderr (rich's live display redirects it while it runs)."""

    def __init__(self, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record).replace("\r", " ").replace("\n", " | ")
            if self.journald:  # sd-daemon(3) priority prefixes: journald files the level
                line = f"<{_syslog_priority(record.levelno)}>{line}"
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def _syslog_priority(level: int) -> int:
    if level >= logging.ERROR:
        return 3
    if level >= logging.WARNING:
        return 4
    if level >= logging.INFO:
        return 6
    return 7


def setup_logging(level: str) -> None:
    """Plain one-line records (no ANSI, no carriage returns); no timestamps under journald."""
    journald = bool(os.environ.get("JOURNAL_STREAM"))
    handler = _StderrHandler(journald)
    fmt = "%(levelname)s %(name)s: %(message)s" if journald else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger("semwatch")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


# --- the service -----------------------------------------------------------------------------------


class _Signals:
    """SIGTERM/SIGINT set `stop`; a second one exits at once."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.stop.is_set():
            os.write(2, b"semwatch: second signal, exiting now (queued files stay pending)\n")
            os._exit(130 if signum == signal.SIGINT else 143)
        self.stop.set()


def watch_command(args: argparse.Namespace, settings: Settings) -> int:
    folder_arg = getattr(args, "folder", None)
    if folder_arg is not None:
        watch = dataclasses.replace(settings.watch, folder=Path(folder_arg).absolute())
        settings = settings.replace(watch=watch)
    setup_logging(settings.logging.level)
    plain = bool(getattr(args, "plain", False)) or not sys.stdout.isatty()
    return Service(settings, plain=plain).run()


class Service:
    def __init__(self, settings: Settings, *, plain: bool = True) -> None:
        self.settings = settings
        self.plain = plain
        self.folder = Path(os.path.abspath(settings.watch.folder))  # noqa: PTH100 - keep symlinks as named
        self.notifier = Notifier()
        self.signals = _Signals()
        self.malloc = _Malloc()

    def run(self) -> int:
        from semwatch.pipeline import Pipeline
        from semwatch.store import Gone, Writer, load_ledger
        from semwatch.watcher import Watcher, resolve_mode

        settings = self.settings
        if not self.folder.is_dir():
            what = "is not a folder" if self.folder.exists() else "does not exist"
            raise ConfigError(f"[watch] folder {what}: {self.folder}")
        mode, fstype = resolve_mode(settings.watch.mode, self.folder)
        self.signals.install()
        try:
            classifier = self._load_classifier()
            read = _reader()
            store = _open_store(settings)
        except BaseException:
            self.signals.restore()
            raise
        writer = Writer(store)
        pipeline: Pipeline | None = None
        watcher: Watcher | None = None
        extras: list[Any] = []
        code = EXIT_OK
        try:
            manifest: dict[str, Any] = dict(getattr(classifier, "manifest", {}) or {})
            store.register_model(classifier.model_id, manifest.get("name"), list(classifier.classes),
                                 manifest.get("created_at"), manifest.get("metrics"), settings.model.path)
            store.start_daemon(device=classifier.device, model_id=classifier.model_id,
                               watch_folder=self.folder, watch_mode=mode)
            repaired = store.reconcile_csv()
            if repaired:
                log.warning("results CSV: appended %d line(s) missing after an unclean stop", repaired)
            ledger = load_ledger(store.conn)
            writer.start()
            pipeline = Pipeline(settings, classifier, writer, self.folder, read=read,
                                database=settings.store.database)
            watcher = Watcher(settings.watch, self.folder, mode=mode, done=ledger.done,
                              pending=ledger.pending, submit=pipeline.submit,
                              on_gone=lambda key: writer.put(Gone(key)))
            pipeline.watcher = watcher
            pipeline.start()
            watcher.start()
            log.info("watching %s (%s on %s), model %s on %s, database %s", self.folder, mode, fstype,
                     classifier.model_id, classifier.device, settings.store.database)
            while not watcher.wait_started(0.5):
                if self.signals.stop.is_set():
                    break
            if watcher.error is not None:
                raise watcher.error
            if not self.signals.stop.is_set():
                self.notifier.notify("READY=1", f"STATUS=watching {self.folder}")
                extras = self._start_extras()
                code = self._loop(writer, pipeline, watcher)
        finally:
            self.notifier.notify("STOPPING=1", "STATUS=stopping")
            code = self._shutdown(writer, pipeline, watcher, store, extras, code)
            self.signals.restore()
            self.notifier.close()
        return code

    def _load_classifier(self) -> Any:
        try:
            from semwatch.classify import Classifier
        except ImportError as exc:  # pragma: no cover - the classifier module is part of the package
            raise UserError(f"classifier unavailable: {exc}", 1) from None
        try:
            return Classifier.load(self.settings.model.path, self.settings)
        except UserError as exc:
            # The model is configuration: exit 78 so systemd does not restart into the same error.
            message = str(exc)
            raise ConfigError(message if message.startswith("[") else f"[model] path: {message}") from None

    def _loop(self, writer: Any, pipeline: Any, watcher: Any) -> int:
        from semwatch.store import DaemonStatus

        last_trim = time.monotonic()
        while not self.signals.stop.wait(STATUS_SECONDS):
            if time.monotonic() - last_trim >= TRIM_SECONDS:
                self.malloc.trim()
                last_trim = time.monotonic()
            problem = self._problem(writer, pipeline, watcher)
            if problem:
                log.error("%s; exiting so that the service is restarted", problem)
                return EXIT_FAILED
            queued, in_progress = pipeline.counts()
            ips, tps = pipeline.rates.rates()
            waiting = watcher.counts.waiting + queued
            writer.put(DaemonStatus("running", waiting=waiting, in_progress=in_progress,
                                    done=pipeline.done, failed=pipeline.failed, images_per_s=round(ips, 3),
                                    tiles_per_s=round(tps, 2), message=None))
            self.notifier.notify("WATCHDOG=1", f"STATUS={pipeline.done} done, {pipeline.failed} failed, "
                                 f"{waiting} waiting, {in_progress} in progress, {ips:.2f} images/s")
        log.info("stopping: finishing work in flight")
        return EXIT_OK

    @staticmethod
    def _problem(writer: Any, pipeline: Any, watcher: Any) -> str | None:
        if watcher.error is not None or not watcher.is_alive():
            return f"the watcher died ({watcher.error})"
        if writer.error is not None or not writer.is_alive():
            return f"the database writer died ({writer.error})"
        if pipeline.error is not None or not pipeline.alive():
            return f"the processing pipeline died ({pipeline.error})"
        return None

    def _start_extras(self) -> list[Any]:
        extras: list[Any] = []
        if not self.plain:
            try:
                from semwatch.live import LiveView

                live = LiveView(self.settings)
                live.start()
                extras.append(live)
            except ImportError:
                log.info("live view not available (semwatch.live missing); plain log lines")
            except Exception as exc:
                log.warning("live view failed to start: %s; plain log lines", exc)
        if self.settings.report.enabled:
            try:
                from semwatch.scheduler import ReportScheduler

                scheduler = ReportScheduler(self.settings)
                scheduler.start()
                extras.append(scheduler)
            except ImportError:
                log.info("nightly reports not available (semwatch.scheduler missing)")
            except Exception as exc:
                log.warning("report scheduler failed to start: %s", exc)
        return extras

    def _shutdown(self, writer: Any, pipeline: Any, watcher: Any, store: Any, extras: list[Any],
                  code: int) -> int:
        from semwatch.store import DaemonStatus, exit_message

        deadline = time.monotonic() + self.settings.watch.stop_timeout_seconds
        for extra in reversed(extras):
            try:
                (extra.shutdown if hasattr(extra, "shutdown") else extra.stop)()
            except Exception as exc:
                log.warning("stopping %s: %s", type(extra).__name__, exc)
        if watcher is not None:
            watcher.stop()
            watcher.join(max(0.1, deadline - time.monotonic()))
        if pipeline is not None and not pipeline.stop(max(0.1, deadline - time.monotonic())):
            log.warning("work still in flight after %.0f s; it stays pending for the next start",
                        self.settings.watch.stop_timeout_seconds)
        if writer.is_alive():
            done = pipeline.done if pipeline is not None else 0
            failed = pipeline.failed if pipeline is not None else 0
            writer.put(DaemonStatus("stopped", done=done, failed=failed, message=exit_message(code)))
            writer.stop()
            writer.join(max(1.0, deadline + 1.0 - time.monotonic()))
            if writer.is_alive():
                log.error("database writer did not finish in time")
                code = code or EXIT_FAILED
        if not writer.is_alive():
            store.close()
        log.info("stopped (exit %d)", code)
        return code


class _Malloc:
    """glibc tuning against RSS creep: several threads decoding multi-megabyte images make glibc
    keep one arena per thread and hold freed memory; two arenas and a periodic trim keep the
    daemon's memory flat (measured in benchmarks/daemon_bench.py). No-op on other C libraries."""

    def __init__(self) -> None:
        self.libc: Any = None
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-8, 2)  # M_ARENA_MAX = 2, before the worker threads start
            self.libc = libc
        except (OSError, AttributeError):
            pass

    def trim(self) -> None:
        if self.libc is not None:
            self.libc.malloc_trim(0)


def _open_store(settings: Settings) -> Any:
    """The database and CSV, checked up front: an unusable one is a configuration error (78)."""
    import sqlite3

    from semwatch.store import Store

    csv_path = settings.store.results_csv
    try:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "ab"):
            pass
    except OSError as exc:
        reason = exc.strerror or exc
        raise ConfigError(f"[store] results_csv cannot be written: {csv_path}: {reason}") from None
    try:
        return Store(settings.store.database, csv_path, busy_timeout_ms=settings.store.busy_timeout_ms,
                     sample_settings=settings.samples)
    except (sqlite3.Error, OSError, RuntimeError) as exc:
        raise ConfigError(f"[store] database cannot be used: {settings.store.database}: {exc}") from None


def _reader() -> Any:
    from semwatch.micrograph import read_micrograph

    return read_micrograph
