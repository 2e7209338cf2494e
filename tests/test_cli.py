"""The command line: --help and --version on every command without heavy imports; argument and
configuration errors are one line with their exit status; file names that are not UTF-8 or hold
escape sequences come out as valid, visible text. Commands run in-process (`main(argv)`); real
processes only where the process is the point (the installed entry points, a fresh interpreter's
imports)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Cli, CliRun
from semwatch import __version__
from semwatch.cli import build_parser
from semwatch.errors import ExitStatus
from semwatch.safefs import path_from_text

SEMWATCH = Path(sys.executable).parent / "semwatch"
HEAVY = ("torch", "cv2", "matplotlib", "textual")


def _commands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sorted(sub.choices)  # type: ignore[arg-type]


def test_all_documented_commands_exist() -> None:
    assert {"inspect", "train", "evaluate", "classify", "bench", "watch", "top", "report", "demo"} <= set(
        _commands())


@pytest.mark.parametrize("command", [[], *[[c] for c in _commands()]], ids=lambda c: c[0] if c else "main")
def test_help_and_version(command: list[str], cli: Cli) -> None:
    run = cli(*command, "--help")
    assert run.code == ExitStatus.OK, run.err
    assert run.out.startswith("usage: semwatch") and "--version" in run.out
    if command:
        assert "--config" in run.out
    run = cli(*command, "--version")
    assert run.code == ExitStatus.OK, run.err
    assert run.out.strip() == f"semwatch {__version__}"


def test_help_and_version_import_no_heavy_library(tmp_path: Path) -> None:
    """--help and --version of every command, in a fresh interpreter: torch, cv2 and matplotlib are
    never imported (they take seconds; the command that needs one imports it)."""
    script = (
        "import json, sys\n"
        "from semwatch.cli import main\n"
        f"for command in {[[], *[[c] for c in _commands()]]!r}:\n"
        "    for flag in ('--help', '--version'):\n"
        "        assert main([*command, flag]) == 0, (command, flag)\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "print(json.dumps(heavy), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stderr.splitlines()[-1]) == []
    assert proc.stdout.count("usage: semwatch") == len(_commands()) + 1


def test_entry_points(tmp_path: Path) -> None:
    """The installed console script and `python -m semwatch` reach `main` and exit with its status."""
    for cmd in ([str(SEMWATCH), "--version"], [sys.executable, "-m", "semwatch", "--version"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                              stdin=subprocess.DEVNULL)
        assert (proc.returncode, proc.stdout.strip()) == (ExitStatus.OK, f"semwatch {__version__}"), proc
    proc = subprocess.run([str(SEMWATCH), "nonsense"], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert proc.returncode == ExitStatus.USAGE and "invalid choice" in proc.stderr


def _one_line_error(run: CliRun, code: ExitStatus, args: object) -> None:
    assert run.code == code, (args, run.code, run.err)
    assert "Traceback" not in run.err, (args, run.err)
    assert len(run.err.splitlines()) == 1, (args, run.err)
    assert run.err.startswith("semwatch"), (args, run.err)


def test_usage_errors_exit_2(cli: Cli) -> None:
    for args in ([], ["nonsense"], ["inspect"], ["inspect", "--bogus", "x.tif"], ["report", "--date"]):
        run = cli(*args)
        _one_line_error(run, ExitStatus.USAGE, args)
        assert "--help" in run.err


def test_argument_errors_are_one_line(cli: Cli, tmp_path: Path) -> None:
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
        run = cli(*args)
        _one_line_error(run, ExitStatus.USAGE, args)
        assert words in run.err, (args, run.err)
        assert "\x1b" not in run.err and "\x07" not in run.err  # shown, not sent to the terminal


def test_config_errors_are_one_line_exit_78(cli: Cli, tmp_path: Path) -> None:
    """A missing or unusable config file is a configuration error (78: systemd does not restart)."""
    (tmp_path / "adir").mkdir()
    for config, words in (("missing.toml", "not found"), ("adir", "is a folder")):
        for command in (["report"], ["top", "--once"], ["inspect", "x.tif"], ["watch"]):
            run = cli(*command, "--config", config)
            _one_line_error(run, ExitStatus.CONFIG, (command, config))
            assert run.err.startswith("semwatch: configuration error: ") and words in run.err


def test_os_errors_interrupts_and_closed_pipes(cli: Cli, settings_file: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """What a command could not foresee still ends as one line with its status: a file it could not
    use (INPUT_FAILED), Ctrl-C (INTERRUPTED), a reader that closed the pipe (OK, silently)."""
    from semwatch.views import inspection

    faults: list[BaseException] = [PermissionError(13, "Permission denied", "/x/\udcff.tif"),
                                   KeyboardInterrupt(), BrokenPipeError()]

    def fail(*args: object, **kwargs: object) -> int:
        raise faults.pop(0)

    monkeypatch.setattr(inspection, "inspect_files", fail)
    run = cli("inspect", "x.tif", "--config", settings_file)
    _one_line_error(run, ExitStatus.INPUT_FAILED, "PermissionError")
    assert run.err == "semwatch: Permission denied: /x/\\xff.tif\n"
    run = cli("inspect", "x.tif", "--config", settings_file)
    _one_line_error(run, ExitStatus.INTERRUPTED, "KeyboardInterrupt")
    assert run.err == "semwatch: interrupted\n"
    assert cli("inspect", "x.tif", "--config", settings_file) == (ExitStatus.OK, "", "")


@pytest.fixture
def settings_file(tmp_path: Path) -> Path:
    path = tmp_path / "empty.toml"
    path.write_text("", encoding="utf-8")
    return path


@pytest.mark.slow
def test_classify_non_utf8_name_json_and_table(cli: Cli, tiny_model: Path, ncm_dir: Path,
                                               tmp_path: Path) -> None:
    """`classify --json` on a real JPEG named with the bytes b'bad_\\xff.jpg': valid UTF-8 JSON with the
    path in `path_text` form; the plain form shows the name and an escape sequence as text."""
    source = sorted((ncm_dir / "811_cycled").glob("*.jpg"))[0]
    bad = tmp_path / os.fsdecode(b"bad_\xff.jpg")
    evil = tmp_path / "evil\x1b]0;pwned\x07[red]x.jpg"
    for target in (bad, evil):
        shutil.copy(source, target)
    missing = tmp_path / os.fsdecode(b"gone_\xfe.jpg")
    base: list[str | Path] = ["classify", "--model", tiny_model, bad, evil, missing]
    run = cli(*base, "--json")
    assert run.code == ExitStatus.INPUT_FAILED, run.err
    run.out.encode("utf-8")  # strictly valid UTF-8: a surrogate escape (a raw byte) would raise here
    rows = [json.loads(line) for line in run.out.splitlines()]
    assert [r["path"] for r in rows] == [str(tmp_path / "bad_\\xff.jpg"), str(evil),
                                         str(tmp_path / "gone_\\xfe.jpg")]
    assert rows[0]["status"] in ("ok", "unknown", "rejected") and rows[2]["error"] == "no such file"
    assert path_from_text(rows[0]["path"]) == str(bad)

    plain = cli(*base)
    assert plain.code == ExitStatus.INPUT_FAILED
    assert "bad_\\xff.jpg: " in plain.out and "evil\\x1b]0;pwned\\x07[red]x.jpg: " in plain.out
    assert "gone_\\xfe.jpg: no such file" in plain.err
    for text in (plain.out, plain.err):
        assert "\x1b" not in text and "\x07" not in text
