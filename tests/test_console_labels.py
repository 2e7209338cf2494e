"""The console's labelling keys and its Review tab (Textual's pilot, 80 x 24): labels written by
the same function as `semwatch label`, seen by the console at its next poll."""

from __future__ import annotations

import json

from textual.pilot import Pilot
from textual.widgets import Input

from semwatch.config import Settings
from semwatch.store import db
from semwatch.store.labels import current_labels
from semwatch.views.console import ConsoleApp, ImageScreen, Rows
from semwatch.views.labelling import ClassChooser
from test_console import _column, _drive, _fixture, _settle, _text


def _labels(settings: Settings) -> dict[str, tuple[str, str | None]]:
    conn = db.connect(settings.store.database, readonly=True)
    try:
        return {lab.path or "": (lab.status, lab.class_name) for lab in current_labels(conn)}
    finally:
        conn.close()


def _select(app: ConsoleApp, table: str, row: int) -> None:
    app.query_one(table, Rows).move_cursor(row=row, animate=False)


def test_review_tab_and_labelling_keys(settings: Settings) -> None:
    _fixture(settings)

    async def script(app: ConsoleApp, pilot: Pilot[int]) -> None:
        await pilot.press("r")
        await _settle(pilot, app)
        # Unknown first, then the image of a failed sample, then low confidence; the failed read
        # has nothing to label.
        assert _column(app, 0, "#review-table") == ["unknown", "fail", "low conf", "low conf"]
        assert [f.rsplit("/", 1)[-1] for f in _column(app, 1, "#review-table")] == [
            "a2.tif", "b1.tif", "a1.tif", "c1.tif"]
        # l on the unknown image: the chooser offers the known classes; a new one is typed.
        _select(app, "#review-table", 0)
        await pilot.press("l")
        await pilot.pause()
        assert isinstance(app.screen, ClassChooser)
        assert "811_cycled" in app.screen.known
        app.screen.query_one("#chooser-name", Input).value = "NCA cycled"  # not a class name
        await pilot.press("enter")
        await _settle(pilot, app)
        assert not isinstance(app.screen, ClassChooser) and _labels(settings) == {}  # refused, said so
        await pilot.press("l")
        await pilot.pause()
        app.screen.query_one("#chooser-name", Input).value = "NCA_cycled"
        await pilot.press("enter")
        await _settle(pilot, app)
        assert _labels(settings) == {"/export/lotA/a2.tif": ("corrected", "NCA_cycled")}
        assert _column(app, 0, "#review-table") == ["fail", "low conf", "low conf"]  # a2 is done
        # y confirms the highlighted verdict; x marks foreign.
        _select(app, "#review-table", 0)
        await pilot.press("y")
        await _settle(pilot, app)
        _select(app, "#review-table", 1)  # c1 (a1 is row 0 now)
        await pilot.press("x")
        await _settle(pilot, app)
        assert _labels(settings) == {"/export/lotA/a2.tif": ("corrected", "NCA_cycled"),
                                     "/export/lotB/b1.tif": ("confirmed", "811_cycled"),
                                     "/export/lotC/c1.tif": ("foreign", None)}
        assert [f.rsplit("/", 1)[-1] for f in _column(app, 1, "#review-table")] == ["a1.tif"]
        # In an image's detail: u takes back b1's confirmation; it is back in the review list.
        await pilot.press("i")
        await _settle(pilot, app)
        assert _column(app, 1)[0] == "b1.tif"
        _select(app, "#images-table", 0)
        await pilot.press("enter")
        await pilot.pause()
        await pilot.press("u")
        await _settle(pilot, app)
        await pilot.press("escape")
        assert "/export/lotB/b1.tif" not in _labels(settings)
        await pilot.press("r")
        await _settle(pilot, app)
        assert "fail" in _column(app, 0, "#review-table")
        # y on an image without a verdict: refused, nothing written.
        await pilot.press("i")
        await _settle(pilot, app)
        _select(app, "#images-table", 1)  # broken.tif: failed, no content
        await pilot.press("y")
        await _settle(pilot, app)
        assert len(_labels(settings)) == 2

    _drive(settings, script)


def test_review_counts_shadow_disagreements_when_the_table_exists(settings: Settings) -> None:
    _fixture(settings)
    conn = db.connect(settings.store.database)
    try:  # shadow verdicts as the daemon writes them (schema step 5's table): one disagrees
        for sha, agrees in ((f"{1:064x}", 0), (f"{0:064x}", 1)):  # a1, c1
            conn.execute("INSERT INTO shadow_results (path, sha256, model_id, status, agrees, created_at) "
                         "VALUES ('x.tif', ?, 'shadow', 'ok', ?, '2026-12-04T00:00:00.000Z')", (sha, agrees))
    finally:
        conn.close()

    async def script(app: ConsoleApp, pilot: Pilot[int]) -> None:
        await pilot.press("r")
        await _settle(pilot, app)
        assert _column(app, 0, "#review-table") == ["unknown", "shadow", "fail", "low conf"]
        assert json.dumps(_column(app, 1, "#review-table")[1]).endswith('a1.tif"')

    _drive(settings, script)


def test_an_images_detail_shows_its_labels(settings: Settings) -> None:
    from semwatch.store.labels import add_label, writing
    from semwatch.store.ledger import Store

    _fixture(settings)
    store = Store(settings.store.database, None)
    try:
        with writing(store) as conn:  # b1 (the newest row) is sha256 4
            add_label(conn, f"{4:064x}", "confirmed", "811_cycled", "ana", note="looked twice")
            add_label(conn, f"{4:064x}", "corrected", "NCA_cycled", "ben")
    finally:
        store.close()

    async def script(app: ConsoleApp, pilot: Pilot[int]) -> None:
        _select(app, "#images-table", 0)
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, ImageScreen)
        text = _text(app.screen.view, 120)
        assert "confirmed 811_cycled  by ana  (looked twice)" in text
        assert "▶" in text and "is NCA_cycled  by ben" in text
        await pilot.press("escape")

    _drive(settings, script)
