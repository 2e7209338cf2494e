"""Alerts through apprise (`[notify]`): failing samples, a degraded daemon, unknown spikes, reports.

Design. Two threads of their own, so that sending never blocks or slows the pipeline:

- the poll thread reads the database read-only about every `[notify] poll_seconds`
  (`events.SamplePoller`): new fail/uncertain sample verdicts and the unknown share. Polling the
  `samples` table rather than hooking the writer catches results written by any process and
  needs no new table and no change to the writer's transactions;
- the send thread delivers events from a bounded queue (full: the event is dropped and counted
  in the log) with apprise, each URL separately, each attempt bounded by `[notify]
  timeout_seconds` (apprise's `cto`/`rto`), a failed URL retried `[notify] retries` times with
  back-off, never fatal.

The daemon's status loop hands its health to `Alerts.health` and the report scheduler its written
reports to `Alerts.report_ready`: both only enqueue. The same event (`Event.key`) is not sent again
within `[notify] dedup_seconds`, also across a restart: the sent log, the poll watermark and the
unknown-spike state live in `<database>.notify.json` (written atomically; the database stays the
writer's alone). An event still queued when the daemon stops is lost (counted in the log); a sample
still in its quiet period is not (the saved watermark is before it).
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

from semwatch.config import Settings
from semwatch.errors import ConfigError, ExitStatus
from semwatch.output import Output
from semwatch.safefs import write_atomic
from semwatch.service.events import (
    DIGEST_OVER,
    Event,
    HealthTracker,
    SamplePoller,
    digest_event,
    for_instrument,
    model_event,
    report_event,
)
from semwatch.store import db
from semwatch.store.model_events import ModelEvent, last_move_to
from semwatch.urls import mask_url

if TYPE_CHECKING:
    from apprise import Apprise

log = logging.getLogger("semwatch.notify")

STATE_VERSION = 1
SAVE_SECONDS = 5.0  # the watermark is saved at most this often (sent events at once)
FLUSH_SECONDS = 2.0  # at stop, queued events get this long to go out
BACKOFF_SECONDS = 2.0  # first retry delay; doubled after each failure


def state_path(database: Path) -> Path:
    return database.with_name(database.name + ".notify.json")


class SentLog:
    """The persistent part: when each event key was last sent, the poll watermark, the spike flag.
    Shared by the threads (one lock)."""

    def __init__(self, path: Path, dedup_seconds: float) -> None:
        self.path = path
        self.dedup_seconds = dedup_seconds
        self.lock = threading.Lock()
        self.sent: dict[str, float] = {}
        self.watermark: str | None = None
        self.at_mark: list[str] = []
        self.in_spike = False
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(raw, dict) and raw.get("version") == STATE_VERSION:
                self.sent = {str(k): float(v) for k, v in raw.get("sent", {}).items()}
                self.watermark = str(raw["watermark"]) if raw.get("watermark") is not None else None
                self.at_mark = [str(s) for s in raw.get("at_mark", [])]
                self.in_spike = bool(raw.get("in_spike", False))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("alert state %s unreadable (%s); starting afresh", path, exc)

    def recent(self, key: str, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        with self.lock:
            at = self.sent.get(key)
        return at is not None and now - at < self.dedup_seconds

    def mark(self, key: str, now: float | None = None) -> None:
        with self.lock:
            self.sent[key] = time.time() if now is None else now

    def save(self, *, watermark: tuple[str, list[str]] | None = None, in_spike: bool | None = None) -> None:
        now = time.time()
        with self.lock:
            if watermark is not None:
                self.watermark, self.at_mark = watermark
            if in_spike is not None:
                self.in_spike = in_spike
            self.sent = {k: t for k, t in self.sent.items() if now - t < self.dedup_seconds}
            data = {"version": STATE_VERSION, "watermark": self.watermark, "at_mark": self.at_mark,
                    "in_spike": self.in_spike, "sent": self.sent}
        try:
            write_atomic(self.path, json.dumps(data, indent=1, sort_keys=True).encode())
        except OSError as exc:  # a full disk must not stop alerts (they are about the full disk)
            log.warning("cannot save alert state %s: %s", self.path, exc.strerror or exc)


def _silence_apprise() -> None:
    """apprise's own log lines quote URLs, tokens and chat ids as each plugin sees fit ("Unparseable
    URL", debug lines with the whole POST URL and request errors, warnings naming a chat): none is
    shown. What failed is said by our lines, naming the target by `Target.name`."""
    logging.getLogger("apprise").disabled = True


@dataclass(frozen=True)
class Target:
    """One configured URL, ready to send; `name` is how it is shown anywhere (`urls.mask_url`, and
    its place in `[notify] urls`, since two URLs may share a host)."""

    name: str
    apprise: Apprise


def build_targets(urls: tuple[str, ...], timeout: float) -> list[Target]:
    """One apprise object per URL (per-URL results and retries), each attempt bounded by `timeout`
    seconds to connect and to read. A URL apprise does not understand is a ConfigError."""
    import apprise

    _silence_apprise()
    targets = []
    for i, url in enumerate(urls):
        # In the calling thread (no apprise pool threads: our send thread is the one place that
        # waits), no files of apprise's own; each attempt bounded by cto/rto below.
        asset = apprise.AppriseAsset(async_mode=False, storage_mode="memory", service_timeout=0)
        ap = apprise.Apprise(asset=asset)
        sep = "&" if "?" in url else "?"
        timed = url if ("cto=" in url or "rto=" in url) else f"{url}{sep}cto={timeout:g}&rto={timeout:g}"
        if not ap.add(timed):
            raise ConfigError(f"[notify] urls[{i}] is not a URL apprise can send to")
        targets.append(Target(f"{mask_url(url)} (urls[{i}])", ap))
    return targets


def deliver(target: Target, event: Event) -> bool:
    try:
        return bool(target.apprise.notify(body=event.body, title=event.title))
    except Exception as exc:  # a plugin's bug must not kill the send thread; its text may quote the URL
        log.warning("alert to %s raised %s", target.name, type(exc).__name__)
        return False


class Alerts:
    """The daemon's alerts: `start`, `stop`, and the non-blocking `put`, `health`, `report_ready`."""

    def __init__(self, settings: Settings, *, targets: list[Target] | None = None) -> None:
        self.settings = settings
        self.notify = settings.notify
        self.enabled = set(settings.notify.on)
        self.targets = targets if targets is not None else build_targets(settings.notify.urls,
                                                                           settings.notify.timeout_seconds)
        self.state = SentLog(state_path(settings.store.database), settings.notify.dedup_seconds)
        self.queue: queue.Queue[Event | None] = queue.Queue(maxsize=settings.notify.queue_size)
        self.health_tracker = HealthTracker(socket.gethostname())
        self.instrument = instrument_label(settings)
        self.dropped = 0
        self.sent = 0
        self.failed = 0
        self._queued: set[str] = set()
        self._digested: dict[str, list[str]] = {}  # digest key -> the sample event keys it covers
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._poller: SamplePoller | None = None
        self._threads: list[threading.Thread] = []

    # --- producers (any thread; never block) ---------------------------------------------------

    def put(self, event: Event) -> bool:
        """Queue `event` unless disabled, sent within the dedup window or already queued."""
        if event.kind not in self.enabled or self.state.recent(event.key):
            return False
        with self._lock:
            if event.key in self._queued:
                return False
            try:
                self.queue.put_nowait(for_instrument(event, self.instrument))
            except queue.Full:
                self.dropped += 1
                log.warning("alert queue full (%d): dropped %s (%d dropped so far)",
                            self.notify.queue_size, event.key, self.dropped)
                return False
            self._queued.add(event.key)
        return True

    def health(self, conditions: Mapping[str, str]) -> None:
        """From the daemon's status loop, about once a second: its problems now, by name."""
        for event in self.health_tracker.update(conditions):
            self.put(event)

    def report_ready(self, day: date, path: Path) -> None:
        """From the report scheduler, once a report folder is written."""
        self.put(report_event(day.isoformat(), path))

    def model_moved(self, alias: str, model_id: str) -> None:
        """From the daemon's registry watch: `alias` now names `model_id` (the move as recorded)."""
        self.put(model_event(alias, model_id, self._last_move(alias, model_id)))

    def _last_move(self, alias: str, model_id: str) -> ModelEvent | None:
        try:
            conn = db.connect(self.settings.store.database, readonly=True)
        except sqlite3.Error:
            return None
        try:
            return last_move_to(conn, alias, model_id)
        except sqlite3.Error:  # the record is extra: the alert goes without it
            return None
        finally:
            conn.close()

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Read the starting watermark (now, so results written from here on are seen), then the
        two threads."""
        self._poller = SamplePoller(self.notify, watermark=self.state.watermark or "",
                                    at_mark=self.state.at_mark, in_spike=self.state.in_spike)
        if self.state.watermark is None:
            conn = db.connect(self.settings.store.database, readonly=True)
            try:
                self._poller.skip_existing(conn)
            finally:
                conn.close()
        self._threads = [threading.Thread(target=self._poll_main, name="semwatch-alerts-poll", daemon=True),
                         threading.Thread(target=self._send_main, name="semwatch-alerts-send", daemon=True)]
        for t in self._threads:
            t.start()
        log.info("alerts to %d URL(s) on %s", len(self.targets), ", ".join(self.notify.on) or "nothing")

    def stop(self) -> None:
        """A last poll, then up to FLUSH_SECONDS for the queue; a receiver that hangs is not waited
        for (daemon threads). Samples still in their quiet period are read again at the next start."""
        self._stopping.set()
        if not self._threads:
            return
        poll, send = self._threads
        poll.join(FLUSH_SECONDS + self.notify.poll_seconds)
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass  # the send thread is behind; it is a daemon thread and ends with the process
        send.join(FLUSH_SECONDS)
        if send.is_alive():
            log.warning("alerts: %d event(s) not sent at stop (receiver slow or down)",
                        max(1, self.queue.qsize()))
        if poll.is_alive():  # stuck in a database read: its watermark cannot be read safely
            self.state.save()
        else:
            self._save()
        self._threads = []

    def _save(self) -> None:
        poller = self._poller
        if poller is not None:
            self.state.save(watermark=poller.resume_from(), in_spike=poller.in_spike)
        else:
            self.state.save()

    # --- the threads -------------------------------------------------------------------------

    def _poll_main(self) -> None:
        poller = self._poller
        assert poller is not None
        last_save = time.monotonic()
        conn = db.connect(self.settings.store.database, readonly=True, check_same_thread=False)
        try:
            while True:
                stopping = self._stopping.wait(self.notify.poll_seconds)
                try:
                    for event in self._digest(poller.poll(conn)):
                        self.put(event)
                except Exception as exc:  # a busy or vanished database: try again next round
                    log.warning("alerts: reading the database failed: %s", exc)
                if stopping:
                    return
                if time.monotonic() - last_save >= SAVE_SECONDS:
                    self._save()
                    last_save = time.monotonic()
        finally:
            conn.close()

    def _digest(self, events: list[Event]) -> list[Event]:
        """More than DIGEST_OVER new sample events in one round: one digest instead. Their keys are
        marked sent once the digest is, so each sample is still announced once."""
        samples = [e for e in events if e.kind.startswith("sample_") and not self.state.recent(e.key)]
        if len(samples) <= DIGEST_OVER:
            return events
        digest = digest_event(samples)
        with self._lock:
            self._digested[digest.key] = [e.key for e in samples]
        return [e for e in events if not e.kind.startswith("sample_")] + [digest]

    def _send_main(self) -> None:
        while (event := self.queue.get()) is not None:
            try:
                self._send(event)
            finally:
                with self._lock:
                    self._queued.discard(event.key)

    def _send(self, event: Event) -> None:
        """To every target, retrying the ones that failed with back-off; marked sent (dedup) once
        any target has it, so a dead target does not make the others repeat themselves."""
        pending = list(self.targets)
        delay = BACKOFF_SECONDS
        for attempt in range(self.notify.retries + 1):
            pending = [t for t in pending if not deliver(t, event)]
            if len(pending) < len(self.targets):
                self.state.mark(event.key)
                with self._lock:
                    covered = self._digested.pop(event.key, [])
                for key in covered:
                    self.state.mark(key)
            if not pending:
                break
            if attempt < self.notify.retries:
                log.warning("alert %s to %s failed; retry %d/%d in %.0f s", event.key,
                            ", ".join(t.name for t in pending), attempt + 1, self.notify.retries, delay)
                self._stopping.wait(delay)  # stopping: the last tries run at once, within the flush time
                delay *= 2
        if pending:
            self.failed += 1
            log.error("alert %s not delivered to %s after %d attempt(s)", event.key,
                      ", ".join(t.name for t in pending), self.notify.retries + 1)
        else:
            self.sent += 1
            log.info("alert sent: %s", event.title)
        if len(pending) < len(self.targets):
            self.state.save()  # the sent log now; the watermark is the poll thread's to save


def start_alerts(settings: Settings) -> Alerts | None:
    """The daemon's alerts, started; None when `[notify] urls` is empty. A bad URL is a
    ConfigError (exit 78): the operator asked for alerts that would never arrive."""
    if not settings.notify.urls:
        return None
    alerts = Alerts(settings)
    alerts.start()
    return alerts


def instrument_label(settings: Settings) -> str:
    """`[instrument] name (site)` as alerts show it."""
    name, site = settings.instrument.resolved_name(), settings.instrument.site
    return f"{name} ({site})" if site else name


def send_test(settings: Settings, *, out: Output,
              targets: Callable[[tuple[str, ...], float], list[Target]] = build_targets) -> int:
    """`semwatch notify --test`: one test message to each configured URL, one line per URL;
    exit 1 if any failed."""
    urls = settings.notify.urls
    if not urls:
        where = settings.source or "the built-in defaults"
        raise ConfigError(f"[notify] urls is empty in {where}: no alert targets configured")
    event = for_instrument(Event("test", "test", f"semwatch: test message from {socket.gethostname()}",
                                 "This is a test of semwatch alerts (semwatch notify --test)."),
                           instrument_label(settings))
    failed = 0
    for target in targets(urls, settings.notify.timeout_seconds):
        ok = deliver(target, event)
        failed += not ok
        if out.json:
            out.emit({"url": target.name, "delivered": ok})
        else:
            out.line(f"{target.name}: {'delivered' if ok else 'FAILED'}")
    return ExitStatus.INPUT_FAILED if failed else ExitStatus.OK
