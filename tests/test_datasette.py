"""datasette/metadata.yml: it parses, names the database the daemon writes, and every canned query
runs (plain sqlite3, read-only, as datasette opens it) on a database written by the daemon's Store
and returns what was written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from semwatch.config import load_settings
from semwatch.store import db
from semwatch.store.ledger import Store
from semwatch.store.messages import Failed, Pending, Result
from semwatch.values import FileKey, ImageVerdict, utc_now

METADATA = Path(__file__).resolve().parents[1] / "datasette" / "metadata.yml"


def _queries() -> dict[str, dict[str, str]]:
    meta = yaml.safe_load(METADATA.read_text(encoding="utf-8"))
    database = load_settings(None, environ={}).store.database
    return meta["databases"][database.stem]["queries"]  # datasette names a database by its file stem


def _verdict(path: str, status: str, cls: str | None, confidence: float) -> ImageVerdict:
    comp, _, state = (cls or "").partition("_")
    return ImageVerdict(Path(path), status, cls, comp or None, state or None, confidence, 1.0, 6,
                        {cls: confidence} if cls else {})


@pytest.fixture
def database(tmp_path: Path) -> Path:
    """Written through the Store (the writer thread's code): a failing sample of two images, a
    sample with no expectation holding an unknown image, one failed image, one still pending."""
    path = tmp_path / "semwatch.db"
    settings = load_settings(None, environ={}, overrides={"samples": {"pass_confidence": 0.5}})
    store = Store(path, tmp_path / "results.csv", sample_settings=settings.samples)
    try:
        keys = [FileKey(f"/export/{name}", 1000 + i, i) for i, name in enumerate(
            ["lot1/a.tif", "lot1/b.tif", "lot2/c.tif", "lot2/broken.tif", "lot2/later.tif"])]
        store.apply([Pending(k, utc_now()) for k in keys])
        store.apply([
            Result(keys[0], "a" * 64, "lot1", _verdict(keys[0].path, "ok", "811_cycled", 0.9), "m1", "622"),
            Result(keys[1], "b" * 64, "lot1", _verdict(keys[1].path, "ok", "811_cycled", 0.8), "m1", "622"),
            Result(keys[2], "c" * 64, "lot2", _verdict(keys[2].path, "unknown", None, 0.3), "m1", None),
            Failed(keys[3], 4, "cannot decode: not a TIFF", None, "lot2"),
        ])
    finally:
        store.close()
    return path


def _run(database: Path, sql: str) -> list[dict[str, object]]:
    conn = db.connect(database, readonly=True)
    try:
        return [dict(r) for r in conn.execute(sql)]
    finally:
        conn.close()


def test_metadata_names_the_database_and_has_the_queries() -> None:
    queries = _queries()
    assert set(queries) == {"todays_failures", "samples_by_verdict", "unknown_images_by_day",
                            "throughput_per_hour"}
    for q in queries.values():
        assert q["title"] and q["description"] and q["sql"].lstrip().lower().startswith("select")


def test_canned_queries_on_a_database_written_by_the_store(database: Path) -> None:
    queries = _queries()
    today = utc_now()[:10]

    failures = _run(database, queries["todays_failures"]["sql"])
    assert sorted((r["kind"], r["name"], r["status"]) for r in failures) == [
        ("image", "/export/lot2/broken.tif", "failed"), ("sample", "lot1", "fail")]
    assert [r["at"] for r in failures] == sorted((r["at"] for r in failures), reverse=True)
    sample = next(r for r in failures if r["kind"] == "sample")
    assert sample["detail"] == "expected 622, found 811_cycled (0.85, 2 images)"

    by_verdict = {r["verdict"]: r for r in _run(database, queries["samples_by_verdict"]["sql"])}
    assert {v: (r["samples"], r["images"]) for v, r in by_verdict.items()} == {"fail": (1, 2),
                                                                               "unknown": (1, 2)}

    by_day = _run(database, queries["unknown_images_by_day"]["sql"])
    assert by_day == [{"day": today, "images": 4, "unknown": 1, "unknown_percent": 25.0}]

    hours = _run(database, queries["throughput_per_hour"]["sql"])
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:00Z", str(h["hour"])) for h in hours)
    assert sum(h["results"] for h in hours) == 4 and sum(h["failed"] for h in hours) == 1
    assert sum(h["tiles"] for h in hours) == 18
