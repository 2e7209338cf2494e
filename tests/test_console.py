"""The interactive console (`semwatch top` on a terminal), driven by Textual's pilot: tables,
filters, search, the detail screens, live updates from a database the real `Store` writes, and the
outdated-results counts (which `top --once` and the daemon's live view show too)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from rich.console import Console, RenderableType
from textual.pilot import Pilot
from textual.widgets import Footer, Input, Select, Static, TabbedContent

from conftest import Cli
from dbfixture import iso, make_database, settled
from semwatch.config import Settings
from semwatch.errors import ExitStatus
from semwatch.store import browse, db
from semwatch.store.ledger import Store
from semwatch.store.messages import DaemonStatus, Failed, Pending, Result
from semwatch.store.snapshot import take_snapshot
from semwatch.values import FileKey, ImageVerdict
from semwatch.views.console import ConsoleApp, ImageScreen, Rows, SampleScreen
from semwatch.views.console_views import parse_day
from semwatch.views.live import render

Script = Callable[[ConsoleApp, Pilot[int]], Awaitable[None]]


def _drive(settings: Settings, script: Script, *, size: tuple[int, int] = (80, 24),
           current_model: str | None = "m1", quit_at_end: bool = True) -> None:
    async def main() -> None:
        app = ConsoleApp(settings, current_model=current_model)
        async with app.run_test(size=size) as pilot:
            await pilot.pause()
            await script(app, pilot)
            if quit_at_end:
                await pilot.press("q")
    asyncio.run(main())


def _text(view: RenderableType | object, width: int = 100) -> str:
    console = Console(record=True, width=width, force_terminal=False)
    console.print(view)
    return console.export_text()


def _column(app: ConsoleApp, column: int, table: str = "#images-table") -> list[str]:
    t = app.screen.query_one(table, Rows)
    return [str(t.get_row_at(i)[column]) for i in range(t.row_count)]


def _summary(app: ConsoleApp) -> str:
    return str(app.summary())


async def _settle(pilot: Pilot[int], app: ConsoleApp, ticks: int = 3) -> None:
    """Long enough for the filter debounce (0.3 s) and a few polls."""
    await pilot.pause(max(0.4, ticks * app.interval))


def _fixture(settings: Settings) -> datetime:
    now = settled(datetime.now(UTC)) + timedelta(minutes=10)  # its rows all fall today, even at 00:03
    earlier = iso(now - timedelta(days=3))
    make_database(
        settings.store.database, now=now,
        images=[  # in the order the daemon took them in (the tables' order, newest first)
            {"path": "/export/lotC/c1.tif", "sample_id": "lotC", "model_id": "old-model",
             "detected_at": earlier, "processed_at": earlier},
            {"path": "/export/lotA/a1.tif", "sample_id": "lotA",
             "processed_at": iso(now - timedelta(minutes=5))},
            {"path": "/export/lotA/a2.tif", "sample_id": "lotA", "status": "unknown", "confidence": 0.41,
             "predicted_class": None, "composition": None, "state": None,
             "reasons": '["tiles disagree (agreement 0.35)"]',
             "processed_at": iso(now - timedelta(minutes=4))},
            {"path": "/export/lotB/broken.tif", "sample_id": "lotB", "status": "failed", "model_id": None,
             "error": "not a TIFF file: truncated header", "confidence": None, "predicted_class": None,
             "composition": None, "state": None, "probabilities": None,
             "processed_at": iso(now - timedelta(minutes=3))},
            {"path": "/export/lotB/b1.tif", "sample_id": "lotB", "composition": "811", "state": "cycled",
             "predicted_class": "811_cycled", "confidence": 0.97, "model_id": "old-model",
             "probabilities": '{"811_cycled": 0.97, "622_pristine": 0.03}',
             "processed_at": iso(now - timedelta(minutes=2))},
        ],
        samples=[{"sample_id": "lotA", "n_images": 2, "verdict": "pass", "expected": "622_pristine",
                  "updated_at": iso(now - timedelta(minutes=4))},
                 {"sample_id": "lotB", "n_images": 2, "composition": "811", "state": "cycled",
                  "predicted_class": "811_cycled", "expected": "622_pristine", "verdict": "fail",
                  "confidence": 0.97, "uniformity": 0.5, "updated_at": iso(now - timedelta(minutes=2))},
                 {"sample_id": "lotC", "n_images": 1, "updated_at": earlier}],
    )
    return now


def test_tables_show_images_and_samples_newest_first(settings: Settings) -> None:
    _fixture(settings)

    async def script(app: ConsoleApp, pilot: Pilot[int]) -> None:
        assert _column(app, 1) == ["b1.tif", "broken.tif", "a2.tif", "a1.tif", "c1.tif"]
        assert _column(app, 3) == ["ok", "failed", "unknown", "ok", "ok"]
        assert _column(app, 4)[0] == "811_cycled*"  # made by another model than the current one
        summary = _summary(app)
        assert "daemon running" in summary and "model m1" in summary
        assert "failed 1" in summary and "ok 2" in summary and "unknown 1" in summary  # today's only
        assert "outdated* 1 today, 2 in all" in summary
        await pilot.press("s")
        await _settle(pilot, app)
        # 80 columns: sample, verdict, n, found, expected, conf (time and uniformity need 100)
        assert _column(app, 0, "#samples-table") == ["lotB", "lotA", "lotC"]
        assert _column(app, 1, "#samples-table") == ["fail", "pass", "pass"]

    _drive(settings, script)


def test_filters_by_status_class_sample_and_day(settings: Settings) -> None:
    _fixture(settings)

    async def script(app: ConsoleApp, pilot: Pilot[int]) -> None:
        app.query_one("#img-status", Select).value = "ok"
        await _settle(pilot, app)
        assert _column(app, 1) == ["b1.tif", "a1.tif", "c1.tif"]
        app.query_one("#img-class", Select).value = "811_cycled"  # the models table's classes
        await _settle(pilot, app)
        assert _column(app, 1) == ["b1.tif"]
        await pilot.press("c")  # clear every filter
        await _settle(pilot, app)
        assert len(_column(app, 1)) == 5
        app.query_one("#img-sample", Input).value = "lotB"  # a prefix of the sample id
        await _settle(pilot, app)
        assert _column(app, 1) == ["b1.tif", "broken.tif"]
        app.query_one("#img-sample", Input).value = "lot"
        app.query_one("#img-day", Input).value = "today"
        await _settle(pilot, app)
        assert "c1.tif" not in _column(app, 1) and len(_column(app, 1)) == 4
        app.query_one("#img-day", Input).value = (date.today() - timedelta(days=3)).isoformat()
        await _settle(pilot, app)
        assert _column(app, 1) == ["c1.tif"]
        app.query_one("#img-day", Input).value = "not a day"  # ignored (and marked invalid)
        await _settle(pilot, app)
        assert len(_column(app, 1)) == 5
        # The samples tab has its own bar: verdict, class, sample, day.
        await pilot.press("s")
        app.query_one("#smp-verdict", Select).value = "fail"
        await _settle(pilot, app)
        assert _column(app, 0, "#samples-table") == ["lotB"]

    _drive(settings, script)


def test_search_by_file_name_from_the_keyboard(settings: Settings) -> None:
    _fixture(settings)

    async def script(app: ConsoleApp, pilot: Pilot[int]) -> None:
        await pilot.press("slash", *"broken", "enter")  # / focuses the search, Enter applies it
        await _settle(pilot, app)
        assert _column(app, 1) == ["broken.tif"]
        assert isinstance(app.focused, Rows)  # back on the table: q quits, arrows move
        await pilot.press("slash", *"100%_", "enter")  # LIKE's wildcards are searched for as text
        await _settle(pilot, app)
        assert _column(app, 1) == []

    _drive(settings, script)


def test_image_detail_shows_probabilities_reasons_model_and_timings(settings: Settings) -> None:
    _fixture(settings)

    async def script(app: ConsoleApp, pilot: Pilot[int]) -> None:
        await pilot.press("enter")  # the cursor is on the newest row, b1.tif
        await pilot.pause()
        assert isinstance(app.screen, ImageScreen)
        text = _text(app.screen.view)
        assert "b1.tif" in text and "/export/lotB" in text and "811 / cycled" in text
        assert "811_cycled   0.97" in text and "622_pristine 0.03" in text
        assert "outdated: current model is m1" in text and "old-model" in text
        assert "detected → done" in text and "(480.0 s)" in text  # detected 10 min, done 2 min ago
        assert "0.90 of 12 tiles" in text
        await pilot.press("escape", "down", "enter")  # broken.tif: why it failed
        await pilot.pause()
        text = _text(app.screen.view)
        assert "why it failed" in text and "not a TIFF file: truncated header" in text
        await pilot.press("escape", "down", "enter")  # a2.tif: why unknown
        await pilot.pause()
        assert "why unknown" in _text(app.screen.view) and "tiles disagree" in _text(app.screen.view)
        await pilot.press("escape")
        assert not isinstance(app.screen, ImageScreen)

    _drive(settings, script)


def test_wide_terminal_shows_the_highlighted_image_beside_the_table(settings: Settings) -> None:
    _fixture(settings)

    async def script(app: ConsoleApp, pilot: Pilot[int]) -> None:
        await pilot.press("down")  # broken.tif
        await pilot.pause()
        side = app.query_one("#image-side-detail", Static)
        assert side.region.width > 40
        assert "not a TIFF file" in _text(side.content)

    _drive(settings, script, size=(160, 45))


def test_sample_detail_and_its_images(settings: Settings) -> None:
    _fixture(settings)

    async def script(app: ConsoleApp, pilot: Pilot[int]) -> None:
        await pilot.press("s")
        await _settle(pilot, app)
        await pilot.press("enter")  # lotB
        await pilot.pause()
        assert isinstance(app.screen, SampleScreen)
        text = _text(app.screen.query_one("#sample-head", Static).content)
        assert "lotB" in text and "fail" in text
        assert "expected    622_pristine" in text and "found       811_cycled  (811 / cycled)" in text
        assert "uniformity  0.50" in text and "1× 811_cycled" in text and "1× failed" in text
        assert _column(app, 1, "#sample-images") == ["b1.tif", "broken.tif"]
        await pilot.press("down", "enter")  # one of its images, in detail
        await pilot.pause()
        assert isinstance(app.screen, ImageScreen) and "broken.tif" in _text(app.screen.view)
        await pilot.press("escape", "escape")
        assert not isinstance(app.screen, ImageScreen | SampleScreen)

    _drive(settings, script)


def _verdict(path: str, cls: str, confidence: float) -> ImageVerdict:
    return ImageVerdict(path=Path(path), status="ok", predicted_class=cls, composition=cls[:3],
                        state=cls[4:], confidence=confidence, tile_agreement=0.9, n_tiles=8,
                        probabilities={cls: confidence}, model_id="m1")


def test_follows_the_database_as_the_daemon_writes(settings: Settings) -> None:
    """Rows the real writer (`Store`) commits appear within a tick; a pending row that finishes is
    updated in place; a new version of a file replaces the old one; a filter applies to new rows."""
    settings = settings.replace(live=type(settings.live)(refresh_per_second=20.0))
    store = Store(settings.store.database, None)
    store.register_model("m1", "ncm", ["622_pristine", "811_cycled"], None, None, None)
    store.start_daemon(device="cpu", model_id="m1", watch_folder=Path("/export"), watch_mode="native")
    now = iso(datetime.now(UTC))
    first = FileKey("/export/lot1/first.tif", 10, 1)

    async def script(app: ConsoleApp, pilot: Pilot[int]) -> None:
        assert _column(app, 1) == [] and "daemon starting" in _summary(app)
        store.apply([Pending(first, now)])
        await _settle(pilot, app)
        assert _column(app, 1) == ["first.tif"] and _column(app, 3) == ["pending"]
        store.apply([Result(first, "a" * 64, "lot1", _verdict(first.path, "811_cycled", 0.93), "m1")])
        await _settle(pilot, app)
        assert _column(app, 3) == ["ok"] and _column(app, 4) == ["811_cycled"]
        app.query_one("#img-status", Select).value = "ok"
        await _settle(pilot, app)
        second, broken = FileKey("/export/lot1/second.tif", 10, 1), FileKey("/export/lot1/broken.tif", 3, 1)
        store.apply([Pending(second, now), Pending(broken, now),
                     Result(second, "b" * 64, "lot1", _verdict(second.path, "622_pristine", 0.8), "m1"),
                     Failed(broken, 3, "truncated"), DaemonStatus(state="running", waiting=4)])
        await _settle(pilot, app)
        assert _column(app, 1) == ["second.tif", "first.tif"]  # broken.tif is not ok
        assert "daemon running" in _summary(app) and "queue 4" in _summary(app)
        newer = FileKey(first.path, 11, 2)  # the file was written again
        store.apply([Pending(newer, now)])
        await _settle(pilot, app)
        assert _column(app, 1) == ["second.tif"]  # the old version left; the new one is pending
        store.apply([Result(newer, "c" * 64, "lot1", _verdict(first.path, "622_pristine", 0.7), "m1")])
        await _settle(pilot, app)
        assert _column(app, 1) == ["first.tif", "second.tif"]

    try:
        _drive(settings, script)
    finally:
        store.close()


def test_waits_for_a_database_that_does_not_exist_yet(settings: Settings) -> None:
    settings = settings.replace(live=type(settings.live)(refresh_per_second=20.0))

    async def script(app: ConsoleApp, pilot: Pilot[int]) -> None:
        assert "no database yet" in _summary(app)
        settings.store.database.write_bytes(b"")  # the daemon has just created the file
        await _settle(pilot, app)
        assert "not initialised yet" in _summary(app)
        settings.store.database.unlink()
        _fixture(settings)
        await _settle(pilot, app)
        assert "no database yet" not in _summary(app) and len(_column(app, 1)) == 5

    _drive(settings, script)


def test_names_are_shown_as_text(settings: Settings) -> None:
    now = datetime.now(UTC)
    make_database(settings.store.database, now=now, images=[
        {"path": "/export/x/[bold]evil\x1b]0;pwned\x07.tif", "sample_id": "[red]s\x1b[2J",
         "processed_at": iso(now)}])

    async def script(app: ConsoleApp, pilot: Pilot[int]) -> None:
        assert _column(app, 1) == ["[bold]evil\\x1b]0;pwned\\x07.tif"]
        assert _column(app, 2) == ["[red]s\\x1b[2J"]

    _drive(settings, script, size=(160, 45))


def test_parse_day() -> None:
    zone, today = ZoneInfo("Europe/Berlin"), date(2026, 11, 26)
    assert parse_day("today", zone, today=today) == today
    assert parse_day(" Yesterday ", zone, today=today) == date(2026, 11, 25)
    assert parse_day("2026-01-02", zone, today=today) == date(2026, 1, 2)
    assert parse_day("26.11.2026", zone, today=today) is None
    # A local day in UTC: Berlin's 26 November starts at 23:00 UTC the day before.
    assert browse.day_bounds(today, zone) == ("2026-11-25T23:00:00.000+00:00",
                                              "2026-11-26T23:00:00.000+00:00")


def test_outdated_counts(settings: Settings) -> None:
    """Current results of another model, today and in all; superseded rows and rows without a
    result (failed, pending) are not counted; with no model known, nothing is outdated."""
    now = _fixture(settings)
    conn = db.connect(settings.store.database)
    try:  # a superseded old-model row and a pending row: neither is a current result
        conn.execute("INSERT INTO images (path, size_bytes, mtime_ns, status, model_id, detected_at, "
                     "processed_at, current) "
                     "VALUES ('/export/lotA/a1.tif', 1, 0, 'ok', 'old-model', ?, ?, 0)",
                     (iso(now), iso(now)))
        conn.execute("INSERT INTO images (path, size_bytes, mtime_ns, status, detected_at) "
                     "VALUES ('/export/lotD/d.tif', 1, 0, 'pending', ?)", (iso(now),))
    finally:
        conn.close()
    today = browse.day_bounds(now.date(), ZoneInfo("UTC"))
    conn = db.connect(settings.store.database, readonly=True)
    try:
        assert browse.count_outdated(conn, "m1", today=today) == browse.Outdated("m1", 1, 2)
        assert browse.count_outdated(conn, "old-model", today=today) == browse.Outdated("old-model", 2, 2)
        assert browse.count_outdated(conn, "zzz", today=today).total == 4
        assert browse.count_outdated(conn, None, today=today) == browse.NO_OUTDATED
    finally:
        conn.close()
    text = _text(render(take_snapshot(settings, now=now, current_model="m1"), settings), 200)
    assert "outdated 1 today, 2 in all (results of another model than m1)" in text
    # Without a readable configured model, the daemon's model (m1 in the fixture) is the current one.
    assert "outdated 1 today, 2 in all" in _text(render(take_snapshot(settings, now=now), settings), 200)


def test_top_once_prints_the_outdated_counts(cli: Cli, settings: Settings, tmp_path: Path) -> None:
    """`top --once` (and `top` into a pipe) compares with the configured model's id, read from its
    manifest; a model that cannot be read falls back to the daemon's."""
    _fixture(settings)
    config = tmp_path / "config.toml"
    config.write_text(f'[store]\ndatabase = "{settings.store.database}"\n'
                      f'[model]\npath = "{tmp_path / "no-model"}"\n', encoding="utf-8")
    run = cli("top", "--once", "--config", config, env={"COLUMNS": "200"})
    assert run.code == ExitStatus.OK, run.err
    assert "outdated 1 today, 2 in all (results of another model than m1)" in run.out


@pytest.mark.slow  # the session's tiny model: trained once for the whole suite
def test_current_model_is_the_configured_one(cli: Cli, settings: Settings, tmp_path: Path,
                                             tiny_model: Path) -> None:
    """With a readable `[model] path`, its manifest's id is the current model: every result in the
    fixture (made by m1 and old-model) is then outdated."""
    from semwatch.views.live import current_model_id

    model_id = current_model_id(settings.replace(model=type(settings.model)(path=tiny_model)))
    assert model_id is not None and len(model_id) == 16
    _fixture(settings)
    config = tmp_path / "config.toml"
    config.write_text(f'[store]\ndatabase = "{settings.store.database}"\n'
                      f'[model]\npath = "{tiny_model}"\n', encoding="utf-8")
    run = cli("top", "--once", "--config", config, env={"COLUMNS": "200"})
    assert run.code == ExitStatus.OK, run.err
    assert f"outdated 3 today, 4 in all (results of another model than {model_id})" in run.out


def test_mouse_tabs_rows_and_footer(settings: Settings) -> None:
    """A click on a tab switches to it; a click on the highlighted row opens it; the footer's keys
    are buttons."""
    _fixture(settings)

    async def script(app: ConsoleApp, pilot: Pilot[int]) -> None:
        await pilot.click("#--content-tab-samples")
        await _settle(pilot, app)
        assert app.query_one(TabbedContent).active == "samples"
        table = app.query_one("#samples-table", Rows)
        await pilot.click(table, offset=(3, 2))  # the header, then lotB, lotA: highlights lotA
        await pilot.pause()
        assert table.cursor_row == 1
        await pilot.click(table, offset=(3, 2))  # again: opens it
        await pilot.pause()
        assert isinstance(app.screen, SampleScreen) and app.screen.detail.sample.sample_id == "lotA"
        await pilot.press("escape")
        await pilot.click(Footer, offset=(15, 0))  # "q Quit", after "⏎ Detail"
        await pilot.pause()
        assert app.return_code == 0 and not app.is_running

    _drive(settings, script, quit_at_end=False)


def test_the_header_shows_the_daemons_problem(settings: Settings) -> None:
    """A running daemon's message (a frozen share, a full disk, a stuck stage) is on the first line."""
    now = datetime.now(UTC)
    make_database(settings.store.database, now=now, images=[{"processed_at": iso(now)}],
                  message="watch folder unreachable: /mnt/sem has not answered for 12 s")

    async def script(app: ConsoleApp, pilot: Pilot[int]) -> None:
        first = _summary(app).splitlines()[0]
        assert "daemon running" in first and "watch folder unreachable: /mnt/sem" in first

    _drive(settings, script, size=(200, 24))
