"""`semwatch fleet report`: the day's report across instruments, from their snapshots.

`reports/fleet-YYYY-MM-DD/` holds report.html, images.csv and samples.csv: the nightly report's
sections (`report.daily`, whose loading and plots it reuses on each snapshot) with an instrument
column, one block of plots per instrument, and a comparison: the same material judged differently
on two instruments (the same image content, by sha256, or the same sample id, with another verdict
or class) is what a fleet view is for. Thumbnails are left out: the images lie on each instrument's
own disk, not beside the snapshots. A snapshot that is missing, broken or of a newer schema gets
its row in the instruments table saying so, and the rest of the report is unaffected.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from semwatch.config import Settings
from semwatch.errors import ExitStatus, UserError
from semwatch.output import Output
from semwatch.report.daily import (
    DayData,
    parse_day,
    sample_order,
    summarise,
)
from semwatch.report.daily import load_day as load_one_day
from semwatch.report.pages import environment, publish
from semwatch.safefs import path_text
from semwatch.store.browse import day_bounds
from semwatch.store.csvfile import REPORT_IMAGE_COLUMNS, REPORT_SAMPLE_COLUMNS, csv_bytes
from semwatch.store.fleet import Card, open_snapshot, read_cards, sources_of

log = logging.getLogger("semwatch.report")


@dataclass(frozen=True)
class InstrumentDay:
    card: Card
    data: DayData | None  # None: the snapshot could not be read (`card.problem`, or `problem`)
    problem: str | None = None
    timeline: str = ""
    classes: str = ""
    trend: str = ""


@dataclass(frozen=True)
class Judgement:
    instrument: str
    verdict: str  # an image's status or a sample's verdict
    predicted_class: str | None
    confidence: float | None
    where: str  # the path or sample id on that instrument


@dataclass(frozen=True)
class Disagreement:
    """The same material (an image's content, or a sample id) judged differently."""

    kind: str  # "image" or "sample"
    key: str  # the sha256 (shortened) or the sample id
    judgements: tuple[Judgement, ...]


@dataclass(frozen=True)
class FleetPaths:
    day: date
    folder: Path
    html: Path
    images_csv: Path
    samples_csv: Path
    instruments: int
    broken: int


def load_instruments(settings: Settings, sources: Sequence[Path], day: date,
                     now: datetime | None = None) -> list[InstrumentDay]:
    zone = ZoneInfo(settings.report.timezone)
    cards = read_cards(sources, today=day_bounds(day, zone), stale_seconds=settings.fleet.stale_seconds,
                       now=now)
    out = []
    for card in cards:
        if card.problem is not None:
            out.append(InstrumentDay(card, None))
            continue
        try:
            data = load_one_day(settings, day, database=card.path, model_id=card.model_id)
        except UserError as exc:  # unreadable after all: this instrument only
            out.append(InstrumentDay(card, None, problem=str(exc)))
            continue
        out.append(InstrumentDay(card, data))
    return out


def plotted(instruments: list[InstrumentDay]) -> list[InstrumentDay]:
    """Each readable instrument with its plots (matplotlib imported only here)."""
    from semwatch.report.plots import plot_classes, plot_timeline, plot_trend

    out = []
    for one in instruments:
        if one.data is None:
            out.append(one)
            continue
        images = one.data.images
        trend = plot_trend(one.data.trend, f"{one.card.name}: the last {len(one.data.trend)} days") if any(
            t.images for t in one.data.trend) else ""
        out.append(dataclasses.replace(one, timeline=plot_timeline(images) if images else "",
                                       classes=plot_classes(images) if images else "", trend=trend))
    return out


def disagreements(instruments: list[InstrumentDay], day: tuple[str, str]) -> list[Disagreement]:
    """The same image content (sha256) or the same sample id on two or more instruments, judged
    differently (another status/verdict or class)."""
    by_hash: dict[str, list[Judgement]] = defaultdict(list)
    by_sample: dict[str, list[Judgement]] = defaultdict(list)
    for one in instruments:
        if one.data is None:
            continue
        name = one.card.name
        for s in one.data.samples:
            by_sample[s.sample_id].append(Judgement(name, s.verdict, s.predicted_class,
                                                    s.confidence if s.judged else None, s.sample_id))
        try:
            with open_snapshot(one.card.path) as conn:
                rows = conn.execute(
                    "SELECT sha256, status, predicted_class, confidence, path FROM images "
                    "WHERE processed_at >= ? AND processed_at < ? AND current = 1 AND sha256 IS NOT NULL "
                    "AND status != 'pending' ORDER BY id", day).fetchall()
        except sqlite3.DatabaseError as exc:
            log.warning("fleet report: %s: %s", path_text(one.card.path), exc)
            continue
        for r in rows:
            confidence = r["confidence"] if r["status"] == "ok" else None
            judged = Judgement(name, r["status"], r["predicted_class"], confidence, r["path"])
            by_hash[r["sha256"]].append(judged)
    out: list[Disagreement] = []
    for kind, groups in (("image", by_hash), ("sample", by_sample)):
        for key, found in sorted(groups.items()):
            several = len({j.instrument for j in found}) > 1
            if several and len({(j.verdict, j.predicted_class) for j in found}) > 1:
                out.append(Disagreement(kind, key[:12] if kind == "image" else key, tuple(found)))
    return out


def render_fleet_html(settings: Settings, day: date, instruments: list[InstrumentDay],
                      compared: list[Disagreement], generated_at: datetime) -> str:
    env = environment()
    env.filters["age"] = _age
    rows = [(one, summarise(one.data) if one.data is not None else None) for one in instruments]
    samples = sorted(((one.card.name, s) for one in instruments if one.data is not None
                      for s in one.data.samples), key=lambda pair: (*sample_order(pair[1]), pair[0]))
    return env.get_template("fleet.html.j2").render(
        day=day.isoformat(), timezone=settings.report.timezone,
        generated_at=generated_at.isoformat(timespec="seconds"), rows=rows, compared=compared,
        samples=samples, stale_seconds=settings.fleet.stale_seconds,
    )


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def write_fleet_report(settings: Settings, sources: Sequence[Path], day: date, *,
                       now: datetime | None = None) -> FleetPaths:
    """Write `reports/fleet-YYYY-MM-DD/` for the local `day` from the snapshots in `sources`."""
    zone = ZoneInfo(settings.report.timezone)
    instruments = plotted(load_instruments(settings, sources, day, now))
    compared = disagreements(instruments, day_bounds(day, zone))
    generated = (now or datetime.now(UTC)).astimezone(zone)
    images = [{"instrument": one.card.name, **dataclasses.asdict(img)}
              for one in instruments if one.data is not None for img in one.data.images]
    samples = [{"instrument": one.card.name, **dataclasses.asdict(s)}
               for one in instruments if one.data is not None for s in one.data.samples]
    files = {
        "report.html": render_fleet_html(settings, day, instruments, compared, generated).encode("utf-8"),
        "images.csv": csv_bytes(("instrument", *REPORT_IMAGE_COLUMNS), images),
        "samples.csv": csv_bytes(("instrument", *REPORT_SAMPLE_COLUMNS), samples),
    }
    target = settings.report.folder / f"fleet-{day.isoformat()}"
    publish(target, files)
    broken = sum(1 for one in instruments if one.data is None)
    log.info("fleet report for %s: %s (%d instruments, %d unreadable)", day, target, len(instruments), broken)
    return FleetPaths(day, target, target / "report.html", target / "images.csv", target / "samples.csv",
                      len(instruments), broken)


def fleet_report(settings: Settings, *, sources: Sequence[Path], day: str | None, out: Output) -> int:
    """`semwatch fleet report [--date YYYY-MM-DD] [SNAPSHOT_OR_FOLDER ...]`: write the report and
    print its paths (or one JSON object). Exit 1 when any snapshot could not be read (the report
    is written all the same, saying which)."""
    when = parse_day(day, settings)
    chosen = sources_of(settings, sources)
    try:
        paths = write_fleet_report(settings, chosen, when)
    except OSError as exc:
        raise UserError(f"cannot write the fleet report to {settings.report.folder}: {exc.strerror or exc}",
                        ExitStatus.INPUT_FAILED) from None
    if out.json:
        out.emit({k: path_text(v) if isinstance(v, Path) else str(v) if isinstance(v, date) else v
                  for k, v in dataclasses.asdict(paths).items()})
    else:
        out.line(f"fleet report for {when} ({paths.instruments} instruments, {paths.broken} unreadable)")
        for p in (paths.html, paths.images_csv, paths.samples_csv):
            out.line(path_text(p))
    return ExitStatus.INPUT_FAILED if paths.broken or not paths.instruments else ExitStatus.OK
