"""The console script: --help and --version on every command, usage errors exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from semwatch import __version__
from semwatch.cli import build_parser

SEMWATCH = Path(sys.executable).parent / "semwatch"


def _commands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sorted(sub.choices)  # type: ignore[arg-type]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEMWATCH_") or k == "SEMWATCH_DATA"}
    return subprocess.run([str(SEMWATCH), *args], capture_output=True, text=True, timeout=60, cwd=cwd,
                          env=env, stdin=subprocess.DEVNULL)


def test_all_documented_commands_exist() -> None:
    assert {"inspect", "train", "evaluate", "classify", "bench", "watch", "top", "report", "demo"} <= set(
        _commands())


@pytest.mark.parametrize("command", [[], *[[c] for c in _commands()]], ids=lambda c: c[0] if c else "main")
def test_help_and_version(command: list[str], tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = _run(*command, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: semwatch") and "--version" in proc.stdout
    if command:
        assert "--config" in proc.stdout
    proc = _run(*command, "--version", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"semwatch {__version__}"
    assert time.monotonic() - t0 < 20  # no torch import for --help/--version


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    for args in ([], ["nonsense"], ["inspect"], ["inspect", "--bogus", "x.tif"]):
        proc = _run(*args, cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "usage:" in proc.stderr and "Traceback" not in proc.stderr
