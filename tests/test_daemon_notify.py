"""sd_notify datagrams (path and abstract sockets) and fault handling of the daemon's threads."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
import uuid
from pathlib import Path

from semwatch.config import WatchSettings
from semwatch.service.daemon import Service
from semwatch.service.inbox import Inbox
from semwatch.service.sdnotify import Notifier
from semwatch.service.stability import Candidate
from semwatch.service.watcher import Watcher


def test_notify_path_socket() -> None:
    folder = tempfile.mkdtemp(prefix="swn", dir="/tmp")
    path = str(Path(folder) / "n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
        notifier = Notifier(env)
        try:
            assert notifier.enabled and notifier.watchdog_seconds == 30.0
            assert notifier.notify("READY=1", "STATUS=watching")
            assert server.recv(100) == b"READY=1\nSTATUS=watching"
        finally:
            notifier.close()
    Path(path).unlink()
    Path(folder).rmdir()


def test_notify_abstract_socket_and_disabled() -> None:
    name = f"semwatch-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(b"\0" + name.encode())
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        try:
            assert notifier.notify("WATCHDOG=1")
            assert server.recv(100) == b"WATCHDOG=1"
        finally:
            notifier.close()
    off = Notifier({})
    assert not off.enabled and not off.notify("READY=1") and off.watchdog_seconds is None


def test_dead_observer_is_restarted(tmp_path: Path) -> None:
    """A dead inotify thread is noticed, restarted with one log line, and events flow again."""
    handed: list[Candidate] = []
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("semwatch.watcher").addHandler(handler)
    watcher = Watcher(WatchSettings(folder=tmp_path, settle_seconds=0.1), tmp_path, mode="inotify",
                      inbox=Inbox(), done={}, pending={}, submit=handed.append)
    watcher.start()
    try:
        assert watcher.wait_started(10)
        observer = watcher._observer
        assert observer is not None
        observer.stop()  # inject the fault: the inotify thread ends
        observer.join(5)
        deadline = time.monotonic() + 5
        while watcher._observer is observer or watcher._observer is None:
            assert time.monotonic() < deadline, "observer not restarted"
            time.sleep(0.05)
        assert watcher.is_alive() and watcher._observer.is_alive()
        (tmp_path / "new.tif").write_bytes(b"II*\x00")
        deadline = time.monotonic() + 5
        while not handed:
            assert time.monotonic() < deadline, "no event after the restart"
            time.sleep(0.05)
        assert Service._problem(writer=_Alive(), pipeline=_Alive(), watcher=watcher) is None
        assert sum("inotify thread died" in m for m in messages) == 1
    finally:
        logging.getLogger("semwatch.watcher").removeHandler(handler)
        watcher.stop()
        watcher.join(5)


class _Alive:
    error = None

    def is_alive(self) -> bool:
        return True

    def alive(self) -> bool:
        return True


def test_notify_never_blocks_on_a_full_queue() -> None:
    name = f"semwatch-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(b"\0" + name.encode())
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        try:
            t0 = time.monotonic()
            results = [notifier.notify("WATCHDOG=1") for _ in range(2000)]  # nobody reads
            assert time.monotonic() - t0 < 5.0
            assert results[0] and not all(results)
        finally:
            notifier.close()
