"""Nightly reports inside the daemon: apscheduler 3.x cron job plus catch-up of missed nights.

apscheduler 3.x keeps jobs in memory, so a night missed while the daemon was down is simply lost
to it; at start-up we work out ourselves which reports are due and missing. A report is due once
its scheduled time has passed: the report written at `[report] time` covers that calendar day
when the time is 12:00 or later (the default 23:55), else the day before (e.g. 00:30 writes
yesterday's). A day's report is missing when its folder does not exist (report folders appear
complete, see `semwatch.report`); catch-up looks back `[report] catch_up_days` and skips days on
which no image was processed. One worker thread writes reports, so two never race.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from semwatch.config import Settings
from semwatch.report import ReportPaths, day_has_images, report_folder, write_report

log = logging.getLogger("semwatch.scheduler")

NIGHTLY_JOB = "semwatch-nightly-report"
CATCH_UP_JOB = "semwatch-report-catch-up"


class ReportScheduler:
    """Writes the day's report at `[report] time` in `[report] timezone`; catches up at start."""

    def __init__(self, settings: Settings, *, clock: Callable[[], datetime] | None = None) -> None:
        self.settings = settings
        self.zone = ZoneInfo(settings.report.timezone)
        hour, minute = (int(p) for p in settings.report.time.split(":"))
        self.at = time(hour, minute)
        self.clock = clock or (lambda: datetime.now(UTC))
        self._scheduler: Any = None
        self._lock = threading.Lock()

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
        if days == 0:
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
            log.info("writing missed report for %s", day)
            paths = self._write(day)
            if paths is not None:
                written.append(paths)
        return written

    def nightly(self) -> ReportPaths | None:
        """The scheduled job: the report for the day that has just ended (or is ending)."""
        return self._write(self.report_day(self.clock()))

    def _write(self, day: date) -> ReportPaths | None:
        with self._lock:
            try:
                return write_report(self.settings, day)
            except Exception as exc:  # a report must never take the daemon down
                log.error("report for %s failed: %s", day, exc)
                return None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Schedule the nightly job and run the catch-up at once (in the scheduler's worker thread)."""
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.cron import CronTrigger

        scheduler = BackgroundScheduler(executors={"default": ThreadPoolExecutor(1)}, timezone=self.zone,
                                        job_defaults={"coalesce": True, "max_instances": 1,
                                                      "misfire_grace_time": 3600})
        scheduler.add_job(self.nightly, CronTrigger(hour=self.at.hour, minute=self.at.minute,
                                                    timezone=self.zone), id=NIGHTLY_JOB)
        scheduler.add_job(self.catch_up, id=CATCH_UP_JOB)  # no trigger: runs once, now
        scheduler.start()
        self._scheduler = scheduler
        job = scheduler.get_job(NIGHTLY_JOB)
        log.info("nightly report at %s %s (next %s) into %s", self.settings.report.time,
                 self.settings.report.timezone, job.next_run_time if job else "?",
                 self.settings.report.folder)

    def next_run(self) -> datetime | None:
        job = self._scheduler.get_job(NIGHTLY_JOB) if self._scheduler is not None else None
        return job.next_run_time if job is not None else None

    def shutdown(self) -> None:
        """Stop; a report being written is finished first (reports are written atomically anyway)."""
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None
