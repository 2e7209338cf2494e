"""`semwatch fleet top`: the interactive fleet console on a terminal, the table once otherwise.

Its own module because it chooses between the two (`fleet_console` imports `fleet`), and so that
Textual is imported only when the console runs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from semwatch.config import Settings
from semwatch.errors import ExitStatus
from semwatch.output import Output
from semwatch.store.fleet import sources_of
from semwatch.views.fleet import load_cards, table


def fleet_top(settings: Settings, *, sources: Sequence[Path], once: bool, out: Output) -> int:
    """`semwatch fleet top [--once] [SNAPSHOT_OR_FOLDER ...]`. Once: the table, then exit 0 when
    every instrument is readable and fresh, 1 otherwise (for scripts and monitoring)."""
    chosen = sources_of(settings, sources)
    if once or not out.is_terminal or os.environ.get("TERM", "") == "dumb":
        cards = load_cards(settings, chosen)
        Console(file=out.stdout, width=max(160, Console().width)).print(table(cards))
        if not cards:
            out.say(f"no snapshots in {', '.join(map(str, chosen))}")
        healthy = cards and all(c.problem is None and not c.stale for c in cards)
        return ExitStatus.OK if healthy else ExitStatus.INPUT_FAILED
    from semwatch.views.fleet_console import run_fleet_console  # Textual only where it runs

    return run_fleet_console(settings, chosen)
