"""Nightly reports inside the daemon: apscheduler 3.x cron job plus catch-up of missed nights; the
automatic retraining (`after_nightly`, `service.retrainjob`) runs after the night's report.

apscheduler 3.x keeps jobs in memory, so a night missed while the daemon was down is simply lost
to it; at start-up we work out ourselves which reports are due and missing. A report is due once
its scheduled time has passed: the report written at `[report] time` covers that calendar day
when the time is 12:00 or later (the default 23:55), else the day before (e.g. 00:30 writes
yesterday's). A day's report is missing when its folder does not exist (report folders appear
complete, see `semwatch.report`); catch-up looks back `[report] catch_up_days` and skips days on
which no image was processed.

One worker thread of our own writes reports, so two never race. apscheduler's jobs only hand it
work: a report reads files from the untrusted export folder and could in the worst case hang, and
apscheduler's pool threads (like every `concurrent.futures` thread) are joined at interpreter exit,
so a hung report there would keep the daemon from ever exiting on SIGTERM. Our worker is a daemon
thread, and `stop` waits for it only a bounded time. `start`/`stop` make it one of the daemon's
attachments (`service.daemon.Attachment`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time as clock_time
from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from zoneinfo import ZoneInfo

from semwatch.config import Settings
from semwatch.report.daily import ReportPaths, day_has_images, report_folder, write_report

if TYPE_CHECKING:
    from apscheduler.schedulers.background import BackgroundScheduler


class NightlyJob(Protocol):
    """Work after the nightly report (`service.retrainjob.NightlyRetrain`)."""

    def __call__(self) -> None: ...

    def cancel(self) -> None: ...

log = logging.getLogger("semwatch.scheduler")

NIGHTLY_JOB = "semwatch-nightly-report"


class ReportScheduler:
    """Writes the day's report at `[report] time` in `[report] timezone`; catches up at start."""

    def __init__(self, settings: Settings, *, clock: Callable[[], datetime] | None = None,
                 stop_timeout: float | None = None,
                 on_written: Callable[[date, Path], None] | None = None,
                 after_nightly: NightlyJob | None = None) -> None:
        self.settings = settings
        self.on_written = on_written  # told of each report written (the daemon's alerts)
        self.reports = settings.report.enabled  # False: only `after_nightly` runs at the report time
        self.after_nightly = after_nightly
        self.zone = ZoneInfo(settings.report.timezone)
        hour, minute = (int(p) for p in settings.report.time.split(":"))
        self.at = time(hour, minute)
        self.clock = clock or (lambda: datetime.now(UTC))
        # Half the daemon's stop budget: the pipeline and the database writer need the rest.
        self.stop_timeout = (settings.watch.stop_timeout_seconds / 2 if stop_timeout is None
                             else stop_timeout)
        self._scheduler: BackgroundScheduler | None = None
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[str, Callable[[], object]] | None] = queue.SimpleQueue()
        self._queued: set[str] = set()
        self._queued_lock = threading.Lock()
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        self.running: str | None = None  # the job being run ("nightly", "catch-up"), for the stop log

    # --- which day, when ---------------------------------------------------------------------

    def report_day(self, fired_at: datetime) -> date:
        """The day covered by the report written at `fired_at`."""
        local = fired_at.astimezone(self.zone).date()
        return local if self.at >= time(12) else local - timedelta(days=1)

    def due_at(self, day: date) -> datetime:
        """When `day`'s report is scheduled (aware, in the report time zone)."""
        run_date = day if self.at >= time(12) else day + timedelta(days=1)
        return datetime.combine(run_date, self.at, self.zone)

    def missed_days(self, now: datetime | None = None) -> list[date]:
        """Days whose report time passed within `catch_up_days`, with images but no report folder."""
        now = now or self.clock()
        days = self.settings.report.catch_up_days
        if days == 0 or not self.reports:
            return []
        newest = self.report_day(now) + timedelta(days=1)
        missed = []
        for back in range(days + 2):
            day = newest - timedelta(days=back)
            due = self.due_at(day)
            if not now - timedelta(days=days) < due <= now:
                continue
            if report_folder(self.settings, day).exists() or not day_has_images(self.settings, day):
                continue
            missed.append(day)
        return sorted(missed)

    # --- work --------------------------------------------------------------------------------

    def catch_up(self, now: datetime | None = None) -> list[ReportPaths]:
        """Write every missed report (oldest first); one failure does not stop the others."""
        written = []
        for day in self.missed_days(now):
            if self._stopping.is_set():
                break
            log.info("writing missed report for %s", day)
            paths = self._write(day)
            if paths is not None:
                written.append(paths)
        return written

    def nightly(self) -> ReportPaths | None:
        """The scheduled job: the report for the day that has just ended (or is ending), then the
        automatic retraining (when configured), in this order: the report shows the day as served."""
        paths = self._write(self.report_day(self.clock())) if self.reports else None
        if self.after_nightly is not None and not self._stopping.is_set():
            try:
                self.after_nightly()
            except Exception as exc:  # it must never take the scheduler down
                log.error("after the nightly report: %s", exc)
        return paths

    def _write(self, day: date) -> ReportPaths | None:
        with self._lock:
            try:
                paths = write_report(self.settings, day)
            except Exception as exc:  # a report must never take the daemon down
                log.error("report for %s failed: %s", day, exc)
                return None
        if self.on_written is not None:
            try:
                self.on_written(day, paths.html)
            except Exception as exc:  # an alert must never cost a report
                log.warning("report for %s: alert failed: %s", day, exc)
        return paths

    # --- the worker thread -------------------------------------------------------------------

    def _submit(self, name: str, job: Callable[[], object]) -> None:
        """apscheduler's job: hand `job` to the worker at once (once: a job still queued or running
        is not queued again, so a hung report cannot pile up a queue of nights)."""
        with self._queued_lock:
            if name in self._queued or self._stopping.is_set():
                return
            self._queued.add(name)
        self._jobs.put((name, job))

    def _work(self) -> None:
        while (item := self._jobs.get()) is not None:
            name, job = item
            if self._stopping.is_set():
                break
            self.running = name
            try:
                job()
            except Exception as exc:  # pragma: no cover - _write already catches report errors
                log.error("%s failed: %s", name, exc)
            finally:
                self.running = None
                with self._queued_lock:
                    self._queued.discard(name)

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Schedule the nightly job and run the catch-up at once (in the worker thread)."""
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.cron import CronTrigger

        self._worker = threading.Thread(target=self._work, name="semwatch-report", daemon=True)
        self._worker.start()
        scheduler = BackgroundScheduler(executors={"default": ThreadPoolExecutor(1)}, timezone=self.zone,
                                        job_defaults={"coalesce": True, "max_instances": 1,
                                                      "misfire_grace_time": 3600})
        scheduler.add_job(self._submit, CronTrigger(hour=self.at.hour, minute=self.at.minute,
                                                    timezone=self.zone), args=("nightly", self.nightly),
                          id=NIGHTLY_JOB)
        self._submit("catch-up", self.catch_up)  # runs once, now
        scheduler.start()
        self._scheduler = scheduler
        job = scheduler.get_job(NIGHTLY_JOB)
        log.info("nightly %s at %s %s (next %s)%s",
                 " and ".join(n for n, on in (("report", self.reports),
                                              ("retraining", self.after_nightly is not None)) if on),
                 self.settings.report.time, self.settings.report.timezone,
                 job.next_run_time if job else "?",
                 f" into {self.settings.report.folder}" if self.reports else "")

    def next_run(self) -> datetime | None:
        job = self._scheduler.get_job(NIGHTLY_JOB) if self._scheduler is not None else None
        return job.next_run_time if job is not None else None

    def stop(self) -> None:
        """Stop within `stop_timeout` seconds; `running` still names a report left running.

        A report being written gets that long to finish. One still running after it (a slow
        Grad-CAM on the CPU, or a hang nothing should cause) is left to the daemon thread and dies
        with the process: its folder is built under a temporary name, so no half report appears,
        and the next start's catch-up writes the day again."""
        self._stopping.set()
        if self.after_nightly is not None:
            self.after_nightly.cancel()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)  # its jobs only enqueue: returns at once
            self._scheduler = None
        worker, self._worker = self._worker, None
        if worker is None:
            return
        self._jobs.put(None)
        started = clock_time.monotonic()
        worker.join(self.stop_timeout)
        if worker.is_alive():
            log.warning("report job %s still running after %.1f s; not waiting for it (the next start "
                        "catches the day up)", self.running or "?", clock_time.monotonic() - started)
