"""`semwatch top`: the interactive console on a terminal, one plain frame for scripts and logs.

Its own module because it chooses between the two views (`console` imports `live`'s helpers, so
`live` cannot import `console`), and so that Textual is imported only when the console runs.
"""

from __future__ import annotations

import os

from rich.console import Console

from semwatch.config import Settings
from semwatch.errors import ExitStatus
from semwatch.output import Output
from semwatch.views.live import current_model_id, render_once


def top(settings: Settings, *, once: bool, out: Output) -> int:
    """`semwatch top`: the daemon's database, read while it runs.

    On a terminal, the interactive console (`views.console`, Textual) until q or Ctrl-C. With
    `once`, or when stdout is not a terminal (a pipe, a log, cron) or the terminal is `dumb`, one
    frame of the rich dashboard as text: INPUT_FAILED when there is no database to show.
    """
    current_model = current_model_id(settings)
    if once or not out.is_terminal or os.environ.get("TERM", "") == "dumb":
        snap = render_once(settings, Console(file=out.stdout), current_model=current_model)
        return ExitStatus.INPUT_FAILED if snap.problem is not None else ExitStatus.OK
    from semwatch.views.console import run_console  # Textual only where it runs

    return run_console(settings, current_model=current_model)
