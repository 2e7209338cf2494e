"""Where a command's output goes: one JSON object per line, plain lines, and one-line messages.

Commands take an `Output` instead of writing to `sys.stdout` themselves, so there is one JSON-lines
writer (always valid UTF-8: paths in `safefs.path_text` form, undecodable bytes as `\\xNN`) and
tests capture a command's output in-process by passing their own streams (the idea of httpie's
`Environment`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from semwatch.safefs import path_text, printable, text_safe


def _stdout() -> TextIO:
    return sys.stdout


def _stderr() -> TextIO:
    return sys.stderr


@dataclass
class Output:
    """A command's two streams and whether it speaks JSON (`--json`)."""

    json: bool = False
    stdout: TextIO = field(default_factory=_stdout)
    stderr: TextIO = field(default_factory=_stderr)

    def emit(self, record: dict[str, Any]) -> None:
        """One JSON object on one line of stdout."""
        self.stdout.write(json_line(record) + "\n")
        self.stdout.flush()

    def line(self, text: str) -> None:
        """One plain line on stdout; untrusted names in it are shown, not sent (`printable`)."""
        print(printable(text_safe(text)), file=self.stdout, flush=True)

    def say(self, message: str) -> None:
        """One `semwatch: ...` line on stderr (errors, warnings, progress)."""
        print(f"semwatch: {printable(text_safe(message))}", file=self.stderr, flush=True)

    @property
    def is_terminal(self) -> bool:
        isatty = getattr(self.stdout, "isatty", None)
        return bool(isatty and isatty())


def json_line(record: object) -> str:
    """`record` as one line of JSON: UTF-8 text (not \\u escapes), paths as `path_text`."""
    return json.dumps(_json_safe(record), ensure_ascii=False, default=_json_default)


def _json_default(value: object) -> str:
    return path_text(value) if isinstance(value, Path) else text_safe(str(value))


def _json_safe(value: object) -> object:
    if isinstance(value, str):
        return text_safe(value)
    if isinstance(value, Path):
        return path_text(value)
    if isinstance(value, dict):
        return {_json_safe(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
