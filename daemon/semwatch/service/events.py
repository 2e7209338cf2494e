"""What an alert says, and when: the events `service.notify` sends.

`SamplePoller` reads the database read-only (its own connection, `poll` about once a second from
the alert thread) rather than hooking the writer: the `samples` table is the truth about verdicts,
whoever wrote it (this daemon, or another process such as a reprocessing run), and a poll keyed on
`samples.updated_at` needs no new table and nothing from the writer's transaction. A sample is
reported once its row has been quiet for `[notify] sample_quiet_seconds`, so a burst of its images
(a backlog, a fast series) gives one message with all of them rather than one per image.

`HealthTracker` turns the daemon's once-a-second view of its own health (`conditions`: a name per
problem) into `daemon_degraded` events when a problem appears and recovery events when it goes.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from semwatch.config import NotifySettings
from semwatch.liveness import Stuck
from semwatch.safefs import printable, text_safe
from semwatch.service.folderprobe import FolderState
from semwatch.store.model_events import ModelEvent

MAX_PATHS = 5  # image paths named in a sample message; the rest are counted
DIGEST_OVER = 10  # more sample events than this in one poll round become one digest message
MAX_DIGEST_LINES = 50


@dataclass(frozen=True)
class Event:
    """One alert. `kind` is the `[notify] on` name that enables it; `key` identifies "the same
    event" for the dedup window (a sample and its verdict, a condition, a report day)."""

    kind: str
    key: str
    title: str
    body: str


def for_instrument(event: Event, instrument: str) -> Event:
    """`event` naming the instrument it comes from (`[instrument]`), in its title and first line:
    with several microscopes on one channel, "sample X FAIL" alone does not say where to walk."""
    name = _clean(instrument)
    title = event.title.removeprefix("semwatch: ")
    return Event(event.kind, event.key, f"semwatch [{name}]: {title}", f"instrument: {name}\n{event.body}")


def _clean(text: object) -> str:
    """Untrusted text (sample ids, paths, error messages) for a chat message or an e-mail."""
    return printable(text_safe(str(text)))


@dataclass(frozen=True)
class SampleRow:
    sample_id: str
    verdict: str
    expected: str | None
    found: str | None
    confidence: float
    n_images: int
    updated_at: str


def sample_event(row: SampleRow, paths: Sequence[str], total: int) -> Event:
    """A sample whose verdict is fail or uncertain: what was expected, what was found, where."""
    sid = _clean(row.sample_id)
    found = _clean(row.found or "-")
    expected = _clean(row.expected or "-")
    lines = [f"Sample {sid}: {row.verdict}",
             f"expected {expected}, found {found} (confidence {row.confidence:.2f})",
             f"{row.n_images} image(s) so far"]
    if paths:
        folder = os.path.commonpath(paths) if len(paths) > 1 else str(Path(paths[0]).parent)
        lines.append(f"folder: {_clean(folder)}")
        lines += [f"  {_clean(p)}" for p in paths]
        if total > len(paths):
            lines.append(f"  ... and {total - len(paths)} more")
    return Event(f"sample_{row.verdict}", f"sample_{row.verdict}:{row.sample_id}",
                 f"semwatch: sample {sid} {row.verdict.upper()} (expected {expected}, found {found})",
                 "\n".join(lines))


def digest_event(events: Sequence[Event]) -> Event:
    """Many sample events at once (a re-classification run, a backlog after an outage): one message
    listing them instead of a flood. Its kind is sample_fail when any of them fails."""
    kind = "sample_fail" if any(e.kind == "sample_fail" for e in events) else "sample_uncertain"
    shown = [e.title.removeprefix("semwatch: ") for e in events[:MAX_DIGEST_LINES]]
    more = [f"... and {len(events) - len(shown)} more"] if len(events) > len(shown) else []
    keys = hashlib.sha256("\n".join(sorted(e.key for e in events)).encode()).hexdigest()[:16]
    return Event(kind, f"digest:{keys}",
                 f"semwatch: {len(events)} samples failed or are uncertain",
                 "\n".join(shown + more))


def report_event(day: str, path: Path) -> Event:
    return Event("report_ready", f"report_ready:{day}", f"semwatch: report for {day} is ready",
                 f"The report for {day} was written: {_clean(path)}")


def model_event(alias: str, model_id: str, move: ModelEvent | None) -> Event:
    """`challenger_ready` / `model_promoted`: the alias move the daemon saw, with who made it, why,
    and the gate's decision where the move's evidence has one (`semwatch models show` has it all)."""
    evidence = (move.evidence or {}) if move is not None else {}
    gate = evidence.get("gate", evidence)
    decision = gate.get("decision") if isinstance(gate, dict) else None
    lines = [f"model: {_clean(model_id)}"]
    if move is not None:
        lines.append(f"{_clean(move.action)} by {_clean(move.by)} at {_clean(move.at)}"
                     + (f", was {_clean(move.previous_model_id)}" if move.previous_model_id else ""))
        if move.reason:
            lines.append(f"reason: {_clean(move.reason)}")
    if decision:
        lines.append(f"gate: {_clean(decision)}")
    lines.append(f"details: semwatch models show {_clean(model_id)}")
    if alias == "champion":
        return Event("model_promoted", f"model_promoted:{model_id}:{move.id if move else ''}",
                     f"semwatch: now serving model {_clean(model_id)[:12]}", "\n".join(lines))
    return Event("challenger_ready", f"challenger_ready:{model_id}",
                 f"semwatch: challenger {_clean(model_id)[:12]} ready"
                 + (f" (gate: {_clean(decision)})" if decision else ""), "\n".join(lines))


class SamplePoller:
    """New fail/uncertain sample verdicts and unknown spikes, read from the database.

    `watermark` is the newest `samples.updated_at` seen; `pending_since` the oldest one still
    waiting for its quiet period (what a restart must read again, see `resume_from`)."""

    def __init__(self, settings: NotifySettings, *, watermark: str, in_spike: bool,
                 at_mark: Iterable[str] = (), clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.watermark = watermark
        self.in_spike = in_spike
        self.clock = clock
        self._at_mark: set[str] = set(at_mark)  # samples seen with updated_at == watermark
        self._pending: dict[str, tuple[SampleRow, float]] = {}
        self._last_processed: str | None = None
        wanted = set(settings.on)
        self.verdicts = {v for v in ("fail", "uncertain") if f"sample_{v}" in wanted}
        self.spikes = "unknown_spike" in wanted

    def skip_existing(self, conn: sqlite3.Connection) -> None:
        """Start after what the database already holds (a poller without a saved watermark:
        enabling alerts on an old database does not replay its history)."""
        self.watermark = str(conn.execute("SELECT max(updated_at) FROM samples").fetchone()[0] or "")
        self._at_mark = {r[0] for r in conn.execute("SELECT sample_id FROM samples WHERE updated_at = ?",
                                                    (self.watermark,))}

    def resume_from(self) -> tuple[str, list[str]]:
        """The watermark to save and the samples already seen at it: before any sample still in its
        quiet period (read again after a restart; what was sent meanwhile is in the sent log)."""
        pending = [row.updated_at for row, _ in self._pending.values()]
        if pending:
            return min(pending), []
        return self.watermark, sorted(self._at_mark)

    def poll(self, conn: sqlite3.Connection) -> list[Event]:
        """One round: the events due now."""
        if self.verdicts:
            self._read_samples(conn)
        events = self._due_samples(conn)
        if self.spikes:
            events += self._unknown_spike(conn)
        return events

    def _read_samples(self, conn: sqlite3.Connection) -> None:
        now = self.clock()
        rows = conn.execute(
            "SELECT sample_id, verdict, expected, predicted_class, confidence, n_images, updated_at "
            "FROM samples WHERE updated_at >= ? ORDER BY updated_at", (self.watermark,)).fetchall()
        for r in rows:
            row = SampleRow(r[0], r[1], r[2], r[3], float(r[4] or 0.0), int(r[5] or 0), r[6])
            if row.updated_at == self.watermark and row.sample_id in self._at_mark:
                continue
            if row.updated_at > self.watermark:
                self.watermark, self._at_mark = row.updated_at, set()
            self._at_mark.add(row.sample_id)
            self._pending[row.sample_id] = (row, now)

    def _due_samples(self, conn: sqlite3.Connection) -> list[Event]:
        now = self.clock()
        due = [sid for sid, (_, seen) in self._pending.items()
               if now - seen >= self.settings.sample_quiet_seconds]
        events = []
        for sid in due:
            row, _ = self._pending.pop(sid)
            if row.verdict not in self.verdicts:
                continue
            paths = [r[0] for r in conn.execute(
                "SELECT path FROM images WHERE sample_id = ? AND current = 1 ORDER BY path LIMIT ?",
                (sid, MAX_PATHS))]
            total = int(conn.execute("SELECT count(*) FROM images WHERE sample_id = ? AND current = 1",
                                     (sid,)).fetchone()[0])
            events.append(sample_event(row, paths, total))
        return events

    def _unknown_spike(self, conn: sqlite3.Connection) -> list[Event]:
        newest = conn.execute("SELECT max(processed_at) FROM images").fetchone()[0]
        if newest is None or newest == self._last_processed:
            return []
        self._last_processed = newest
        window = self.settings.unknown_window
        n, unknown = conn.execute(
            "SELECT count(*), coalesce(sum(status = 'unknown'), 0) FROM (SELECT status FROM images "
            "WHERE current = 1 AND processed_at IS NOT NULL AND status != 'pending' "
            "ORDER BY processed_at DESC LIMIT ?)", (window,)).fetchone()
        if n < window:
            return []
        share = unknown / n
        if share < self.settings.unknown_share:
            self.in_spike = False
            return []
        if self.in_spike:
            return []
        self.in_spike = True
        return [Event("unknown_spike", f"unknown_spike:{newest}",
                      f"semwatch: {share:.0%} of the last {n} images are unknown",
                      f"{unknown} of the last {n} images were classified unknown (threshold "
                      f"{self.settings.unknown_share:.0%}): a wrong specimen, a wrong magnification, "
                      f"or a model that does not fit what is being imaged. Newest result at {newest}.")]


def health_conditions(*, stuck: Iterable[Stuck], database: str | None, folder: FolderState,
                      observer_restarts: int) -> dict[str, str]:
    """The daemon's problems right now, by name (see `HealthTracker`). The folder as the probe last
    saw it: looking at it here could block the caller on a frozen share."""
    conditions = {f"stuck:{s.stage}": f"stage {s.stage} has not moved for {s.seconds:.0f} s ({s.doing})"
                  for s in stuck}
    if database:
        conditions["database"] = f"database not writable (disk full?): {database}"
    problem = folder.problem()
    if problem is not None:
        conditions[problem[0]] = problem[1]
    if observer_restarts:
        conditions["observer"] = (f"the inotify observer died and was restarted {observer_restarts} "
                                  "time(s) in the last 5 minutes")
    return conditions


class HealthTracker:
    """Conditions that appear → `daemon_degraded`; conditions that clear → a recovery message
    (also sent under `daemon_degraded`), only for problems that were reported."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.active: dict[str, str] = {}

    def update(self, conditions: Mapping[str, str]) -> list[Event]:
        events = []
        for name, text in conditions.items():
            if name not in self.active:
                events.append(Event("daemon_degraded", f"daemon_degraded:{name}",
                                    f"semwatch on {self.host}: degraded: {_clean(text)}", _clean(text)))
        for name, text in self.active.items():
            if name not in conditions:
                events.append(Event("daemon_degraded", f"daemon_recovered:{name}",
                                    f"semwatch on {self.host}: recovered", f"recovered: {_clean(text)}"))
        self.active = dict(conditions)
        return events
