"""`semwatch inspect FILE...`: what semwatch reads from each file — metadata, data bar, quality.

With `--json`, one JSON object per file and line (`{path, error}` for a file that cannot be read);
otherwise a rich table. Exit status 1 when any file could not be read. Paths are given in
`safefs.path_text` form (valid UTF-8 JSON for any file name); the table shows every string through
`safefs.printable` as plain `Text` (file names and metadata are not trusted: no terminal escapes,
no rich markup).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from semwatch.config import Settings
from semwatch.safefs import path_text, printable, text_safe
from semwatch.values import Micrograph, MicrographError

if TYPE_CHECKING:
    from rich.text import Text


def describe(m: Micrograph) -> dict[str, Any]:
    """The `inspect --json` object for one micrograph."""
    md = m.metadata
    return {
        "path": path_text(m.path),
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
        "acquired_at": md.acquired_at.isoformat() if md.acquired_at else None,
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


def inspect_path(path: Path, settings: Settings) -> dict[str, Any]:
    """`describe` of one file, or `{path, error}` when it cannot be read."""
    from semwatch.reading.micrograph import read_micrograph

    try:
        return describe(read_micrograph(path, settings))
    except MicrographError as exc:
        return {"path": path_text(path), "error": text_safe(str(exc))}
    except Exception as exc:  # never a traceback for one bad file; the others still get inspected
        return {"path": path_text(path), "error": text_safe(f"unexpected error: {type(exc).__name__}: {exc}")}


def inspect_files(paths: Sequence[Path], settings: Settings, *, as_json: bool) -> int:
    from semwatch.output import json_line

    failed = 0
    results: list[dict[str, Any]] = []
    for path in paths:
        result = inspect_path(path, settings)
        failed += "error" in result
        if as_json:
            print(json_line(result), flush=True)
        else:
            results.append(result)
    if not as_json:
        _print_table(results)
    return 1 if failed else 0


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "—"
    return format(value, spec) if spec else str(value)


def _text(value: Any, style: str = "") -> Text:
    """A table cell: printable, and a rich `Text`, so `[red]` in a name is not markup."""
    from rich.text import Text

    return Text(printable(text_safe(_fmt(value))), style=style)


def _print_table(results: list[dict[str, Any]]) -> None:
    """One small two-column table per file: readable at any terminal width."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for r in results:
        # The path on a line of its own, not as the table's title: a title wraps at the table's width.
        console.print(_text(r["path"], "italic"))
        table = Table(show_header=False, box=None, padding=(0, 2))
        table.add_column("field", style="bold")
        table.add_column("value")
        if "error" in r:
            table.add_row("error", _text(r["error"], "red"))
            console.print(table, "")
            continue
        q = r["quality"]
        rows = [
            ("format", f"{r['format']}, {r['width']}×{r['height']}, {r['bit_depth']}-bit"),
            ("instrument", " ".join(x for x in (r["vendor"], r["instrument"]) if x) or None),
            ("pixel size", _fmt(r["pixel_size_nm"], "g") + " nm" if r["pixel_size_nm"] else None),
            ("magnification", _fmt(r["magnification"], "g") + "×" if r["magnification"] else None),
            ("voltage", _fmt(r["voltage_kv"], "g") + " kV" if r["voltage_kv"] else None),
            ("detector", r["detector"]),
            ("acquired", r["acquired_at"]),
            ("session", r["session"]),
            ("data bar", f"{r['databar_rows']} rows"),
            ("quality", f"focus {q['focus']:.4f}, saturated {q['saturated_fraction']:.2%}, "
                        f"dynamic range {q['dynamic_range']:.3f}"),
        ]
        for name, value in rows:
            table.add_row(name, _text(value))
        table.add_row("", _text("ok", "green") if q["ok"] else _text("; ".join(q["reasons"]), "yellow"))
        console.print(table, "")
