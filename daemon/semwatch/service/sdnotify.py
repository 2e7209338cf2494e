"""sd_notify(3) without libsystemd: one datagram to `$NOTIFY_SOCKET` per state change.

READY=1 once the model is loaded and the watcher runs, STATUS=... for `systemctl status`,
WATCHDOG=1 while every thread is alive and no busy stage is stuck (the service decides),
STOPPING=1 on the way out. Outside systemd (`NOTIFY_SOCKET` unset) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("semwatch.sdnotify")


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        self.sock: socket.socket | None = None
        if address.startswith("@"):
            self.address = b"\0" + address[1:].encode()  # abstract namespace
        elif address.startswith("/"):
            self.address = address
        if self.address is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_seconds: float | None = None
        if usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_seconds = int(usec) / 1e6

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def notify(self, *lines: str) -> bool:
        if self.sock is None or self.address is None:
            return False
        try:
            # Never block the daemon on a receiver that does not read (a full datagram queue).
            self.sock.sendto("\n".join(lines).encode("utf-8"), socket.MSG_DONTWAIT, self.address)
        except OSError as exc:
            log.debug("sd_notify failed: %s", exc)
            return False
        return True

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
