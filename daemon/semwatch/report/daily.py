"""The day's report: `reports/YYYY-MM-DD/` with report.html, images.csv and samples.csv.

A day is a calendar day in `[report] timezone`; the database stores UTC, so the day becomes a UTC
interval before querying. The HTML is one self-contained file (plots and thumbnails embedded as
base64 PNG, no scripts; a Content-Security-Policy forbids any) rendered by jinja2 with
autoescaping, because file and sample names are user data (shown through `safefs.printable`, so
control and bidi characters are visible; every CSV cell goes through `safefs.csv_cell`). Thumbnails
read the files again, which may have changed since: only through `read_micrograph` with the watch
folder's confinement and the `[reading]` limits. A new report folder is built under a temporary
name and renamed into place, so a folder that exists is a finished report (the scheduler's
catch-up relies on it); rewriting an existing one replaces each file atomically.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import logging
import os
import shutil
import sqlite3
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import numpy as np
from matplotlib.ticker import MaxNLocator

from semwatch.config import Settings
from semwatch.errors import ExitStatus, UserError
from semwatch.safefs import Confinement, csv_cell, path_from_text, path_text, printable, text_safe
from semwatch.store import db

if TYPE_CHECKING:
    from semwatch.model.classify import Classifier

log = logging.getLogger("semwatch.report")

IMAGE_COLUMNS = (
    "id", "path", "sample_id", "status", "predicted_class", "composition", "state", "confidence",
    "tile_agreement", "n_tiles", "model_id", "detected_at", "processed_at", "processed_local", "error",
    "reasons",
)
SAMPLE_COLUMNS = (
    "sample_id", "verdict", "composition", "state", "predicted_class", "confidence", "uniformity",
    "expected", "n_images", "images_this_day", "updated_at",
)
STATUS_COLOURS = {"ok": "#2e7d32", "unknown": "#f9a825", "rejected": "#8e24aa", "failed": "#c62828"}
THUMB_PX = 360


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


def day_bounds_utc(day: date, zone: ZoneInfo) -> tuple[str, str]:
    """[start, end) of the local `day` as UTC ISO strings comparable with the database's timestamps."""
    start = datetime.combine(day, time(0), zone).astimezone(UTC)
    end = datetime.combine(day + timedelta(days=1), time(0), zone).astimezone(UTC)
    return start.isoformat(timespec="milliseconds"), end.isoformat(timespec="milliseconds")


def day_has_images(settings: Settings, day: date) -> bool:
    """Whether any image was finished on `day` (the scheduler's catch-up skips empty days)."""
    path = settings.store.database
    if not path.is_file():
        return False
    start, end = day_bounds_utc(day, ZoneInfo(settings.report.timezone))
    conn = db.connect(path, readonly=True, busy_timeout_ms=settings.store.busy_timeout_ms)
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
class DayData:
    images: list[dict[str, Any]]
    samples: list[dict[str, Any]]


def load_day(settings: Settings, day: date) -> DayData:
    """The day's finished images (every version finished that day) and the samples they belong to."""
    path = settings.store.database
    if not path.is_file():
        raise UserError(f"no database at {path} (has the daemon run?)", ExitStatus.INPUT_FAILED)
    zone = ZoneInfo(settings.report.timezone)
    start, end = day_bounds_utc(day, zone)
    try:
        conn = db.connect(path, readonly=True, busy_timeout_ms=settings.store.busy_timeout_ms)
    except sqlite3.Error as exc:
        raise UserError(f"cannot open database {path}: {exc}", ExitStatus.INPUT_FAILED) from None
    try:
        conn.execute("BEGIN")
        images = [dict(r) for r in conn.execute(
            "SELECT * FROM images WHERE processed_at >= ? AND processed_at < ? AND status != 'pending' "
            "ORDER BY processed_at, id", (start, end))]
        counts = Counter(img["sample_id"] for img in images if img["sample_id"] is not None)
        samples: list[dict[str, Any]] = []
        if counts:
            rows = conn.execute("SELECT * FROM samples ORDER BY sample_id").fetchall()
            samples = [dict(r) | {"images_this_day": counts[r["sample_id"]]}
                       for r in rows if r["sample_id"] in counts]
        conn.execute("COMMIT")
    except sqlite3.DatabaseError as exc:
        raise UserError(f"cannot read database {path}: {exc}", ExitStatus.INPUT_FAILED) from None
    finally:
        conn.close()
    for img in images:
        when = datetime.fromisoformat(img["processed_at"])
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
        img["processed_local"] = when.astimezone(zone).isoformat(timespec="seconds")
        img["name"] = PurePath(img["path"]).name
    return DayData(images, samples)


# --- plots ------------------------------------------------------------------------------------


def _png(fig: Any) -> str:
    fig.set_layout_engine("constrained")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(w: float = 7.0, h: float = 3.2) -> Any:
    # Figure without pyplot: no global state, the Agg canvas, safe in the daemon's scheduler thread.
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h))


def plot_timeline(images: list[dict[str, Any]]) -> str:
    """Verdicts per hour of the (local) day, stacked by status."""
    fig = _figure()
    ax = fig.add_subplot()
    hours = np.arange(24)
    bottom = np.zeros(24)
    for status, colour in STATUS_COLOURS.items():
        counts = np.zeros(24)
        for img in images:
            if img["status"] == status:
                counts[int(img["processed_local"][11:13])] += 1
        if counts.any():
            ax.bar(hours, counts, bottom=bottom, color=colour, label=status, width=0.85)
            bottom += counts
    ax.set_xlabel("hour of day (report time zone)")
    ax.set_ylabel("images")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xticks(range(0, 24, 2))
    ax.set_xlim(-0.6, 23.6)
    if bottom.any():
        ax.legend(loc="upper left", fontsize="small")
    ax.set_title("verdicts over the day")
    return _png(fig)


def plot_classes(images: list[dict[str, Any]]) -> str:
    """Predicted classes of images with a verdict (`ok`), plus counts of the other statuses."""
    counts = Counter(img["predicted_class"] for img in images if img["status"] == "ok")
    others = Counter(img["status"] for img in images if img["status"] != "ok")
    labels = sorted(counts) + [f"({s})" for s in STATUS_COLOURS if others[s]]
    values = [counts[c] for c in sorted(counts)] + [others[s] for s in STATUS_COLOURS if others[s]]
    colours = ["#1565c0"] * len(counts) + [STATUS_COLOURS[s] for s in STATUS_COLOURS if others[s]]
    fig = _figure(7.0, max(2.0, 0.35 * len(labels) + 1.0))
    ax = fig.add_subplot()
    ax.barh(range(len(labels)), values, color=colours)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("images")
    ax.set_title("class distribution")
    return _png(fig)


def plot_confidence(images: list[dict[str, Any]]) -> str:
    fig = _figure()
    ax = fig.add_subplot()
    bins = np.linspace(0.0, 1.0, 21)
    data = [[img["confidence"] for img in images if img["status"] == s and img["confidence"] is not None]
            for s in ("ok", "unknown", "rejected")]
    labels = [s for s, d in zip(("ok", "unknown", "rejected"), data, strict=True) if d]
    data = [d for d in data if d]
    if data:
        ax.hist(data, bins=bins, stacked=True, label=labels, color=[STATUS_COLOURS[s] for s in labels])
        ax.legend(fontsize="small")
    ax.set_xlabel("image confidence")
    ax.set_ylabel("images")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("confidence histogram")
    return _png(fig)


# --- thumbnails -------------------------------------------------------------------------------


def _encode_thumb(rgb: np.ndarray) -> str:
    """A JPEG (a micrograph thumbnail as PNG is ~8x larger, and the HTML embeds up to a dozen)."""
    import cv2

    h, w = rgb.shape[:2]
    scale = THUMB_PX / max(h, w)
    if scale < 1:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:  # pragma: no cover - encoding uint8 RGB does not fail
        raise ValueError("cannot encode thumbnail")
    return base64.b64encode(buf.tobytes()).decode("ascii")


def _plain_thumb(pixels: np.ndarray) -> np.ndarray:
    """The reader's grey specimen area, contrast-stretched, as 8-bit RGB (the plain thumbnail)."""
    import cv2

    grey = np.asarray(pixels, dtype=np.float32)
    lo, hi = np.percentile(grey, (0.5, 99.5))
    grey = np.clip((grey - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)
    return np.asarray(cv2.cvtColor((grey * 255).astype(np.uint8), cv2.COLOR_GRAY2RGB))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def thumbnail(stored_path: str, settings: Settings, classifier: Classifier | None) -> tuple[str | None, str]:
    """(base64 JPEG or None, what it shows) for an image row's path (`path_text` form).

    The file is untrusted and may have changed since it was processed (replaced by a FIFO, a link
    out of the folder, a giant TIFF), so it is read only through `read_micrograph`: the watch
    folder's confinement, no blocking opens, the `[reading]` limits. Grad-CAM where a model is
    available and the image has usable tiles, else the plain image; None (and the reason) when the
    file cannot or may not be read now."""
    from semwatch.reading.micrograph import read_micrograph

    confine = Confinement(settings.watch.folder, settings.watch.follow_symlinks)
    try:
        micrograph = read_micrograph(Path(path_from_text(stored_path)), settings, confine=confine)
    except Exception as exc:  # MicrographError, or a reader bug: either way no thumbnail, no report lost
        return None, f"not readable now: {_first_line(exc)}"
    if classifier is not None:
        try:
            if len(classifier.prepare(micrograph).tiles):
                from semwatch.model.gradcam import explain_image

                return _encode_thumb(explain_image(classifier, micrograph)), "Grad-CAM"
        except Exception as exc:  # the plain image still says something
            log.debug("no Grad-CAM for %s: %s", stored_path, exc)
    try:
        return _encode_thumb(_plain_thumb(micrograph.pixels)), "image"
    except Exception as exc:
        return None, f"no thumbnail: {_first_line(exc)}"


def _load_classifier(settings: Settings) -> Classifier | None:
    if not (settings.model.path / "manifest.json").is_file():
        return None
    try:
        from semwatch.model.classify import Classifier

        return Classifier.load(settings.model.path, settings)
    except Exception as exc:
        log.info("report thumbnails without Grad-CAM: %s", exc)
        return None


# --- writing ----------------------------------------------------------------------------------


def _csv_bytes(columns: tuple[str, ...], rows: list[dict[str, Any]]) -> bytes:
    """UTF-8 CSV whose every cell passed `csv_cell`: names and errors come from the export folder, and
    a cell such as `=HYPERLINK(...)` must stay text when the file is opened in a spreadsheet."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else csv_cell(row.get(c)) for c in columns])
    return buf.getvalue().encode("utf-8")


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _summary(data: DayData) -> dict[str, Any]:
    status = Counter(img["status"] for img in data.images)
    verdicts = Counter(s["verdict"] for s in data.samples)
    confs = [img["confidence"] for img in data.images
             if img["status"] == "ok" and img["confidence"] is not None]
    return {
        "n_images": len(data.images),
        "status": {s: status[s] for s in STATUS_COLOURS},
        "n_samples": len(data.samples),
        "verdicts": {v: verdicts[v] for v in ("pass", "fail", "uncertain", "unknown")},
        "mean_confidence": (sum(confs) / len(confs)) if confs else None,
    }


def render_html(settings: Settings, day: date, data: DayData, thumbs: list[dict[str, Any]],
                plots: dict[str, str], generated_at: datetime) -> str:
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(loader=PackageLoader("semwatch.report", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["conf"] = lambda v: "–" if v is None else f"{v:.2f}"
    env.filters["show"] = _show
    template = env.get_template("report.html.j2")
    return template.render(
        day=day.isoformat(), timezone=settings.report.timezone, generated_at=generated_at.isoformat(
            timespec="seconds"), summary=_summary(data), samples=data.samples, plots=plots, thumbs=thumbs,
        images=data.images, database=path_text(settings.store.database),
    )


def _show(value: object) -> str:
    """User data (file names, sample ids, errors) for the page: valid UTF-8 with control and bidi
    characters made visible (a name must not reorder or hide the text around it); autoescaping
    then makes it text, never markup."""
    return printable(text_safe(str(value)))


def write_report(settings: Settings, day: date, *, classifier: Classifier | None = None,
                 now: datetime | None = None) -> ReportPaths:
    """Write `reports/YYYY-MM-DD/` for the local `day`; returns its paths."""
    data = load_day(settings, day)
    zone = ZoneInfo(settings.report.timezone)
    generated = (now or datetime.now(UTC)).astimezone(zone)
    plots = {"timeline": plot_timeline(data.images), "classes": plot_classes(data.images),
             "confidence": plot_confidence(data.images)} if data.images else {}
    flagged = [img for img in reversed(data.images) if img["status"] in ("failed", "unknown")]
    flagged = flagged[: settings.report.thumbnails]
    thumbs: list[dict[str, Any]] = []
    if flagged:
        if classifier is None:
            classifier = _load_classifier(settings)
        for img in flagged:
            jpeg, kind = thumbnail(img["path"], settings, classifier)
            thumbs.append({"name": img["name"], "path": img["path"], "status": img["status"], "jpeg": jpeg,
                           "kind": kind, "detail": img["error"] or _reasons(img["reasons"]),
                           "sample_id": img["sample_id"], "confidence": img["confidence"]})
    html = render_html(settings, day, data, thumbs, plots, generated)
    files = {
        "report.html": html.encode("utf-8"),
        "images.csv": _csv_bytes(IMAGE_COLUMNS, data.images),
        "samples.csv": _csv_bytes(SAMPLE_COLUMNS, data.samples),
    }
    target = report_folder(settings, day)
    _publish(target, files)
    log.info("report for %s: %s (%d images, %d samples)", day, target, len(data.images), len(data.samples))
    return ReportPaths(day, target, target / "report.html", target / "images.csv", target / "samples.csv",
                       len(data.images), len(data.samples))


def _reasons(text: str | None) -> str:
    try:
        items = json.loads(text) if text else []
    except ValueError:
        return text or ""
    return "; ".join(map(str, items)) if isinstance(items, list) else str(items)


def _publish(target: Path, files: dict[str, bytes]) -> None:
    """A new folder appears complete (built under a temporary name, then renamed); an existing one has
    each file replaced atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            for name, data in files.items():
                (tmp / name).write_bytes(data)
            tmp.chmod(0o755)
            tmp.rename(target)
            return
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not target.is_dir():
                raise
    for name, data in files.items():
        _write_atomic(target / name, data)


# --- command ----------------------------------------------------------------------------------


EARLIEST_DAY = date(2000, 1, 1)


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


def report_command(args: argparse.Namespace, settings: Settings) -> int:
    """`semwatch report [--date YYYY-MM-DD] [--json]`: write the day's report, print its paths."""
    day = parse_day(args.date, settings)
    try:
        paths = write_report(settings, day)
    except OSError as exc:
        raise UserError(f"cannot write the report to {report_folder(settings, day)}: {exc.strerror or exc}",
                        ExitStatus.INPUT_FAILED) from None
    if args.json:
        out = {k: (path_text(v) if isinstance(v, Path) else str(v) if isinstance(v, date) else v)
               for k, v in asdict(paths).items()}
        print(json.dumps(out, ensure_ascii=False), flush=True)
    else:
        print(f"report for {day} ({paths.n_images} images, {paths.n_samples} samples)")
        for p in (paths.html, paths.images_csv, paths.samples_csv):
            print(printable(path_text(p)))
    return 0
