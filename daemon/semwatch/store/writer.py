"""The single writer: the one thread that writes the database and results.csv.

Everything the daemon records reaches the writer as a message (`messages`) through its queue; the
writer drains the queue in batches, one transaction per batch, then appends the batch's finished
rows to the CSV and marks them written. A batch that fails on a transient error (a full disk, an
I/O error, a lock held too long) is kept and retried with back-off, the real error logged once, so
nothing is lost or written twice and the daemon does not crash-loop while the disk is full. A
replaced or deleted database file ends the writer (`error`), and the service exits.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
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


class DatabaseUnwritable(RuntimeError):
    """A batch could not be written within the retry limit (a writer that may give up: `reprocess`)."""


class Retry:
    """Back-off for a batch that hit a transient error (a full disk, an I/O error, a lock held too
    long): the real error logged once a minute, waits doubling up to `max_backoff`. `give_up_after`
    seconds of failing raise `DatabaseUnwritable` (None: never, the daemon's choice: it stays up and
    says so). `degraded` is the error being retried, if any; `beat` is called at each retry (the
    daemon's liveness: retrying on purpose is not stuck)."""

    def __init__(self, *, max_backoff: float = 30.0, give_up_after: float | None = None,
                 beat: Callable[[], None] | None = None) -> None:
        self.max_backoff = max_backoff
        self.give_up_after = give_up_after
        self.beat = beat
        self.degraded: str | None = None
        self._since = self._last_log = 0.0
        self._delay = 0.5

    def failed(self, exc: BaseException, records: int) -> None:
        """After a failed attempt: log, wait, or give up."""
        now = time.monotonic()
        if self.degraded is None:
            self._since, self._delay, self._last_log = now, 0.5, 0.0
        if self.give_up_after is not None and now - self._since >= self.give_up_after:
            raise DatabaseUnwritable(f"cannot write the database for {now - self._since:.0f} s: {exc}; "
                                     f"gave up ({records} record(s) not written)") from exc
        if self.degraded is None or now - self._last_log >= 60.0:
            log.error("cannot write the database: %s; keeping %d record(s) and retrying", exc, records)
            self._last_log = now
        self.degraded = str(exc)
        if self.beat is not None:
            self.beat()
        time.sleep(self._delay)
        self._delay = min(self.max_backoff, self._delay * 2)

    def succeeded(self) -> None:
        if self.degraded is not None:
            log.warning("database writable again after %.0f s (%s)", time.monotonic() - self._since,
                        self.degraded)
            self.degraded = None


def commit_batch(store: Ledger, batch: Sequence[Message], retry: Retry,
                 lock: WriteLock | None = None) -> list[int]:
    """Write one batch: its transaction, its results.csv lines, their marks; the ids of the rows it
    finished. The one way every writer (the daemon's thread, `semwatch reprocess`) commits.

    Under `lock` (held through retries: the batch's CSV lines are written by one process), the
    database's identity is checked before each attempt (`DatabaseReplaced`: nothing more is
    written). Each step runs once: a failed CSV append is retried without committing the batch
    again, and a retried commit was rolled back, so no batch is committed twice and no line
    written twice; rows whose CSV append failed are appended as soon as the disk has room."""
    with lock if lock is not None else contextlib.nullcontext():
        finished: list[int] | None = None
        csv_written = False
        while True:
            store.check_identity()
            try:
                if finished is None:
                    finished = store.apply(batch)
                if not csv_written:
                    store.write_csv_lines(finished)
                    csv_written = True
                store.mark_csv_written(finished)
                break
            except (sqlite3.OperationalError, OSError) as exc:
                retry.failed(exc, len(batch))
        retry.succeeded()
    return finished


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
        self.retry = Retry(max_backoff=max_backoff, beat=self.stage.beat)
        self.lock = lock  # shared with other writing processes (`db.WriteLock`), per batch

    @property
    def degraded(self) -> str | None:
        return self.retry.degraded

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
                commit_batch(self.store, batch, self.retry, self.lock)
                for msg in batch:
                    if isinstance(msg, Started) and msg.done is not None:
                        msg.done.set()
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
