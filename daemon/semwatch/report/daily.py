"""The day's report: `reports/YYYY-MM-DD/` with report.html, images.csv and samples.csv.

A day is a calendar day in `[report] timezone`; the database stores UTC, so the day becomes a UTC
interval before querying. The HTML is one self-contained file (plots and thumbnails embedded as
base64, no scripts; a Content-Security-Policy forbids any) rendered by jinja2 with autoescaping,
because file and sample names are user data (shown through `safefs.printable`, so control and bidi
characters are visible). The CSVs are written by the store's one CSV writer (`store.csvfile`:
every cell through `safefs.csv_cell`, the columns of each file listed there). Thumbnails read the
files again, carefully (`thumbnails`); plots are in `plots` (matplotlib is imported only when a
report is written). A new report folder is built under a temporary name and renamed into place,
so a folder that exists is a finished report (the scheduler's catch-up relies on it); rewriting an
existing one replaces each file atomically (`safefs.write_atomic`).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sqlite3
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path, PurePath
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from semwatch.config import Settings
from semwatch.errors import ExitStatus, UserError
from semwatch.output import Output
from semwatch.report.pages import environment, publish
from semwatch.safefs import path_text, printable
from semwatch.store.access import ReadRefused, open_readonly
from semwatch.store.browse import Outdated, count_outdated, day_bounds
from semwatch.store.csvfile import REPORT_IMAGE_COLUMNS, REPORT_SAMPLE_COLUMNS, csv_bytes, reasons_text
from semwatch.store.instrument import Instrument
from semwatch.store.instrument import read as read_instrument
from semwatch.store.labels import LabelDay, has_labels_table, label_day
from semwatch.store.model_events import NO_SHADOW, Agreement, shadow_agreement

if TYPE_CHECKING:
    from semwatch.model.classify import Classifier
    from semwatch.report.plots import Plots
    from semwatch.report.thumbnails import Thumbnail

log = logging.getLogger("semwatch.report")

_NOVELTY = re.compile(r"novelty ([0-9.]+) > ([0-9.]+)")  # the reason `model.classify.aggregate` gives

STATUSES = ("ok", "unknown", "rejected", "failed")
VERDICTS = ("pass", "fail", "uncertain", "unknown")
EARLIEST_DAY = date(2000, 1, 1)


@dataclass(frozen=True)
class ReportPaths:
    day: date
    folder: Path
    html: Path
    images_csv: Path
    samples_csv: Path
    n_images: int
    n_samples: int


def report_folder(settings: Settings, day: date) -> Path:
    return settings.report.folder / day.isoformat()


def day_has_images(settings: Settings, day: date) -> bool:
    """Whether any image was finished on `day` (the scheduler's catch-up skips empty days)."""
    start, end = day_bounds(day, ZoneInfo(settings.report.timezone))
    try:
        conn = open_readonly(settings.store.database, busy_timeout_ms=settings.store.busy_timeout_ms)
    except ReadRefused:
        return False
    try:
        row = conn.execute(
            "SELECT 1 FROM images WHERE processed_at >= ? AND processed_at < ? AND status != 'pending' "
            "LIMIT 1",
            (start, end)).fetchone()
        return row is not None
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


# --- data -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DayImage:
    """A version finished on the day (the `images` row, its time in the report's zone)."""

    id: int
    path: str  # `path_text` form
    sample_id: str | None
    status: str
    predicted_class: str | None
    composition: str | None
    state: str | None
    confidence: float | None
    tile_agreement: float | None
    n_tiles: int | None
    model_id: str | None
    detected_at: str
    processed_at: str
    processed_local: str
    error: str | None
    reasons: str  # "; "-joined
    supersedes: int | None  # a re-classification: the id of the result it replaced

    @property
    def name(self) -> str:
        return PurePath(self.path).name

    @property
    def detail(self) -> str:
        """Why it has no verdict: the error, else the reasons."""
        return self.error or self.reasons

    @property
    def judged(self) -> str:
        """What to say of the verdict: the confidence of an `ok` image; for an `unknown` one its
        novelty against the threshold (its confidence is among the known classes: 1.00 there reads
        as certainty about an image the model does not know); nothing for the others."""
        if self.status == "ok":
            return "–" if self.confidence is None else f"confidence {self.confidence:.2f}"
        if self.status == "unknown":
            found = _NOVELTY.search(self.reasons)
            if found:
                return f"novelty {found.group(1)} > threshold {found.group(2)}"
            return self.reasons.split("; ")[0].split(":")[0] or "unknown"
        return ""


@dataclass(frozen=True)
class DaySample:
    """A sample with an image finished on the day (the `samples` row as it is now)."""

    sample_id: str
    verdict: str
    composition: str | None
    state: str | None
    predicted_class: str | None
    confidence: float | None
    uniformity: float | None
    expected: str | None
    n_images: int
    images_this_day: int
    updated_at: str
    model_ids: str  # the models of its current images, ", "-joined (more than one: partly outdated)
    n_counted: int = 0  # its images with a verdict (`ok`): with none, its confidence means nothing

    @property
    def judged(self) -> bool:
        """Whether any image voted: a sample of unknown or failed images has no confidence or
        uniformity to show (they are stored as 1.00 there)."""
        return self.n_counted > 0


@dataclass(frozen=True)
class TrendDay:
    """One local day of the trend: its finished images, failed ones and unknown ones."""

    day: str
    images: int
    failed: int
    unknown: int


@dataclass(frozen=True)
class DayData:
    images: list[DayImage]
    samples: list[DaySample]
    outdated: Outdated | None = None  # None: the current model is not known
    labels: LabelDay | None = None  # operators' labels of the day (None: a database before labels)
    shadow: Agreement = NO_SHADOW  # the shadow model's agreement with the live verdicts that day
    trend: list[TrendDay] = dataclasses.field(default_factory=list)  # TREND_DAYS, oldest first
    instrument: Instrument | None = None  # None: a database before schema step 6, or never bound


TREND_DAYS = 30
VERDICT_ORDER = {"fail": 0, "uncertain": 1, "unknown": 2, "pass": 3}  # the order a reader looks


def sample_order(sample: DaySample) -> tuple[int, str]:
    """Failing and uncertain samples first, then unknown, then passed; by id within each."""
    return VERDICT_ORDER.get(sample.verdict, 9), sample.sample_id


def load_day(settings: Settings, day: date, *, database: Path | None = None,
             model_id: str | None = None) -> DayData:
    """The day's finished images (every version finished that day), the samples they belong to
    (failing first), the 30 days' trend and the instrument. `database` replaces `[store] database`
    and `model_id` the configured model (the fleet report: another instrument's snapshot and its
    daemon's model)."""
    path = database or settings.store.database  # missing, older or newer: open_readonly says so
    zone = ZoneInfo(settings.report.timezone)
    conn = open_readonly(path, busy_timeout_ms=settings.store.busy_timeout_ms)  # ReadRefused: one line
    start, end = day_bounds(day, zone)
    try:
        image_rows, sample_rows, models = _query_day(conn, start, end)
        current = model_id or (current_model_id(settings, conn) if database is None else _daemon_model(conn))
        outdated = _outdated(conn, current, start, end)
        trend = load_trend(conn, day, zone)
        instrument = read_instrument(conn)
        labels = label_day(conn, start, end) if has_labels_table(conn) else None
        shadow = shadow_agreement(conn, since=start, until=end)
    except sqlite3.DatabaseError as exc:
        raise UserError(f"cannot read database {path}: {exc}", ExitStatus.INPUT_FAILED) from None
    finally:
        conn.close()
    images = [_day_image(r, zone) for r in image_rows]
    counts = Counter(img.sample_id for img in images if img.sample_id is not None)
    samples = [_day_sample(r, counts[r["sample_id"]], models.get(r["sample_id"], ""))
               for r in sample_rows if r["sample_id"] in counts]
    return DayData(images, sorted(samples, key=sample_order), outdated, labels=labels, shadow=shadow,
                   trend=trend, instrument=instrument)


def load_trend(conn: sqlite3.Connection, day: date, zone: ZoneInfo, days: int = TREND_DAYS) -> list[TrendDay]:
    """The `days` local days up to `day`: finished images (every version), failed and unknown ones;
    one index range of `images_processed_at` per day."""
    out: list[TrendDay] = []
    for back in range(days - 1, -1, -1):
        when = day - timedelta(days=back)
        counts = {r[0]: int(r[1]) for r in conn.execute(
            "SELECT status, count(*) FROM images WHERE processed_at >= ? AND processed_at < ? "
            "AND status != 'pending' GROUP BY status", day_bounds(when, zone))}
        out.append(TrendDay(when.isoformat(), sum(counts.values()), counts.get("failed", 0),
                            counts.get("unknown", 0)))
    return out


def _daemon_model(conn: sqlite3.Connection) -> str | None:
    row = conn.execute("SELECT model_id FROM daemon WHERE id = 1").fetchone()
    return str(row["model_id"]) if row is not None and row["model_id"] else None


def current_model_id(settings: Settings, conn: sqlite3.Connection) -> str | None:
    """The configured model's id (its manifest only, no weights), else the daemon's last one."""
    from semwatch.model.artifact import configured_model_id
    from semwatch.model.registry import live_model_dir

    configured = configured_model_id(live_model_dir(settings.model, strict=False))
    if configured is not None:
        return configured
    row = conn.execute("SELECT model_id FROM daemon WHERE id = 1").fetchone()
    return str(row["model_id"]) if row is not None and row["model_id"] else None


def _outdated(conn: sqlite3.Connection, model_id: str | None, start: str, end: str) -> Outdated | None:
    return count_outdated(conn, model_id, today=(start, end)) if model_id is not None else None


def _query_day(conn: sqlite3.Connection, start: str,
               end: str) -> tuple[list[sqlite3.Row], list[sqlite3.Row], dict[str, str]]:
    """The rows of the images finished in [start, end), of every sample, and each sample's models,
    in one read transaction (all see the same state of the database)."""
    conn.execute("BEGIN")
    try:
        images = conn.execute(
            "SELECT * FROM images WHERE processed_at >= ? AND processed_at < ? AND status != 'pending' "
            "ORDER BY processed_at, id", (start, end)).fetchall()
        samples = conn.execute("SELECT * FROM samples ORDER BY sample_id").fetchall() if images else []
        models: dict[str, str] = {}
        if images:
            for r in conn.execute("SELECT DISTINCT sample_id, model_id FROM images WHERE current = 1 "
                                  "AND model_id IS NOT NULL ORDER BY sample_id, model_id"):
                models[r["sample_id"]] = ", ".join(filter(None, (models.get(r["sample_id"]), r["model_id"])))
    finally:
        conn.execute("COMMIT")
    return images, samples, models


def _day_image(row: sqlite3.Row, zone: ZoneInfo) -> DayImage:
    when = datetime.fromisoformat(row["processed_at"])
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    return DayImage(
        id=row["id"], path=row["path"], sample_id=row["sample_id"], status=row["status"],
        predicted_class=row["predicted_class"], composition=row["composition"], state=row["state"],
        confidence=row["confidence"], tile_agreement=row["tile_agreement"], n_tiles=row["n_tiles"],
        model_id=row["model_id"], detected_at=row["detected_at"], processed_at=row["processed_at"],
        processed_local=when.astimezone(zone).isoformat(timespec="seconds"), error=row["error"],
        reasons=reasons_text(row["reasons"]), supersedes=_column(row, "supersedes"),
    )


def _column(row: sqlite3.Row, name: str) -> int | None:
    """A column a database of an older schema (read before the daemon migrated it) does not have."""
    return row[name] if name in row.keys() else None  # noqa: SIM118 - sqlite3.Row has no __contains__


def _day_sample(row: sqlite3.Row, images_this_day: int, model_ids: str) -> DaySample:
    return DaySample(
        sample_id=row["sample_id"], verdict=row["verdict"], composition=row["composition"],
        state=row["state"], predicted_class=row["predicted_class"], confidence=row["confidence"],
        uniformity=row["uniformity"], expected=row["expected"], n_images=int(row["n_images"] or 0),
        images_this_day=images_this_day, updated_at=row["updated_at"], model_ids=model_ids,
        n_counted=int(row["n_counted"] or 0),
    )


# --- the page ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DaySummary:
    n_images: int
    status: dict[str, int]
    n_samples: int
    verdicts: dict[str, int]
    mean_confidence: float | None  # over the `ok` images


def summarise(data: DayData) -> DaySummary:
    status = Counter(img.status for img in data.images)
    verdicts = Counter(s.verdict for s in data.samples)
    confs = [img.confidence for img in data.images if img.status == "ok" and img.confidence is not None]
    return DaySummary(
        n_images=len(data.images), status={s: status[s] for s in STATUSES}, n_samples=len(data.samples),
        verdicts={v: verdicts[v] for v in VERDICTS},
        mean_confidence=(sum(confs) / len(confs)) if confs else None,
    )


def flagged_thumbnails(settings: Settings, images: list[DayImage],
                       classifier: Classifier | None) -> list[Thumbnail]:
    """Thumbnails of the day's last `[report] thumbnails` failed and unknown images, newest first;
    the model is loaded only if there is one to show."""
    from semwatch.report.thumbnails import Thumbnail, load_classifier, thumbnail

    flagged = [img for img in reversed(images) if img.status in ("failed", "unknown")]
    flagged = flagged[: settings.report.thumbnails]
    if flagged and classifier is None:
        classifier = load_classifier(settings)
    thumbs = []
    for img in flagged:
        jpeg, kind = thumbnail(img.path, settings, classifier)
        if jpeg is None and img.detail and img.detail.splitlines()[0] in kind:
            kind = kind.split(":", 1)[0]  # "not readable now: X" above "X": say X once
        thumbs.append(Thumbnail(name=img.name, path=img.path, status=img.status, jpeg=jpeg, kind=kind,
                                detail=img.detail, sample_id=img.sample_id, confidence=img.confidence,
                                judged=img.judged))
    return thumbs


def render_html(settings: Settings, day: date, data: DayData, thumbs: list[Thumbnail],
                plots: Plots | None, generated_at: datetime, *, trend_png: str = "") -> str:
    template = environment().get_template("report.html.j2")
    return template.render(
        day=day.isoformat(), timezone=settings.report.timezone,
        generated_at=generated_at.isoformat(timespec="seconds"), summary=summarise(data),
        samples=data.samples, plots=plots, thumbs=thumbs, images=data.images, outdated=data.outdated,
        labels=data.labels,
        shadow=data.shadow,
        database=path_text(settings.store.database),
        instrument=data.instrument.label if data.instrument is not None else None, trend=data.trend,
        trend_png=trend_png,
    )


# --- writing ----------------------------------------------------------------------------------


def write_report(settings: Settings, day: date, *, classifier: Classifier | None = None,
                 now: datetime | None = None) -> ReportPaths:
    """Write `reports/YYYY-MM-DD/` for the local `day`; returns its paths."""
    from semwatch.report.plots import plot_day, plot_trend

    data = load_day(settings, day)
    generated = (now or datetime.now(UTC)).astimezone(ZoneInfo(settings.report.timezone))
    plots = plot_day(data.images) if data.images else None
    trend_png = plot_trend(data.trend) if any(t.images for t in data.trend) else ""
    thumbs = flagged_thumbnails(settings, data.images, classifier)
    files = {
        "report.html": render_html(settings, day, data, thumbs, plots, generated,
                                   trend_png=trend_png).encode("utf-8"),
        "images.csv": csv_bytes(REPORT_IMAGE_COLUMNS, [dataclasses.asdict(img) for img in data.images]),
        "samples.csv": csv_bytes(REPORT_SAMPLE_COLUMNS, [dataclasses.asdict(s) for s in data.samples]),
    }
    target = report_folder(settings, day)
    publish(target, files)
    log.info("report for %s: %s (%d images, %d samples)", day, target, len(data.images), len(data.samples))
    return ReportPaths(day, target, target / "report.html", target / "images.csv", target / "samples.csv",
                       len(data.images), len(data.samples))


# --- command ----------------------------------------------------------------------------------


def parse_day(text: str | None, settings: Settings, now: datetime | None = None) -> date:
    """`--date` as a local day: YYYY-MM-DD from 2000-01-01 to tomorrow (a day further is a typo, and
    days near the ends of the calendar overflow the time-zone arithmetic)."""
    today = (now or datetime.now(UTC)).astimezone(ZoneInfo(settings.report.timezone)).date()
    if text is None:
        return today
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise UserError(f"--date must be YYYY-MM-DD, got {printable(repr(text))}") from None
    latest = today + timedelta(days=1)
    if not EARLIEST_DAY <= day <= latest:
        raise UserError(f"--date {day} is outside {EARLIEST_DAY} .. {latest} (tomorrow in "
                        f"{settings.report.timezone})")
    return day


def report_day(settings: Settings, *, day: str | None, out: Output) -> int:
    """`semwatch report [--date YYYY-MM-DD] [--json]`: write the day's report (today in the report's
    time zone when `day` is None), then print its paths, or one JSON object with them."""
    when = parse_day(day, settings)
    try:
        paths = write_report(settings, when)
    except OSError as exc:
        raise UserError(f"cannot write the report to {report_folder(settings, when)}: {exc.strerror or exc}",
                        ExitStatus.INPUT_FAILED) from None
    if out.json:
        out.emit(dataclasses.asdict(paths))
    else:
        out.line(f"report for {when} ({paths.n_images} images, {paths.n_samples} samples)")
        for p in (paths.html, paths.images_csv, paths.samples_csv):
            out.line(path_text(p))
    return ExitStatus.OK
