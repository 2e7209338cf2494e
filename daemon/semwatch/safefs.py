"""Untrusted files and names: everything that comes out of the watch folder goes through here.

The export folder is written by instrument software, other programs and people. An entry there
can be a FIFO (opening it blocks), a device or a link to one (`/dev/zero` never ends), a link
to a file outside the folder (`/etc/passwd`), or a name that is not UTF-8 or holds terminal
escapes. So:

- `open_regular` is the one way a file from the folder is opened: `lstat` first, the symlink
  policy, `open(O_NONBLOCK | O_NOFOLLOW)`, `fstat` of the opened descriptor, regular files only,
  a size limit. `read_bounded` reads a small file (sidecar, expected.txt) through it.
- `path_text` turns a path (a `str` from `os.fsdecode`, possibly holding surrogate escapes) into
  text that is valid UTF-8, lossless and unambiguous: undecodable bytes become `\\xNN` and a
  literal backslash `\\\\`; plain names are unchanged. `path_from_text` reverses it, so the
  original bytes are still used to open the file.
- `printable` makes control characters visible for anything printed on a terminal.
- `csv_cell` neutralises spreadsheet formulas (the leading-apostrophe rule).

Written by hand: no maintained library does the O_NOFOLLOW/fstat dance with a containment policy.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

FollowSymlinks = Literal["inside", "never", "always"]
PATH_MAX = 4096  # bytes, the Linux limit for a path handed to a system call

_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a directory",
    stat.S_IFLNK: "a symbolic link",
}


class RefusedFile(OSError):
    """A file that is not opened on purpose (not regular, a link outside the folder, too large).

    An `OSError`, so code that already handles unreadable files handles it; `strerror` is the
    one-line reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.EPERM, reason)


@dataclass(frozen=True)
class Confinement:
    """Where files may be read from. `root=None`: anywhere (files named on the command line)."""

    root: Path | None = None
    follow_symlinks: FollowSymlinks = "inside"

    def real_root(self) -> str | None:
        return os.path.realpath(self.root) if self.root is not None else None


UNCONFINED = Confinement(None, "always")


def kind_of(mode: int) -> str:
    """'a FIFO (named pipe)', 'a directory' ... for a non-regular `st_mode`."""
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip("/") + "/")


def check_confined(path: str | Path, confine: Confinement) -> None:
    """Refuse a path that leads outside the confinement root through a link (the last component
    or a folder on the way), as the policy says. Raises `RefusedFile`."""
    name = os.fspath(path)
    if len(os.fsencode(name)) >= PATH_MAX:
        raise RefusedFile(f"path too long ({len(os.fsencode(name))} bytes; the limit is {PATH_MAX - 1})")
    try:
        is_link = stat.S_ISLNK(os.lstat(name).st_mode)
    except OSError:
        is_link = False  # open() will say what is wrong
    if confine.follow_symlinks == "always":
        return
    if is_link and confine.follow_symlinks == "never":
        raise RefusedFile("a symbolic link ([watch] follow_symlinks = \"never\")")
    root = confine.real_root()
    if root is None:
        return
    real = os.path.realpath(name)
    if not _inside(real, root):
        what = "a symbolic link" if is_link else "reached through a symbolic link"
        raise RefusedFile(f"{what} to a file outside the watch folder ({path_text(real)})")


def open_regular(path: str | Path, *, confine: Confinement = UNCONFINED,
                 max_bytes: int | None = None) -> tuple[int, os.stat_result]:
    """Open a regular file for reading without ever blocking on a FIFO or following a link the
    policy forbids. Returns (fd, fstat of that fd); the caller closes the fd. Raises `RefusedFile`
    for what is refused on purpose and `OSError` for what cannot be read."""
    name = os.fspath(path)
    check_confined(name, confine)
    st = os.lstat(name)
    follow = stat.S_ISLNK(st.st_mode)
    if follow:
        # Look at the target before opening it: opening a device has effects of its own (a tape
        # rewinds, a watchdog starts), so a link to one is refused without being opened.
        st = os.stat(name)  # noqa: PTH116 - str paths keep surrogate bytes
    if not stat.S_ISREG(st.st_mode):
        raise RefusedFile(f"not a regular file: {kind_of(st.st_mode)}")
    # O_NOCTTY: a terminal swapped in after the check must not become the daemon's controlling tty.
    flags = (os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
             | (0 if follow else os.O_NOFOLLOW))
    try:
        fd = os.open(name, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # replaced by a link between lstat and open
            raise RefusedFile("a symbolic link") from None
        raise
    try:
        fst = os.fstat(fd)
        if not stat.S_ISREG(fst.st_mode):
            raise RefusedFile(f"not a regular file: {kind_of(fst.st_mode)}")
        if follow and confine.follow_symlinks == "inside" and confine.root is not None:
            # The link may have been re-pointed between the check and the open: the file we hold
            # must be the one the check saw inside the folder.
            real = os.stat(os.path.realpath(name))  # noqa: PTH116 - str paths keep surrogate bytes
            if (real.st_dev, real.st_ino) != (fst.st_dev, fst.st_ino):
                raise RefusedFile("a symbolic link that changed while it was opened")
        if max_bytes is not None and fst.st_size > max_bytes:
            raise RefusedFile(f"file too large ({fst.st_size} bytes > {max_bytes})")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, fst


def read_bounded(path: str | Path, max_bytes: int, *, confine: Confinement = UNCONFINED) -> bytes:
    """The whole content of a small regular file, at most `max_bytes` (more is refused)."""
    fd, _ = open_regular(path, confine=confine, max_bytes=max_bytes)
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(max_bytes + 1)  # the file may have grown since fstat
    if len(data) > max_bytes:
        raise RefusedFile(f"file too large (> {max_bytes} bytes)")
    return data


# --- names -----------------------------------------------------------------------------------------

_SURROGATE = re.compile("[\udc80-\udcff]")
_NEEDS_ESCAPE = re.compile("[\\\\\udc80-\udcff]")
# Only bytes >= 0x80 are ever escaped: a "\\x41" typed by hand stays as it is (a surrogate
# below \udc80 cannot be encoded back to bytes).
_ESCAPED = re.compile(r"\\(\\|x[89a-fA-F][0-9a-fA-F])")


def sha256_bounded(path: str | Path, *, confine: Confinement, max_bytes: int, limit: str,
                   on_chunk: Callable[[], None] | None = None, chunk_bytes: int = 1 << 20) -> str:
    """The SHA-256 of a file opened through `open_regular`, refused (`RefusedFile`) once more than
    `max_bytes` were read: a file that grows while it is hashed stops at the limit (`limit` names
    it in the message, e.g. "[reading] max_file_mb 200").
    `on_chunk` runs after each chunk (the daemon's readers beat their liveness stage there and
    check whether they were abandoned). By hand rather than `hashlib.file_digest`, which reads to
    the end and calls nobody back."""
    fd, _ = open_regular(path, confine=confine, max_bytes=max_bytes)
    digest = hashlib.sha256()
    total = 0
    with os.fdopen(fd, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            total += len(chunk)
            if total > max_bytes:
                raise RefusedFile(f"file too large (> {limit})")
            digest.update(chunk)
            if on_chunk is not None:
                on_chunk()
    return digest.hexdigest()


def path_text(path: str | Path) -> str:
    """A path as lossless, unambiguous, valid UTF-8 text: bytes that are not UTF-8 (surrogate
    escapes from `os.fsdecode`) are written `\\xNN`, a literal backslash `\\\\`. A name with
    neither is returned unchanged."""
    text = os.fspath(path)
    if not _NEEDS_ESCAPE.search(text):
        return text

    def sub(m: re.Match[str]) -> str:
        ch = m.group()
        return "\\\\" if ch == "\\" else f"\\x{ord(ch) - 0xDC00:02x}"

    return _NEEDS_ESCAPE.sub(sub, text)


def path_from_text(text: str) -> str:
    """The inverse of `path_text`: the path as `os.fsdecode` gives it (opens the original bytes)."""
    if "\\" not in text:
        return text

    def sub(m: re.Match[str]) -> str:
        body = m.group(1)
        return "\\" if body == "\\" else chr(0xDC00 + int(body[1:], 16))

    raw = _ESCAPED.sub(sub, text)
    # Escaped bytes that happen to form valid UTF-8 together were never produced by path_text from
    # a real name, but normalise through bytes so that the result is what os.fsdecode would give.
    return os.fsdecode(os.fsencode(raw))


def text_safe(text: str) -> str:
    """Any string (an error message, a sample id) made encodable as UTF-8: surrogate escapes
    become `\\xNN`. Unlike `path_text`, backslashes stay as they are."""
    if not _SURROGATE.search(text):
        return text
    return _SURROGATE.sub(lambda m: f"\\x{ord(m.group()) - 0xDC00:02x}", text)


def printable(text: str) -> str:
    """Text safe to print on a terminal: control and format characters (escape sequences, bell,
    carriage return, bidirectional overrides) and undecodable bytes shown as `\\xNN`/`\\uNNNN`."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
            continue
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch == " ":
            out.append(ch)
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> object:
    """A CSV cell that a spreadsheet will not run: text beginning with = + - @ tab or CR gets a
    leading apostrophe (OWASP's rule); other values pass unchanged. Text is made UTF-8-safe."""
    if isinstance(value, str):
        value = text_safe(value)
        if value.startswith(_FORMULA_START):
            return "'" + value
    return value


def _umask() -> int:
    """This process's umask, read without changing it (`os.umask` sets it to read it, which races
    with other threads creating files); 0o022 where /proc does not say."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def write_atomic(path: Path, data: bytes) -> None:
    """Write `path` so that a reader sees the old file or the whole new one, never half: a temporary
    file beside it, flushed to disk, then renamed over it. The file gets the mode it had, or a new
    file's (0666 less the umask): `mkstemp`'s 0600 would hide reports and models from the group
    (a daemon running as its own user, a lab's web server)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
