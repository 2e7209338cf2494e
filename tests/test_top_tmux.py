"""`semwatch top` in a real terminal (tmux): the interactive console follows the database as it
changes, answers keys and quits; `semwatch watch` on a terminal shows the rich dashboard."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dbfixture import iso, make_database
from semwatch.config import Settings
from semwatch.errors import ExitStatus
from semwatch.store import db

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None,
                                reason="tmux is not installed (apt-get install -y tmux)")


@pytest.fixture
def tmux() -> Iterator[list[str]]:
    # A private server: never touches anyone's tmux. Commands run under `env -u COLUMNS -u LINES`
    # because a tmux server started from a test run can hand them COLUMNS=80 (rich obeys it).
    socket = f"semwatch-test-{uuid.uuid4().hex[:8]}"
    base = ["tmux", "-L", socket]
    yield base
    subprocess.run([*base, "kill-server"], capture_output=True, timeout=10)


def _screen(base: list[str]) -> str:
    out = subprocess.run([*base, "capture-pane", "-p", "-t", "top"], capture_output=True, text=True,
                         timeout=10)
    return out.stdout


def _wait_for(base: list[str], needle: str, timeout: float = 30.0, *, present: bool = True) -> str:
    """The screen once `needle` is on it (`present=False`: once it is not)."""
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = _screen(base)
        if (needle in screen) == present:
            return screen
        time.sleep(0.2)
    raise AssertionError(f"{needle!r} {'not ' if present else 'still '}on screen:\n{screen}")


def _start(base: list[str], command: str, config: Path, done_file: Path,
           size: tuple[int, int] = (150, 50)) -> None:
    """`semwatch COMMAND --config CONFIG` in a terminal of `size`; its exit code goes to `done_file`."""
    cmd = (f"env -u COLUMNS -u LINES {shlex.quote(sys.executable)} -m semwatch {command} "
           f"--config {shlex.quote(str(config))}; "
           f"echo $? > {shlex.quote(str(done_file))}; sleep 30")
    subprocess.run([*base, "new-session", "-d", "-s", "top", "-x", str(size[0]), "-y", str(size[1]), cmd],
                   check=True, timeout=10)


def _keys(base: list[str], *keys: str) -> None:
    subprocess.run([*base, "send-keys", "-t", "top", *keys], check=True, timeout=10)


def _interrupt_and_check_exit(base: list[str], done_file: Path, timeout: float, key: str = "C-c") -> None:
    """Ctrl-C (or `key`), as an operator would: the command exits 0 without a traceback."""
    _keys(base, key)
    deadline = time.monotonic() + timeout
    while not done_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert int(done_file.read_text()) == ExitStatus.OK
    assert "Traceback" not in _screen(base)


def test_top_follows_the_database_in_a_terminal(settings: Settings, tmp_path: Path, tmux: list[str]) -> None:
    """The console in an 80x24 terminal (an SSH session's default): it waits for the database,
    shows new rows as the daemon writes them, searches, opens a detail and quits with q."""
    config = tmp_path / "config.toml"
    config.write_text(f'[store]\ndatabase = "{settings.store.database}"\n[live]\nrefresh_per_second = 5.0\n',
                      encoding="utf-8")
    done_file = tmp_path / "exit-code"
    _start(tmux, "top", config, done_file, size=(80, 24))
    _wait_for(tmux, "no database yet")  # started before the daemon ever ran

    now = datetime.now(UTC)
    make_database(settings.store.database, now=now, images=[{"path": "/export/lotA/first.tif",
                                                              "sample_id": "lotA", "processed_at": iso(now)}],
                  samples=[{"sample_id": "lotA"}])
    screen = _wait_for(tmux, "first.tif")
    assert "daemon running" in screen and "lotA" in screen
    assert "q Quit" in screen and "/ Search" in screen  # the footer lists the keys

    # The "daemon" writes a new verdict while top is reading.
    conn = db.connect(settings.store.database)
    try:
        conn.execute(
            "INSERT INTO images (path, size_bytes, mtime_ns, status, sample_id, error, detected_at, "
            "processed_at) VALUES ('/export/lotB/second.tif', 1, 1, 'failed', 'lotB', 'truncated file', "
            "?, ?)",
            (iso(now), iso(datetime.now(UTC))))
    finally:
        conn.close()
    screen = _wait_for(tmux, "second.tif")
    assert "failed" in screen and "first.tif" in screen

    assert "Detail" in screen  # the table has the focus: its key is in the footer
    _keys(tmux, "/")  # search by name, typed once the focus has moved, as a person types
    _wait_for(tmux, "Detail", present=False)  # the search field has it: the table's key left the footer
    _keys(tmux, "second", "Enter")
    _wait_for(tmux, "1 shown")
    _keys(tmux, "Enter")  # the detail of the one row left
    screen = _wait_for(tmux, "why it failed")
    assert "truncated file" in screen
    _keys(tmux, "Escape")
    _wait_for(tmux, "q Quit")
    _interrupt_and_check_exit(tmux, done_file, 15, key="q")


@pytest.mark.slow
def test_daemon_on_a_terminal_shows_the_dashboard(tiny_model: Path, ncm_dir: Path, tmp_path: Path,
                                                  tmux: list[str]) -> None:
    incoming = tmp_path / "incoming"
    (incoming / "lot7").mkdir(parents=True)
    config = tmp_path / "config.toml"
    config.write_text(
        f'[watch]\nfolder = "{incoming}"\nsettle_seconds = 0.5\n'
        f'[store]\ndatabase = "{tmp_path / "var/semwatch.db"}"\n'
        f'results_csv = "{tmp_path / "var/results.csv"}"\n'
        f'[model]\npath = "{tiny_model}"\ndevice = "cpu"\n[report]\nenabled = false\n', encoding="utf-8")
    done_file = tmp_path / "exit-code"
    _start(tmux, "watch", config, done_file)
    _wait_for(tmux, "daemon running", timeout=120)
    source = sorted((ncm_dir / "811_cycled").glob("*.jpg"))[0]
    shutil.copy(source, incoming / "lot7" / "new-image.jpg")
    screen = _wait_for(tmux, "new-image.jpg", timeout=120)
    assert "lot7" in screen and "device cpu" in screen
    _interrupt_and_check_exit(tmux, done_file, 30)


def test_top_shows_escape_sequences_in_names_as_text(settings: Settings, tmp_path: Path,
                                                     tmux: list[str]) -> None:
    """A file name holding `ESC ] 0 ; title BEL` and `ESC [ 2 J` must not retitle or clear the
    operator's terminal: tmux records the title a program sets, so a real terminal is the check."""
    config = tmp_path / "config.toml"
    config.write_text(f'[store]\ndatabase = "{settings.store.database}"\n[live]\nrefresh_per_second = 5.0\n',
                      encoding="utf-8")
    now = datetime.now(UTC)
    make_database(settings.store.database, now=now, images=[
        {"path": "/export/lotE/evil\x1b]0;pwned\x07\x1b[2J[red]x.tif", "sample_id": "lot\x1b]2;pwned2\x07E",
         "status": "failed", "error": "bad\x1b]0;pwned3\x07", "processed_at": iso(now)}],
        samples=[{"sample_id": "lot\x1b]2;pwned2\x07E"}])
    done_file = tmp_path / "exit-code"
    _start(tmux, "top", config, done_file)
    # The full name is in the highlighted image's detail beside the table (the table cell is cut).
    screen = _wait_for(tmux, "evil\\x1b]0;pwned\\x07\\x1b[2J[red]x.tif")
    assert "lot\\x1b]2;pwned2\\x07E" in screen
    title = subprocess.run([*tmux, "display-message", "-p", "-t", "top", "#{pane_title}"],
                           capture_output=True, text=True, timeout=10).stdout
    assert "pwned" not in title
    _interrupt_and_check_exit(tmux, done_file, 15)
