"""A hostile export folder, tried on a real daemon process.

Each test drops something a careless or hostile user could leave in the folder, then ordinary
images, and checks that the ordinary images are processed promptly, that every file has exactly
one current row (database and CSV agree), and that SIGTERM still stops the daemon in time.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from semwatch.safefs import path_text
from test_daemon import Daemon, copy_image, daemon_factory, ncm_images

pytestmark = pytest.mark.slow
__all__ = ["daemon_factory"]  # the fixture, re-exported for pytest


def ordinary(d: Daemon, ncm_dir: Path, name: str = "ok.jpg", cls: str = "523") -> Path:
    return copy_image(ncm_images(ncm_dir, cls, 1)[0], d.folder / name)


def stop_cleanly(d: Daemon) -> None:
    rc, took = d.stop()
    assert rc == 0 and took < 10.0, d.log_text()[-3000:]
    d.assert_exactly_once()
    assert "Traceback" not in d.log_text()


def row_of(d: Daemon, path: Path | str) -> dict[str, object]:
    text = path_text(os.fspath(path))
    rows = [r for r in d.rows("current = 1") if r["path"] == text]
    assert len(rows) == 1, rows
    return rows[0]


def wait_row(d: Daemon, path: Path | str, timeout: float = 60.0) -> dict[str, object]:
    text = path_text(os.fspath(path))
    deadline = time.monotonic() + timeout
    while True:
        rows = [r for r in d.rows("current = 1 AND status != 'pending'") if r["path"] == text]
        if rows:
            return rows[0]
        assert d.proc is not None and d.proc.poll() is None, f"daemon died:\n{d.log_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no row for {text}:\n{d.log_text()[-3000:]}"
        time.sleep(0.1)


def test_name_that_is_not_utf8(daemon_factory: Callable[..., Daemon], ncm_dir: Path) -> None:
    d = daemon_factory()
    d.start()
    raw = os.fsencode(d.folder) + b"/bad_\xff.jpg"
    shutil.copyfile(ncm_images(ncm_dir, "333", 1)[0], raw)
    escaped = d.folder / "esc_\x1b]0;title\x07\x1b[31m.jpg"
    shutil.copyfile(ncm_images(ncm_dir, "333", 1, skip=1)[0], escaped)
    ok = ordinary(d, ncm_dir)
    bad = wait_row(d, os.fsdecode(raw))
    assert bad["path"] == path_text(os.fsdecode(raw)) and str(bad["path"]).endswith("bad_\\xff.jpg")
    assert bad["status"] != "failed", bad  # read through its original bytes
    wait_row(d, escaped)
    d.wait_finished([ok])
    data = d.csv.read_bytes()
    data.decode("utf-8")  # valid UTF-8 throughout
    assert b"bad_\\xff.jpg" in data
    assert "\x1b" not in d.log_text() and "\x07" not in d.log_text()
    stop_cleanly(d)


def test_fifos_and_device_links_do_not_block(daemon_factory: Callable[..., Daemon], ncm_dir: Path) -> None:
    d = daemon_factory()
    d.start()
    os.mkfifo(d.folder / "a.tif")
    os.mkfifo(d.folder / "b.tif")
    (d.folder / "zero.tif").symlink_to("/dev/zero")
    s1 = d.folder / "s1"
    s1.mkdir()
    os.mkfifo(s1 / "expected.txt")
    (s1 / "a.jpg.txt").symlink_to("/dev/zero")  # a sidecar that never ends
    t0 = time.monotonic()
    ok = ordinary(d, ncm_dir)
    in_s1 = copy_image(ncm_images(ncm_dir, "622", 1)[0], s1 / "a.jpg", sidecar=False)
    rows = d.wait_finished([ok, in_s1], 60)
    assert all(r["status"] != "failed" for r in rows), rows
    assert time.monotonic() - t0 < 30
    for name in ("a.tif", "b.tif"):
        row = wait_row(d, d.folder / name)
        assert row["status"] == "failed" and "FIFO" in str(row["error"]), row
    zero = wait_row(d, d.folder / "zero.tif")
    assert zero["status"] == "failed" and "outside the watch folder" in str(zero["error"]), zero
    assert d.query("SELECT expected FROM samples WHERE sample_id = 's1'")[0]["expected"] is None
    stop_cleanly(d)


def test_links_outside_the_folder(daemon_factory: Callable[..., Daemon], ncm_dir: Path,
                                  tmp_path: Path) -> None:
    d = daemon_factory()
    outside = copy_image(ncm_images(ncm_dir, "811", 1)[0], tmp_path / "elsewhere" / "x.jpg", sidecar=False)
    (d.folder / "p.tif").symlink_to("/etc/passwd")
    (d.folder / "x.jpg").symlink_to(outside)
    inside = ordinary(d, ncm_dir, "real.jpg")
    (d.folder / "alias.jpg").symlink_to(inside)  # inside the folder: followed by default
    (d.folder / "sub").symlink_to(tmp_path / "elsewhere")  # a linked folder is never entered
    d.start()
    d.wait_finished([inside, d.folder / "alias.jpg"])
    for name in ("p.tif", "x.jpg"):
        row = wait_row(d, d.folder / name)
        assert row["status"] == "failed" and "outside the watch folder" in str(row["error"]), row
        assert row["sha256"] is None  # never read nor hashed
    assert row_of(d, d.folder / "alias.jpg")["status"] != "failed"
    assert not [r for r in d.rows() if "/sub/" in str(r["path"])]
    stop_cleanly(d)


def test_formula_in_sample_name_is_neutralised(daemon_factory: Callable[..., Daemon], ncm_dir: Path) -> None:
    d = daemon_factory()
    d.start()
    folder = d.folder / '=HYPERLINK("x","click")'  # (a name cannot hold "/")
    img = copy_image(ncm_images(ncm_dir, "333", 1)[0], folder / "a.jpg")
    minus = copy_image(ncm_images(ncm_dir, "333", 1)[0], d.folder / "-1+2" / "b.jpg")
    d.wait_finished([img, minus])
    with open(d.csv, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    samples = {r["sample_id"] for r in rows}
    assert "'=HYPERLINK(\"x\",\"click\")" in samples and "'-1+2" in samples
    assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for r in rows for cell in r.values())
    stop_cleanly(d)


def test_one_daemon_per_database(daemon_factory: Callable[..., Daemon], ncm_dir: Path) -> None:
    first = daemon_factory()
    first.start()
    # Same configuration file: same database.
    proc = subprocess.run([*_semwatch(), "watch", "--config", str(first.config), "--plain"],
                          capture_output=True, text=True, timeout=120, cwd=first.root)
    assert proc.returncode == 75, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert first.proc is not None
    assert "another semwatch daemon" in last and f"pid {first.proc.pid}" in last
    assert "Traceback" not in proc.stderr
    ok = ordinary(first, ncm_dir)
    first.wait_finished([ok])
    stop_cleanly(first)


def _semwatch() -> list[str]:
    import sys

    return [sys.executable, "-m", "semwatch"]


def test_database_deleted_while_running(daemon_factory: Callable[..., Daemon], ncm_dir: Path) -> None:
    d = daemon_factory()
    d.start()
    first = ordinary(d, ncm_dir, "a.jpg")
    d.wait_finished([first])
    for suffix in ("", "-wal", "-shm"):
        Path(str(d.database) + suffix).unlink(missing_ok=True)
    assert d.proc is not None
    rc = d.proc.wait(15)  # noticed within seconds, exits for systemd to restart it
    assert rc != 0
    assert "database file was deleted" in d.log_text()
    old_csv = d.csv.read_text(encoding="utf-8")
    d.start()  # what systemd does: a fresh database, the old CSV set aside
    second = ordinary(d, ncm_dir, "b.jpg", "622")
    d.wait_finished([first, second])
    aside = sorted(d.root.glob("results.before-*.csv"))
    assert len(aside) == 1 and aside[0].read_text(encoding="utf-8") == old_csv
    stop_cleanly(d)  # ids in the new CSV match the new database exactly once


@pytest.fixture
def remove_deep_trees() -> Iterator[list[Path]]:
    """Folders deleted with `rm -rf` after the test (shutil.rmtree, pytest's too, recurses)."""
    paths: list[Path] = []
    yield paths
    for path in paths:
        subprocess.run(["rm", "-rf", str(path)], check=False, timeout=120)


def test_deep_tree_and_overlong_path(daemon_factory: Callable[..., Daemon], ncm_dir: Path,
                                     remove_deep_trees: list[Path]) -> None:
    d = daemon_factory(watch_depth=8, rescan_seconds=2.0)
    remove_deep_trees.append(d.folder)
    d.start()
    # 1,500 levels: the inotify thread must survive; the image at the bottom is found by rescans.
    deep = d.folder
    fd = os.open(d.folder, os.O_RDONLY)
    try:
        for _ in range(1500):
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)
    deep = d.folder / "/".join(["d"] * 12)  # below the watch depth, within PATH_MAX
    in_deep = copy_image(ncm_images(ncm_dir, "333", 1)[0], deep / "deep.jpg", sidecar=False)
    # A file whose path is longer than PATH_MAX: recorded failed, not lost.
    long_dir = d.folder / "long"
    long_dir.mkdir()
    length = len(os.fsencode(long_dir))
    fd = os.open(long_dir, os.O_RDONLY)
    try:  # folders up to ~4,050 bytes (still listable), then a file name that passes 4,096
        while length < 4050:
            name = "x" * min(250, 4050 - length)
            os.mkdir(name, dir_fd=fd)
            nfd = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
            length += 1 + len(name)
        nfd = os.open("too_long_" + "y" * 80 + ".jpg", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(nfd, b"\xff\xd8\xff")
        os.close(nfd)
    finally:
        os.close(fd)
    ok = ordinary(d, ncm_dir)
    d.wait_finished([ok, in_deep], 60)
    deadline = time.monotonic() + 30
    while not [r for r in d.rows("status = 'failed'") if "path too long" in str(r["error"])]:
        assert time.monotonic() < deadline, d.log_text()[-3000:]
        time.sleep(0.2)
    assert "inotify thread died" not in d.log_text() and "RecursionError" not in d.log_text()
    later = ordinary(d, ncm_dir, "later.jpg", "811")  # events still arrive promptly
    t0 = time.monotonic()
    d.wait_finished([later], 30)
    assert time.monotonic() - t0 < 10
    stop_cleanly(d)


def test_flood_of_empty_files_is_drained_quietly(daemon_factory: Callable[..., Daemon],
                                                 ncm_dir: Path) -> None:
    d = daemon_factory()
    d.start()
    n = 1000
    for i in range(n):
        (d.folder / f"empty_{i:05d}.tif").write_bytes(b"")
    ok = ordinary(d, ncm_dir)
    d.wait_finished([ok], 60)
    deadline = time.monotonic() + 60
    while len(d.rows("status = 'failed'")) < n:
        assert time.monotonic() < deadline, d.log_text()[-3000:]
        time.sleep(0.2)
    deadline = time.monotonic() + 20  # the summary of suppressed lines comes once per interval
    while "not shown" not in d.log_text():
        assert time.monotonic() < deadline, d.log_text()[-3000:]
        time.sleep(0.2)
    stop_cleanly(d)
    lines = d.log_text().splitlines()
    assert len(lines) < 100, len(lines)


def test_pending_file_that_crashed_the_daemon_is_not_retried_forever(
        daemon_factory: Callable[..., Daemon], ncm_dir: Path) -> None:
    """An attempt is counted before a file is read: a file whose reading killed the daemon
    max_attempts times is recorded failed at the next start, not read again."""
    d = daemon_factory(max_attempts=3)
    d.start()
    ok = ordinary(d, ncm_dir)
    d.wait_finished([ok])
    stop_cleanly(d)
    victim = ordinary(d, ncm_dir, "crashes.jpg", "622")
    st = victim.stat()
    import sqlite3

    conn = sqlite3.connect(d.database)
    try:  # what three crashes mid-read leave behind: a pending row with three counted attempts
        conn.execute("INSERT INTO images (path, size_bytes, mtime_ns, status, detected_at, attempts) "
                     "VALUES (?, ?, ?, 'pending', '2026-01-01T00:00:00.000+00:00', 3)",
                     (str(victim), st.st_size, st.st_mtime_ns))
        conn.commit()
    finally:
        conn.close()
    d.start()
    row = wait_row(d, victim)
    assert row["status"] == "failed" and "interrupted 3 time(s)" in str(row["error"]), row
    assert row["sha256"] is None  # not read again
    stop_cleanly(d)


def _mount_tmpfs(target: Path, size: str) -> bool:
    target.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
                          capture_output=True, timeout=30)
    return proc.returncode == 0


def test_disk_full_under_the_database(tmp_path: Path, tiny_model: Path, ncm_dir: Path) -> None:
    small = tmp_path / "small"
    if os.geteuid() != 0 or shutil.which("mount") is None or not _mount_tmpfs(small, "16m"):
        pytest.skip("cannot mount a small tmpfs here")
    d = Daemon(tmp_path / "d", tiny_model)
    try:  # the database and the CSV on the small file system, the watch folder elsewhere
        text = d.config.read_text(encoding="utf-8")
        for old, new in ((d.database, small / "semwatch.db"), (d.csv, small / "results.csv")):
            text = text.replace(f'"{old}"', f'"{new}"')
        d.config.write_text(text, encoding="utf-8")
        d.database, d.csv = small / "semwatch.db", small / "results.csv"
        d.start()
        first = ordinary(d, ncm_dir, "a.jpg")
        d.wait_finished([first])
        filler = small / "filler"
        with open(filler, "wb", buffering=0) as fh:  # fill the file system to the last block
            try:
                while True:
                    fh.write(b"\0" * 4096)
            except OSError:
                pass
        dropped = [copy_image(src, d.folder / src.name, sidecar=False)
                   for src in ncm_images(ncm_dir, "811", 3)]
        deadline = time.monotonic() + 60
        while "database or disk is full" not in d.log_text() and "No space left" not in d.log_text():
            assert d.proc is not None and d.proc.poll() is None, d.log_text()[-3000:]
            assert time.monotonic() < deadline, d.log_text()[-3000:]
            time.sleep(0.2)
        time.sleep(3.0)
        assert d.proc is not None and d.proc.poll() is None, "crashed instead of waiting for space"
        assert "cannot rollback" not in d.log_text()
        filler.unlink()  # space returns
        d.wait_finished(dropped, 90)
        assert "database writable again" in d.log_text()
        stop_cleanly(d)
    finally:
        d.close()
        subprocess.run(["umount", "-l", str(small)], capture_output=True, timeout=30)


def test_sigterm_during_a_flood(daemon_factory: Callable[..., Daemon], ncm_dir: Path) -> None:
    d = daemon_factory()
    for i in range(300):
        os.mkfifo(d.folder / f"pipe_{i}.jpg")
    d.start()
    ordinary(d, ncm_dir)
    time.sleep(2.0)
    assert d.proc is not None
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(15) == 0 and time.monotonic() - t0 < 10
