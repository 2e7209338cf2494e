"""Plain one-line log records, safe to print, with per-file lines summarised in floods.

Under systemd stdout is not a terminal: records are single lines without ANSI codes or carriage
returns, with sd-daemon priority prefixes when journald reads them. File names come from an
untrusted folder, so every record is passed through `safefs.printable` (an escape sequence in a
name shows as `\\x1b`, never reaches the terminal). Records about single files (tagged with
`extra=PER_FILE`) are printed in full up to `[logging] per_file_lines` per interval; beyond that
they are counted and summarised in one line per `[logging] summary_seconds`, so 10,000 broken
files give a few dozen lines, not 20,000.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable

from semwatch.safefs import printable

PER_FILE = {"per_file": True}


class BurstLimiter(logging.Filter):
    """Lets the first `limit` per-file records of each interval through, counts the rest."""

    def __init__(self, limit: int, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.limit = limit
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._window_start = clock()
        self._passed = 0
        self._suppressed: Counter[str] = Counter()
        self.emit_summary: Callable[[str], None] | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        summary = self.roll()
        if summary and self.emit_summary is not None:
            self.emit_summary(summary)
        if not getattr(record, "per_file", False):
            return True
        with self._lock:
            if self._passed < self.limit:
                self._passed += 1
                return True
            self._suppressed[record.levelname.lower()] += 1
            return False

    def roll(self, force: bool = False) -> str | None:
        """End the interval if it is over (or `force`); the summary line of what was suppressed."""
        with self._lock:
            now = self.clock()
            if not force and now - self._window_start < self.interval:
                return None
            span = now - self._window_start
            self._window_start, self._passed = now, 0
            counts, self._suppressed = self._suppressed, Counter()
        if not counts:
            return None
        parts = ", ".join(f"{n} {level}" for level, n in sorted(counts.items()))
        total = sum(counts.values())
        return f"{total} more per-file log line(s) in the last {span:.0f} s not shown ({parts})"


class _StderrHandler(logging.Handler):
    """Writes to the current sys.stderr (rich's live display redirects it while it runs)."""

    def __init__(self, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._write(self.format(record), record.levelno)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)

    def _write(self, text: str, level: int) -> None:
        line = printable(text.replace("\r\n", "\n").replace("\n", " | "))
        if self.journald:  # sd-daemon(3) priority prefixes: journald files the level
            line = f"<{_syslog_priority(level)}>{line}"
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _syslog_priority(level: int) -> int:
    if level >= logging.ERROR:
        return 3
    if level >= logging.WARNING:
        return 4
    if level >= logging.INFO:
        return 6
    return 7


def setup_logging(level: str, *, per_file_lines: int = 20, summary_seconds: float = 10.0) -> BurstLimiter:
    """Plain one-line records (no ANSI, no carriage returns); no timestamps under journald.
    Returns the burst limiter, whose `roll()` the service calls so summaries are not late."""
    journald = bool(os.environ.get("JOURNAL_STREAM"))
    handler = _StderrHandler(journald)
    fmt = "%(levelname)s %(name)s: %(message)s" if journald else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    limiter = BurstLimiter(per_file_lines, summary_seconds)
    summary_log = logging.getLogger("semwatch.log")

    def emit_summary(text: str) -> None:
        summary_log.warning("%s", text)

    limiter.emit_summary = emit_summary
    handler.addFilter(limiter)
    root = logging.getLogger("semwatch")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    return limiter
