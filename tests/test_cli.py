"""The console script: --help and --version on every command; argument errors are one line and exit 2;
file names that are not UTF-8 or hold escape sequences come out as valid, visible text."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from semwatch import __version__
from semwatch.cli import build_parser
from semwatch.safefs import path_from_text

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


def _one_line_error(proc: subprocess.CompletedProcess[str], code: int, args: object) -> None:
    assert proc.returncode == code, (args, proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, (args, proc.stderr)
    assert len(proc.stderr.splitlines()) == 1, (args, proc.stderr)
    assert proc.stderr.startswith("semwatch"), (args, proc.stderr)


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    for args in ([], ["nonsense"], ["inspect"], ["inspect", "--bogus", "x.tif"], ["report", "--date"]):
        proc = _run(*args, cwd=tmp_path)
        _one_line_error(proc, 2, args)
        assert "--help" in proc.stderr


def test_argument_errors_are_one_line(tmp_path: Path) -> None:
    """Bad values of every kind: one line on stderr, exit 2, before any work starts (no traceback
    from deep inside a command, minutes into training)."""
    afile = tmp_path / "afile"
    afile.write_text("x", encoding="utf-8")
    adir = tmp_path / "adir"
    adir.mkdir()
    cases: list[tuple[list[str], str]] = [
        (["report", "--date", "9999-12-31"], "outside"),
        (["report", "--date", "0001-01-01"], "outside"),
        (["report", "--date", "1999-12-31"], "outside"),
        (["report", "--date", "2026-02-30"], "YYYY-MM-DD"),
        (["report", "--date", "yesterday"], "YYYY-MM-DD"),
        (["train", str(adir), "--out", str(afile / "model")], "not a folder"),
        (["train", str(adir), "--out", str(afile)], "not a folder"),
        (["train", str(adir), "--out", "m", "--split-out", str(adir)], "is a folder"),
        (["train", str(adir), "--out", "m", "--epochs", "-1"], ">= 1"),
        (["train", str(adir), "--out", "m", "--max-images-per-class", "0"], ">= 1"),
        (["evaluate", str(adir), "--model", str(adir), "--out", str(afile)], "not a folder"),
        (["evaluate", str(adir), "--model", str(adir), "--seed", "-1"], "between 0"),
        (["classify", "x.jpg", "--explain", str(afile)], "not a folder"),
        (["bench", str(adir), "--max-images", "-5"], ">= 1"),
        (["bench", str(adir), "--rounds", "0"], ">= 1"),
        (["bench", str(adir), "--rounds", "many"], "whole number"),
        (["demo", "--images", "-3"], ">= 1"),
        (["demo", "--interval", "-1"], ">= 0"),
        (["demo", "--interval", "nan"], ">= 0"),
        (["demo", "--workdir", str(afile)], "not a folder"),
        (["inspect", "--bogus\x1b]0;t\x07", "x.tif"], "unrecognized"),
    ]
    for args, words in cases:
        proc = _run(*args, cwd=tmp_path)
        _one_line_error(proc, 2, args)
        assert words in proc.stderr, (args, proc.stderr)
        assert "\x1b" not in proc.stderr and "\x07" not in proc.stderr  # shown, not sent to the terminal


def test_config_errors_are_one_line_exit_78(tmp_path: Path) -> None:
    """A missing or unusable config file is a configuration error (78: systemd does not restart)."""
    (tmp_path / "adir").mkdir()
    for config, words in (("missing.toml", "not found"), ("adir", "is a folder")):
        for command in (["report"], ["top", "--once"], ["inspect", "x.tif"], ["watch"]):
            proc = _run(*command, "--config", config, cwd=tmp_path)
            _one_line_error(proc, 78, (command, config))
            assert words in proc.stderr


@pytest.mark.slow
def test_classify_non_utf8_name_json_and_table(tiny_model: Path, ncm_dir: Path, tmp_path: Path) -> None:
    """`classify --json` on a real JPEG named with the bytes b'bad_\\xff.jpg': valid UTF-8 JSON with the
    path in `path_text` form; the plain form shows the name and an escape sequence as text."""
    source = sorted((ncm_dir / "811_cycled").glob("*.jpg"))[0]
    bad = tmp_path / os.fsdecode(b"bad_\xff.jpg")
    evil = tmp_path / "evil\x1b]0;pwned\x07[red]x.jpg"
    for target in (bad, evil):
        shutil.copy(source, target)
    missing = tmp_path / os.fsdecode(b"gone_\xfe.jpg")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEMWATCH_") or k == "SEMWATCH_DATA"}
    base: list[str | Path] = [SEMWATCH, "classify", "--model", tiny_model, bad, evil, missing]
    proc = subprocess.run([os.fsencode(a) for a in (*base, "--json")], capture_output=True, timeout=300,
                          cwd=tmp_path, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.decode("utf-8").splitlines()]  # strictly UTF-8
    assert [r["path"] for r in rows] == [str(tmp_path / "bad_\\xff.jpg"), str(evil),
                                         str(tmp_path / "gone_\\xfe.jpg")]
    assert rows[0]["status"] in ("ok", "unknown", "rejected") and rows[2]["error"] == "no such file"
    assert path_from_text(rows[0]["path"]) == str(bad)

    plain = subprocess.run([os.fsencode(a) for a in base], capture_output=True, timeout=300, cwd=tmp_path,
                           env=env, stdin=subprocess.DEVNULL)
    assert plain.returncode == 1
    out, err = plain.stdout.decode("utf-8"), plain.stderr.decode("utf-8")
    assert "bad_\\xff.jpg: " in out and "evil\\x1b]0;pwned\\x07[red]x.jpg: " in out
    assert "gone_\\xfe.jpg: no such file" in err
    for text in (out, err):
        assert "\x1b" not in text and "\x07" not in text
