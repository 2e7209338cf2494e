"""sd_notify datagrams (path and abstract sockets) and fault handling of the daemon's threads."""

from __future__ import annotations

import os
import socket
import tempfile
import time
import uuid
from pathlib import Path

from semwatch.config import WatchSettings
from semwatch.sdnotify import Notifier
from semwatch.service import Service
from semwatch.stability import Candidate
from semwatch.watcher import Watcher, WatcherDied


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


def test_dead_observer_stops_the_watcher(tmp_path: Path) -> None:
    """A dead inotify observer is fatal (the service exits 1 and systemd restarts it)."""
    handed: list[Candidate] = []
    watcher = Watcher(WatchSettings(folder=tmp_path), tmp_path, mode="inotify", done={}, pending={},
                      submit=handed.append)
    watcher.start()
    try:
        assert watcher.wait_started(10)
        observer = watcher._observer
        observer.stop()  # inject the fault: the observer thread ends
        observer.join(5)
        deadline = time.monotonic() + 5
        while watcher.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not watcher.is_alive()
        assert isinstance(watcher.error, WatcherDied)
        problem = Service._problem(writer=_Alive(), pipeline=_Alive(), watcher=watcher)
        assert problem is not None and "watcher died" in problem
    finally:
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
