"""What the console shows, as rich renderables: an image's and a sample's detail, a table row's
cells, the columns' widths for a terminal's width, and the day a filter names. No Textual here:
`console.py` places these on its screens.

Everything that comes from the export folder or the database is shown through `live.shown`
(printable, never parsed as markup).
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from pathlib import PurePath
from zoneinfo import ZoneInfo

from rich.bar import Bar
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from semwatch.safefs import printable, text_safe
from semwatch.store import browse
from semwatch.store.snapshot import parse_utc
from semwatch.views.live import STATUS_STYLE, VERDICT_STYLE, fmt_conf, shown

TOP_CLASSES = 5  # class probabilities shown in an image's detail


def parse_day(text: str, zone: ZoneInfo, *, today: date | None = None) -> date | None:
    """'today', 'yesterday' or YYYY-MM-DD; None for anything else."""
    today = today or datetime.now(zone).date()
    word = text.strip().lower()
    if word == "today":
        return today
    if word == "yesterday":
        return today - timedelta(days=1)
    try:
        return date.fromisoformat(word)
    except ValueError:
        return None


def when_text(text: str | None, zone: ZoneInfo, today: date) -> str:
    """A UTC timestamp as local time: the time alone today, month-day and time before."""
    moment = parse_utc(text)
    if moment is None:
        return "–"
    local = moment.astimezone(zone)
    return local.strftime("%H:%M:%S") if local.date() == today else local.strftime("%m-%d %H:%M")


def _name(path: str) -> str:
    return PurePath(path).name


def _outdated(model_id: str | None, current: str | None) -> bool:
    return model_id is not None and current is not None and model_id != current


def image_detail_view(d: browse.ImageDetail, zone: ZoneInfo, current_model: str | None) -> RenderableType:
    """One image in full: verdict, probabilities, why, which model, when."""
    r = d.row
    head = Text()
    head.append(shown(_name(r.path), "bold"))
    head.append("\n")
    head.append(shown(str(PurePath(r.path).parent), "dim"))
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column()
    grid.add_row("status", shown(r.status + ("" if d.current else " (superseded)"),
                                 STATUS_STYLE.get(r.status, "")))
    grid.add_row("sample", shown(r.sample_id or "–"))
    grid.add_row("class", shown(r.predicted_class or "–"))
    grid.add_row("composition", shown(f"{d.composition or '–'} / {d.state or '–'}"))
    grid.add_row("confidence", fmt_conf(r.confidence))
    agreement = "–" if not d.n_tiles else f"{d.tile_agreement or 0:.2f} of {d.n_tiles} tiles"
    grid.add_row("tile agreement", agreement)
    model = Text()
    model.append(shown(r.model_id or "–"))
    if _outdated(r.model_id, current_model):
        model.append(" outdated: current model is ", style="yellow")
        model.append(shown(current_model or "", "yellow"))
    grid.add_row("model", model)
    detected, processed = parse_utc(r.detected_at), parse_utc(r.processed_at)
    day = detected.astimezone(zone).date() if detected else date.min
    timing = Text(when_text(r.detected_at, zone, datetime.now(zone).date()) + " → "
                  + when_text(r.processed_at, zone, day))
    if detected and processed:
        timing.append(f"  ({(processed - detected).total_seconds():.1f} s)", style="dim")
    grid.add_row("detected → done", timing)
    grid.add_row("attempts", str(d.attempts))
    grid.add_row("file", f"{d.size_bytes:,} bytes, sha256 {(d.sha256 or '–')[:12]}")
    parts: list[RenderableType] = [head, grid]
    why = [*d.reasons, *([r.error] if r.error else [])]
    if why:
        label = {"failed": "why it failed", "rejected": "why it was rejected",
                 "unknown": "why unknown"}.get(r.status, "notes")
        text = Text(label + "\n", style="bold")
        for reason in why:
            text.append("• ")
            text.append(shown(reason, "red" if r.status == "failed" else "yellow"))
            text.append("\n")
        text.rstrip()
        parts.append(text)
    if any(p > 0 for _, p in d.probabilities):
        probs = Table.grid(padding=(0, 1))
        probs.add_column(no_wrap=True)
        probs.add_column(justify="right")
        probs.add_column()
        for name, p in d.probabilities[:TOP_CLASSES]:
            probs.add_row(shown(name), f"{p:.2f}", Bar(1.0, 0.0, p, width=20, color="cyan"))
        rest = len(d.probabilities) - TOP_CLASSES
        title = "class probabilities" + (f" (the {TOP_CLASSES} highest of {len(d.probabilities)})"
                                         if rest > 0 else "")
        parts += [Text(title, style="bold"), probs]
    if d.earlier:
        text = Text("earlier results\n", style="bold")
        for e in d.earlier:
            text.append(f"{when_text(e.processed_at, zone, date.min)}  ", style="dim")
            text.append(shown(f"{e.status} {e.predicted_class or ''}  model {e.model_id or '–'}"))
            text.append("\n")
        text.rstrip()
        parts.append(text)
    return Group(*parts)


def sample_detail_view(d: browse.SampleDetail) -> RenderableType:
    """One sample: verdict, expected against found, how uniform its images are."""
    s = d.sample
    head = Text()
    head.append(shown(s.sample_id, "bold"))
    head.append("  ")
    head.append(shown(s.verdict, VERDICT_STYLE.get(s.verdict, "")))
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column()
    grid.add_row("expected", shown(s.expected or "– (no expectation)"))
    grid.add_row("found", shown(f"{s.predicted_class or '–'}  ({s.composition or '–'} / {s.state or '–'})"))
    grid.add_row("confidence", fmt_conf(s.confidence))
    grid.add_row("uniformity", fmt_conf(s.uniformity))
    grid.add_row("images", f"{s.n_images} ({d.n_counted} counted in the verdict)")
    counts = Text()
    for i, (name, n) in enumerate(d.class_counts):
        counts.append(("  " if i else "") + f"{n}× ")
        counts.append(shown(name))
    grid.add_row("classes", counts)
    return Group(head, grid)


def fit(value: str, width: int, *, keep_end: bool = False) -> str:
    """`value` in its printable form, cut to `width` with an ellipsis where it was cut (a table
    cell crops silently: two sample ids that differ only at the end would look the same)."""
    text = printable(text_safe(value))
    if len(text) <= width:
        return text
    return "…" + text[-(width - 1):] if keep_end else text[:width - 1] + "…"


def image_cells(r: browse.ImageRow, zone: ZoneInfo, today: date, current: str | None,
                widths: dict[str, int]) -> tuple[RenderableType, ...]:
    """One images-table row: time, file, sample, status, class (starred when outdated), confidence."""
    cls = shown(r.predicted_class or "–")
    if _outdated(r.model_id, current):
        cls.append("*", style="bold yellow")  # the footnote is in the summary line
    # A file name's end tells the images of one sample apart; a sample id's start is its name.
    return (_Stamp(when_text(r.processed_at or r.detected_at, zone, today), r.id),
            shown(fit(_name(r.path), widths["file"], keep_end=True)),
            shown(fit(r.sample_id or "–", widths["sample"])),
            shown(r.status, STATUS_STYLE.get(r.status, "")), cls, fmt_conf(r.confidence))


class _Stamp(Text):
    """The time cell, which also knows its row's id: `DataTable.sort` hands a sort key the cells
    only, and the tables are in id order (newest first)."""

    def __init__(self, text: str, order: int) -> None:
        super().__init__(text)
        self.order = order


def image_columns(width: int) -> dict[str, int]:
    """Column widths of an images table `width` cells wide: the file name and the sample id share
    what the fixed columns leave (less the scroll bar and a padding cell on each side of each)."""
    fixed = {"time": 8, "status": 8, "class": 13, "conf": 4}
    free = max(28, width - 2 - 2 * 6 - sum(fixed.values()))
    sample = min(20, max(10, free // 3))
    return {"time": 8, "file": free - sample, "sample": sample, "status": 8, "class": 13, "conf": 4}


def sample_columns(width: int) -> dict[str, int]:
    """Column widths of a samples table: narrow terminals leave out the update time and the
    uniformity (in the sample's detail) so that the verdict is never cut off."""
    fixed = {"verdict": 9, "n": 3, "found": 13, "expected": 13, "conf": 4}
    if width >= 100:
        fixed = {"updated": 8, **fixed, "unif": 4}
    free = max(12, width - 2 - 2 * (len(fixed) + 1) - sum(fixed.values()))
    order = ("updated", "sample", "verdict", "n", "found", "expected", "conf", "unif")
    sizes = {**fixed, "sample": min(30, free)}
    return {k: sizes[k] for k in order if k in sizes}
