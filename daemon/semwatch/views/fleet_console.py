"""The interactive `semwatch fleet top` (Textual): the fleet table; Enter opens an instrument.

Opening an instrument runs `views.console.ConsoleApp` (the console of `semwatch top`, with its
Images and Samples tabs and detail screens) on that instrument's snapshot; q there returns here,
on the same row. Its own module so that Textual is imported only when the console runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Footer, Static

from semwatch.config import Settings
from semwatch.errors import ExitStatus
from semwatch.store.fleet import Card
from semwatch.views.console import ConsoleApp
from semwatch.views.fleet import COLUMNS, cells, load_cards

REFRESH_SECONDS = 5.0


class FleetApp(App[tuple[int, Path] | None]):
    """One row per instrument; exits with (row, snapshot) to open, or None on q."""

    TITLE = "semwatch fleet"
    ENABLE_COMMAND_PALETTE = False
    CSS = "#head { height: 1; padding: 0 1; background: $panel; } DataTable { height: 1fr; }"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        Binding("enter", "open", "Open"),
        Binding("r", "refresh", "Refresh"),
    ]

    def __init__(self, settings: Settings, sources: Sequence[Path], *, cursor: int | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.sources = sources
        self.cards: list[Card] = []
        self.start_row = cursor

    def compose(self) -> ComposeResult:
        yield Static(id="head")
        yield DataTable[Text](id="fleet", cursor_type="row", zebra_stripes=True)
        yield Footer(show_command_palette=False)

    def on_mount(self) -> None:
        grid = self._grid()
        for name in COLUMNS:
            grid.add_column(name, key=name)
        self.action_refresh()
        if self.start_row is not None and self.start_row < len(self.cards):
            grid.move_cursor(row=self.start_row)
        grid.focus()
        self.set_interval(REFRESH_SECONDS, self.action_refresh)

    def _grid(self) -> DataTable[Text]:
        return self.query_one("#fleet", DataTable)

    def action_refresh(self) -> None:
        grid = self._grid()
        row = grid.cursor_row
        self.cards = load_cards(self.settings, self.sources)
        grid.clear()
        for i, card in enumerate(self.cards):
            grid.add_row(*cells(card), key=str(i))
        if self.cards:
            grid.move_cursor(row=min(max(row, 0), len(self.cards) - 1))
        bad = sum(1 for c in self.cards if c.problem is not None or c.stale)
        head = Text(f"{len(self.cards)} instrument(s)", style="bold")
        if bad:
            head.append(f" · {bad} stale or broken", style="bold red")
        head.append(f" · Enter: its images and samples · refreshed every {REFRESH_SECONDS:.0f} s",
                    style="dim")
        self.query_one("#head", Static).update(head)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open()

    def action_open(self) -> None:
        if not self.cards:
            return
        row = self._grid().cursor_row
        card = self.cards[row]
        if card.problem is not None:
            self.notify(f"{card.label}: {card.problem}", severity="error")
            return
        self.exit((row, card.path))


def instrument_console(settings: Settings, snapshot: Path) -> ConsoleApp:
    """`semwatch top`'s console on one instrument's snapshot."""
    return ConsoleApp(settings.replace(store=dataclasses.replace(settings.store, database=snapshot)))


def run_fleet_console(settings: Settings, sources: Sequence[Path]) -> int:
    """The fleet table on this terminal until q; Enter runs the instrument's console in between."""
    row: int | None = None
    while True:
        chosen = FleetApp(settings, sources, cursor=row).run()
        if chosen is None:
            return ExitStatus.OK
        row, path = chosen
        instrument_console(settings, path).run()
