"""The watcher and settle gate on real folders: events, polling, rescans, exactly one hand-off."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from semwatch.config import Settings, WatchSettings
from semwatch.reading.listing import NameFilter
from semwatch.reading.micrograph import read_micrograph
from semwatch.service.inbox import Finished, Inbox, Retry
from semwatch.service.stability import Candidate, SettleGate, looks_complete
from semwatch.service.watcher import Watcher, filesystem_type, resolve_mode
from semwatch.values import FileKey

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:35 / /mnt/sem\\040export rw,relatime shared:2 - nfs4 srv:/export rw,vers=4.2
41 22 0:36 / /mnt/sshfs rw - fuse.sshfs user@host: rw
42 22 0:37 / /media/usb rw - fuseblk /dev/sdb1 rw
"""


def test_filesystem_type_and_mode() -> None:
    assert filesystem_type(Path("/home/x"), MOUNTINFO) == "ext4"
    assert filesystem_type(Path("/mnt/sem export/day1"), MOUNTINFO) == "nfs4"
    assert resolve_mode("auto", Path("/mnt/sem export"), MOUNTINFO) == ("polling", "nfs4")
    assert resolve_mode("auto", Path("/mnt/sshfs/a"), MOUNTINFO) == ("polling", "fuse.sshfs")
    assert resolve_mode("auto", Path("/media/usb/a"), MOUNTINFO) == ("inotify", "fuseblk")
    assert resolve_mode("inotify", Path("/mnt/sem export"), MOUNTINFO) == ("inotify", "nfs4")
    assert resolve_mode("auto", Path("/tmp"))[0] in ("inotify", "polling")  # the real mountinfo parses


def test_name_filter() -> None:
    names = NameFilter.from_settings(WatchSettings())
    assert names.wants("a b.JPG") and names.wants("x.tif")
    assert not names.wants(".hidden.jpg") and not names.wants("x.jpg.part") and not names.wants("x.tmp")
    assert not names.wants("x.jpg.txt") and not names.wants("notes.doc")


def test_looks_complete(tmp_path: Path, ncm_dir: Path) -> None:
    src = next((ncm_dir / "622").glob("*.jpg"))
    data = src.read_bytes()
    whole, half = tmp_path / "a.jpg", tmp_path / "b.jpg"
    whole.write_bytes(data)
    half.write_bytes(data[: len(data) // 2])
    empty = tmp_path / "c.jpg"
    empty.write_bytes(b"")
    assert looks_complete(str(whole), whole.stat())
    assert not looks_complete(str(half), half.stat())
    assert not looks_complete(str(empty), empty.stat())
    fifo = tmp_path / "d.jpg"
    os.mkfifo(fifo)  # never opened here: the reader refuses it with a reason
    assert looks_complete(str(fifo), fifo.stat())


class Harness:
    """A watcher whose 'pipeline' finishes each hand-off at once and records it."""

    def __init__(self, folder: Path, mode: str, **overrides: float) -> None:
        values: dict[str, float] = {"settle_seconds": 0.5, "sidecar_wait_seconds": 2.0,
                                    "rescan_seconds": 30.0, "poll_interval_seconds": 0.25}
        values.update(overrides)
        settings = WatchSettings(folder=folder, **values)  # type: ignore[arg-type]
        self.handed: list[tuple[FileKey, float]] = []
        self.inbox = Inbox()
        self.watcher = Watcher(settings, folder, mode=mode, inbox=self.inbox, done={}, pending={},
                               submit=self._submit)

    def _submit(self, cand: Candidate) -> None:
        self.handed.append((cand.key, time.monotonic()))
        self.inbox.put(Finished(cand.key))

    def wait_for(self, pred: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < deadline, f"timed out; handed: {self.handed}"
            time.sleep(0.05)

    def paths(self) -> list[str]:
        return sorted(k.path for k, _ in self.handed)


@pytest.fixture(params=["inotify", "polling"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    folder = tmp_path / "in"
    folder.mkdir()
    h = Harness(folder, request.param)
    h.watcher.start()
    assert h.watcher.wait_started(10)
    yield h
    h.watcher.stop()
    h.watcher.join(10)
    assert h.watcher.error is None


def sample_jpeg(ncm_dir: Path) -> bytes:
    return next((ncm_dir / "622_cycled").glob("*.jpg")).read_bytes()


def test_slow_writer_handed_once_complete(harness: Harness, ncm_dir: Path) -> None:
    data = sample_jpeg(ncm_dir)
    target = harness.watcher.folder / "slow.jpg"
    chunks = 10
    with open(target, "wb") as fh:
        for i in range(chunks):  # ~3 s of writing, pauses shorter than the settle time
            fh.write(data[i * len(data) // chunks : (i + 1) * len(data) // chunks])
            fh.flush()
            time.sleep(0.3)
    harness.wait_for(lambda: len(harness.handed) >= 1, 60)
    time.sleep(1.0)
    assert len(harness.handed) == 1
    key, _ = harness.handed[0]
    assert key.size == len(data)  # handed once, complete (how soon is not a test's question)


def test_rename_and_burst_and_sidecars(harness: Harness, ncm_dir: Path) -> None:
    data = sample_jpeg(ncm_dir)
    folder = harness.watcher.folder
    tmp = folder / "r.jpg.part"
    tmp.write_bytes(data)
    tmp.rename(folder / "renamed.jpg")
    sub = folder / "sample-1" / "deep"
    sub.mkdir(parents=True)
    for i in range(40):
        (sub / f"img {i:03d}.jpg").write_bytes(data)
        (sub / f"img {i:03d}.jpg.txt").write_text("[Image Info]\r\n", encoding="utf-8")
    (folder / ".hidden.jpg").write_bytes(data)
    (folder / "notes.tmp").write_bytes(b"x")
    harness.wait_for(lambda: len(harness.handed) == 41)
    # A JPEG in a sidecar folder waits for its sidecar (bounded).
    late = sub / "late.jpg"
    late.write_bytes(data)
    time.sleep(1.0)
    assert len(harness.handed) == 41
    (sub / "late.jpg.txt").write_text("[Image Info]\r\n", encoding="utf-8")
    harness.wait_for(lambda: len(harness.handed) == 42)
    time.sleep(1.0)
    assert len(harness.paths()) == len(set(harness.paths())) == 42
    # A new version of a file is handed again; touching the sidecar of a done image is not a new version.
    (folder / "renamed.jpg").write_bytes(data + b"\0")
    harness.wait_for(lambda: len(harness.handed) == 43)
    assert harness.handed[-1][0].size == len(data) + 1


def test_folder_vanishes_and_recovers(tmp_path: Path, ncm_dir: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="semwatch.watcher")
    folder = tmp_path / "in"
    folder.mkdir()
    h = Harness(folder, "inotify")
    h.watcher.start()
    try:
        assert h.watcher.wait_started(10)
        (folder / "a.jpg").write_bytes(sample_jpeg(ncm_dir))
        h.wait_for(lambda: len(h.handed) == 1)
        shutil.rmtree(folder)
        h.wait_for(lambda: "watch folder vanished" in caplog.text, 5)
        folder.mkdir()
        (folder / "b.jpg").write_bytes(sample_jpeg(ncm_dir))
        h.wait_for(lambda: len(h.handed) == 2, 10)
        assert "watch folder is back" in caplog.text
        (folder / "c.jpg").write_bytes(sample_jpeg(ncm_dir))  # events flow again
        h.wait_for(lambda: len(h.handed) == 3, 10)
        assert h.watcher.is_alive() and h.watcher.error is None
    finally:
        h.watcher.stop()
        h.watcher.join(10)


def test_startup_backlog_is_quick(tmp_path: Path, ncm_dir: Path) -> None:
    folder = tmp_path / "in"
    for d in range(10):
        (folder / f"s{d}").mkdir(parents=True)
        for i in range(100):
            (folder / f"s{d}" / f"{i}.jpg").symlink_to(next((ncm_dir / "333").glob("*.jpg")))
    # Old files (mtime older than the settle time) need no second look: with a settle time far
    # beyond the generous deadline, all of them handed on proves it without timing the watcher.
    h = Harness(folder, "inotify", settle_seconds=600.0)
    h.watcher.start()
    try:
        h.wait_for(lambda: len(h.handed) == 1000, 120)
    finally:
        h.watcher.stop()
        h.watcher.join(10)


def test_retry_backoff_and_vanished_retry(tmp_path: Path) -> None:
    """A failed read comes back after its back-off; a retried file that vanishes releases its row."""
    folder = tmp_path / "in"
    folder.mkdir()
    gone: list[FileKey] = []
    handed: list[Candidate] = []
    settings = WatchSettings(folder=folder, settle_seconds=0.2, rescan_seconds=30.0)
    inbox = Inbox()
    watcher = Watcher(settings, folder, mode="polling", inbox=inbox, done={}, pending={},
                      submit=handed.append, on_gone=gone.append)
    bad = folder / "bad.tif"
    bad.write_bytes(b"II*\0garbage")
    watcher.start()
    try:
        deadline = time.monotonic() + 10
        while not handed:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        t0 = time.monotonic()
        inbox.put(Retry(handed[0].key, 1, 0.5))
        while len(handed) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert time.monotonic() - t0 >= 0.45 and handed[1].attempts == 1
        inbox.put(Retry(handed[1].key, 2, 0.5))
        bad.unlink()
        while not gone:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert gone == [handed[0].key] and len(handed) == 2
    finally:
        watcher.stop()
        watcher.join(10)


def test_first_sidecar_of_a_new_folder_holds_the_next_images(tmp_path: Path, ncm_dir: Path) -> None:
    """The folder's first image is looked at before its sidecar exists ("no sidecars here" is cached);
    once that sidecar appears, the next image must wait for its own instead of going without."""
    data = sample_jpeg(ncm_dir)
    gate = SettleGate(0.0, 30.0)
    first, second = tmp_path / "a.jpg", tmp_path / "b.jpg"
    first.write_bytes(data)
    old = time.time() - 60  # settled long ago: only the sidecar rule can hold an image back
    os.utime(first, (old, old))
    gate.offer(str(first), first.stat())
    assert [c.key.path for c in gate.ready()] == [str(first)]  # no sidecars in the folder yet
    (tmp_path / "a.jpg.txt").write_text("[Image Info]\r\n", encoding="utf-8")
    gate.note_sidecar(str(first))  # the watcher calls this on the sidecar's event
    second.write_bytes(data)
    os.utime(second, (old, old))
    gate.offer(str(second), second.stat())
    assert gate.ready() == []  # waits for b.jpg.txt (bounded by sidecar_wait_seconds)
    (tmp_path / "b.jpg.txt").write_text("[Image Info]\r\n", encoding="utf-8")
    time.sleep(0.15)  # past the re-check interval
    assert [c.key.path for c in gate.ready()] == [str(second)]


def test_gate_and_reader_agree_on_the_sidecar_name(tmp_path: Path, ncm_dir: Path, settings: Settings) -> None:
    """Only `<name>.txt` is an image's sidecar. The reader also took `<stem>.txt`, which the gate
    neither waited for nor watched (so the metadata depended on timing), and which beside
    `expected.jpg` is the folder's expected-class file."""
    source = next((ncm_dir / "622").glob("*.jpg"))
    sne_text = Path(str(source) + ".txt").read_bytes()
    data = source.read_bytes()
    old = time.time() - 60
    (tmp_path / "other.jpg.txt").write_bytes(sne_text)  # a folder of sidecars: JPEGs wait for theirs
    stem_only, named = tmp_path / "expected.jpg", tmp_path / "b.jpg"
    for image in (stem_only, named):
        image.write_bytes(data)
        os.utime(image, (old, old))
    (tmp_path / "expected.txt").write_bytes(sne_text)
    (tmp_path / "b.jpg.txt").write_bytes(sne_text)

    assert read_micrograph(stem_only, settings).metadata.vendor is None
    assert read_micrograph(named, settings).metadata.vendor == "SEC"
    gate = SettleGate(0.0, 30.0)
    for image in (stem_only, named):
        gate.offer(str(image), image.stat())
    assert [c.key.path for c in gate.ready()] == [str(named)]  # expected.jpg still waits for its own


def test_folder_moved_away_leaves_the_gate(tmp_path: Path, ncm_dir: Path) -> None:
    """A sub-folder moved out of the watch folder takes its settling files with it at once (not at
    their next look, a settle period later), and nothing in it is handed on."""
    folder, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    # A settle time far beyond the deadline: leaving the gate within it is the move's doing.
    h = Harness(folder, "inotify", settle_seconds=600.0)
    h.watcher.start()
    try:
        assert h.watcher.wait_started(10)
        (folder / "session").mkdir()
        with open(folder / "session" / "a.jpg", "wb") as fh:  # still open: no close-after-write hint
            fh.write(sample_jpeg(ncm_dir))
            fh.flush()
            h.wait_for(lambda: h.watcher.counts.waiting == 1, 60)
            (folder / "session").rename(elsewhere / "session")
            h.wait_for(lambda: h.watcher.counts.waiting == 0, 120)
        time.sleep(0.5)
        assert h.handed == []
    finally:
        h.watcher.stop()
        h.watcher.join(10)
