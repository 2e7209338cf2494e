"""`semwatch reprocess`: re-classify ledger rows or ingest an archive, exactly once, resumably.

The command is the one writer of its results (Ray workers only compute): outcomes are committed in
small batches, each batch one transaction plus its results.csv lines, under the database's write
lock (`db.WriteLock`), which the daemon's writer also takes per batch, so both can run on one
database. A re-classification is a `Reclassified` message, applied only while the row it supersedes
is still current (the unique index on `supersedes` makes a second one impossible): a batch that is
repeated, raced by the daemon, or re-sent by a retried Ray task changes nothing. A kill (even -9)
loses at most the uncommitted batch, and the next run selects only what is still to do (outdated
rows are by definition not done; `--all` remembers its start in `reprocess_runs`; an archive file
already held for this model is skipped). A row whose CSV line was not yet written when the process
died is appended by the next run's (or the daemon's) start-up reconcile.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

from semwatch.config import Settings
from semwatch.errors import ExitStatus, UserError
from semwatch.model.registry import live_model_dir
from semwatch.output import Output
from semwatch.reading.listing import NameFilter, TooLong, confinement_root, scan
from semwatch.reprocess.progress import Progress
from semwatch.reprocess.work import Outcome, WorkItem
from semwatch.safefs import path_text
from semwatch.store import selection as sel
from semwatch.store.access import open_readonly, open_writer
from semwatch.store.ledger import DatabaseReplaced, Store
from semwatch.store.messages import Failed, Message, Pending, Reclassified, Refused, Result
from semwatch.store.writer import DatabaseUnwritable, Retry, commit_batch
from semwatch.values import FileKey, utc_now

log = logging.getLogger("semwatch.reprocess")

EngineName = Literal["local", "ray"]
COMMIT_EVERY = 64  # outcomes per transaction (or every COMMIT_SECONDS, whichever comes first)
COMMIT_SECONDS = 1.0


class Engine(Protocol):
    """What the driver needs of an engine (`local.LocalEngine`, `ray_engine.RayEngine`)."""

    name: str
    model_id: str
    device: str

    def run(self, items: Iterable[WorkItem]) -> Iterator[Outcome]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ReprocessRequest:
    """What to re-classify: archive `folders`, or (none given) the ledger rows `selection` takes."""

    folders: tuple[Path, ...] = ()
    selection: sel.Selection = field(default_factory=sel.Selection)
    engine: EngineName | None = None  # None: `[scale] engine`
    dry_run: bool = False


@dataclass
class Tally:
    done: int = 0  # new results written
    failed: int = 0  # recorded failed (archive files that cannot be read)
    kept: int = 0  # could not be read again: the earlier result stays current
    gone: int = 0  # the file no longer exists
    stale: int = 0  # superseded meanwhile (the daemon or another run got there first)


def reprocess(settings: Settings, request: ReprocessRequest, *, out: Output) -> int:
    """Run one re-classification (see the module docstring); the exit status."""
    from semwatch.model.artifact import read_manifest

    engine_name: EngineName = request.engine or settings.scale.engine
    model_dir = live_model_dir(settings.model)  # the registry's champion, else [model] path
    try:
        model_id = read_manifest(model_dir).model_id
    except (OSError, ValueError, UserError) as exc:
        raise UserError(f"[model] path: cannot read the model at {model_dir}: {exc}",
                        ExitStatus.CONFIG) from None
    for folder in request.folders:
        if not folder.is_dir():
            raise UserError(f"not a folder: {path_text(folder)}", ExitStatus.USAGE)
    if request.dry_run:  # reads only: never creates, migrates or locks the database
        return _dry_run(settings, request, model_id, engine_name, out)
    store = open_writer(settings)
    retry = Retry(give_up_after=settings.store.write_retry_seconds)
    try:
        _refuse_if_daemon_disagrees(store.conn, model_id, settings)
        repaired = store.reconcile_csv()
        if repaired:
            log.warning("results CSV: appended %d line(s) missing after an unclean stop", repaired)
        with store.batch():
            run = sel.open_run(store.conn, _run_key(request), model_id, engine_name)
        plan = _plan(store, settings, request, model_id, run)
        engine = _engine(engine_name, settings, model_dir)
        try:
            if engine.model_id != model_id:
                raise UserError(f"the model changed while starting: {model_id} -> {engine.model_id}")
            with _sigterm_as_interrupt():
                tally = _drive(store, engine, plan.items, run, out, retry, total=plan.total)
                if plan.refused:  # found while listing
                    _commit(store, plan.refused, retry)
        finally:
            engine.close()
        with store.batch():
            sel.finish_run(store.conn, run.run_id, tally.done, tally.failed)
    except (DatabaseReplaced, DatabaseUnwritable) as exc:
        raise UserError(f"{exc}; stopped, nothing more was written (what was committed before is in "
                        f"the database and its results CSV)", ExitStatus.DATABASE) from None
    finally:
        store.close()
    _summary(out, tally, engine_name, model_id)
    return ExitStatus.INPUT_FAILED if tally.failed or tally.kept else ExitStatus.OK


def _dry_run(settings: Settings, request: ReprocessRequest, model_id: str, engine_name: EngineName,
             out: Output) -> int:
    """The plan, from a read-only connection (`access.open_readonly`): a database of an older schema
    is read through a migrated copy in memory, the file itself is left exactly as it was."""
    conn = open_readonly(settings.store.database, busy_timeout_ms=settings.store.busy_timeout_ms,
                         older="copy")
    try:
        _refuse_if_daemon_disagrees(conn, model_id, settings)
        run = sel.find_run(conn, _run_key(request), model_id) or sel.Run(0, utc_now(), resumed=False)
        return _report_plan(out, _plan(_Reader(conn), settings, request, model_id, run), run, engine_name)
    finally:
        conn.close()


@dataclass(frozen=True)
class _Reader:
    """What `_plan` reads: a connection (the writer's Store, or a read-only one for a dry run)."""

    conn: sqlite3.Connection


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (systemd, `kill`) ends the run the way Ctrl-C does: the batch in hand is committed and
    the engine closed (a private Ray is shut down) before the process exits with 143."""

    def terminated(signum: int, frame: object) -> None:
        raise UserError("terminated: what was done is recorded; run the command again to finish",
                        ExitStatus.TERMINATED)

    try:
        previous = signal.signal(signal.SIGTERM, terminated)
    except ValueError:  # not the main thread (a test calling the library): nothing to install
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- what to do ---------------------------------------------------------------------------------


@dataclass
class Plan:
    """The work list as a stream, never a list: an archive is listed while it is classified and the
    ledger read a page at a time (`selection.paged_rows`), so the driver's memory does not grow with
    the archive. `total` is known for a ledger selection (counted), None for an archive (known only
    once listed); `refused` fills as the listing goes (archive paths too long to open)."""

    items: Iterator[WorkItem]
    total: int | None
    refused: list[Message] = field(default_factory=list)


def _plan(store: Store | _Reader, settings: Settings, request: ReprocessRequest, model_id: str,
          run: sel.Run) -> Plan:
    if not request.folders:
        before = run.started_at if request.selection.scope == "all" else None
        total = sel.count_rows(store.conn, request.selection, model_id, before=before)
        rows = sel.paged_rows(store.conn, request.selection, model_id, before=before)
        watch = settings.watch.folder
        return Plan((WorkItem(r.key.path, confinement_root(r.key.path, watch), r.id, r.key, r.sample_id)
                     for r in rows), total)
    plan = Plan(iter(()), None)
    plan.items = _archive_items(store, settings, request.folders, model_id, plan.refused)
    return plan


def _archive_items(store: Store | _Reader, settings: Settings, folders: Sequence[Path], model_id: str,
                   refused: list[Message]) -> Iterator[WorkItem]:
    """The archive files this model has no result for, as the folders are listed."""
    names = NameFilter.from_settings(settings.watch)
    for given in folders:
        folder = given.absolute()  # the ledger holds absolute paths, as the daemon writes them
        too_long: list[TooLong] = []
        for path, st in scan(folder, names, settings.watch.recursive, too_long):
            key = FileKey.of(path, st)
            row = sel.current_row(store.conn, path)
            if row is None or (row["size_bytes"], row["mtime_ns"]) != (key.size, key.mtime_ns):
                yield WorkItem(path, str(folder), listed=key)  # a version the ledger does not hold
            elif row["status"] == "pending":
                yield WorkItem(path, str(folder), listed=key)  # queued by a daemon that is not done
            elif row["model_id"] != model_id or row["status"] == "failed":
                yield WorkItem(path, str(folder), int(row["id"]), key)
        for item in too_long:
            key = FileKey.of(item.path, item.st)
            if sel.current_row(store.conn, item.path) is None:
                refused.append(Refused(key, utc_now(), "path too long to open"))


def _run_key(request: ReprocessRequest) -> str:
    if request.folders:
        return "archive:" + "|".join(path_text(f.resolve()) for f in request.folders)
    return request.selection.key()


def _refuse_if_daemon_disagrees(conn: sqlite3.Connection, model_id: str, settings: Settings) -> None:
    """A running daemon with another model would write new files with it while this run writes
    them with this one, and each would call the other's results outdated: refuse, say what to do."""
    row = conn.execute("SELECT pid, state, heartbeat_at, model_id FROM daemon WHERE id = 1").fetchone()
    if row is None or row["state"] not in ("starting", "running") or row["model_id"] == model_id:
        return
    try:
        age = (datetime.now(UTC) - datetime.fromisoformat(row["heartbeat_at"])).total_seconds()
    except (TypeError, ValueError):
        return
    if age > settings.live.stale_seconds:
        return  # a daemon that died without saying so
    raise UserError(
        f"the running daemon (pid {row['pid']}) classifies with model {row['model_id']}, this "
        f"configuration with {model_id}: restart the daemon with the new model first",
        ExitStatus.LOCKED)


def _engine(name: EngineName, settings: Settings, model_dir: Path) -> Engine:
    if name == "ray":
        from semwatch.reprocess.ray_engine import RayEngine

        return RayEngine(settings, model_dir)
    from semwatch.reprocess.local import LocalEngine

    return LocalEngine(settings, model_dir)


# --- doing it ------------------------------------------------------------------------------------


def _drive(store: Store, engine: Engine, items: Iterable[WorkItem], run: sel.Run, out: Output,
           retry: Retry, *, total: int | None = None) -> Tally:
    tally = Tally()
    progress = Progress(out, total=total, label=f"reprocess ({engine.name}, {engine.device})")
    pending: list[Message] = []
    last = time.monotonic()
    try:
        for outcome in engine.run(items):
            pending.extend(_messages(outcome, engine.model_id, tally))
            if outcome.error is not None and not outcome.gone:
                _tell_error(out, progress, outcome)
            progress.advance()
            if len(pending) >= COMMIT_EVERY or time.monotonic() - last >= COMMIT_SECONDS:
                batch, pending = pending, []  # handed over once: a failed commit is not tried again below
                _commit_counted(store, batch, tally, retry)
                last = time.monotonic()
    finally:  # an interrupt still commits what is done (a kill -9 loses only this batch)
        if pending:
            batch, pending = pending, []
            _commit_counted(store, batch, tally, retry)
        progress.close()
    return tally


def _messages(outcome: Outcome, model_id: str, tally: Tally) -> list[Message]:
    item, key, verdict = outcome.item, outcome.key, outcome.verdict
    if verdict is not None and key is not None:
        assert outcome.sha256 is not None and outcome.sample_id is not None
        if item.supersedes is not None and key == item.recorded:
            return [Reclassified(key, item.supersedes, outcome.sha256, outcome.sample_id, verdict, model_id,
                                 outcome.expected)]
        # A version the ledger does not hold (new, or changed since its row): recorded as the daemon would.
        return [Pending(key, utc_now()),
                Result(key, outcome.sha256, outcome.sample_id, verdict, model_id, outcome.expected)]
    error = outcome.error or "no result"
    if outcome.gone:
        tally.gone += 1
        return []
    if item.supersedes is not None or key is None:
        tally.kept += 1
        return []
    tally.failed += 1
    return [Pending(key, utc_now()), Failed(key, 1, error, outcome.sha256, outcome.sample_id)]


def _tell_error(out: Output, progress: Progress, outcome: Outcome) -> None:
    kept = outcome.item.supersedes is not None or outcome.key is None
    if out.json:
        out.emit({"event": "error", "path": outcome.item.path, "error": outcome.error, "kept": kept})
    else:
        progress.say(f"{path_text(outcome.item.path)}: {outcome.error}"
                     + (" (the earlier result stays)" if kept else ""))


def _commit_counted(store: Store, batch: list[Message], tally: Tally, retry: Retry) -> None:
    """Commit, then count the results that wrote a row; the others were stale (superseded meanwhile)."""
    expected = sum(isinstance(m, Reclassified | Result) for m in batch)
    finished = _commit(store, batch, retry)
    written = int(store.conn.execute(
        f"SELECT count(*) FROM images WHERE id IN ({','.join('?' * len(finished))}) "
        "AND status != 'failed'", finished).fetchone()[0]) if finished else 0
    tally.done += written
    tally.stale += expected - written


def _commit(store: Store, batch: Sequence[Message], retry: Retry) -> list[int]:
    """One transaction and its CSV lines, as the daemon's writer commits them (`commit_batch`: under
    the write lock, the database's identity checked, a full disk retried); the ids of the rows it
    finished."""
    return commit_batch(store, batch, retry, store.write_lock)


# --- telling the user ------------------------------------------------------------------------------


def _report_plan(out: Output, plan: Plan, run: sel.Run, engine: str) -> int:
    files = superseding = 0
    for item in plan.items:  # counted as they stream by
        files += 1
        superseding += item.supersedes is not None
    record = {"event": "plan", "files": files, "reclassify": superseding,
              "new": files - superseding, "engine": engine, "resumed_run": run.resumed}
    if out.json:
        out.emit(record)
    else:
        out.line(f"would classify {files} file(s): {superseding} again, "
                 f"{files - superseding} new (engine {engine})")
    return ExitStatus.OK


def _summary(out: Output, tally: Tally, engine: str, model_id: str) -> None:
    record = {"event": "summary", "engine": engine, "model_id": model_id, "classified": tally.done,
              "failed": tally.failed, "kept": tally.kept, "gone": tally.gone, "stale": tally.stale}
    if out.json:
        out.emit(record)
        return
    out.line(f"reprocess ({engine}, model {model_id}): {tally.done} classified, {tally.failed} failed, "
             f"{tally.kept} could not be read again (earlier result kept), {tally.gone} gone, "
             f"{tally.stale} already done elsewhere")
