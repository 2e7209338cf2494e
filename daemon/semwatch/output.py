"""Where a command's output goes: one JSON object per line, plain lines, and one-line messages.

Commands take an `Output` instead of writing to `sys.stdout` themselves, so there is one JSON-lines
writer and tests capture a command's output in-process by passing their own streams (the idea of
httpie's `Environment`). Every line `emit` writes is strict JSON in valid UTF-8 whatever it is
given: paths in `safefs.path_text` form, undecodable bytes as `\\xNN`, numpy-style scalars as
numbers, non-finite floats as `null` (JSON has no NaN), dates in ISO 8601, dataclasses as objects.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from enum import Enum
from pathlib import Path
from typing import TextIO

from semwatch.safefs import path_text, printable, text_safe


def _stdout() -> TextIO:
    return sys.stdout


def _stderr() -> TextIO:
    return sys.stderr


@dataclass
class Output:
    """A command's two streams and whether it speaks JSON (`--json`).

    The streams default to `sys.stdout`/`sys.stderr` as they are when the `Output` is made (so
    pytest's `capsys` captures a command run in-process)."""

    json: bool = False
    stdout: TextIO = field(default_factory=_stdout)
    stderr: TextIO = field(default_factory=_stderr)

    def emit(self, record: Mapping[str, object]) -> None:
        """One JSON object on one line of stdout, flushed (a reader may be following the pipe)."""
        self.stdout.write(json_line(record) + "\n")
        self.stdout.flush()

    def line(self, text: str = "") -> None:
        """One plain line on stdout; untrusted names in it are shown, not sent (`printable`)."""
        print(printable(text_safe(text)), file=self.stdout, flush=True)

    def say(self, message: str) -> None:
        """One `semwatch: ...` line on stderr (errors, warnings, progress)."""
        print(f"semwatch: {printable(text_safe(message))}", file=self.stderr, flush=True)

    @property
    def is_terminal(self) -> bool:
        """Whether stdout is a terminal (live views and colour only there)."""
        isatty = getattr(self.stdout, "isatty", None)
        return bool(isatty and isatty())


def json_line(record: object) -> str:
    """`record` as one line of strict JSON: UTF-8 text (not \\u escapes), paths as `path_text`."""
    return json.dumps(_json_safe(record), ensure_ascii=False, allow_nan=False)


def _json_safe(value: object) -> object:
    """`value` made of JSON's own types only (`json.dumps` then never needs a `default`)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return text_safe(value)
    if isinstance(value, Path):
        return path_text(value)
    if isinstance(value, Enum):
        return _json_safe(value.value)
    if isinstance(value, numbers.Integral):  # int, numpy integers
        return int(value)
    if isinstance(value, numbers.Real):  # float, numpy floats
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, date):  # datetime too
        return value.isoformat()
    if isinstance(value, Mapping):
        return {_key(k): _json_safe(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _json_safe(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return text_safe(str(value))


def _key(key: object) -> str:
    if isinstance(key, Path):
        return path_text(key)
    return text_safe(key if isinstance(key, str) else str(_json_safe(key)))
