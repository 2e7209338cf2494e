"""The operator's dashboard: one renderer for the daemon's live view and `semwatch top`.

Both read the daemon database read-only (`semwatch.snapshot`), so what `semwatch top` shows for a
daemon under systemd is exactly what the daemon's own terminal shows. `render` is a pure function
of a `Snapshot`, which keeps it testable with a recording console.

Everything shown that comes from the export folder or the database (file names, sample ids,
errors, the daemon's message) goes through `shown`: `safefs.printable` (a name holding
`ESC ] 0 ; ... BEL` shows as text instead of retitling the terminal) inside a rich `Text`, which
is never parsed as markup (`[red]` in a name stays `[red]`).
"""

from __future__ import annotations

import threading
from datetime import datetime
from pathlib import PurePath
from zoneinfo import ZoneInfo

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from semwatch.config import Settings
from semwatch.safefs import printable, text_safe
from semwatch.store.messages import exit_message
from semwatch.store.snapshot import Snapshot, parse_utc, take_snapshot

STATUS_STYLE = {"ok": "green", "unknown": "yellow", "rejected": "magenta", "failed": "bold red",
                "pending": "dim"}
VERDICT_STYLE = {"pass": "bold green", "fail": "bold red", "uncertain": "yellow", "unknown": "dim"}


def shown(value: object, style: str = "") -> Text:
    """Untrusted text as a terminal-safe, markup-free cell."""
    return Text(printable(text_safe(str(value))), style=style)


def _name(path: str) -> str:
    """A stored path's file name (stored paths are `path_text`, so this is printable-ready)."""
    return PurePath(path).name


def fmt_conf(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _local_time(text: str | None, zone: ZoneInfo) -> str:
    when = parse_utc(text)
    return when.astimezone(zone).strftime("%H:%M:%S") if when else "–"


def age_text(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def current_model_id(settings: Settings) -> str | None:
    """The id of the configured model (`[model] path`), the one results are compared with to call
    them outdated; None when it cannot be read (the views then use the daemon's model)."""
    from semwatch.model.artifact import configured_model_id
    from semwatch.model.registry import live_model_dir

    return configured_model_id(live_model_dir(settings.model, strict=False))


def shadow_text(snap: Snapshot) -> Text:
    """'shadow 1a2b… agrees 97.0 % (412, last day)' for the headers; empty without a shadow."""
    s = snap.shadow
    text = Text()
    if s.rate is None or s.model_id is None:
        return text
    text.append("shadow ", style="dim")
    text.append(shown(s.model_id[:12]))
    text.append(" agrees ", style="dim")
    text.append(f"{100 * s.rate:.1f} %", style="bold")
    text.append(f" ({s.n}, last day)", style="dim")
    return text


def outdated_text(snap: Snapshot) -> Text:
    """'outdated results: 3 today, 120 in all (model ≠ 9c89…)' for the dashboards' headers."""
    o = snap.outdated
    text = Text()
    if o.model_id is None:
        return text
    text.append("outdated ", style="dim")
    if o.total == 0:
        text.append("none")
    else:
        text.append(f"{o.today} today, {o.total} in all", style="bold yellow")
        text.append(" (results of another model than ", style="dim")
        text.append(shown(o.model_id))
        text.append(")", style="dim")
    return text


def render(snap: Snapshot, settings: Settings) -> RenderableType:
    """One dashboard frame."""
    zone = ZoneInfo(settings.report.timezone)
    if snap.problem is not None:
        return Panel(shown(snap.problem, "yellow"), title="semwatch", border_style="yellow")
    parts: list[RenderableType] = [_header(snap, settings), _recent(snap, zone), _samples(snap)]
    if snap.errors or _daemon_problem(snap):
        parts.append(_errors(snap, zone))
    return Group(*parts)


def _daemon_problem(snap: Snapshot) -> str | None:
    """The daemon's own message when it tells of a problem (a clean `exit 0` is not one)."""
    d = snap.daemon
    if d is None or not d.message or (d.state == "stopped" and d.message == exit_message(0)):
        return None
    return d.message


def _header(snap: Snapshot, settings: Settings) -> RenderableType:
    d = snap.daemon
    lines = Text()
    if d is None:
        lines.append("no daemon has written to this database yet\n", style="bold yellow")
    else:
        state_style = "bold green" if d.state == "running" and not snap.stale else "bold yellow"
        ended = f" ({d.message})" if d.state == "stopped" and d.message else ""
        lines.append(shown(f"daemon {d.state}{ended}", state_style))
        lines.append(shown(f"  pid {d.pid} on {d.hostname}  ·  heartbeat {age_text(snap.heartbeat_age_s)}"))
        lines.append("\n")
        if snap.stale and d.state == "stopped":
            lines.append(shown(f"the daemon stopped ({d.message or 'no message'}); figures below are from "
                                "its last update", "bold yellow"))
            lines.append("\n")
        elif snap.stale:
            lines.append(
                f"no heartbeat for more than {settings.live.stale_seconds:.0f} s: the daemon is not "
                "running (or is hung); figures below are from its last update\n", style="bold red")
        lines.append("device ", style="dim")
        lines.append(shown(d.device or "–"))
        lines.append("   model ", style="dim")
        lines.append(shown((d.model_id or "–")[:16]))
        lines.append("   folder ", style="dim")
        lines.append(shown(d.watch_folder or "–"))
        lines.append("\n")
        lines.append("waiting ", style="dim")
        lines.append(f"{d.waiting}", style="bold")
        lines.append("   in progress ", style="dim")
        lines.append(f"{d.in_progress}", style="bold")
        lines.append("   done ", style="dim")
        lines.append(f"{d.done}", style="bold green")
        lines.append("   failed ", style="dim")
        lines.append(f"{d.failed}", style="bold red" if d.failed else "bold")
        lines.append("   throughput ", style="dim")
        lines.append(f"{d.images_per_s:.2f} images/s, {d.tiles_per_s:.1f} tiles/s\n")
    counts = "  ".join(f"{k} {v}" for k, v in sorted(snap.status_counts.items())) or "no images yet"
    lines.append("in database ", style="dim")
    lines.append(shown(counts))
    outdated = outdated_text(snap)
    if outdated:
        lines.append("   ")
        lines.append(outdated)
    shadow = shadow_text(snap)
    if shadow:
        lines.append("   ")
        lines.append(shadow)
    # A str subtitle would be parsed as markup: the database path is shown as Text too.
    title = shown(f"semwatch — {snap.instrument}") if snap.instrument else "semwatch"
    return Panel(lines, title=title, subtitle=shown(snap.database), border_style="blue")


def _recent(snap: Snapshot, zone: ZoneInfo) -> RenderableType:
    table = Table(title=f"last {len(snap.recent)} verdicts", expand=True, title_justify="left")
    for col in ("time", "file", "sample", "status", "composition", "state"):
        table.add_column(col, overflow="fold" if col == "file" else "ellipsis")
    table.add_column("confidence", justify="right")
    for img in snap.recent:
        style = STATUS_STYLE.get(img.status, "")
        table.add_row(
            _local_time(img.processed_at, zone), shown(_name(img.path)), shown(img.sample_id or "–"),
            shown(img.status, style), shown(img.composition or "–"), shown(img.state or "–"),
            fmt_conf(img.confidence), style=None,
        )
    if not snap.recent:
        table.add_row("–", "no verdicts yet", "", "", "", "", "")
    return table


def _samples(snap: Snapshot) -> RenderableType:
    table = Table(title="samples (running verdicts)", expand=True, title_justify="left")
    numeric = ("images", "confidence", "uniformity")
    for col in ("sample", *numeric[:1], "composition", "state", *numeric[1:], "expected", "verdict"):
        table.add_column(col, justify="right" if col in numeric else "left")
    for s in snap.samples:
        table.add_row(
            shown(s.sample_id), str(s.n_images), shown(s.composition or "–"), shown(s.state or "–"),
            fmt_conf(s.confidence), fmt_conf(s.uniformity), shown(s.expected or "–"),
            shown(s.verdict, VERDICT_STYLE.get(s.verdict, "")),
        )
    if not snap.samples:
        table.add_row("no samples yet", "", "", "", "", "", "", "")
    return table


def _errors(snap: Snapshot, zone: ZoneInfo) -> RenderableType:
    text = Text()
    problem = _daemon_problem(snap)
    if problem:
        text.append(shown(f"daemon: {problem}", "yellow"))
        text.append("\n")
    for img in snap.errors:
        when = _local_time(img.processed_at or img.detected_at, zone)
        text.append(f"{when}  ", style="dim")
        text.append(shown(_name(img.path), "bold"))
        retrying = " (retrying)" if img.status == "pending" else ""
        text.append(shown(f": {img.error}{retrying}", "yellow" if retrying else "red"))
        text.append("\n")
    text.rstrip()
    return Panel(text, title="recent errors", border_style="red", title_align="left")


def render_once(settings: Settings, console: Console, *, now: datetime | None = None,
                current_model: str | None = None) -> Snapshot:
    """Print one frame; returns the snapshot it showed."""
    snap = take_snapshot(settings, now=now, current_model=current_model)
    console.print(render(snap, settings))
    return snap


class LiveView:
    """The rich Live dashboard in a thread of its own (the daemon starts it on a terminal)."""

    def __init__(self, settings: Settings, console: Console | None = None) -> None:
        self.settings = settings
        self.console = console or Console()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: Live | None = None
        self.current_model: str | None = None

    def frame(self) -> RenderableType:
        return render(take_snapshot(self.settings, current_model=self.current_model), self.settings)

    def start(self) -> None:
        if self._thread is not None:
            return
        self.current_model = current_model_id(self.settings)
        self._live = Live(self.frame(), console=self.console, auto_refresh=False,
                          redirect_stdout=True, redirect_stderr=True, transient=False)
        self._live.start(refresh=True)
        self._thread = threading.Thread(target=self._run, name="semwatch-live", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval = 1.0 / self.settings.live.refresh_per_second
        while not self._stop.wait(interval):
            assert self._live is not None
            try:
                self._live.update(self.frame(), refresh=True)
            except Exception as exc:  # a frame must never kill the view: show why instead
                self._live.update(Panel(shown(f"live view: {exc}", "red")), refresh=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        if self._live is not None:
            try:
                self._live.update(self.frame(), refresh=True)
            finally:
                self._live.stop()
                self._live = None

    def __enter__(self) -> LiveView:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
