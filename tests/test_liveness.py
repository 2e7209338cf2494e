"""Liveness: stuck stages starve the watchdog; a read that never returns is abandoned and recorded.

The hung read is a fault injected at the reader (a regular file on a hung share blocks in the
kernel, which a test cannot reproduce portably); everything else is real: the tiny model, the
SQLite ledger, the writer and reader threads.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from semwatch.config import Settings
from semwatch.liveness import Liveness
from semwatch.reading.micrograph import read_micrograph
from semwatch.service.daemon import _stuck_threshold
from semwatch.service.inbox import Inbox
from semwatch.service.logs import PER_FILE, BurstLimiter
from semwatch.service.pipeline import Pipeline
from semwatch.service.stability import Candidate
from semwatch.store import db
from semwatch.store.ledger import Store
from semwatch.store.writer import Writer
from semwatch.values import FileKey


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_busy_stage_that_does_not_move_is_stuck() -> None:
    clock = FakeClock()
    live = Liveness(clock)
    reader, writer = live.stage("reader-0"), live.stage("writer")
    reader.busy("reading a.tif")
    writer.idle()
    clock.now += 50
    assert live.stuck(30) == [live.stuck(30)[0]] and live.stuck(30)[0].stage == "reader-0"
    assert live.stuck(30)[0].doing == "reading a.tif"
    reader.beat()  # progress (a chunk read) clears it
    assert live.stuck(30) == []
    clock.now += 1000
    writer.idle()
    reader.idle()  # waiting for work is never stuck
    clock.now += 1000
    assert live.stuck(30) == []


def test_stuck_threshold_follows_the_systemd_watchdog() -> None:
    assert _stuck_threshold(90.0, {}) == 90.0
    assert _stuck_threshold(90.0, {"WATCHDOG_USEC": "30000000"}) == 27.0
    assert _stuck_threshold(10.0, {"WATCHDOG_USEC": "120000000"}) == 10.0
    assert _stuck_threshold(90.0, {"WATCHDOG_USEC": "bogus"}) == 90.0


def test_per_file_lines_are_summarised_in_a_flood() -> None:
    clock = FakeClock()
    limiter = BurstLimiter(limit=3, interval=10.0, clock=clock)
    summaries: list[str] = []
    limiter.emit_summary = summaries.append

    def record(level: int, per_file: bool) -> logging.LogRecord:
        rec = logging.LogRecord("semwatch.pipeline", level, __file__, 1, "x", None, None)
        if per_file:
            rec.__dict__.update(PER_FILE)
        return rec

    passed = [limiter.filter(record(logging.ERROR, True)) for _ in range(1000)]
    assert sum(passed) == 3
    assert limiter.filter(record(logging.ERROR, False))  # other lines always pass
    clock.now += 11
    assert limiter.filter(record(logging.INFO, True))  # a new interval starts
    assert summaries == ["997 more per-file log line(s) in the last 11 s not shown (997 error)"]


def _candidate(path: Path) -> Candidate:
    st = path.stat()
    now = time.monotonic()
    return Candidate(FileKey.of(str(path), st), time.time(), now, now)


def test_hung_read_is_abandoned_and_recorded(settings: Settings, tiny_model: Path, ncm_dir: Path) -> None:
    from semwatch.model.classify import Classifier

    folder = settings.watch.folder
    folder.mkdir(parents=True)
    src = sorted((ncm_dir / "523").glob("*.jpg"))[0]
    hang, ok = folder / "hang.jpg", folder / "ok.jpg"
    shutil.copyfile(src, hang)
    shutil.copyfile(sorted((ncm_dir / "622").glob("*.jpg"))[0], ok)
    settings = settings.replace(watch=dataclasses.replace(settings.watch, read_timeout_seconds=1.0,
                                                          reader_threads=1))
    release = threading.Event()

    def read(path: Path, s: Settings, **kw: Any) -> Any:
        if path.name == "hang.jpg":
            release.wait(30)  # the injected fault: a read that does not return
        return read_micrograph(path, s, **kw)

    classifier = Classifier.load(tiny_model, settings)
    store = Store(settings.store.database, settings.store.results_csv)
    liveness = Liveness()
    writer = Writer(store, stage=liveness.stage("writer"))
    writer.start()
    pipeline = Pipeline(settings, classifier, writer, folder, inbox=Inbox(), read=read,
                        database=settings.store.database, liveness=liveness)
    pipeline.start()
    conn = db.connect(settings.store.database, readonly=True)
    try:
        pipeline.submit(_candidate(hang))
        deadline = time.monotonic() + 20
        while True:  # the attempt is committed before the read starts
            row = conn.execute("SELECT status, attempts FROM images WHERE path = ?", (str(hang),)).fetchone()
            if row is not None and row["attempts"] == 1:
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert row["status"] == "pending"
        pipeline.submit(_candidate(ok))
        deadline = time.monotonic() + 60
        while [s.stage for s in liveness.stuck(1.0)] != ["reader-0"]:  # alive, but not moving
            assert time.monotonic() < deadline, liveness.stuck(1.0)
            time.sleep(0.05)
        pipeline.check_readers()
        assert liveness.stuck(1.0) == []  # the stuck thread no longer counts; a new one reads
        deadline = time.monotonic() + 60
        while True:
            rows = {r["path"]: dict(r) for r in conn.execute("SELECT * FROM images")}
            if all(rows.get(str(p), {}).get("status") not in (None, "pending") for p in (hang, ok)):
                break
            assert time.monotonic() < deadline, rows
            time.sleep(0.1)
        assert rows[str(hang)]["status"] == "failed" and "timed out" in rows[str(hang)]["error"]
        assert rows[str(ok)]["status"] != "failed"
        assert pipeline.timed_out == 1 and pipeline.alive()
    finally:
        release.set()  # the abandoned thread ends; what it produces is dropped
        conn.close()
        pipeline.stop(10)
        writer.stop()
        writer.join(10)
        store.close()
    rows_after = db.connect(settings.store.database, readonly=True)
    try:
        hang_rows = rows_after.execute("SELECT status FROM images WHERE path = ?", (str(hang),)).fetchall()
        assert [r["status"] for r in hang_rows] == ["failed"]  # never a second, late result
    finally:
        rows_after.close()
