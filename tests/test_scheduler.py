"""Nightly reports: missed nights are caught up at start (fake "now", no sleeping), the cron job
is scheduled in the report time zone, and the scheduler's threads stop."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from dbfixture import iso, make_database
from semwatch.config import ReportSettings, Settings
from semwatch.scheduler import ReportScheduler


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


def test_start_schedules_in_zone_catches_up_and_stops(settings: Settings) -> None:
    s = _settings(settings)
    yesterday = datetime.now(UTC).astimezone(ReportScheduler(s).zone).date() - timedelta(days=1)
    make_database(s.store.database, now=datetime.now(UTC), images=_images_on([yesterday]))
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
        sched.shutdown()
    assert sched.next_run() is None


def test_nightly_job_writes_the_day_even_when_empty(settings: Settings) -> None:
    s = _settings(settings)
    make_database(s.store.database, now=datetime.now(UTC), images=[])
    fired = datetime(2026, 11, 24, 23, 55, tzinfo=ReportScheduler(s).zone)
    sched = ReportScheduler(s, clock=lambda: fired)
    paths = sched.nightly()
    assert paths is not None and paths.day == date(2026, 11, 24) and paths.n_images == 0
