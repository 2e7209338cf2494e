"""`semwatch watch`: the daemon in the foreground (systemd runs exactly this).

Start-up: check the watch folder (missing → configuration error, exit 78), load the model
(missing or refused → exit 78, so systemd does not restart into the same error), open the
database, reconcile the CSV after a crash, start writer → pipeline → watcher, then READY=1.
Only one daemon per database: an exclusive lock `<database>.lock` (a second one exits 75,
EX_TEMPFAIL). About once a second: the `daemon` row, STATUS=, the read timeout check, and
WATCHDOG=1 only while every thread is alive and every busy stage (watcher, readers, inference,
writer) has moved within the stuck threshold (`[watch] stuck_seconds`, or the unit's WatchdogSec
if shorter): a thread alive but blocked starves the watchdog and is logged. A database file
deleted or replaced under the daemon stops the writer before its next write (checked at least
twice a second): exit 1. SIGTERM/SIGINT: stop taking files, finish work in flight (`[watch]
stop_timeout_seconds`), exit 0; a second signal exits at once (nothing is lost: queued files stay
`pending` and are processed at the next start). A dead watcher, writer or inference thread exits
1 so systemd restarts the service.

Threads and who owns what: the watcher thread owns the settle gate and reads the one `Inbox`
(inotify hints; the pipeline's Finished/Retry/Changed); reader threads and the inference thread
belong to the `Pipeline` (its job and prepared queues); the writer thread owns the database
connection (its message queue). This thread installs the signal handlers, pings systemd and
watches the others. Attachments (the live view, the nightly report scheduler) are started once
the daemon is ready and stopped first; the live view comes from above (`view`), since the
service layer does not know the views.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Protocol

from semwatch.config import Settings
from semwatch.errors import ConfigError, ExitStatus, UserError
from semwatch.liveness import Liveness, Stuck
from semwatch.model.registry import live_model_dir
from semwatch.reading.micrograph import read_micrograph
from semwatch.service.catchup import CatchUp
from semwatch.service.events import health_conditions
from semwatch.service.fleet_export import SnapshotScheduler
from semwatch.service.folderprobe import FolderProbe, FolderState, unreachable_after
from semwatch.service.inbox import Inbox
from semwatch.service.logs import setup_logging
from semwatch.service.metrics import Metrics, queue_depths, start_metrics
from semwatch.service.modelswap import ModelWatch
from semwatch.service.notify import Alerts, start_alerts
from semwatch.service.pipeline import Pipeline
from semwatch.service.retrainjob import NightlyRetrain
from semwatch.service.scheduler import ReportScheduler
from semwatch.service.sdnotify import Notifier
from semwatch.service.watcher import Watcher, resolve_mode
from semwatch.store import db
from semwatch.store.access import lock_daemon, open_writer
from semwatch.store.ledger import LedgerState, Store, load_ledger
from semwatch.store.messages import DaemonStatus, Gone, exit_message
from semwatch.store.writer import Writer

if TYPE_CHECKING:
    from semwatch.model.classify import Classifier

log = logging.getLogger("semwatch")

STATUS_SECONDS = 1.0
TRIM_SECONDS = 30.0  # hand freed heap memory back to the system this often


class Attachment(Protocol):
    """Something that runs beside the daemon (the live view, the nightly report scheduler): started
    once the daemon is ready, stopped first when it stops (within a bounded time)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


ViewFactory = Callable[[Settings], Attachment]

_Handler = Callable[[int, FrameType | None], object] | int | None


def run_daemon(settings: Settings, *, folder: Path | None = None, view: ViewFactory | None = None,
               rename_instrument: bool = False) -> int:
    """Run the daemon until SIGTERM/SIGINT; the exit status (`ExitStatus`). `folder` replaces
    `[watch] folder`; `view` builds the live view (None: plain log lines); `rename_instrument`
    lets a database of another `[instrument] name` take this one (`store.instrument.bind`)."""
    if folder is not None:
        settings = settings.replace(watch=dataclasses.replace(settings.watch, folder=folder.absolute()))
    return Service(settings, view=view, rename_instrument=rename_instrument).run()


class _Signals:
    """SIGTERM/SIGINT set `stop`; a second one exits at once. SIGHUP sets `hup`: look at the
    registry's champion again (`service.modelswap`)."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.hup = threading.Event()
        self.previous: dict[int, _Handler] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        self.previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda _s, _f: self.hup.set())

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.stop.is_set():
            os.write(2, b"semwatch: second signal, exiting now (queued files stay pending)\n")
            os._exit(ExitStatus.INTERRUPTED if signum == signal.SIGINT else ExitStatus.TERMINATED)
        self.stop.set()


@dataclasses.dataclass
class _Parts:
    """What one run started, for the shutdown to stop in order (absent parts never started)."""

    store: Store
    writer: Writer
    pipeline: Pipeline | None = None
    watcher: Watcher | None = None
    attachments: list[Attachment] = dataclasses.field(default_factory=list)


class Service:
    def __init__(self, settings: Settings, *, view: ViewFactory | None = None,
                 rename_instrument: bool = False) -> None:
        self.settings = settings
        self.rename_instrument = rename_instrument
        self.view = view
        self.folder = Path(os.path.abspath(settings.watch.folder))  # noqa: PTH100 - keep symlinks as named
        self.notifier = Notifier()
        self.signals = _Signals()
        self.malloc = _Malloc()
        self.liveness = Liveness()
        self.limiter = setup_logging(settings.logging.level, per_file_lines=settings.logging.per_file_lines,
                                     summary_seconds=settings.logging.summary_seconds)
        self.stuck_after = _stuck_threshold(settings.watch.stuck_seconds, os.environ)
        self._stuck_logged: set[str] = set()
        self.alerts: Alerts | None = None  # [notify]: started before the threads, stopped last
        self.metrics: Metrics | None = None  # [metrics]: started with the threads, stopped first
        # Whether the watch folder answers, asked without blocking (a frozen share blocks the caller).
        self.probe = FolderProbe(self.folder, unreachable_after=unreachable_after(settings.watch))
        self.model_dir = settings.model.path  # the model served at start: the champion, else path

    def run(self) -> int:
        settings = self.settings
        if not self.folder.is_dir():
            what = "is not a folder" if self.folder.exists() else "does not exist"
            raise ConfigError(f"[watch] folder {what}: {self.folder}")
        mode, fstype = resolve_mode(settings.watch.mode, self.folder)
        try:
            lock_fd = lock_daemon(settings.store.database)
        except db.DatabaseLocked as exc:
            raise UserError(str(exc), ExitStatus.LOCKED) from None
        except OSError as exc:
            raise ConfigError(f"[store] database cannot be locked: {settings.store.database}: "
                              f"{exc.strerror or exc}") from None
        try:
            return self._run_locked(mode, fstype)
        finally:
            os.close(lock_fd)

    def _run_locked(self, mode: str, fstype: str) -> int:
        self.signals.install()
        try:
            classifier = self._load_classifier()
            store = open_writer(self.settings, rename_instrument=self.rename_instrument)
        except BaseException:
            self.signals.restore()
            raise
        parts = _Parts(store, Writer(store, stage=self.liveness.stage("writer"), lock=store.write_lock))
        code: int = ExitStatus.OK
        try:
            ledger = self._prepare_store(store, classifier, mode)
            self.probe.start()
            self.alerts = start_alerts(self.settings)
            pipeline, watcher = self._start_threads(parts, classifier, ledger, mode)
            self.metrics = start_metrics(self.settings, model_id=classifier.model_id,
                                         device=classifier.device,
                                         depths=lambda: queue_depths(pipeline, watcher, parts.writer),
                                         folder=self.probe.state)
            pipeline.observer = self.metrics
            log.info("watching %s (%s on %s), model %s on %s, database %s", self.folder, mode, fstype,
                     classifier.model_id, classifier.device, self.settings.store.database)
            if self._wait_started(watcher):
                self.notifier.notify("READY=1", f"STATUS=watching {self.folder}")
                parts.attachments = self._start_attachments()
                code = self._loop(parts.writer, pipeline, watcher)
        finally:
            self.notifier.notify("STOPPING=1", "STATUS=stopping")
            code = self._shutdown(parts, code)
            self.signals.restore()
            self.notifier.close()
        return code

    def _load_classifier(self) -> Classifier:
        from semwatch.model.classify import Classifier  # torch: loaded only by the daemon itself

        try:
            self.model_dir = live_model_dir(self.settings.model)
            classifier = Classifier.load(self.model_dir, self.settings)
            if classifier.runtime_note:
                log.warning("%s", classifier.runtime_note)
            return classifier
        except ConfigError:
            raise
        except UserError as exc:
            # The model is configuration: exit 78 so systemd does not restart into the same error.
            raise ConfigError(f"[model] path: {exc}") from None

    def _prepare_store(self, store: Store, classifier: Classifier, mode: str) -> LedgerState:
        """Record the model and this daemon, repair the CSV after an unclean stop, read the ledger."""
        manifest = classifier.manifest
        with store.batch():
            store.register_model(classifier.model_id, manifest.name or None, classifier.classes,
                                 manifest.created_at or None, manifest.metrics, self.model_dir)
            store.start_daemon(device=classifier.device, model_id=classifier.model_id,
                               watch_folder=self.folder, watch_mode=mode)
        repaired = store.reconcile_csv()
        if repaired:
            log.warning("results CSV: appended %d line(s) missing after an unclean stop", repaired)
        return load_ledger(store.conn)

    def _start_threads(self, parts: _Parts, classifier: Classifier, ledger: LedgerState,
                       mode: str) -> tuple[Pipeline, Watcher]:
        """writer → pipeline → watcher, each recorded in `parts` as it starts; one inbox between
        the pipeline and the watcher."""
        settings, writer = self.settings, parts.writer
        inbox = Inbox()
        writer.start()
        pipeline = parts.pipeline = Pipeline(settings, classifier, writer, self.folder, inbox=inbox,
                                             read=read_micrograph, database=settings.store.database,
                                             liveness=self.liveness)
        watcher = parts.watcher = Watcher(settings.watch, self.folder, mode=mode, inbox=inbox,
                                          done=ledger.done, pending=ledger.pending, submit=pipeline.submit,
                                          on_gone=lambda key: writer.put(Gone(key)), on_refused=writer.put,
                                          stage=self.liveness.stage("watcher"))
        pipeline.start()
        watcher.start()
        return pipeline, watcher

    def _wait_started(self, watcher: Watcher) -> bool:
        """Whether the watcher finished its first scan before a signal came; its error if it died."""
        while not watcher.wait_started(0.5):
            if self.signals.stop.is_set():
                return False
        if watcher.error is not None:
            raise watcher.error
        return not self.signals.stop.is_set()

    def _loop(self, writer: Writer, pipeline: Pipeline, watcher: Watcher) -> int:
        last_trim = time.monotonic()
        catchup: CatchUp | None = None

        def start_catchup(model_id: str) -> None:
            nonlocal catchup
            if self.settings.model.reprocess_outdated:  # a new model: its outdated results anew
                catchup = CatchUp(self.settings.store.database, model_id,
                                  page=max(2, 2 * self.settings.watch.reader_threads))
                catchup.start()

        def switched(model_id: str) -> None:
            start_catchup(model_id)
            if self.metrics is not None:
                self.metrics.switched(model_id)
            if self.alerts is not None:
                self.alerts.model_moved("champion", model_id)

        def challenger(model_id: str | None) -> None:
            if self.alerts is not None and model_id is not None:
                self.alerts.model_moved("challenger", model_id)

        start_catchup(pipeline.classifier.model_id)
        models = ModelWatch(self.settings, pipeline, writer, on_switch=switched, on_challenger=challenger)
        models.hup = self.signals.hup
        models.start()
        while not self.signals.stop.wait(STATUS_SECONDS):
            models.check()
            if time.monotonic() - last_trim >= TRIM_SECONDS:
                self.malloc.trim()
                last_trim = time.monotonic()
            summary = self.limiter.roll()
            if summary:
                log.warning("%s", summary)
            pipeline.check_readers()
            problem = self._problem(writer, pipeline, watcher)
            if problem:
                log.error("%s; exiting so that the service is restarted", problem)
                return ExitStatus.INPUT_FAILED
            self._report(writer, pipeline, watcher)
            if catchup is not None:
                catchup.tick(pipeline, watcher.counts.waiting)
        log.info("stopping: finishing work in flight")
        return ExitStatus.OK

    def _report(self, writer: Writer, pipeline: Pipeline, watcher: Watcher) -> None:
        """The `daemon` row and systemd's STATUS=; WATCHDOG=1 only while no stage is stuck."""
        queued, in_progress = pipeline.counts()
        ips, tps = pipeline.rates.rates()
        waiting = watcher.counts.waiting + queued
        folder = self.probe.check()
        stuck = self._stuck(folder)
        if self.alerts is not None:
            self.alerts.health(health_conditions(stuck=stuck, database=writer.degraded, folder=folder,
                                                 observer_restarts=watcher.observer_restarts()))
        message = writer.degraded and f"database not writable: {writer.degraded}"
        problem = folder.problem()
        if problem is not None:
            message = problem[1]
        if stuck:
            message = "stuck: " + "; ".join(f"{s.stage} {s.doing} for {s.seconds:.0f} s" for s in stuck)
        writer.put(DaemonStatus("running", waiting=waiting, in_progress=in_progress,
                                done=pipeline.done, failed=pipeline.failed, images_per_s=round(ips, 3),
                                tiles_per_s=round(tps, 2), message=message))
        if stuck:
            self.notifier.notify(f"STATUS={message}")  # no WATCHDOG=1: systemd will restart us
        else:
            self.notifier.notify("WATCHDOG=1", f"STATUS={pipeline.done} done, {pipeline.failed} failed, "
                                 f"{waiting} waiting, {in_progress} in progress, {ips:.2f} images/s")

    def _stuck(self, folder: FolderState) -> list[Stuck]:
        """Busy stages that have not moved within the threshold; each is logged once per episode.
        While the watch folder does not answer, the watcher waiting on it is not stuck: the share is
        (reported as such); restarting the daemon would not help."""
        stuck = self.liveness.stuck(self.stuck_after)
        if folder.unreachable:
            stuck = [s for s in stuck if s.stage != "watcher"]
        names = {s.stage for s in stuck}
        for s in stuck:
            if s.stage not in self._stuck_logged:
                log.error("stage %s has not moved for %.0f s (%s); not feeding the watchdog",
                          s.stage, s.seconds, s.doing)
        for name in self._stuck_logged - names:
            log.warning("stage %s moves again", name)
        self._stuck_logged = names
        return stuck

    @staticmethod
    def _problem(writer: Writer, pipeline: Pipeline, watcher: Watcher) -> str | None:
        if watcher.error is not None or not watcher.is_alive():
            return f"the watcher died ({watcher.error})"
        if writer.error is not None or not writer.is_alive():
            return f"the database writer died ({writer.error})"
        if pipeline.error is not None or not pipeline.alive():
            return f"the processing pipeline died ({pipeline.error})"
        return None

    def _start_attachments(self) -> list[Attachment]:
        """The live view (when the caller gave one), the report scheduler (when enabled) and the
        snapshot scheduler (`[fleet] export_folder`); one that fails to start costs only itself."""
        factories: list[tuple[ViewFactory, str]] = []
        if self.view is not None:
            factories.append((self.view, "live view failed to start: %s; plain log lines"))
        retraining = self.settings.lifecycle.retrain_after_labels > 0
        if self.settings.report.enabled or retraining:
            scheduler: ViewFactory = functools.partial(
                ReportScheduler, on_written=self.alerts.report_ready if self.alerts is not None else None,
                after_nightly=NightlyRetrain(self.settings) if retraining else None)
            factories.append((scheduler, "report scheduler failed to start: %s"))
        if self.settings.fleet.export_folder is not None:  # snapshots for `semwatch fleet`
            factories.append((SnapshotScheduler, "snapshot scheduler failed to start: %s"))
        started: list[Attachment] = []
        for factory, failed in factories:
            try:
                attachment = factory(self.settings)
                attachment.start()
            except Exception as exc:
                log.warning(failed, exc)
                continue
            started.append(attachment)
        return started

    def _shutdown(self, parts: _Parts, code: int) -> int:
        """Attachments, watcher, pipeline, then the writer last (it records the stop), all within
        `[watch] stop_timeout_seconds`."""
        deadline = time.monotonic() + self.settings.watch.stop_timeout_seconds
        for attachment in reversed(parts.attachments):
            try:
                attachment.stop()
            except Exception as exc:
                log.warning("stopping %s: %s", type(attachment).__name__, exc)
        if self.metrics is not None:
            self.metrics.stop()
        if parts.watcher is not None:
            parts.watcher.stop()
            parts.watcher.join(max(0.1, deadline - time.monotonic()))
        pipeline, writer = parts.pipeline, parts.writer
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
                code = code or ExitStatus.INPUT_FAILED
        if not writer.is_alive():
            parts.store.close()
        if self.alerts is not None:
            self.alerts.stop()  # after the writer: the last results are committed, a last poll sees them
        self.probe.stop()
        summary = self.limiter.roll(force=True)
        if summary:
            log.warning("%s", summary)
        log.info("stopped (exit %d)", code)
        return code


class _Malloc:
    """glibc tuning against RSS creep: several threads decoding multi-megabyte images make glibc
    keep one arena per thread and hold freed memory; two arenas and a periodic trim keep the
    daemon's memory flat (measured in benchmarks/daemon_bench.py). No-op on other C libraries."""

    def __init__(self) -> None:
        self.libc: ctypes.CDLL | None = None
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-8, 2)  # M_ARENA_MAX = 2, before the worker threads start
            self.libc = libc
        except (OSError, AttributeError):
            pass

    def trim(self) -> None:
        if self.libc is not None:
            self.libc.malloc_trim(0)


def _stuck_threshold(stuck_seconds: float, environ: Mapping[str, str]) -> float:
    """`[watch] stuck_seconds`, or systemd's WatchdogSec if shorter (a stage stuck longer than the
    watchdog allows is the same as dead). Leaves a few seconds so the ping stops before the kill."""
    try:
        watchdog = int(environ.get("WATCHDOG_USEC", "0")) / 1e6
    except ValueError:
        watchdog = 0.0
    if watchdog > 0:
        return max(1.0, min(stuck_seconds, watchdog - max(2.0, watchdog * 0.1)))
    return stuck_seconds


