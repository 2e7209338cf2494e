"""Progress of a long command: a bar with rate and ETA on a terminal, JSON lines with `--json`,
a plain line now and then in a log (stderr that is not a terminal)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from semwatch.output import Output

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID

JSON_EVERY = 2.0  # seconds between progress lines with --json
LOG_EVERY = 30.0  # seconds between plain progress lines when stderr is not a terminal


class Progress:
    def __init__(self, out: Output, *, total: int | None, label: str) -> None:
        """`total`: None while it is not known (an archive being listed): no ETA then."""
        self.out, self.total, self.label = out, total, label
        self.done = 0
        self.started = self.last = time.monotonic()
        self.bar: RichProgress | None = None
        self.task: TaskID | None = None
        isatty = getattr(out.stderr, "isatty", None)
        if not out.json and isatty is not None and isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TaskProgressColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TaskProgressColumn(), TextColumn("{task.fields[rate]}"),
                                    TimeRemainingColumn(), console=Console(file=out.stderr), transient=False)
            self.task = self.bar.add_task(label, total=total, rate="")
            self.bar.start()

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def advance(self) -> None:
        self.done += 1
        now = time.monotonic()
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, advance=1, rate=f"{self.rate():.1f} images/s")
            return
        if self.out.json and now - self.last >= JSON_EVERY:
            self.last = now
            self.out.emit(self._record())
        elif not self.out.json and now - self.last >= LOG_EVERY:
            self.last = now
            r = self._record()
            eta = f", about {r['eta_s']:.0f} s left" if r["eta_s"] is not None else ""
            of = f"/{self.total}" if self.total is not None else ""
            self.out.say(f"{self.label}: {self.done}{of} ({r['rate']:.1f} images/s{eta})")

    def _record(self) -> dict[str, object]:
        rate = self.rate()
        left = self.total - self.done if self.total is not None else None
        return {"event": "progress", "done": self.done, "total": self.total, "rate": round(rate, 2),
                "eta_s": round(left / rate, 1) if rate > 0 and left is not None else None}

    def say(self, message: str) -> None:
        """A `semwatch: ...` line on stderr; above the bar while one is shown (rich keeps it last)."""
        if self.bar is not None:
            from rich.markup import escape

            from semwatch.safefs import printable, text_safe

            self.bar.console.print(escape(f"semwatch: {printable(text_safe(message))}"))
        else:
            self.out.say(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
