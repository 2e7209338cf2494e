"""The single writer: the one thread that writes the database and results.csv.

Everything the daemon records reaches the writer as a message (`messages`) through its queue; the
writer drains the queue in batches, one transaction per batch, then appends the batch's finished
rows to the CSV and marks them written. A batch that fails on a transient error (a full disk, an
I/O error, a lock held too long) is kept and retried with back-off, the real error logged once, so
nothing is lost or written twice and the daemon does not crash-loop while the disk is full. A
replaced or deleted database file ends the writer (`error`), and the service exits.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Protocol

from semwatch.liveness import Stage
from semwatch.store.db import WriteLock
from semwatch.store.messages import Message, Started

log = logging.getLogger("semwatch.store")


class Ledger(Protocol):
    """What the writer needs of `ledger.Store` (the seam where tests inject a failing database)."""

    def check_identity(self) -> None: ...

    def apply(self, messages: Iterable[Message]) -> list[int]: ...

    def write_csv_lines(self, row_ids: Sequence[int]) -> None: ...

    def mark_csv_written(self, row_ids: Sequence[int]) -> None: ...


class Writer(threading.Thread):
    """The single writer thread over `store` (see the module docstring). `degraded` is the transient
    error being retried, if any (the daemon row shows it); `error` what ended the thread."""

    def __init__(self, store: Ledger, *, max_batch: int = 256, stage: Stage | None = None,
                 max_backoff: float = 30.0, lock: WriteLock | None = None) -> None:
        super().__init__(name="semwatch-writer", daemon=True)
        self.store = store
        self.queue: queue.Queue[Message | None] = queue.Queue()
        self.max_batch = max_batch
        self.error: BaseException | None = None
        self.stage = stage or Stage("writer")
        self.max_backoff = max_backoff
        self.degraded: str | None = None
        self.lock = lock  # shared with other writing processes (`db.WriteLock`), per batch

    def put(self, msg: Message) -> None:
        self.queue.put(msg)

    def stop(self) -> None:
        """Finish everything queued so far, then end."""
        self.queue.put(None)

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # the service sees `error` and exits non-zero
            self.error = exc
            log.error("writer stopped: %s", exc)
        finally:
            self.stage.idle()

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            try:
                first = self.queue.get(timeout=0.5)
            except queue.Empty:
                self.store.check_identity()
                self.stage.idle()
                continue
            batch, stopping = self._batch(first)
            if batch:
                self.stage.busy(f"writing {len(batch)} record(s)")
                self._write(batch)
            self.stage.idle()

    def _batch(self, first: Message | None) -> tuple[list[Message], bool]:
        """`first` and whatever else is queued, up to `max_batch`; and whether `stop` was reached."""
        if first is None:
            return [], True
        batch = [first]
        while len(batch) < self.max_batch:
            try:
                nxt = self.queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                return batch, True
            batch.append(nxt)
        return batch, False

    def _write(self, batch: list[Message]) -> None:
        if self.lock is None:
            self._write_batch(batch)
            return
        with self.lock:  # held through retries: the batch's CSV lines are written by one process
            self._write_batch(batch)

    def _write_batch(self, batch: list[Message]) -> None:
        delay, since, last_log = 0.5, time.monotonic(), 0.0
        finished: list[int] | None = None
        csv_written = False
        while True:
            self.store.check_identity()
            try:  # each step once: a retry never writes a CSV line twice
                if finished is None:
                    finished = self.store.apply(batch)
                if not csv_written:
                    self.store.write_csv_lines(finished)
                    csv_written = True
                self.store.mark_csv_written(finished)
                break
            except (sqlite3.OperationalError, OSError) as exc:
                now = time.monotonic()
                if self.degraded is None or now - last_log >= 60.0:
                    log.error("cannot write the database: %s; keeping %d record(s) and retrying",
                              exc, len(batch))
                    last_log = now
                self.degraded = str(exc)
                self.stage.beat()  # retrying on purpose: alive, not stuck
                time.sleep(delay)
                delay = min(self.max_backoff, delay * 2)
        if self.degraded is not None:
            log.warning("database writable again after %.0f s (%s)", time.monotonic() - since, self.degraded)
            self.degraded = None
        for msg in batch:
            if isinstance(msg, Started) and msg.done is not None:
                msg.done.set()
