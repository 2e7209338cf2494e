"""The daemon as a real process: `python -m semwatch watch --config <tmp>` on a temporary folder.

Every test checks the ledger's promise: each file ends with exactly one current row, nothing is
lost and nothing is counted twice (database and CSV).
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from semwatch.config import Settings, load_settings
from semwatch.errors import ExitStatus
from semwatch.service.daemon import run_daemon
from semwatch.store import db

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def ncm_images(ncm_dir: Path, cls: str, n: int, skip: int = 0) -> list[Path]:
    return sorted((ncm_dir / cls).glob("*.jpg"))[skip : skip + n]


def copy_image(src: Path, dst: Path, *, sidecar: bool = True) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    sc = src.with_name(src.name + ".txt")
    if sidecar and sc.exists():
        shutil.copyfile(sc, dst.with_name(dst.name + ".txt"))
    shutil.copyfile(src, dst)
    return dst


class Daemon:
    """One daemon process with its own folder, database, CSV and sd_notify socket."""

    def __init__(self, root: Path, model: Path, **watch: Any) -> None:
        self.root = root
        self.folder = root / "incoming"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.database = root / "semwatch.db"
        self.csv = root / "results.csv"
        self.log = root / "daemon.log"
        self.config = root / "config.toml"
        values: dict[str, Any] = {"folder": str(self.folder), "settle_seconds": 0.5, "rescan_seconds": 5.0,
                                  "poll_interval_seconds": 0.25, "retry_backoff_seconds": 0.2,
                                  "max_attempts": 3, "sidecar_wait_seconds": 2.0}
        values.update(watch)
        lines = ["[watch]"] + [f"{k} = {_toml(v)}" for k, v in values.items()] + [
            "[store]", f'database = "{self.database}"', f'results_csv = "{self.csv}"',
            # One runtime pinned: `auto` measures each model on its own (seconds per start on a
            # loaded machine) and may pick another runtime for another model, whose float32/bf16
            # digits differ; tests that compare results to the last digit need the same one.
            "[model]", f'path = "{model}"', 'device = "cpu"', "max_batch_latency_ms = 100.0",
            'runtime = "onnxruntime"',
            "[report]", "enabled = false",
        ]
        self.config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self._sockdir = tempfile.mkdtemp(prefix="swn", dir="/tmp")  # AF_UNIX paths are short
        self.notify_path = str(Path(self._sockdir) / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.notify_path)
        self.notes: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait_ready: bool = True) -> None:
        # A restart must wait for *its* READY=1, not find the previous process's one.
        self.drain_notes()
        self.notes.clear()
        env = dict(os.environ, NOTIFY_SOCKET=self.notify_path, PYTHONUNBUFFERED="1")
        env.pop("JOURNAL_STREAM", None)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "semwatch", "watch", "--config", str(self.config), "--plain"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=self.root,
            )
        if wait_ready:
            self.wait_note("READY=1", 120)

    def wait_note(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in n for n in self.notes):
            assert self.proc is not None
            if self.proc.poll() is not None:
                self.drain_notes()
                if any(text in n for n in self.notes):
                    return
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log_text()}")
            assert time.monotonic() < deadline, f"no {text} from the daemon:\n{self.log_text()}"
            self.sock.settimeout(0.2)
            try:
                self.notes.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def drain_notes(self) -> None:
        self.sock.settimeout(0.01)
        while True:
            try:
                self.notes.append(self.sock.recv(4096).decode())
            except (TimeoutError, BlockingIOError):
                return

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> tuple[int, float]:
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        return rc, time.monotonic() - t0

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.sock.close()
        shutil.rmtree(self._sockdir, ignore_errors=True)

    def rows(self, where: str = "1") -> list[dict[str, Any]]:
        if not self.database.exists():
            return []
        conn = db.connect(self.database, readonly=True)
        try:
            return [dict(r) for r in conn.execute(f"SELECT * FROM images WHERE {where} ORDER BY id")]
        finally:
            conn.close()

    def query(self, sql: str) -> list[dict[str, Any]]:
        conn = db.connect(self.database, readonly=True)
        try:
            return [dict(r) for r in conn.execute(sql)]
        finally:
            conn.close()

    def wait_finished(self, paths: list[Path], timeout: float = 120.0) -> list[dict[str, Any]]:
        """Wait until every path has a current, finished row; return those rows."""
        wanted = {str(p) for p in paths}
        deadline = time.monotonic() + timeout
        while True:
            rows = [r for r in self.rows("current = 1 AND status != 'pending'") if r["path"] in wanted]
            if {r["path"] for r in rows} == wanted:
                return rows
            assert self.proc is not None and self.proc.poll() is None, f"daemon died:\n{self.log_text()}"
            assert time.monotonic() < deadline, (
                f"missing: {sorted(wanted - {r['path'] for r in rows})[:5]}\n{self.log_text()[-3000:]}"
            )
            time.sleep(0.1)

    def csv_rows(self) -> list[dict[str, str]]:
        with open(self.csv, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))

    def assert_exactly_once(self) -> None:
        """One current row per path, no pending left, and the CSV has each finished row once."""
        rows = self.rows()
        current = [r for r in rows if r["current"] == 1]
        assert len({r["path"] for r in current}) == len(current)
        assert not [r for r in rows if r["status"] == "pending"]
        finished_ids = sorted(r["id"] for r in rows if r["status"] != "pending")
        csv_ids = [int(r["id"]) for r in self.csv_rows()]
        assert sorted(csv_ids) == finished_ids, "CSV and database disagree"


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return str(v)


@pytest.fixture
def daemon_factory(tmp_path: Path, tiny_model: Path) -> Iterator[Callable[..., Daemon]]:
    made: list[Daemon] = []

    def make(**watch: Any) -> Daemon:
        d = Daemon(tmp_path / f"d{len(made)}", tiny_model, **watch)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def test_daemon_end_to_end(daemon_factory: Callable[..., Daemon], ncm_dir: Path) -> None:
    d = daemon_factory()
    # A backlog before start: two samples with sidecars, a corrupt and a zero-byte file.
    backlog = [copy_image(src, d.folder / "s622" / src.name) for src in ncm_images(ncm_dir, "622_cycled", 3)]
    backlog += [copy_image(src, d.folder / "s811" / src.name) for src in ncm_images(ncm_dir, "811", 2)]
    (d.folder / "s622" / "expected.txt").write_text("622_cycled\n", encoding="utf-8")
    corrupt, empty = d.folder / "corrupt.jpg", d.folder / "empty.tif"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg \xff\xd9")
    empty.write_bytes(b"")
    (d.folder / "notes.txt").write_text("not an image", encoding="utf-8")
    (d.folder / ".hidden.jpg").write_bytes(b"x")
    # A reader holding the database open (and a snapshot) the whole time must not block the daemon.
    d.start()
    reader = db.connect(d.database, readonly=True)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM images").fetchone()
        rows = d.wait_finished([*backlog, corrupt, empty])
        by_path = {r["path"]: r for r in rows}
        assert all(by_path[str(p)]["status"] in ("ok", "unknown", "rejected") for p in backlog)
        assert by_path[str(corrupt)]["status"] == "failed" and by_path[str(corrupt)]["error"]
        # A settled file that cannot be decoded fails the same way again: one attempt, no retries
        # (a later write makes a new version, which is read afresh).
        assert by_path[str(empty)]["status"] == "failed" and by_path[str(empty)]["attempts"] == 1
        assert {r["sample_id"] for r in rows if r["path"] in map(str, backlog)} == {"s622", "s811"}
        assert all(r["model_id"] and r["sha256"] for r in rows if r["status"] != "failed")
        # Live files: a slow writer (chunks over ~3 s) and a write-then-rename.
        data = ncm_images(ncm_dir, "333", 1)[0].read_bytes()
        slow = d.folder / "live" / "slow.jpg"
        slow.parent.mkdir()
        with open(slow, "wb") as fh:
            for i in range(10):
                fh.write(data[i * len(data) // 10 : (i + 1) * len(data) // 10])
                fh.flush()
                time.sleep(0.3)
        part = d.folder / "live" / "renamed.jpg.part"
        part.write_bytes(ncm_images(ncm_dir, "523", 1)[0].read_bytes())
        part.rename(d.folder / "live" / "renamed.jpg")
        t_written = time.monotonic()
        live = d.wait_finished([slow, d.folder / "live" / "renamed.jpg"], 60)
        latency = time.monotonic() - t_written
        assert all(r["status"] != "failed" for r in live), live
        assert {r["size_bytes"] for r in live if r["path"] == str(slow)} == {len(data)}
        # A new version of a file: processed again, the old row kept as history.
        replaced = backlog[0]
        replaced.write_bytes(ncm_images(ncm_dir, "622_cycled", 1, skip=5)[0].read_bytes())
        deadline = time.monotonic() + 60
        where = f"path = '{replaced}'"
        while len(d.rows(where)) < 2 or d.rows(where + " AND status = 'pending'"):
            assert time.monotonic() < deadline, d.log_text()[-3000:]
            time.sleep(0.1)
        versions = d.rows(f"path = '{replaced}'")
        assert [v["current"] for v in versions] == [0, 1]
        assert versions[0]["sha256"] != versions[1]["sha256"]
        reader.execute("COMMIT")
    finally:
        reader.close()
    d.drain_notes()
    time.sleep(1.5)
    d.drain_notes()
    assert any("WATCHDOG=1" in n for n in d.notes) and any("STATUS=" in n for n in d.notes)
    daemon_row = d.query("SELECT * FROM daemon")[0]
    assert daemon_row["state"] == "running" and daemon_row["device"] and daemon_row["model_id"]
    sample = d.query("SELECT * FROM samples WHERE sample_id = 's622'")[0]
    assert sample["expected"] == "622_cycled" and sample["n_images"] == 3
    assert sample["verdict"] in ("pass", "fail", "uncertain", "unknown")
    rc, took = d.stop()
    assert rc == 0 and took < 10.0, d.log_text()[-2000:]
    d.wait_note("STOPPING=1", 2)
    assert d.query("SELECT state FROM daemon")[0]["state"] == "stopped"
    d.assert_exactly_once()
    text = d.log_text()
    assert "\x1b[" not in text and "\r" not in text and "Traceback" not in text
    print(f"live latency (settle 0.5 s): {latency:.2f} s")


def test_burst_of_500_and_polling(daemon_factory: Callable[..., Daemon], ncm_dir: Path) -> None:
    """500 files at once (5 distinct contents: copies reuse the first result), found by polling."""
    d = daemon_factory(mode="polling")
    d.start()
    classes = ("333", "523", "622", "811", "811_cycled")
    sources = [ncm_images(ncm_dir, cls, 1)[0].read_bytes() for cls in classes]
    paths = []
    for i in range(500):
        p = d.folder / f"batch{i % 5}" / f"img_{i:03d}.jpg"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(sources[i % 5])
        paths.append(p)
    rows = d.wait_finished(paths, 120)
    assert len(rows) == 500 and all(r["status"] != "failed" for r in rows)
    rc, _ = d.stop()
    assert rc == 0
    d.assert_exactly_once()
    assert len(d.csv_rows()) == 500


def test_kill9_mid_batch_then_restart(daemon_factory: Callable[..., Daemon], ncm_dir: Path) -> None:
    d = daemon_factory()
    paths = []
    for cls in ("333", "622_formation"):
        paths += [copy_image(src, d.folder / cls / src.name) for src in ncm_images(ncm_dir, cls, 6)]
    d.start()
    deadline = time.monotonic() + 120
    while not d.rows("status != 'pending'"):
        assert time.monotonic() < deadline, d.log_text()
        time.sleep(0.05)
    d.kill9()  # in the middle of the run: some results written, some in a batch, some queued
    done_before = len(d.rows("status != 'pending'"))
    print(f"killed with {done_before} of {len(paths)} finished")
    # Killed as soon as the first result was committed, with 12 images to classify; a kill that
    # came after the last result would test nothing, so it fails the test instead of passing it.
    assert 1 <= done_before < len(paths), f"the kill came too late to test anything ({done_before} done)"
    d.start()
    d.wait_finished(paths, 180)
    rc, _ = d.stop()
    assert rc == 0
    d.assert_exactly_once()
    assert len(d.rows()) == len(paths)  # nothing processed twice: one row per file, no duplicates


def test_missing_folder_at_start_is_config_error(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    shutil.rmtree(d.folder)
    d.start(wait_ready=False)
    assert d.proc is not None
    rc = d.proc.wait(60)
    text = d.log_text().strip()
    assert rc == 78
    assert text.splitlines()[-1].startswith("semwatch: configuration error: [watch] folder does not exist")
    assert "Traceback" not in text


def test_missing_model_is_config_error(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "d", tmp_path / "no-model")
    try:
        d.start(wait_ready=False)
        assert d.proc is not None
        rc = d.proc.wait(60)
        assert rc == 78, d.log_text()
        assert "configuration error: [model] path" in d.log_text()
        assert "Traceback" not in d.log_text()
    finally:
        d.close()


def test_folder_vanishes_while_running(daemon_factory: Callable[..., Daemon], ncm_dir: Path) -> None:
    d = daemon_factory()
    d.start()
    first = copy_image(ncm_images(ncm_dir, "523", 1)[0], d.folder / "a.jpg")
    d.wait_finished([first], 60)
    shutil.rmtree(d.folder)
    deadline = time.monotonic() + 10
    while "watch folder vanished" not in d.log_text():
        assert time.monotonic() < deadline, d.log_text()
        time.sleep(0.1)
    time.sleep(1.5)
    assert d.proc is not None and d.proc.poll() is None  # keeps trying
    d.folder.mkdir()
    second = copy_image(ncm_images(ncm_dir, "523", 1, skip=1)[0], d.folder / "b.jpg")
    d.wait_finished([second], 60)
    assert "watch folder is back" in d.log_text()
    rc, _ = d.stop()
    assert rc == 0
    d.assert_exactly_once()


class RecordingView:
    """Stands in for the live view: an `Attachment` that records what the daemon does with it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.calls: list[str] = []

    def start(self) -> None:
        self.calls.append("start")

    def stop(self) -> None:
        self.calls.append("stop")


@pytest.fixture
def semwatch_logger() -> Iterator[None]:
    """The daemon sets up the `semwatch` logger for itself; put it back for the tests after."""
    logger = logging.getLogger("semwatch")
    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate


def test_run_daemon_in_process_with_a_view(tmp_path: Path, tiny_model: Path, ncm_dir: Path,
                                           monkeypatch: pytest.MonkeyPatch, semwatch_logger: None) -> None:
    """`run_daemon` as the CLI calls it: `folder` replaces `[watch] folder`, the view is built from
    the settings once the daemon is ready and stopped when SIGTERM stops the daemon (exit 0)."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    folder = tmp_path / "given"
    folder.mkdir()
    settings = load_settings(None, environ={}, overrides={
        "watch": {"folder": str(tmp_path / "configured"), "settle_seconds": 0.2},
        "store": {"database": str(tmp_path / "semwatch.db"), "results_csv": str(tmp_path / "results.csv")},
        "model": {"path": str(tiny_model), "device": "cpu"},
        "report": {"enabled": False},
    })
    views: list[RecordingView] = []
    problems: list[str] = []

    def view(s: Settings) -> RecordingView:
        views.append(RecordingView(s))
        return views[-1]

    def drive() -> None:
        """Feed one image once the view runs, wait for its row, then SIGTERM (unless it ended)."""
        try:
            deadline = time.monotonic() + 120
            while not (views and views[0].calls == ["start"]):
                assert not ended.is_set() and time.monotonic() < deadline, "the view was never started"
                time.sleep(0.05)
            image = copy_image(ncm_images(ncm_dir, "523", 1)[0], folder / "a.jpg")
            while not _finished(settings.store.database, image):
                assert not ended.is_set() and time.monotonic() < deadline, "the image was not processed"
                time.sleep(0.1)
        except AssertionError as exc:
            problems.append(str(exc))
        finally:
            if not ended.is_set():
                os.kill(os.getpid(), signal.SIGTERM)

    ended = threading.Event()
    driver = threading.Thread(target=drive)
    # A SIGTERM that comes after the daemon restored this handler must not end the test run.
    previous = signal.signal(signal.SIGTERM, lambda _signum, _frame: None)
    driver.start()
    try:
        code = run_daemon(settings, folder=folder, view=view)
    finally:
        ended.set()
        driver.join(30)
        signal.signal(signal.SIGTERM, previous)
    assert problems == []
    assert code == ExitStatus.OK
    assert len(views) == 1 and views[0].calls == ["start", "stop"]
    assert views[0].settings.watch.folder == folder


def _finished(database: Path, image: Path) -> bool:
    if not database.exists():
        return False
    conn = db.connect(database, readonly=True)
    try:
        row = conn.execute("SELECT status FROM images WHERE path = ? AND current = 1",
                           (str(image),)).fetchone()
    finally:
        conn.close()
    return row is not None and row["status"] != "pending"
