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
from semwatch.reading.listing import NameFilter, TooLong, scan
from semwatch.reprocess.progress import Progress
from semwatch.reprocess.work import Outcome, WorkItem
from semwatch.safefs import path_text
from semwatch.store import selection as sel
from semwatch.store.ledger import Store, open_store
from semwatch.store.messages import Failed, Message, Pending, Reclassified, Refused, Result
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
    store = open_store(settings)
    try:
        _refuse_if_daemon_disagrees(store, model_id, settings)
        if request.dry_run:  # writes nothing, not even the run's record
            run = (sel.find_run(store.conn, _run_key(request), model_id)
                   or sel.Run(0, utc_now(), resumed=False))
            items, _ = _plan(store, settings, request, model_id, run)
            return _report_plan(out, items, run, engine_name)
        repaired = store.reconcile_csv()
        if repaired:
            log.warning("results CSV: appended %d line(s) missing after an unclean stop", repaired)
        run = sel.open_run(store.conn, _run_key(request), model_id, engine_name)
        items, refused = _plan(store, settings, request, model_id, run)
        if refused:
            _commit(store, refused)
        engine = _engine(engine_name, settings, model_dir)
        try:
            if engine.model_id != model_id:
                raise UserError(f"the model changed while starting: {model_id} -> {engine.model_id}")
            with _sigterm_as_interrupt():
                tally = _drive(store, engine, items, run, out)
        finally:
            engine.close()
        sel.finish_run(store.conn, run.run_id, tally.done, tally.failed)
    finally:
        store.close()
    _summary(out, tally, engine_name, model_id)
    return ExitStatus.INPUT_FAILED if tally.failed or tally.kept else ExitStatus.OK


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


def _plan(store: Store, settings: Settings, request: ReprocessRequest, model_id: str,
          run: sel.Run) -> tuple[list[WorkItem], list[Message]]:
    """The work items, and `Refused` records for archive paths too long to open."""
    if not request.folders:
        before = run.started_at if request.selection.scope == "all" else None
        return [WorkItem(r.key.path, _root_of(r.key.path, settings.watch.folder), r.id, r.key, r.sample_id)
                for r in sel.select_rows(store.conn, request.selection, model_id, before=before)], []
    items: list[WorkItem] = []
    refused: list[Message] = []
    names = NameFilter.from_settings(settings.watch)
    for given in request.folders:
        folder = given.absolute()  # the ledger holds absolute paths, as the daemon writes them
        too_long: list[TooLong] = []
        for path, st in scan(folder, names, settings.watch.recursive, too_long):
            key = FileKey.of(path, st)
            row = sel.current_row(store.conn, path)
            if row is None or (row["size_bytes"], row["mtime_ns"]) != (key.size, key.mtime_ns):
                items.append(WorkItem(path, str(folder)))  # a version the ledger does not hold
            elif row["status"] == "pending":
                items.append(WorkItem(path, str(folder)))  # queued by a daemon that is not done
            elif row["model_id"] != model_id or row["status"] == "failed":
                items.append(WorkItem(path, str(folder), int(row["id"]), key))
        for item in too_long:
            key = FileKey.of(item.path, item.st)
            if sel.current_row(store.conn, item.path) is None:
                refused.append(Refused(key, utc_now(), "path too long to open"))
    return items, refused


def _root_of(path: str, watch_folder: Path) -> str:
    """Where a recorded file's reads are confined: the watch folder for its files, else the file's
    own folder (a row from an archive run; its sidecar lies beside it)."""
    folder, file = watch_folder.absolute(), Path(path).absolute()
    return str(folder if file.is_relative_to(folder) else file.parent)


def _run_key(request: ReprocessRequest) -> str:
    if request.folders:
        return "archive:" + "|".join(path_text(f.resolve()) for f in request.folders)
    return request.selection.key()


def _refuse_if_daemon_disagrees(store: Store, model_id: str, settings: Settings) -> None:
    """A running daemon with another model would write new files with it while this run writes
    them with this one, and each would call the other's results outdated: refuse, say what to do."""
    row = store.conn.execute("SELECT pid, state, heartbeat_at, model_id FROM daemon WHERE id = 1").fetchone()
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


def _drive(store: Store, engine: Engine, items: Sequence[WorkItem], run: sel.Run, out: Output) -> Tally:
    tally = Tally()
    progress = Progress(out, total=len(items), label=f"reprocess ({engine.name}, {engine.device})")
    pending: list[Message] = []
    last = time.monotonic()
    try:
        for outcome in engine.run(items):
            pending.extend(_messages(outcome, engine.model_id, tally))
            if outcome.error is not None and not outcome.gone:
                _tell_error(out, progress, outcome)
            progress.advance()
            if len(pending) >= COMMIT_EVERY or time.monotonic() - last >= COMMIT_SECONDS:
                _commit_counted(store, pending, tally)
                pending, last = [], time.monotonic()
    finally:  # an interrupt still commits what is done (a kill -9 loses only this batch)
        if pending:
            _commit_counted(store, pending, tally)
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


def _commit_counted(store: Store, batch: list[Message], tally: Tally) -> None:
    """Commit, then count the results that wrote a row; the others were stale (superseded meanwhile)."""
    expected = sum(isinstance(m, Reclassified | Result) for m in batch)
    finished = _commit(store, batch)
    written = int(store.conn.execute(
        f"SELECT count(*) FROM images WHERE id IN ({','.join('?' * len(finished))}) "
        "AND status != 'failed'", finished).fetchone()[0]) if finished else 0
    tally.done += written
    tally.stale += expected - written


def _commit(store: Store, batch: Sequence[Message]) -> list[int]:
    """One transaction and its CSV lines (`Store.append_csv`), under the database's write lock;
    the ids of the rows it finished."""
    with store.write_lock:
        finished = store.apply(batch)
        store.append_csv(finished)
    return finished


# --- telling the user ------------------------------------------------------------------------------


def _report_plan(out: Output, items: Sequence[WorkItem], run: sel.Run, engine: str) -> int:
    superseding = sum(1 for i in items if i.supersedes is not None)
    record = {"event": "plan", "files": len(items), "reclassify": superseding,
              "new": len(items) - superseding, "engine": engine, "resumed_run": run.resumed}
    if out.json:
        out.emit(record)
    else:
        out.line(f"would classify {len(items)} file(s): {superseding} again, "
                 f"{len(items) - superseding} new (engine {engine})")
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
