"""`semwatch top` on a terminal: the interactive console (Textual) over the daemon database.

Two tabs, images and samples, each a scrollable table with its own filter bar (status or verdict,
class, sample id prefix, day; images also a search in the path); Enter (or a click on the
highlighted row) opens the detail of one image or one sample; on a wide terminal the highlighted
image's detail also shows in a side pane. The footer lists the keys.

The console only presents: every query is in `semwatch.store.browse`, on one read-only connection
(`db.connect(readonly=True)`), polled `[live] refresh_per_second` times a second. A poll that finds
the database unchanged (`PRAGMA data_version`) reads nothing else; a changed one reads the rows
written since the last poll and the shown or pending rows by id, never the whole ledger (a search
by name scans once, when it changes). A database that does not exist yet, or cannot be read, is
shown as a message and retried at every poll.

Everything that comes from the export folder or the database is shown through `live.shown`
(printable, never parsed as markup) like the rich dashboard.
"""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, date, datetime
from typing import ClassVar
from zoneinfo import ZoneInfo

from rich.console import RenderableType
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.timer import Timer
from textual.validation import Function
from textual.widgets import DataTable, Footer, Input, Select, Static, TabbedContent, TabPane

from semwatch.config import Settings
from semwatch.store import browse, db
from semwatch.store.access import ReadRefused, open_readonly
from semwatch.store.instrument import read as read_instrument
from semwatch.store.snapshot import DaemonRow, heartbeat_age, read_daemon
from semwatch.views import labelling
from semwatch.views.console_views import (
    fit,
    image_cells,
    image_columns,
    image_detail_view,
    parse_day,
    sample_columns,
    sample_detail_view,
    when_text,
)
from semwatch.views.live import VERDICT_STYLE, age_text, fmt_conf, shown

PAGE = 1000  # rows a table holds: the newest matching ones (a filter narrows, scrolling pages)
WIDE = 120  # columns from which the highlighted image's detail shows beside the table
SIDE_WIDTH = 56  # #image-side's width in the CSS
SLOW_EVERY_S = 5.0  # the outdated total (up to ~30 ms on 500,000 rows) is read at most this often


class Rows(DataTable[RenderableType]):
    """A table of rows whose Enter is listed in the footer."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("enter", "select_cursor", "Detail")]


class ImageScreen(Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q", "app.pop_screen", "Back")]

    def __init__(self, view: RenderableType, image_id: int | None = None) -> None:
        super().__init__()
        self.view = view
        self.image_id = image_id  # the labelling keys act on it

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="detail-scroll"):
            yield Static(self.view, id="detail")
        yield Footer(show_command_palette=False)


class SampleScreen(Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q", "app.pop_screen", "Back")]

    def __init__(self, detail: browse.SampleDetail, console: ConsoleApp) -> None:
        super().__init__()
        self.detail = detail
        self.console = console

    def compose(self) -> ComposeResult:
        yield Static(sample_detail_view(self.detail), id="sample-head")
        yield Rows(id="sample-images", cursor_type="row", zebra_stripes=True)
        yield Footer(show_command_palette=False)

    def on_mount(self) -> None:
        table = self.query_one("#sample-images", Rows)
        self.console.fill_images(table, list(self.detail.images))
        table.focus()

    @on(Rows.RowSelected, "#sample-images")
    def _open(self, event: Rows.RowSelected) -> None:
        self.console.open_image(int(str(event.row_key.value)))


class ConsoleApp(labelling.LabelKeys):
    """The console; `run_test` drives it in tests, `run` on a terminal."""

    TITLE = "semwatch"
    ENABLE_COMMAND_PALETTE = False  # its key would take a footer slot that 80 columns need
    # App.CSS rather than DEFAULT_CSS: it outranks the widgets' own (TabbedContent's height: auto).
    CSS = """
    Screen { overflow: hidden; }
    #summary { height: 3; padding: 0 1; background: $panel; text-wrap: nowrap; text-overflow: ellipsis; }
    TabbedContent { height: 1fr; }
    TabbedContent > ContentSwitcher { height: 1fr; }
    TabPane { height: 1fr; padding: 0; }
    .filters { height: 1; margin: 0 0 0 0; }
    .filters Select { width: 14; margin-right: 1; }
    .filters Select.class { width: 18; }
    .filters Input { width: 14; margin-right: 1; }
    .filters Input.search { width: 1fr; margin-right: 0; }
    .body { height: 1fr; }
    .body Rows { width: 1fr; height: 1fr; }
    #image-side { width: 56; height: 1fr; border-left: solid $primary; padding: 0 1; display: none; }
    #image-side.shown { display: block; }
    #detail-scroll { padding: 0 1; }
    #sample-head { height: auto; max-height: 12; padding: 0 1; border-bottom: solid $primary; }
    #sample-images { height: 1fr; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        Binding("slash", "search", "Search"),
        Binding("f", "filters", "Filter"),
        Binding("c", "clear_filters", "Clear"),
        Binding("i", "tab('images')", "Images"),
        Binding("s", "tab('samples')", "Samples"),
        Binding("r", "tab('review')", "Review"),
        Binding("escape", "to_table", "Table", show=False),
        *labelling.LABEL_BINDINGS,
    ]

    def __init__(self, settings: Settings, *, current_model: str | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.zone = ZoneInfo(settings.report.timezone)
        self.current_model = current_model
        self.interval = 1.0 / settings.live.refresh_per_second
        self.conn: db.TrackedConnection | None = None
        self.problem: str | None = None
        self.version: int | None = None
        self.image_filter = browse.ImageFilter()
        self.sample_filter = browse.SampleFilter()
        self.images: dict[int, browse.ImageRow] = {}
        self.high = 0
        self.pending: frozenset[int] = frozenset()
        self.images_stale = True  # the filter changed: read the page again
        self.samples_stale = True
        self.samples: tuple[browse.SampleRow, ...] = ()
        self.samples_shown = 0
        self.image_widths: dict[str, int] = {}
        self.daemon: DaemonRow | None = None
        self.today_counts: dict[str, int] = {}
        self.outdated = browse.NO_OUTDATED
        self.slow_at = 0.0
        self.class_names: tuple[str, ...] = ()
        self._debounce: Timer | None = None
        self.review_stale = True
        self.review: list[labelling.ReviewRow] = []
        self.instrument: str | None = None  # the database's `[instrument]` label

    # --- layout ---------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        day_ok = Function(lambda t: not t.strip() or parse_day(t, self.zone) is not None, "a day")
        yield Static(id="summary")
        with TabbedContent(initial="images"):
            with TabPane("Images", id="images"):
                with Horizontal(classes="filters"):
                    yield Select([(s, s) for s in browse.IMAGE_STATUSES], prompt="status", compact=True,
                                 id="img-status")
                    yield Select([], prompt="class", compact=True, id="img-class", classes="class")
                    yield Input(placeholder="sample", compact=True, id="img-sample")
                    yield Input(placeholder="day", compact=True, id="img-day", validators=[day_ok],
                                valid_empty=True)
                    yield Input(placeholder="/ file name", compact=True, id="img-search", classes="search")
                with Horizontal(classes="body"):
                    yield Rows(id="images-table", cursor_type="row", zebra_stripes=True)
                    with VerticalScroll(id="image-side"):
                        yield Static(id="image-side-detail")
            with TabPane("Samples", id="samples"):
                with Horizontal(classes="filters"):
                    yield Select([(v, v) for v in browse.VERDICTS], prompt="verdict", compact=True,
                                 id="smp-verdict")
                    yield Select([], prompt="class", compact=True, id="smp-class", classes="class")
                    yield Input(placeholder="sample", compact=True, id="smp-sample")
                    yield Input(placeholder="day", compact=True, id="smp-day", validators=[day_ok],
                                valid_empty=True)
                with Horizontal(classes="body"):
                    yield Rows(id="samples-table", cursor_type="row", zebra_stripes=True)
            with TabPane("Review", id="review"):
                yield Rows(id="review-table", cursor_type="row", zebra_stripes=True)
        yield Footer(show_command_palette=False)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """The main screen's keys do nothing (and leave the footer) while a detail is open."""
        if action in ("search", "filters", "clear_filters", "tab", "to_table"):
            return self.screen is self.screen_stack[0]
        if action == "label":  # on an image (a table's or a detail's), not in the class chooser
            return not isinstance(self.screen, labelling.ClassChooser)
        return True

    def on_mount(self) -> None:
        self.poll()
        self.set_interval(self.interval, self.poll)
        self.query_one("#images-table", Rows).focus()

    def on_resize(self) -> None:
        self.query_one("#image-side").set_class(self.size.width >= WIDE, "shown")
        self.images_stale = True  # the file column's width follows the terminal's
        self.samples_stale = True
        self.poll(force=True)

    def on_unmount(self) -> None:
        self._close()

    # --- reading the database -------------------------------------------------------------------

    def _close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.version = None

    def _open(self) -> db.TrackedConnection | None:
        path = self.settings.store.database
        if self.conn is None:
            try:
                self.conn = open_readonly(path, busy_timeout_ms=self.settings.store.busy_timeout_ms)
            except ReadRefused as exc:
                self.problem = str(exc)
                return None
        return self.conn

    def poll(self, *, force: bool = False) -> None:
        """One tick: read what changed (nothing when the database did not), then redraw."""
        conn = self._open()
        if conn is not None:
            try:
                self._read(conn, force)
                self.problem = None
            except sqlite3.Error as exc:
                self._close()  # reopened at the next tick (the file may have been replaced)
                path = self.settings.store.database
                self.problem = (f"database {path} is not initialised yet" if "no such table" in str(exc)
                                else f"cannot read {path}: {exc}")
                self.images_stale = self.samples_stale = True
        self._show_summary()

    def _today(self) -> date:
        return datetime.now(self.zone).date()

    def _read(self, conn: sqlite3.Connection, force: bool) -> None:
        version = int(conn.execute("PRAGMA data_version").fetchone()[0])
        changed = version != self.version
        self.version = version
        now = time.monotonic()
        if changed or force:
            today = browse.day_bounds(self._today(), self.zone)
            self.daemon = read_daemon(conn)
            named = read_instrument(conn)
            self.instrument = named.label if named is not None else None
            self.today_counts = browse.status_counts(conn, day=today)
            if now - self.slow_at >= SLOW_EVERY_S or force or self.images_stale:
                self.slow_at = now
                self.outdated = browse.count_outdated(conn, self._model(), today=today)
                self._set_classes(browse.known_classes(conn))
        if self.images_stale:
            self.images_stale = False
            self.high = browse.high_water(conn)
            self.images = {r.id: r for r in browse.list_images(conn, self.image_filter, limit=PAGE)}
            self.pending = browse.pending_ids(conn)
            self._show_images()
        elif changed:
            found = browse.changes_since(conn, self.image_filter, after=self.high,
                                         watched=set(self.images) | self.pending, limit=PAGE)
            self.high = found.high_water
            self.pending = browse.pending_ids(conn)
            rows = dict(self.images)
            for i in found.gone:
                rows.pop(i, None)
            rows.update((r.id, r) for r in found.rows)
            newest = dict(sorted(rows.items(), reverse=True)[:PAGE])
            if newest != self.images:
                old, self.images = self.images, newest
                self._patch_images(old)
        if self._active() == "review" and (self.review_stale or changed):
            self.review_stale = False
            self._show_review(labelling.read_review(conn, self.settings))
        if self._active() == "samples" and (self.samples_stale or changed):
            samples = browse.list_samples(conn, self.sample_filter, limit=PAGE)
            if self.samples_stale or samples != self.samples:  # a heartbeat changes no sample
                self.samples_stale, self.samples = False, samples
                self._show_samples(samples)

    def _model(self) -> str | None:
        return self.current_model or (self.daemon.model_id if self.daemon else None)

    def _set_classes(self, classes: tuple[str, ...]) -> None:
        if classes == self.class_names:
            return
        self.class_names = classes
        for sel in (self.query_one("#img-class", Select), self.query_one("#smp-class", Select)):
            keep = sel.value
            sel.set_options([(c, c) for c in classes])
            if keep in classes:
                sel.value = keep

    def _active(self) -> str:
        return self.query_one(TabbedContent).active

    # --- drawing --------------------------------------------------------------------------------

    def summary(self) -> Text:
        """Three lines: the daemon, the model and its outdated results, today's counts."""
        lines = [Text(), Text(), Text()]
        d = self.daemon
        if self.problem:
            lines[0].append(shown(self.problem, "bold yellow"))
        elif d is None:
            lines[0].append("no daemon has written to this database yet", style="bold yellow")
        else:
            age = heartbeat_age(d, datetime.now(UTC))
            stale = age is None or age > self.settings.live.stale_seconds
            lines[0].append(shown(f"daemon {d.state}", "bold yellow" if stale or d.state != "running"
                                  else "bold green"))
            if stale and d.state == "running":
                lines[0].append(" (no heartbeat: not running or hung?)", style="bold red")
            lines[0].append(f" · heartbeat {age_text(age)} · {d.images_per_s:.2f} img/s · "
                            f"queue {d.waiting} · in progress {d.in_progress}")
            if d.message and d.state == "running":  # its problem now: a frozen share, a full disk, stuck
                lines[0].append(shown(f" · {d.message}", "bold red"))
        model = self._model()
        if self.instrument:
            lines[1].append("instrument ", style="dim")
            lines[1].append(shown(self.instrument, "bold"))
            lines[1].append(" · ", style="dim")
        if model:
            lines[1].append("model ", style="dim")
            lines[1].append(shown(model))
            o = self.outdated
            lines[1].append(" · outdated* ", style="dim")
            lines[1].append(f"{o.today} today, {o.total} in all",
                            style="bold yellow" if o.total else "")
            lines[1].append(" (*: by another model)", style="dim")
        lines[2].append("today ", style="dim")
        lines[2].append(shown("  ".join(f"{k} {v}" for k, v in sorted(self.today_counts.items()))
                              or "nothing yet"))
        images = self._active() == "images"
        shown_n = len(self.images) if images else self.samples_shown
        filtered = (self.image_filter != browse.ImageFilter() if images
                    else self.sample_filter != browse.SampleFilter())
        lines[2].append(f" · {shown_n}{'+' if shown_n >= PAGE else ''} shown", style="dim")
        if filtered:
            lines[2].append(" (filtered)", style="bold cyan")
        return Text("\n").join(lines)

    def _show_summary(self) -> None:
        self.query_one("#summary", Static).update(self.summary())

    def fill_images(self, table: Rows, rows: list[browse.ImageRow]) -> None:
        """(Re)draw an images table, keeping the cursor on the same image."""
        keep = self._cursor_key(table)
        # Sized from the terminal (the table may not be laid out yet), less the side pane.
        widths = image_columns(self.size.width - (SIDE_WIDTH if self.size.width >= WIDE else 0))
        table.clear(columns=True)
        for name, width in widths.items():
            table.add_column(name, width=width, key=name)
        today = self._today()
        for r in rows:
            table.add_row(*image_cells(r, self.zone, today, self._model(), widths), key=str(r.id))
        self._restore_cursor(table, keep)
        self.image_widths = widths

    def _patch_images(self, old: dict[int, browse.ImageRow]) -> None:
        """Apply a poll's changes to the images table row by row: rebuilding 1,000 rows costs
        about 0.1 s of a core, every second while the daemon is busy."""
        table = self.query_one("#images-table", Rows)
        new = self.images
        added = new.keys() - old.keys()
        changed = [i for i in new.keys() & old.keys() if new[i] != old[i]]
        if not self.image_widths or len(added) + len(changed) > PAGE // 4 or not old:
            self._show_images()
            return
        keep = self._cursor_key(table)
        today, model = self._today(), self._model()
        for i in old.keys() - new.keys():
            table.remove_row(str(i))
        for i in changed:
            cells = image_cells(new[i], self.zone, today, model, self.image_widths)
            for column, cell in zip(self.image_widths, cells, strict=True):
                table.update_cell(str(i), column, cell)
        for i in sorted(added):
            table.add_row(*image_cells(new[i], self.zone, today, model, self.image_widths), key=str(i))
        if added:
            table.sort("time", key=lambda stamp: -stamp.order)
        self._restore_cursor(table, keep)
        if not new:
            self._side(Text("no images match", style="dim"))

    def _show_images(self) -> None:
        table = self.query_one("#images-table", Rows)
        self.fill_images(table, browse.ordered(list(self.images.values())))
        if not self.images:
            self._side(Text("no images match" if self.image_filter != browse.ImageFilter()
                            else "no images yet", style="dim"))

    def _show_samples(self, rows: tuple[browse.SampleRow, ...]) -> None:
        table = self.query_one("#samples-table", Rows)
        self.samples_shown = len(rows)
        keep = self._cursor_key(table)
        table.clear(columns=True)
        widths = sample_columns(self.size.width)
        for name, width in widths.items():
            table.add_column(name, width=width)
        today = self._today()
        for s in rows:
            cells: dict[str, RenderableType] = {
                "updated": when_text(s.updated_at, self.zone, today),
                "sample": shown(fit(s.sample_id, widths["sample"])),
                "verdict": shown(s.verdict, VERDICT_STYLE.get(s.verdict, "")), "n": str(s.n_images),
                "found": shown(s.predicted_class or "–"), "expected": shown(s.expected or "–"),
                "conf": fmt_conf(s.confidence), "unif": fmt_conf(s.uniformity)}
            table.add_row(*(cells[k] for k in widths), key=s.sample_id)
        self._restore_cursor(table, keep)

    def _show_review(self, rows: list[labelling.ReviewRow]) -> None:
        table = self.query_one("#review-table", Rows)
        if rows == self.review and table.row_count == len(rows):
            return
        self.review, keep = rows, self._cursor_key(table)
        labelling.fill_review(table, rows, self.size.width, fit)
        self._restore_cursor(table, keep)

    @staticmethod
    def _cursor_key(table: Rows) -> str | None:
        if table.row_count == 0:
            return None
        try:
            return str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
        except Exception:  # an empty or just-cleared table has no cell under the cursor
            return None

    @staticmethod
    def _restore_cursor(table: Rows, key: str | None) -> None:
        if key is None:
            return
        try:
            table.move_cursor(row=table.get_row_index(key), animate=False)
        except Exception:  # the row left the table (superseded, filtered out): stay at the top
            pass

    def _side(self, view: RenderableType) -> None:
        self.query_one("#image-side-detail", Static).update(view)

    # --- events ---------------------------------------------------------------------------------

    @on(Rows.RowHighlighted, "#images-table")
    def _highlighted(self, event: Rows.RowHighlighted) -> None:
        if self.size.width < WIDE or self.conn is None or event.row_key.value is None:
            return
        detail = browse.image_detail(self.conn, int(event.row_key.value))
        if detail is not None:
            self._side(image_detail_view(detail, self.zone, self._model()))

    @on(Rows.RowSelected, "#images-table")
    def _image_selected(self, event: Rows.RowSelected) -> None:
        if event.row_key.value is not None:
            self.open_image(int(event.row_key.value))

    @on(Rows.RowSelected, "#review-table")
    def _review_selected(self, event: Rows.RowSelected) -> None:
        if event.row_key.value is not None:
            self.open_image(int(event.row_key.value))

    @on(Rows.RowSelected, "#samples-table")
    def _sample_selected(self, event: Rows.RowSelected) -> None:
        if self.conn is None or event.row_key.value is None:
            return
        detail = browse.sample_detail(self.conn, str(event.row_key.value))
        if detail is not None:
            self.push_screen(SampleScreen(detail, self))

    def open_image(self, image_id: int) -> None:
        if self.conn is None:
            return
        detail = browse.image_detail(self.conn, image_id)
        if detail is not None:
            view = labelling.with_label(self.conn, detail.sha256,
                                        image_detail_view(detail, self.zone, self._model()))
            self.push_screen(ImageScreen(view, image_id))

    @on(TabbedContent.TabActivated)
    def _tab(self) -> None:
        self.samples_stale = self.review_stale = True
        self.poll(force=True)
        self.action_to_table()

    @on(Select.Changed)
    @on(Input.Changed)
    def _filter_changed(self) -> None:
        # Typing waits for a pause: a search by name reads the ledger once per change.
        if self._debounce is not None:
            self._debounce.stop()
        self._debounce = self.set_timer(0.3, self.apply_filters)

    @on(Input.Submitted)
    def _submitted(self) -> None:
        self.apply_filters()
        self.action_to_table()

    def _select(self, selector: str) -> str | None:
        value = self.query_one(selector, Select).value
        return value if isinstance(value, str) else None

    def _day(self, selector: str) -> tuple[str, str] | None:
        day = parse_day(self.query_one(selector, Input).value, self.zone)
        return browse.day_bounds(day, self.zone) if day is not None else None

    def apply_filters(self) -> None:
        """Read the filter bars; a changed filter reads its page again."""
        images = browse.ImageFilter(
            status=self._select("#img-status"), predicted_class=self._select("#img-class"),
            sample=self.query_one("#img-sample", Input).value.strip(), day=self._day("#img-day"),
            search=self.query_one("#img-search", Input).value.strip())
        samples = browse.SampleFilter(
            verdict=self._select("#smp-verdict"), predicted_class=self._select("#smp-class"),
            sample=self.query_one("#smp-sample", Input).value.strip(), day=self._day("#smp-day"))
        if images != self.image_filter:
            self.image_filter, self.images_stale = images, True
        if samples != self.sample_filter:
            self.sample_filter, self.samples_stale = samples, True
        if self.images_stale or self.samples_stale:
            self.poll(force=True)

    # --- actions --------------------------------------------------------------------------------

    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab

    def action_search(self) -> None:
        self.action_tab("images")
        self.query_one("#img-search", Input).focus()

    def action_filters(self) -> None:
        self.query_one("#img-status" if self._active() == "images" else "#smp-verdict", Select).focus()

    def action_clear_filters(self) -> None:
        for sel in self.query(Select):
            sel.clear()
        for box in self.query(Input):
            box.value = ""
        self.apply_filters()

    def action_to_table(self) -> None:
        self.query_one(f"#{self._active()}-table", Rows).focus()

    # --- labels (views/labelling.py) ------------------------------------------------------------

    def labelling_target(self) -> int | None:
        """The image the labelling keys act on: the open detail's, else the highlighted row's."""
        if isinstance(self.screen, ImageScreen):
            return self.screen.image_id
        table = (self.screen.query_one("#sample-images", Rows) if isinstance(self.screen, SampleScreen)
                 else self.query_one(f"#{self._active()}-table", Rows))
        if table.id == "samples-table":
            return None  # a sample is not an image
        key = self._cursor_key(table)
        return int(key) if key is not None else None

    def label_about(self, image_id: int) -> str:
        row = self.images.get(image_id)
        return row.path if row is not None else f"image {image_id}"


def run_console(settings: Settings, *, current_model: str | None) -> int:
    """Run the console on this terminal until q (or Ctrl-C); returns 0."""
    ConsoleApp(settings, current_model=current_model).run()
    return 0

