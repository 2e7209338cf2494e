"""The dashboard renders from a database (the same renderer serves `semwatch watch` and `semwatch top`)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from conftest import Cli
from dbfixture import make_database
from semwatch.config import Settings
from semwatch.errors import ExitStatus
from semwatch.store.snapshot import take_snapshot
from semwatch.views.live import LiveView, render

NOW = datetime(2026, 11, 24, 14, 30, tzinfo=UTC)


def _text(settings: Settings, width: int = 160) -> str:
    console = Console(record=True, width=width, force_terminal=False)
    console.print(render(take_snapshot(settings, now=NOW), settings))
    return console.export_text()


def _fixture(settings: Settings, **kw: Any) -> None:
    make_database(
        settings.store.database, now=NOW,
        images=[
            {"path": "/export/lotA/a1.tif", "sample_id": "lotA"},
            {"path": "/export/lotA/a2.tif", "sample_id": "lotA", "status": "unknown", "confidence": 0.41,
             "predicted_class": None, "composition": None, "state": None},
            {"path": "/export/lotB/broken.tif", "sample_id": "lotB", "status": "failed",
             "error": "not a TIFF file: truncated header", "confidence": None, "predicted_class": None,
             "composition": None, "state": None},
            {"path": "/export/lotB/b1.tif", "sample_id": "lotB", "composition": "811", "state": "cycled",
             "predicted_class": "811_cycled", "confidence": 0.97},
        ],
        samples=[{"sample_id": "lotA", "n_images": 2, "verdict": "pass"},
                 {"sample_id": "lotB", "n_images": 2, "composition": "811", "state": "cycled",
                  "expected": "622_pristine", "verdict": "fail", "confidence": 0.97}],
        **kw,
    )


def test_dashboard_shows_counts_verdicts_samples_errors(settings: Settings) -> None:
    _fixture(settings)
    text = _text(settings)
    assert "daemon running" in text and "pid 4242 on sem-ws1" in text
    assert "device cpu" in text
    assert "waiting 3" in text and "in progress 2" in text and "done 3" in text and "failed 1" in text
    assert "1.25 images/s" in text
    assert "b1.tif" in text and "811" in text and "cycled" in text and "0.97" in text
    assert "unknown" in text and "0.41" in text
    lines = text.splitlines()
    # newest first
    first = {name: min(i for i, x in enumerate(lines) if name in x) for name in ("a1.tif", "b1.tif")}
    assert first["b1.tif"] < first["a1.tif"]
    sample_b = next(line for line in lines if "lotB" in line and "622_pristine" in line)
    assert "811" in sample_b and "│ fail" in sample_b
    assert any("lotA" in line and "│ pass" in line for line in lines)
    assert "recent errors" in text and "broken.tif: not a TIFF file: truncated header" in text
    assert "no heartbeat" not in text


def test_status_colours(settings: Settings) -> None:
    _fixture(settings)
    console = Console(record=True, width=160, force_terminal=True, color_system="truecolor")
    console.print(render(take_snapshot(settings, now=NOW), settings))
    segments = list(console._record_buffer)
    styles = {seg.text.strip(): str(seg.style) for seg in segments if seg.text.strip() in ("pass", "fail")}
    assert "green" in styles["pass"] and "red" in styles["fail"]


def test_stale_daemon_is_called_out(settings: Settings) -> None:
    _fixture(settings, heartbeat_age_s=settings.live.stale_seconds + 60)
    text = _text(settings)
    assert "no heartbeat for more than 120 s" in text and "not running" in text


def test_missing_and_uninitialised_database(settings: Settings) -> None:
    text = _text(settings)
    assert "no database yet" in text and str(settings.store.database) in text
    settings.store.database.write_bytes(b"")  # a file the daemon has just created
    assert "not initialised yet" in _text(settings)


def test_empty_database_before_first_heartbeat(settings: Settings) -> None:
    from semwatch.store import db
    from semwatch.store.schema import create_schema

    conn = db.connect(settings.store.database)
    create_schema(conn)
    conn.close()
    text = _text(settings)
    assert "no daemon has written to this database yet" in text and "no verdicts yet" in text


def test_file_names_are_not_markup(settings: Settings) -> None:
    make_database(settings.store.database, now=NOW,
                  images=[{"path": "/export/[bold]x [red].tif", "sample_id": "[link]s"}])
    text = _text(settings)
    assert "[bold]x [red].tif" in text and "[link]s" in text


def test_live_view_thread_starts_and_stops(settings: Settings) -> None:
    _fixture(settings)
    console = Console(record=True, width=160, force_terminal=False)
    view = LiveView(settings.replace(live=type(settings.live)(refresh_per_second=20.0)), console)
    with view:
        import time

        time.sleep(0.3)
    assert "lotB" in console.export_text()


def test_top_once_cli(cli: Cli, settings: Settings, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[store]\ndatabase = "{settings.store.database}"\n', encoding="utf-8")
    missing = cli("top", "--once", "--config", config, env={"COLUMNS": "160"})
    assert missing.code == ExitStatus.INPUT_FAILED and "no database yet" in missing.out
    _fixture(settings)
    done = cli("top", "--config", config, env={"COLUMNS": "160"})  # not a terminal: one frame, as --once
    assert done.code == ExitStatus.OK, done.err
    assert "\x1b[" not in done.out  # not a terminal: no ANSI codes
    assert "lotB" in done.out and "recent errors" in done.out


def test_cleanly_stopped_daemon(settings: Settings) -> None:
    _fixture(settings, heartbeat_age_s=600, daemon_state="stopped", message="exit 0")
    text = _text(settings)
    assert "daemon stopped (exit 0)" in text and "the daemon stopped (exit 0)" in text and "hung" not in text
    assert "daemon: exit 0" not in text  # a clean stop is not listed among the errors


def test_failed_daemon_exit_is_listed_among_errors(settings: Settings) -> None:
    _fixture(settings, heartbeat_age_s=600, daemon_state="stopped", message="exit 1")
    text = _text(settings)
    assert "daemon stopped (exit 1)" in text and "daemon: exit 1" in text and "recent errors" in text


HOSTILE = "evil\x1b]0;pwned\x07\x1b[31m[red]x\u202e_\\xff.tif"  # path_text form: \xff was a raw byte


def _hostile_fixture(settings: Settings) -> None:
    make_database(
        settings.store.database, now=NOW,
        images=[{"path": f"/export/lot\x1b[2J/{HOSTILE}", "sample_id": "[bold]s\x1b[5m", "status": "failed",
                 "error": "bad \x1b]0;err\x07 [red]file", "composition": "6\x1b[1m22"}],
        samples=[{"sample_id": "[bold]s\x1b[5m", "expected": "\x1b[8mhidden"}],
        message="disk \x1b]0;msg\x07 full", daemon_state="stopped", heartbeat_age_s=600)


def test_hostile_names_are_shown_never_interpreted(settings: Settings) -> None:
    _hostile_fixture(settings)
    console = Console(record=True, width=250, force_terminal=True, color_system="truecolor")
    console.print(render(take_snapshot(settings, now=NOW), settings))
    out = console.export_text(styles=True)  # what reaches the terminal, rich's own codes included
    for sequence in ("\x1b]", "\x07", "\x1b[2J", "\x1b[5m", "\x1b[8m", "\u202e"):  # not rich's own
        assert sequence not in out, repr(sequence)
    plain = _text(settings, 250)
    assert "evil\\x1b]0;pwned\\x07\\x1b[31m[red]x\\u202e_\\xff.tif" in plain
    assert "[bold]s\\x1b[5m" in plain and "\\x1b[8mhidden" in plain
    assert "bad \\x1b]0;err\\x07 [red]file" in plain and "disk \\x1b]0;msg\\x07 full" in plain


def test_top_once_cli_with_hostile_names(cli: Cli, settings: Settings, tmp_path: Path) -> None:
    _hostile_fixture(settings)
    config = tmp_path / "config.toml"
    config.write_text(f'[store]\ndatabase = "{settings.store.database}"\n', encoding="utf-8")
    run = cli("top", "--once", "--config", config,
              env={"COLUMNS": "250", "FORCE_COLOR": "1", "TERM": "xterm-256color"})
    assert run.code == ExitStatus.OK, run.err
    for sequence in ("\x1b]", "\x07", "\x1b[2J", "\u202e"):
        assert sequence not in run.out, repr(sequence)
    assert "\\x1b]0;pwned\\x07" in run.out
    assert "\x1b[" in run.out  # a colour terminal: rich's own styling is there, the names' is not
