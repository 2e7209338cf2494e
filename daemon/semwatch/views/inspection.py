"""`semwatch inspect FILE...`: what semwatch reads from each file — metadata, data bar, quality.

With `--json`, one JSON object per file and line (`{path, error}` for a file that cannot be read);
otherwise a small table per file. Each file is shown as soon as it is read (a long list streams,
and only one decoded image is held at a time). Exit status INPUT_FAILED when any file could not be
read; one bad file never stops the others. Paths are given in `safefs.path_text` form (valid UTF-8
JSON for any file name); the table shows every string through `safefs.printable` as plain `Text`
(file names and metadata are not trusted: no terminal escapes, no rich markup).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from semwatch.config import Settings
from semwatch.errors import ExitStatus
from semwatch.output import Output
from semwatch.safefs import path_text, printable, text_safe
from semwatch.values import Micrograph, MicrographError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text


def describe(m: Micrograph) -> dict[str, object]:
    """The `inspect --json` object for one micrograph."""
    md = m.metadata
    return {
        "path": m.path,
        "format": m.format,
        "width": m.width,
        "height": m.height,
        "bit_depth": m.bit_depth,
        "vendor": md.vendor,
        "instrument": md.instrument,
        "pixel_size_nm": md.pixel_size_nm,
        "magnification": md.magnification,
        "voltage_kv": md.voltage_kv,
        "detector": md.detector,
        "acquired_at": md.acquired_at,
        "session": md.session,
        "databar_rows": m.databar_rows,
        "quality": {
            "focus": m.quality.focus,
            "saturated_fraction": m.quality.saturated_fraction,
            "dynamic_range": m.quality.dynamic_range,
            "ok": m.quality.ok,
            "reasons": list(m.quality.reasons),
        },
    }


def read_for_inspection(path: Path, settings: Settings) -> Micrograph | str:
    """The micrograph, or why it cannot be read (one line)."""
    from semwatch.reading.micrograph import read_micrograph

    try:
        return read_micrograph(path, settings)
    except MicrographError as exc:
        return str(exc)
    except Exception as exc:  # never a traceback for one bad file; the others still get inspected
        return f"unexpected error: {type(exc).__name__}: {exc}"


def inspect_files(paths: Sequence[Path], settings: Settings, *, out: Output) -> int:
    """`semwatch inspect`: each file's JSON object (`out.json`) or table, in the order given."""
    console = None if out.json else _console(out)
    failed = False
    for path in paths:
        result = read_for_inspection(path, settings)
        failed |= isinstance(result, str)
        if console is None:
            out.emit(describe(result) if isinstance(result, Micrograph) else {"path": path, "error": result})
        else:
            # The path on a line of its own, not as the table's title: a title wraps at the table's width.
            console.print(_text(path_text(path), "italic"))
            console.print(_table(result), "")
    return ExitStatus.INPUT_FAILED if failed else ExitStatus.OK


def _console(out: Output) -> Console:
    from rich.console import Console

    return Console(file=out.stdout)


def _fmt(value: object, spec: str = "") -> str:
    if value is None:
        return "—"
    return format(value, spec) if spec else str(value)


def _text(value: object, style: str = "") -> Text:
    """A table cell: printable, and a rich `Text`, so `[red]` in a name is not markup."""
    from rich.text import Text

    return Text(printable(text_safe(_fmt(value))), style=style)


def _unit(value: float | None, unit: str) -> str | None:
    return f"{value:g}{unit}" if value else None


def _table(result: Micrograph | str) -> Table:
    """One small two-column table per file: readable at any terminal width."""
    from rich.table import Table

    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_column("field", style="bold")
    table.add_column("value")
    if isinstance(result, str):
        table.add_row("error", _text(result, "red"))
        return table
    md, q = result.metadata, result.quality
    rows: list[tuple[str, object]] = [
        ("format", f"{result.format}, {result.width}×{result.height}, {result.bit_depth}-bit"),
        ("instrument", " ".join(x for x in (md.vendor, md.instrument) if x) or None),
        ("pixel size", _unit(md.pixel_size_nm, " nm")),
        ("magnification", _unit(md.magnification, "×")),
        ("voltage", _unit(md.voltage_kv, " kV")),
        ("detector", md.detector),
        ("acquired", md.acquired_at.isoformat() if md.acquired_at else None),
        ("session", md.session),
        ("data bar", f"{result.databar_rows} rows"),
        ("quality", f"focus {q.focus:.4f}, saturated {q.saturated_fraction:.2%}, "
                    f"dynamic range {q.dynamic_range:.3f}"),
    ]
    for name, value in rows:
        table.add_row(name, _text(value))
    table.add_row("", _text("ok", "green") if q.ok else _text("; ".join(q.reasons), "yellow"))
    return table
