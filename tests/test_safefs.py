"""safefs: opening untrusted folder entries (real FIFOs, sockets, devices, links) and untrusted names."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from semwatch import safefs
from semwatch.safefs import (
    UNCONFINED,
    Confinement,
    RefusedFile,
    csv_cell,
    open_regular,
    path_from_text,
    path_text,
    printable,
    read_bounded,
    write_atomic,
)


def _release_fifos(fifos: tuple[Path, ...]) -> None:
    """Open and close the write end of each FIFO: a reader blocked in open() then sees EOF, so a
    regression fails the test instead of leaving a thread stuck for ever."""
    for fifo in fifos:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


def call_within(fn: Callable[[], Any], timeout: float = 5.0, *, fifos: tuple[Path, ...] = ()) -> Any:
    """`fn()` in a thread: its result, or its exception re-raised; fails the test if it blocks."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the test's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="call-within", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        _release_fifos(fifos)
        thread.join(5.0)
        pytest.fail(f"blocked for more than {timeout} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """A watch folder with a file, links inside and out, a link to /dev/zero, a FIFO and a socket."""
    watch, elsewhere = tmp_path / "watch", tmp_path / "elsewhere"
    (watch / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    (watch / "sub" / "real.txt").write_bytes(b"inside\n")
    (elsewhere / "secret.txt").write_bytes(b"outside\n")
    paths = {
        "real": watch / "sub" / "real.txt",
        "link_in": watch / "link_in.txt",
        "link_out": watch / "link_out.txt",
        "via_dir_link": watch / "outdir" / "secret.txt",
        "zero": watch / "zero.txt",
        "fifo": watch / "pipe.txt",
        "socket": watch / "sock.txt",
        "dir": watch / "sub",
    }
    paths["link_in"].symlink_to(paths["real"])
    paths["link_out"].symlink_to(elsewhere / "secret.txt")
    (watch / "outdir").symlink_to(elsewhere, target_is_directory=True)
    paths["zero"].symlink_to("/dev/zero")
    os.mkfifo(paths["fifo"])
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(paths["socket"]))
    sock.close()
    paths["root"] = watch
    return paths


def _read(path: Path, confine: Confinement = UNCONFINED) -> bytes:
    fd, st = open_regular(path, confine=confine)
    with os.fdopen(fd, "rb") as fh:
        data = fh.read()
    assert len(data) == st.st_size
    return data


def test_regular_file_and_size_limit(tree: dict[str, Path]) -> None:
    assert _read(tree["real"]) == b"inside\n"
    assert read_bounded(tree["real"], 7) == b"inside\n"
    with pytest.raises(RefusedFile, match=r"file too large \(7 bytes > 6\)"):
        read_bounded(tree["real"], 6)
    with pytest.raises(FileNotFoundError):
        open_regular(tree["root"] / "missing.txt")


@pytest.mark.parametrize(
    ("key", "reason"),
    [("fifo", "not a regular file: a FIFO (named pipe)"), ("socket", "not a regular file: a socket"),
     ("dir", "not a regular file: a directory"), ("zero", "not a regular file: a character device")],
)
def test_non_regular_entries_refused_at_once(tree: dict[str, Path], key: str, reason: str) -> None:
    t0 = time.perf_counter()
    with pytest.raises(RefusedFile) as info:
        call_within(lambda: open_regular(tree[key]), fifos=(tree["fifo"],))
    assert info.value.strerror == reason
    assert isinstance(info.value, OSError)
    with pytest.raises(RefusedFile):
        call_within(lambda: read_bounded(tree[key], 1024), fifos=(tree["fifo"],))
    assert time.perf_counter() - t0 < 1.0


def test_link_to_device_is_not_even_opened(tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening a device has effects of its own (a tape rewinds, a watchdog starts): the target is
    looked at before any open()."""
    opened: list[str] = []
    real_open = os.open

    def spy(path: Any, *args: Any, **kwargs: Any) -> int:
        opened.append(os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(safefs.os, "open", spy)
    with pytest.raises(RefusedFile, match="character device"):
        open_regular(tree["zero"])
    assert opened == []


def test_symlink_policies(tree: dict[str, Path]) -> None:
    root = tree["root"]
    inside, never, always = (Confinement(root, policy) for policy in ("inside", "never", "always"))
    # "inside": links are followed to files inside the folder only, folder links included.
    assert _read(tree["link_in"], inside) == b"inside\n"
    assert _read(tree["real"], inside) == b"inside\n"
    with pytest.raises(RefusedFile, match="a symbolic link to a file outside the watch folder"):
        _read(tree["link_out"], inside)
    with pytest.raises(RefusedFile, match="reached through a symbolic link"):
        _read(tree["via_dir_link"], inside)
    with pytest.raises(RefusedFile, match="outside the watch folder"):
        _read(tree["zero"], inside)
    # "never": no link at all, even one that stays inside.
    assert _read(tree["real"], never) == b"inside\n"
    for key in ("link_in", "link_out", "zero"):
        with pytest.raises(RefusedFile, match="symbolic link"):
            _read(tree[key], never)
    # "always" (and UNCONFINED, for files named on the command line): links are followed.
    for confine in (always, UNCONFINED):
        assert _read(tree["link_in"], confine) == b"inside\n"
        assert _read(tree["link_out"], confine) == b"outside\n"
        assert _read(tree["via_dir_link"], confine) == b"outside\n"
        with pytest.raises(RefusedFile, match="character device"):  # followed, still not regular
            _read(tree["zero"], confine)


# --- names ----------------------------------------------------------------------------------------

NAMES = [b"plain.jpg", b"bad_\xff.jpg", b"back\\slash.jpg", b"lit\\xff.jpg", b"\\\\", b"\\", b"end\\",
         b"\\x41", b"\xed\xb3\xbf", b"\xff\xfe\\xff\\\xff", "시료 폴더 é.jpg".encode(), b"tab\there",
         b"\x1b[31mred", b"x\\\\xff"]


def _random_names(n: int = 400) -> Iterator[bytes]:
    rng = np.random.default_rng(11)
    for _ in range(n):
        raw = rng.integers(1, 256, int(rng.integers(1, 40)), dtype=np.uint8).tobytes()
        yield raw.replace(b"/", b"_")


def test_path_text_round_trip_over_arbitrary_bytes() -> None:
    texts: dict[str, bytes] = {}
    for raw in [*NAMES, *_random_names()]:
        name = os.fsdecode(raw)
        text = path_text(name)
        text.encode("utf-8")  # valid UTF-8, whatever the name
        assert path_from_text(text) == name, raw
        assert os.fsencode(path_from_text(text)) == raw
        assert texts.setdefault(text, raw) == raw, (raw, texts[text])  # unambiguous
    assert path_text("plain name é 시료.jpg") == "plain name é 시료.jpg"
    assert path_text(os.fsdecode(b"bad_\xff.jpg")) == "bad_\\xff.jpg"
    assert path_text("a\\b") == "a\\\\b"
    assert path_text(Path(os.fsdecode(b"d/\xfe"))) == "d/\\xfe"


def test_path_from_text_leaves_hand_typed_escapes() -> None:
    """Only bytes >= 0x80 are ever escaped: `\\x41` or a lone backslash typed by hand stay as they are."""
    assert path_from_text("a\\x41.jpg") == "a\\x41.jpg"
    assert path_from_text("C:\\data\\img.jpg") == "C:\\data\\img.jpg"


def test_path_text_opens_the_original_bytes(tmp_path: Path) -> None:
    raw = b"bad_\xff\\x.jpg"
    name = os.fsdecode(os.fsencode(tmp_path) + b"/" + raw)
    Path(name).write_bytes(b"data")
    assert [os.fsencode(p.name) for p in tmp_path.iterdir()] == [raw]
    assert read_bounded(path_from_text(path_text(name)), 100) == b"data"


def test_printable() -> None:
    assert printable("plain é 시료 name.jpg") == "plain é 시료 name.jpg"
    assert printable("a\x1b[31mred") == "a\\x1b[31mred"
    assert printable("bell\x07 cr\r nl\n") == "bell\\x07 cr\\x0d nl\\x0a"
    assert printable("abc\u202egpj.exe") == "abc\\u202egpj.exe"  # right-to-left override
    assert printable("zw\u200bsp") == "zw\\u200bsp"
    assert printable(os.fsdecode(b"bad_\xff")) == "bad_\\xff"
    assert printable("\U000e0001tag") == "\\U000e0001tag"
    for text in ("\x1b]0;title\x07", "\x9b2J", "\u2066x\u2069"):
        assert printable(text).isprintable()


def test_csv_cell() -> None:
    for text in ("=1+2", "+1", "-1", "@SUM(A1)", "\tx", "\rx", "=HYPERLINK(\"http://x\")"):
        assert csv_cell(text) == "'" + text
    for value in ("622_cycled", "a=b", "", " =x", 5, -3.5, 0.0, None, True):
        assert csv_cell(value) == value
    assert csv_cell(os.fsdecode(b"bad_\xff")) == "bad_\\xff"
    assert csv_cell(os.fsdecode(b"=\xff")) == "'=\\xff"


def test_an_atomic_write_gives_the_mode_of_a_plain_write_not_mkstemps(tmp_path: Path) -> None:
    """Reports and models written atomically are readable as a plainly created file would be (the
    umask decides), and a replaced file keeps its mode."""
    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "report.csv", b"a,b\n")
        plain = tmp_path / "plain.csv"
        plain.write_bytes(b"a,b\n")
    finally:
        os.umask(old)
    written = stat.S_IMODE((tmp_path / "report.csv").stat().st_mode)
    assert written == stat.S_IMODE(plain.stat().st_mode) == 0o640
    (tmp_path / "report.csv").chmod(0o604)
    write_atomic(tmp_path / "report.csv", b"c,d\n")
    assert stat.S_IMODE((tmp_path / "report.csv").stat().st_mode) == 0o604
    assert (tmp_path / "report.csv").read_bytes() == b"c,d\n"
