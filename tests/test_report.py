"""The day's report: folder, CSVs and a self-contained, escaped HTML page, for a fixture day; hostile
names and files in the export folder neither fool nor stall it."""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import threading
from datetime import UTC, date, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest

from dbfixture import make_database
from semwatch.cli import main
from semwatch.config import ReadingSettings, ReportSettings, Settings
from semwatch.errors import UserError
from semwatch.output import Output
from semwatch.report.daily import report_day, write_report
from semwatch.safefs import path_text

DAY = date(2026, 11, 24)
SCRIPT_NAME = "<script>alert(1)</script>.tif"
PLOTS = {"verdicts over the day", "class distribution", "confidence histogram",
         "images, failed and unknown share per day"}


class Page(HTMLParser):
    """Tags, table rows (as cell texts) and the text of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[dict[str, str | None]] = []
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
        elif tag == "table":
            self._table = a.get("id") or f"table{len(self.tables)}"
            self.tables[self._table] = []
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            self.tables[self._table].append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def _parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


@pytest.fixture
def seoul(settings: Settings) -> Settings:
    return settings.replace(report=ReportSettings(folder=settings.report.folder, timezone="Asia/Seoul"))


def _a_jpeg(ncm_dir: Path) -> Path:
    return sorted((ncm_dir / "622").glob("*.jpg"))[0]


def _report_in_thread(settings: Settings, day: date = DAY, timeout: float = 120.0) -> Path:
    """`write_report`, failing the test (instead of hanging it) if it does not finish in time."""
    out: list[Path] = []
    worker = threading.Thread(target=lambda: out.append(write_report(settings, day).html), daemon=True)
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), "write_report blocked"
    assert out, "write_report failed"
    return out[0]


def _day_fixture(settings: Settings, tmp_path: Path, ncm_dir: Path) -> None:
    """Images around the local day 2026-11-24 in Seoul (UTC+9): 2026-11-23T15:00Z .. 2026-11-24T15:00Z."""
    real = settings.watch.folder / "lotC" / "c1.jpg"  # thumbnails are read inside the watch folder only
    real.parent.mkdir(parents=True)
    shutil.copy(_a_jpeg(ncm_dir), real)
    corrupt = settings.watch.folder / "lotC" / "broken.tif"
    corrupt.write_bytes(b"II*\x00garbage")
    make_database(settings.store.database, now=datetime(2026, 11, 24, 12, tzinfo=UTC), images=[
        {"path": "/export/lotA/early.tif", "sample_id": "lotA",
         "processed_at": "2026-11-23T14:59:59.000+00:00"},
        {"path": "/export/lotA/a1.tif", "sample_id": "lotA", "processed_at": "2026-11-23T15:00:00.000+00:00"},
        {"path": "/export/lotA/a2.tif", "sample_id": "lotA", "processed_at": "2026-11-24T03:10:00.000+00:00",
         "predicted_class": "811_cycled", "composition": "811", "state": "cycled", "confidence": 0.72,
         "model_id": "m0"},  # by an older model than the daemon's m1: outdated
        {"path": f"/export/lotB/{SCRIPT_NAME}", "sample_id": "<b>lotB</b>", "status": "unknown",
         "confidence": 0.3, "predicted_class": None, "composition": None, "state": None,
         "reasons": json.dumps(["far from the training data"]),
         "processed_at": "2026-11-24T05:00:00.000+00:00"},
        {"path": str(real), "sample_id": "lotC", "status": "unknown", "confidence": 0.4,
         "processed_at": "2026-11-24T06:00:00.000+00:00"},
        {"path": str(corrupt), "sample_id": "lotC", "status": "failed", "confidence": None,
         "error": "not a TIFF: truncated", "processed_at": "2026-11-24T06:30:00.000+00:00"},
        {"path": "/export/lotA/late.tif", "sample_id": "lotA",
         "processed_at": "2026-11-24T15:00:00.000+00:00"},
        {"path": "/export/lotA/pending.tif", "sample_id": "lotA", "status": "pending",
         "processed_at": None, "confidence": None},
    ], samples=[
        {"sample_id": "lotA", "n_images": 5, "verdict": "uncertain", "confidence": 0.6},
        {"sample_id": "<b>lotB</b>", "n_images": 1, "verdict": "unknown", "confidence": None,
         "composition": None, "state": None},
        {"sample_id": "lotC", "n_images": 2, "verdict": "fail", "expected": "811_cycled"},
        {"sample_id": "lotZ", "n_images": 3, "verdict": "pass"},  # nothing this day
    ])


def test_report_for_a_fixture_day(seoul: Settings, tmp_path: Path, ncm_dir: Path) -> None:
    _day_fixture(seoul, tmp_path, ncm_dir)
    paths = write_report(seoul, DAY)
    assert paths.folder == seoul.report.folder / "2026-11-24"
    assert sorted(p.name for p in paths.folder.iterdir()) == ["images.csv", "report.html", "samples.csv"]
    assert paths.n_images == 5 and paths.n_samples == 3

    with paths.images_csv.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    names = [Path(r["path"]).name for r in rows]
    assert names == ["a1.tif", "a2.tif", "script>.tif", "c1.jpg", "broken.tif"]  # local day only, in order
    assert rows[0]["processed_local"] == "2026-11-24T00:00:00+09:00"
    assert rows[2]["path"].endswith(SCRIPT_NAME)
    assert rows[2]["reasons"] == "far from the training data"  # as in results.csv: text, not JSON
    with paths.samples_csv.open(encoding="utf-8", newline="") as fh:
        samples = {r["sample_id"]: r for r in csv.DictReader(fh)}
    assert set(samples) == {"lotA", "<b>lotB</b>", "lotC"}
    assert samples["lotA"]["images_this_day"] == "2" and samples["lotC"]["verdict"] == "fail"
    assert samples["lotA"]["model_ids"] == "m0, m1" and samples["lotC"]["model_ids"] == "m1"
    assert [r["model_id"] for r in rows] == ["m1", "m0", "m1", "m1", "m1"] and rows[0]["supersedes"] == ""

    page = _parse(paths.html)
    assert "script" not in page.tags
    assert page.tags.count("b") == 3  # thumbnail captions only: <b>lotB</b> is text
    text = "".join(page.text)
    assert SCRIPT_NAME in text and "<b>lotB</b>" in text  # shown as text, not markup
    raw = paths.html.read_text(encoding="utf-8")
    assert "<script>" not in raw and "&lt;script&gt;alert(1)&lt;/script&gt;.tif" in raw
    # every image is embedded (self-contained) and is a real PNG
    assert len(page.images) >= 4
    magic = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff"}
    for img in page.images:
        kind, _, data = (img["src"] or "").removeprefix("data:image/").partition(";base64,")
        assert base64.b64decode(data).startswith(magic[kind])
        assert kind == ("png" if img["alt"] in PLOTS else "jpeg")
    alts = [img["alt"] for img in page.images]
    assert set(alts) >= PLOTS
    assert "image of c1.jpg" in alts  # plain thumbnail (no model configured)
    assert "not readable now" in text  # the corrupt file: no thumbnail, but listed
    sample_rows = {r[0]: r for r in page.tables["samples"][1:]}
    assert sample_rows["lotC"][1] == "fail" and sample_rows["lotA"][1] == "uncertain"
    assert sample_rows["<b>lotB</b>"][1] == "unknown"
    summary = {r[0]: r[1] for r in page.tables["summary"]}
    assert summary["images"] == "5" and summary["failed"] == "1" and summary["unknown"] == "2"
    assert summary["samples fail"] == "1"
    assert summary["outdated (another model than m1): of the day"] == "1"  # a2 (late.tif is the next day)
    assert summary["outdated: in all"] == "1"
    assert "1 current result(s) came from another model" in text
    assert "far from the training data" in text


def test_rewrite_replaces_files_and_empty_day(seoul: Settings, tmp_path: Path, ncm_dir: Path) -> None:
    _day_fixture(seoul, tmp_path, ncm_dir)
    first = write_report(seoul, DAY)
    before = first.html.stat().st_ino
    again = write_report(seoul, DAY)
    assert again.html.stat().st_ino != before  # replaced, not rewritten in place
    assert not [p for p in first.folder.parent.iterdir() if p.name.startswith(".")]  # no temp left
    empty = write_report(seoul, date(2026, 1, 1))
    assert empty.n_images == 0 and "No images were processed" in empty.html.read_text(encoding="utf-8")


def test_missing_database_is_a_user_error(settings: Settings) -> None:
    with pytest.raises(UserError, match="no database"):
        write_report(settings, DAY)


def test_report_day_prints_paths_or_json(seoul: Settings, tmp_path: Path, ncm_dir: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    _day_fixture(seoul, tmp_path, ncm_dir)
    assert report_day(seoul, day="2026-11-24", out=Output(json=True)) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1
    obj = json.loads(out)
    assert obj["day"] == "2026-11-24" and obj["n_images"] == 5 and obj["n_samples"] == 3
    assert Path(obj["html"]).is_file() and obj["folder"] == str(seoul.report.folder / "2026-11-24")
    assert report_day(seoul, day="2026-11-24", out=Output()) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["report for 2026-11-24 (5 images, 3 samples)", obj["html"], obj["images_csv"],
                     obj["samples_csv"]]


def test_report_command_and_bad_dates(seoul: Settings, tmp_path: Path, ncm_dir: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`semwatch report` in-process: the config file's day and zone, one-line errors for bad dates."""
    _day_fixture(seoul, tmp_path, ncm_dir)
    config = tmp_path / "config.toml"
    config.write_text(
        f'[store]\ndatabase = "{seoul.store.database}"\n[report]\nfolder = "{seoul.report.folder}"\n'
        f'timezone = "Asia/Seoul"\n[model]\npath = "{tmp_path / "none"}"\n', encoding="utf-8")
    base = ["report", "--config", str(config)]
    assert main([*base, "--date", "2026-11-24", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["day"] == "2026-11-24" and obj["n_images"] == 5 and Path(obj["html"]).is_file()
    ahead = datetime.now(UTC).date() + timedelta(days=3)
    for day, words in (("24.11.2026", "YYYY-MM-DD"), ("9999-12-31", "outside"), ("0001-01-01", "outside"),
                       ("1999-12-31", "outside"), (ahead.isoformat(), "outside"),
                       ("2026-02-30", "YYYY-MM-DD"), ("", "YYYY-MM-DD")):
        assert main([*base, "--date", day]) == 2, day
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.splitlines()) == 1, (day, captured.err)
        assert words in captured.err and "Traceback" not in captured.err, (day, captured.err)


@pytest.mark.slow
def test_gradcam_thumbnails_with_a_model(seoul: Settings, tmp_path: Path, ncm_dir: Path,
                                         tiny_model: Path) -> None:
    from semwatch.config import ModelSettings

    with_model = seoul.replace(model=ModelSettings(path=tiny_model, device="cpu"))
    _day_fixture(with_model, tmp_path, ncm_dir)
    page = _parse(write_report(with_model, DAY).html)
    alts = [img["alt"] for img in page.images]
    assert "Grad-CAM of c1.jpg" in alts  # a readable NCM micrograph: where the network looked
    assert "not readable now" in "".join(page.text)  # the corrupt file still has none


def test_hostile_names_are_text_in_html_and_csv(seoul: Settings, ncm_dir: Path) -> None:
    # A real JPEG whose name holds a terminal title sequence, a bidi override and a byte that is not
    # UTF-8: the database holds its `path_text` form, from which the thumbnail still finds the file.
    raw_name = b"evil\x1b]0;pwned\x07\xe2\x80\xaebad_\xff.jpg"
    folder = seoul.watch.folder / "lotH"
    folder.mkdir(parents=True)
    real = folder / os.fsdecode(raw_name)
    shutil.copy(_a_jpeg(ncm_dir), real)
    stored = path_text(real)
    assert "\\xff" in stored and "\x1b" in stored  # the writer's form: the \xff escaped, ESC kept
    formula = "=HYPERLINK(\"http://evil.example\",\"x\")"
    make_database(seoul.store.database, now=datetime(2026, 11, 24, 12, tzinfo=UTC), images=[
        {"path": stored, "sample_id": formula, "status": "unknown", "confidence": 0.3,
         "error": "+cmd|' /C calc'!A0\x1b[31m", "processed_at": "2026-11-24T05:00:00.000+00:00"},
        {"path": str(folder / "[red]x.jpg"), "sample_id": "@SUM(1+1)", "status": "failed",
         "error": "-1+1", "processed_at": "2026-11-24T05:10:00.000+00:00"},
    ], samples=[{"sample_id": formula, "expected": "\t=1+2"}, {"sample_id": "@SUM(1+1)"}])
    paths = write_report(seoul, DAY)

    raw = paths.html.read_bytes().decode("utf-8")  # strictly valid UTF-8
    for ch in ("\x1b", "\x07", "\u202e"):
        assert ch not in raw, repr(ch)
    page = _parse(paths.html)
    text = "".join(page.text)
    assert "evil\\x1b]0;pwned\\x07\\u202ebad_\\xff.jpg" in text  # visible, not interpreted
    assert "image of evil\\x1b]0;pwned\\x07\\u202ebad_\\xff.jpg" in [i["alt"] for i in page.images]
    assert "[red]x.jpg" in text and formula in text

    for csv_path in (paths.images_csv, paths.samples_csv):
        csv_path.read_bytes().decode("utf-8")
    with paths.images_csv.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["path"] == stored and rows[0]["sample_id"] == "'" + formula
    assert rows[0]["error"].startswith("'+cmd")
    assert rows[1]["sample_id"] == "'@SUM(1+1)" and rows[1]["error"] == "'-1+1"
    with paths.samples_csv.open(encoding="utf-8", newline="") as fh:
        samples = list(csv.DictReader(fh))
    assert {r["sample_id"] for r in samples} == {"'" + formula, "'@SUM(1+1)"}
    assert {r["expected"] for r in samples} >= {"'\t=1+2"}


def test_thumbnails_never_block_or_decode_refused_files(seoul: Settings, tmp_path: Path,
                                                        ncm_dir: Path) -> None:
    """Failed images whose files changed since: a FIFO (opening it would block for ever), a link out
    of the watch folder, a real JPEG above `[reading] max_pixels`. None is opened or decoded; each
    is listed with the reason; the report is written."""
    small = seoul.replace(reading=ReadingSettings(max_pixels=100_000))
    folder = small.watch.folder / "lotF"
    folder.mkdir(parents=True)
    fifo = folder / "was-an-image.tif"
    os.mkfifo(fifo)
    outside = tmp_path / "outside.jpg"
    shutil.copy(_a_jpeg(ncm_dir), outside)
    (folder / "link.jpg").symlink_to(outside)
    big = folder / "big.jpg"  # 1280 x 960 > 100,000 pixels
    shutil.copy(_a_jpeg(ncm_dir), big)
    when = "2026-11-24T05:{:02d}:00.000+00:00"
    make_database(small.store.database, now=datetime(2026, 11, 24, 12, tzinfo=UTC), images=[
        {"path": str(p), "status": "failed", "error": "was refused", "processed_at": when.format(i)}
        for i, p in enumerate((fifo, folder / "link.jpg", big))])

    page = _parse(_report_in_thread(small))
    assert [i["alt"] for i in page.images if i["alt"] not in PLOTS] == []  # no thumbnail at all
    text = " ".join("".join(page.text).split())
    assert "not readable now: not a regular file: a FIFO" in text
    assert "outside the watch folder" in text
    assert "max_pixels" in text
