"""The console's labelling: keys on an image (in a table or its detail) and the Review tab.

Keys: `y` confirm the verdict, `l` label a class (a known one, or type a new one that follows the
class-name rule), `x` mark foreign, `u` undo the newest label. A label is written by the same
library function as `semwatch label` (`lifecycle.labelling.write_labels`: a short write connection
under the database's write lock); the console itself keeps reading on its read-only connection and
sees the label at its next poll. The Review tab lists unlabelled results, the ones worth a minute
first (`store.review`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from rich.console import Group, RenderableType
from rich.text import Text
from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Input, Select, Static

from semwatch.errors import UserError
from semwatch.lifecycle.labelling import Action, LabelChange, write_labels
from semwatch.safefs import printable
from semwatch.store import labels as lab
from semwatch.store.review import ReviewRow, review_queue
from semwatch.views.live import STATUS_STYLE, fmt_conf, shown

if TYPE_CHECKING:
    import sqlite3

    from semwatch.config import Settings
    from semwatch.store.db import TrackedConnection

__all__ = ["LABEL_BINDINGS", "Action", "ClassChooser", "LabelKeys", "ReviewRow", "fill_review",
           "label_classes", "read_review", "try_write"]

LABEL_BINDINGS: list[BindingType] = [
    Binding("y", "label('confirm')", "Confirm"),
    Binding("l", "label('class')", "Label"),
    Binding("x", "label('foreign')", "Foreign"),
    Binding("u", "label('undo')", "Undo"),
]
REVIEW_PAGE = 500


class ClassChooser(ModalScreen[str | None]):
    """Choose the class of an image: a known class from the list, or type a new one; Enter
    labels, Escape cancels."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]
    DEFAULT_CSS = """
    ClassChooser { align: center middle; }
    ClassChooser > Vertical { width: 60; height: auto; border: round $primary; padding: 0 1;
                              background: $surface; }
    ClassChooser Select, ClassChooser Input { width: 100%; }
    """

    def __init__(self, classes: list[str], about: str) -> None:
        super().__init__()
        self.known = classes
        self.about = about

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(Text(f"class of {self.about}", no_wrap=True, overflow="ellipsis"))
            yield Select([(c, c) for c in self.known], prompt="known classes", id="chooser-known")
            yield Input(placeholder="or a new class: <composition>_<state>, Enter", id="chooser-name")

    def on_mount(self) -> None:
        self.query_one("#chooser-name", Input).focus()

    @on(Select.Changed, "#chooser-known")
    def _picked(self, event: Select.Changed) -> None:
        if isinstance(event.value, str):
            box = self.query_one("#chooser-name", Input)
            box.value = event.value
            box.focus()

    @on(Input.Submitted, "#chooser-name")
    def _done(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


def with_label(conn: sqlite3.Connection, sha256: str | None, view: RenderableType) -> RenderableType:
    """An image's detail with its content's labels under it (newest last; what counts is marked)."""
    if sha256 is None or not lab.has_labels_table(conn):
        return view
    history = lab.label_history(conn, sha256)
    if not history:
        return Group(view, Text("\nlabel: none yet (y confirm, l class, x foreign)", style="dim"))
    current = lab.label_of(conn, sha256)
    text = Text("\nlabels of this content (y l x u)\n", style="bold")
    for item in history[-6:]:
        what = {"confirmed": f"confirmed {item.class_name}", "corrected": f"is {item.class_name}",
                "foreign": "foreign", "cleared": "undone"}[item.status]
        mark = "▶ " if current is not None and item.id == current.id else "  "
        line = f"{mark}{item.at[:16].replace('T', ' ')}  {what}  by {item.by}"
        text.append(printable(line + (f"  ({item.note})" if item.note else "")) + "\n",
                    style="" if mark.strip() else "dim")
    return Group(view, text)


def label_classes(conn: sqlite3.Connection | None) -> list[str]:
    """The classes offered: every model's and every current label's."""
    return sorted(lab.known_classes(conn)) if conn is not None else []


def write_one(settings: Settings, image_id: int, action: Action, class_name: str | None = None) -> str:
    """Write one label for an image row; the line to show (or raise `UserError`)."""
    applied = write_labels(settings, [LabelChange("", action, class_name, image_id=image_id)])[0]
    label = applied.label
    what = {"confirmed": f"confirmed {label.class_name}", "corrected": f"labelled {label.class_name}",
            "foreign": "marked foreign", "cleared": "label undone"}[label.status]
    new = " (a new class)" if applied.new_class else ""
    return printable(f"{what}{new}: {label.path or label.sha256}")


def try_write(settings: Settings, image_id: int, action: Action,
              class_name: str | None = None) -> tuple[bool, str]:
    """`write_one`, its failure as a message instead of an exception (the console notifies)."""
    try:
        return True, write_one(settings, image_id, action, class_name)
    except UserError as exc:
        return False, printable(str(exc))


# --- the Review tab --------------------------------------------------------------------------------


def review_columns(width: int) -> dict[str, int]:
    fixed = {"why": 10, "class": 14, "conf": 5, "sample": 10}
    free = max(12, width - 2 - 2 * (len(fixed) + 1) - sum(fixed.values()))
    return {"why": 10, "file": free, "class": 14, "conf": 5, "sample": 10}


def review_cells(r: ReviewRow, widths: dict[str, int],
                 fit: Callable[..., str]) -> list[RenderableType]:
    """A Review row's cells; `fit` is the console's (names cut to their column)."""
    cells: dict[str, RenderableType] = {
        "why": shown(r.why, "bold yellow" if r.rank <= 3 else ""),
        "file": shown(fit(r.path, widths["file"], keep_end=True)),
        "class": shown(r.predicted_class or r.status, STATUS_STYLE.get(r.status, "")),
        "conf": fmt_conf(r.confidence),
        "sample": shown(fit(r.sample_id or "–", widths["sample"])),
    }
    return [cells[k] for k in widths]


def read_review(conn: sqlite3.Connection, settings: Settings) -> list[ReviewRow]:
    """The Review tab's rows: "low confidence" is an `ok` verdict less than halfway from
    `[model] min_confidence` to 1."""
    low = settings.model.min_confidence + (1.0 - settings.model.min_confidence) / 2
    return review_queue(conn, low=low, limit=REVIEW_PAGE)


def fill_review(table: DataTable[RenderableType], rows: list[ReviewRow], width: int,
                fit: Callable[..., str]) -> None:
    """(Re)draw the Review table for a terminal `width`; `fit` is the console's."""
    table.clear(columns=True)
    widths = review_columns(width)
    for name, size in widths.items():
        table.add_column(name, width=size)
    for r in rows:
        table.add_row(*review_cells(r, widths, fit), key=str(r.id))


class LabelKeys(App[int]):
    """The labelling actions of the console (`ConsoleApp` is one): which image they act on and
    how it is named are the console's (`labelling_target`, `label_about`)."""

    settings: Settings
    conn: TrackedConnection | None
    review_stale: bool
    label_in_flight: bool = False  # a label being written on a worker thread

    def labelling_target(self) -> int | None:
        raise NotImplementedError

    def label_about(self, image_id: int) -> str:
        raise NotImplementedError

    def poll(self, *, force: bool = False) -> None:
        raise NotImplementedError

    def action_label(self, action: Action) -> None:
        image_id = self.labelling_target()
        if image_id is None:
            self.notify("no image highlighted", severity="warning")
            return
        if action != "class":
            self._write_label(image_id, action, None)
            return

        def chosen(name: str | None) -> None:
            if name:
                self._write_label(image_id, "class", name)

        about = self.label_about(image_id)
        about = about if len(about) <= 50 else "…" + about[-49:]
        self.push_screen(ClassChooser(label_classes(self.conn), printable(about)), chosen)

    def _write_label(self, image_id: int, action: Action, class_name: str | None) -> None:
        """Write on a worker thread: the write waits for the database's write lock (a daemon's batch,
        up to `[store] busy_timeout_ms`), and the screen must not freeze meanwhile. One at a time,
        so labels land in the order the keys were pressed."""
        if self.label_in_flight:
            self.notify("still writing the last label: press the key again in a moment", severity="warning")
            return
        self.label_in_flight = True

        def write() -> None:
            try:
                ok, message = try_write(self.settings, image_id, action, class_name)
            except Exception as exc:  # e.g. a database error: said, and the keys work again
                ok, message = False, printable(f"label not written: {exc}")
            self.call_from_thread(self._label_written, ok, message)

        self.run_worker(write, thread=True, group="labels", name="label", exit_on_error=False)

    def _label_written(self, ok: bool, message: str) -> None:
        self.label_in_flight = False
        self.notify(message, severity="information" if ok else "error", timeout=6)
        self.review_stale = True
        self.poll(force=True)
