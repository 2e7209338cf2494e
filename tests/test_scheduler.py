"""Nightly reports: missed nights are caught up at start (fake "now", no sleeping), the cron job
is scheduled in the report time zone, and the scheduler's threads stop, also when a report hangs."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from dbfixture import iso, make_database
from semwatch.config import ReportSettings, Settings
from semwatch.service import scheduler as scheduler_mod
from semwatch.service.scheduler import ReportScheduler


def _settings(settings: Settings, **kw: object) -> Settings:
    values: dict[str, object] = {"folder": settings.report.folder, "timezone": "America/New_York",
                                 "time": "23:55", "catch_up_days": 3}
    values.update(kw)
    return settings.replace(report=ReportSettings(**values))  # type: ignore[arg-type]


def _images_on(days: list[date]) -> list[dict[str, object]]:
    # 17:00 UTC is 12:00 in New York (EST, UTC-5): safely inside the local day.
    return [{"path": f"/export/s/{d}.tif",
             "processed_at": iso(datetime(d.year, d.month, d.day, 17, tzinfo=UTC))} for d in days]


def test_missed_nights_are_caught_up(settings: Settings) -> None:
    s = _settings(settings)
    days = [date(2026, 11, d) for d in (18, 20, 21, 22, 23, 24)]
    make_database(s.store.database, now=datetime(2026, 11, 24, tzinfo=UTC), images=_images_on(days))
    (s.report.folder / "2026-11-22").mkdir(parents=True)  # already written before the daemon stopped
    # The daemon starts on 2026-11-24 at 09:00 New York time (14:00 UTC): reports for the 21st
    # and 23rd are due and missing; the 22nd exists; the 20th is beyond catch_up_days = 3; the
    # 24th is not due until 23:55 tonight.
    sched = ReportScheduler(s)
    now = datetime(2026, 11, 24, 14, 0, tzinfo=UTC)
    assert sched.missed_days(now) == [date(2026, 11, 21), date(2026, 11, 23)]
    written = sched.catch_up(now)
    assert [p.day for p in written] == [date(2026, 11, 21), date(2026, 11, 23)]
    assert all(p.html.is_file() and p.n_images == 1 for p in written)
    assert not any((s.report.folder / "2026-11-22").iterdir())  # untouched
    assert sched.missed_days(now) == []  # idempotent: a folder that exists is done
    # Started after tonight's report time (00:10 UTC on the 25th = 19:10 New York: not yet due;
    # 05:00 UTC on the 25th = 00:00 New York: the 24th is due).
    assert sched.missed_days(datetime(2026, 11, 25, 0, 10, tzinfo=UTC)) == []
    assert sched.missed_days(datetime(2026, 11, 25, 5, 0, tzinfo=UTC)) == [date(2026, 11, 24)]


def test_early_morning_time_reports_the_previous_day(settings: Settings) -> None:
    s = _settings(settings, time="00:30", timezone="Asia/Seoul", catch_up_days=2)
    sched = ReportScheduler(s)
    fired = datetime(2026, 11, 24, 0, 30, tzinfo=sched.zone)
    assert sched.report_day(fired) == date(2026, 11, 23)
    assert sched.due_at(date(2026, 11, 23)) == fired
    make_database(s.store.database, now=fired, images=[
        {"path": "/e/x.tif", "processed_at": iso(datetime(2026, 11, 23, 12, tzinfo=sched.zone))}])
    assert sched.missed_days(fired - timedelta(minutes=1)) == []
    assert sched.missed_days(fired) == [date(2026, 11, 23)]


def test_no_catch_up_without_database_or_when_disabled(settings: Settings) -> None:
    now = datetime(2026, 11, 24, 14, 0, tzinfo=UTC)
    assert ReportScheduler(_settings(settings)).missed_days(now) == []
    make_database(settings.store.database, now=now, images=_images_on([date(2026, 11, 23)]))
    assert ReportScheduler(_settings(settings, catch_up_days=0)).missed_days(now) == []


def _with_yesterdays_images(settings: Settings) -> tuple[Settings, date]:
    """Settings whose database holds images from yesterday (report time zone) and no report:
    the catch-up at start has a report to write. Returns them and that day."""
    s = _settings(settings)
    yesterday = datetime.now(UTC).astimezone(ReportScheduler(s).zone).date() - timedelta(days=1)
    make_database(s.store.database, now=datetime.now(UTC), images=_images_on([yesterday]))
    return s, yesterday


def test_start_schedules_in_zone_catches_up_and_stops(settings: Settings) -> None:
    s, yesterday = _with_yesterdays_images(settings)
    sched = ReportScheduler(s)
    sched.start()
    try:
        deadline = time.monotonic() + 60
        target: Path = s.report.folder / yesterday.isoformat()
        while not target.is_dir() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (target / "report.html").is_file()
        nxt = sched.next_run()
        assert nxt is not None
        local = nxt.astimezone(sched.zone)
        assert (local.hour, local.minute) == (23, 55) and nxt > datetime.now(UTC)
    finally:
        sched.stop()
    assert sched.next_run() is None


def test_nightly_job_writes_the_day_even_when_empty(settings: Settings) -> None:
    s = _settings(settings)
    make_database(s.store.database, now=datetime.now(UTC), images=[])
    fired = datetime(2026, 11, 24, 23, 55, tzinfo=ReportScheduler(s).zone)
    sched = ReportScheduler(s, clock=lambda: fired)
    paths = sched.nightly()
    assert paths is not None and paths.day == date(2026, 11, 24) and paths.n_images == 0


def test_stop_does_not_wait_for_ever_on_a_hung_report(settings: Settings, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A report that never finishes (whatever the cause) must not keep SIGTERM from stopping the
    daemon: stop returns within its timeout, says so, and the report thread is a daemon thread
    (the interpreter does not join it at exit)."""
    s, _ = _with_yesterdays_images(settings)
    entered, release = threading.Event(), threading.Event()

    def hung_report(settings: Settings, day: date) -> None:
        entered.set()
        release.wait(60)

    monkeypatch.setattr(scheduler_mod, "write_report", hung_report)
    sched = ReportScheduler(s, stop_timeout=0.5)
    sched.start()
    try:
        assert entered.wait(30), "the catch-up never started"
        worker = next(t for t in threading.enumerate() if t.name == "semwatch-report")
        assert worker.daemon
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="semwatch.scheduler"):
            sched.stop()
        assert sched.running == "catch-up"  # left running
        assert time.monotonic() - t0 < 5
        assert "still running" in caplog.text and "catch-up" in caplog.text
    finally:
        release.set()  # let the thread end (the test checks for leaked threads)
    worker.join(10)
    assert not worker.is_alive()


def test_stop_waits_for_a_report_that_finishes(settings: Settings,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    s, _ = _with_yesterdays_images(settings)
    entered, done = threading.Event(), threading.Event()

    def slow_report(settings: Settings, day: date) -> None:
        entered.set()
        time.sleep(0.5)
        done.set()

    monkeypatch.setattr(scheduler_mod, "write_report", slow_report)
    sched = ReportScheduler(s, stop_timeout=30)
    sched.start()
    assert entered.wait(30)
    sched.stop()
    assert done.is_set() and sched.running is None


def test_process_exits_with_a_hung_report(settings: Settings, tmp_path: Path) -> None:
    """The real claim behind SIGTERM: after `stop`, the interpreter exits although the report
    thread is still blocked (apscheduler's pool threads, like all `concurrent.futures` threads,
    would be joined at exit and keep it alive for ever)."""
    s, _ = _with_yesterdays_images(settings)
    config = tmp_path / "config.toml"
    config.write_text(f'[store]\ndatabase = "{s.store.database}"\n[report]\nfolder = "{s.report.folder}"\n'
                      'timezone = "America/New_York"\ncatch_up_days = 3\n', encoding="utf-8")
    script = textwrap.dedent(f"""
        import threading, sys
        from semwatch.service import scheduler
        from semwatch.config import load_settings
        entered = threading.Event()
        def hung(settings, day):
            entered.set()
            threading.Event().wait()  # for ever
        scheduler.write_report = hung
        sched = scheduler.ReportScheduler(load_settings({str(config)!r}, environ={{}}), stop_timeout=0.5)
        sched.start()
        assert entered.wait(30)
        sched.stop()
        print("left running" if sched.running else "finished", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "left running"
