"""An unreachable watch folder (issue 18, "Also"): a share that freezes, every call on it blocking
as a dead network mount does, is reported as such within a few seconds (log line, the daemon row's
message that the console and live view show, the `daemon_degraded` alert, a metric) and is not taken
for a stuck daemon; when the share answers again the daemon resumes.

The fault is injected in-process: every `os.stat`, `os.lstat` and `os.scandir` of a path in the watch
folder blocks until the test thaws it, whichever thread calls (the probe, the watcher). A FUSE
pass-through would be the real thing, but needs /dev/fuse and privileges a test machine lacks."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from semwatch.config import load_settings
from semwatch.errors import ExitStatus
from semwatch.service.daemon import run_daemon
from semwatch.service.folderprobe import FolderProbe
from semwatch.store import db
from test_daemon import _finished, copy_image, ncm_images, semwatch_logger  # noqa: F401 - a fixture
from test_metrics import free_port
from test_notify import Receiver


class Freezer:
    """Makes every stat/lstat/scandir of a path under `folder` block while frozen."""

    def __init__(self, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.prefix = str(folder)
        self.frozen = threading.Event()
        self.thawed = threading.Event()
        self.blocked = 0
        for name in ("stat", "lstat", "scandir"):
            monkeypatch.setattr(os, name, self._wrap(getattr(os, name)))

    def _wrap(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(path: Any = ".", *args: Any, **kwargs: Any) -> Any:
            if self.frozen.is_set() and isinstance(path, (str, os.PathLike)) \
                    and os.fspath(path).startswith(self.prefix):
                self.blocked += 1
                self.thawed.wait(300)
            return real(path, *args, **kwargs)
        return call

    def freeze(self) -> None:
        self.thawed.clear()
        self.frozen.set()

    def thaw(self) -> None:
        self.frozen.clear()
        self.thawed.set()


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def freezer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Freezer]:
    (tmp_path / "in").mkdir()
    f = Freezer(tmp_path / "in", monkeypatch)
    yield f
    f.thaw()


def _wait(what: Callable[[], bool], timeout: float, message: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, message()
        time.sleep(0.1)


def test_probe_says_unreachable_without_blocking_the_caller(tmp_path: Path, freezer: Freezer) -> None:
    lines = Lines()
    logging.getLogger("semwatch.watcher").addHandler(lines)
    probe = FolderProbe(tmp_path / "in", unreachable_after=1.0, interval=0.1)
    probe.start()
    try:
        _wait(lambda: probe.check().exists, 30, lambda: "the probe never answered")
        assert probe.check().problem() is None
        freezer.freeze()
        _wait(lambda: probe.check().unreachable, 30, lambda: "never unreachable")
        state = probe.check()  # answered at once, though the stat is blocked
        assert state.silent_for >= 1.0 and state.problem() is not None
        assert state.problem()[0] == "folder_unreachable"  # type: ignore[index]
        assert sum("watch folder unreachable" in line for line in lines.lines) == 1  # once an episode
        freezer.thaw()
        _wait(lambda: not probe.check().unreachable, 30, lambda: "never reachable again")
        assert any("watch folder answers again" in line for line in lines.lines)
        (tmp_path / "in").rmdir()
        _wait(lambda: probe.check().problem() is not None, 30, lambda: "the folder's removal unseen")
        assert probe.check().problem() == ("folder", f"watch folder gone: {tmp_path / 'in'}")
    finally:
        probe.stop()
        logging.getLogger("semwatch.watcher").removeHandler(lines)


def _scrape_reachable(port: int) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("semwatch_watch_folder_reachable"):  # {instrument="..."} labelled
                return float(line.rsplit(" ", 1)[1])
    return None


def _daemon_row(database: Path) -> dict[str, Any]:
    if not database.exists():
        return {}
    conn = db.connect(database, readonly=True)
    try:
        row = conn.execute("SELECT state, message FROM daemon").fetchone()
    except sqlite3.OperationalError:  # created, its tables not yet
        return {}
    finally:
        conn.close()
    return dict(row) if row is not None else {}


def _daemon_message(database: Path) -> str:
    return _daemon_row(database).get("message") or ""


def test_a_frozen_share_is_reported_not_taken_for_a_stuck_daemon(
        tmp_path: Path, tiny_model: Path, ncm_dir: Path, freezer: Freezer, monkeypatch: pytest.MonkeyPatch,
        semwatch_logger: None) -> None:  # noqa: F811 - the fixture
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    folder = tmp_path / "in"
    receiver = Receiver()
    port = free_port()
    settings = load_settings(None, environ={}, overrides={
        "watch": {"folder": str(folder), "mode": "polling", "poll_interval_seconds": 0.25,
                  "settle_seconds": 0.2, "stuck_seconds": 8.0},
        "store": {"database": str(tmp_path / "semwatch.db"), "results_csv": str(tmp_path / "results.csv")},
        "model": {"path": str(tiny_model), "device": "cpu"},
        "report": {"enabled": False},
        "notify": {"urls": [receiver.url], "on": ["daemon_degraded"], "poll_seconds": 0.2},
        "metrics": {"listen": f"127.0.0.1:{port}"},
    })
    database = settings.store.database
    lines = Lines()
    watched = [logging.getLogger(name) for name in ("semwatch.watcher", "semwatch.daemon")]
    for logger in watched:
        logger.addHandler(lines)
    problems: list[str] = []
    ended = threading.Event()

    def drive() -> None:
        try:
            _wait(lambda: _daemon_row(database).get("state") == "running", 180, lambda: "never running")
            logging.getLogger("semwatch").addHandler(lines)  # its handlers are the daemon's from now on
            first = copy_image(ncm_images(ncm_dir, "523", 1)[0], folder / "a.jpg")
            _wait(lambda: ended.is_set() or _finished(database, first), 180, lambda: "a.jpg not processed")
            assert _scrape_reachable(port) == 1.0
            freezer.freeze()
            frozen_at = time.monotonic()
            _wait(lambda: "watch folder unreachable" in lines.text(), 60, lines.text)
            print(f"reported after {time.monotonic() - frozen_at:.1f} s")
            _wait(lambda: "watch folder unreachable" in _daemon_message(database), 30, lambda: "no message")
            _wait(lambda: any("degraded: watch folder unreachable" in t for t in receiver.titles()), 30,
                  lambda: f"no alert: {receiver.titles()}")
            assert _scrape_reachable(port) == 0.0
            assert freezer.blocked >= 2  # the probe and the watcher both wait on the share
            # Frozen for longer than [watch] stuck_seconds (8 s): the share, not a stuck watcher.
            _wait(lambda: time.monotonic() - frozen_at > 8.0 + 4.0, 30, lambda: "")
            assert "stage watcher has not moved" not in lines.text(), lines.text()
            freezer.thaw()
            _wait(lambda: "watch folder answers again" in lines.text(), 60, lines.text)
            second = copy_image(ncm_images(ncm_dir, "811", 1)[0], folder / "b.jpg")
            _wait(lambda: _finished(database, second), 180, lambda: "b.jpg not processed after the thaw")
            _wait(lambda: any(t.endswith(": recovered") for t in receiver.titles()), 30,
                  lambda: f"no recovery alert: {receiver.titles()}")
            _wait(lambda: _scrape_reachable(port) == 1.0, 30, lambda: "the metric stayed 0")
            assert "watch folder unreachable" not in _daemon_message(database)
        except BaseException as exc:
            problems.append(f"{type(exc).__name__}: {exc}")
        finally:
            freezer.thaw()
            if not ended.is_set():
                os.kill(os.getpid(), signal.SIGTERM)

    driver = threading.Thread(target=drive)
    previous = signal.signal(signal.SIGTERM, lambda _signum, _frame: None)
    driver.start()
    try:
        code = run_daemon(settings)
    finally:
        ended.set()
        driver.join(60)
        signal.signal(signal.SIGTERM, previous)
        for logger in [*watched, logging.getLogger("semwatch")]:
            logger.removeHandler(lines)
        receiver.close()
    assert problems == []
    assert code == ExitStatus.OK
