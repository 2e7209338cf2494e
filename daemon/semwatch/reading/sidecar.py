"""SEC Nanoeye / SNE-4500M sidecar files (`<image>.jpg.txt`) → `Metadata`, and the sidecar's name.

The format is INI-like (`[Section]` lines, `Key : Value` lines), UTF-8 with CRLF line ends. `Date`
carries a Korean AM/PM marker (오전 = AM, 오후 = PM) and a 12-hour clock; `Time` is the 24-hour clock
with fractional seconds, so the date comes from `Date` and the time of day from `Time`.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, time
from pathlib import Path, PureWindowsPath

from semwatch.reading.vendor import parse_magnification
from semwatch.safefs import UNCONFINED, Confinement, read_bounded
from semwatch.values import Metadata

# A sidecar larger than this is not a sidecar (real ones are about 2 KB): a huge stray file, or a
# link to /dev/zero, is refused instead of read.
MAX_SIDECAR_BYTES = 256 * 1024

_MARKERS_PM = ("오후", "PM", "pm")
_MARKERS_AM = ("오전", "AM", "am")
_NUMBER = re.compile(r"[-+]?\d+(?:[.,]\d+)?")


SIDECAR_SUFFIX = ".txt"
# SNE's images: a sidecar event of one of these re-looks at its image, and a JPEG in a folder of
# sidecars waits for its own (the reader reads `<name>.txt` beside any non-TIFF image).
SIDECAR_IMAGE_SUFFIXES = (".jpg", ".jpeg")


def sidecar_path(image: str) -> str:
    """The sidecar of `image`: `<name>.txt`, the full file name plus `.txt` (SNE's convention).

    The one rule for the reader and the settle gate. Not `<stem>.txt`: that name is not SNE's, it
    is shared by `x.jpg` and `x.tif`, and beside `expected.jpg` it is the folder's `expected.txt`.
    `str` in and out: the watcher works on `str` paths on its hot path."""
    return image + SIDECAR_SUFFIX


def image_of_sidecar(path: str) -> str | None:
    """`x.jpg.txt` -> `x.jpg` (the SNE image a sidecar is about), else None (`notes.txt`, `x.txt`)."""
    if path.lower().endswith(SIDECAR_SUFFIX):
        image = path[: -len(SIDECAR_SUFFIX)]
        if image.lower().endswith(SIDECAR_IMAGE_SUFFIXES):
            return image
    return None


def parse_sections(text: str) -> dict[str, dict[str, str]]:
    """`{section: {key: value}}`; the first occurrence of a key in a section wins."""
    sections: dict[str, dict[str, str]] = {}
    current = sections.setdefault("", {})
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1].strip(" -"), {})
            continue
        key, sep, value = line.partition(":")
        if sep:
            current.setdefault(key.strip(), value.strip())
    return sections


def _number(text: str | None) -> float | None:
    if not text:
        return None
    m = _NUMBER.search(text)
    if not m:
        return None
    value = float(m.group().replace(",", "."))
    return value if math.isfinite(value) else None  # 400 digits overflow to inf


def _voltage_kv(text: str | None) -> float | None:
    value = _number(text)
    if value is None or text is None:
        return None
    unit = text.lower()
    if "kv" in unit:
        return value
    if "v" in unit:
        return value / 1000.0
    return value


def _acquired_at(date_line: str | None, time_line: str | None) -> datetime | None:
    if not date_line:
        return None
    parts = date_line.split()
    try:
        day = datetime.strptime(parts[0], "%Y-%m-%d").date()
    except (ValueError, IndexError):
        return None
    if time_line:  # 24-hour clock, e.g. "20:35:02.0234407"
        m = re.match(r"(\d{1,2}):(\d{2}):(\d{2})", time_line)  # whole seconds, as `Date` gives
        if m:
            try:
                return datetime.combine(day, time(int(m.group(1)), int(m.group(2)), int(m.group(3))))
            except ValueError:  # "25:61:00": fall back to the Date line's clock
                pass
    clock = next((p for p in parts[1:] if ":" in p), None)
    if clock is None:
        return datetime.combine(day, time())
    try:
        h, mi, s = (int(x) for x in clock.split(":"))
        if any(p in _MARKERS_PM for p in parts):
            h = h % 12 + 12
        elif any(p in _MARKERS_AM for p in parts):
            h = h % 12
        return datetime.combine(day, time(h, mi, s))
    except ValueError:
        return None


def read_sidecar(path: Path, *, confine: Confinement = UNCONFINED) -> Metadata:
    """Parse one SNE sidecar; fields it does not carry stay None (never raises on content).

    Read through `safefs.read_bounded`, so a FIFO, a device, a link `confine` forbids or a file
    over `MAX_SIDECAR_BYTES` raises `OSError` at once instead of blocking or filling memory."""
    data = read_bounded(path, MAX_SIDECAR_BYTES, confine=confine)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:  # older Korean Windows software writes CP949
        text = data.decode("cp949", errors="replace")
    sections = parse_sections(text)
    info = sections.get("Image Info")
    if info is None:  # not an SNE sidecar (another vendor's .txt, notes): nothing known
        return Metadata()
    image_process = sections.get("Image Process", {})
    mag = parse_magnification(info.get("Magnification"))
    file_name = info.get("File Name")
    session = None
    if file_name:
        folder = PureWindowsPath(file_name).parent
        # Images saved into the software's own folder (C:\Program Files (x86)\sec\Nanoeye) name no
        # acquisition session.
        if not any(part.lower().startswith("program files") for part in folder.parts):
            session = folder.name or None
    extra = {k.lower(): v for k, v in image_process.items() if k in ("Brightness", "Contrast")}
    for key in ("Vacuum Mode", "Emission Current", "Working Distance"):
        value = info.get(key) or sections.get("Working Distance", {}).get(key)
        if value:
            extra[key.lower().replace(" ", "_")] = value
    if file_name:
        extra["file_name"] = file_name
    return Metadata(
        vendor="SEC",
        instrument=info.get("Model") or None,
        pixel_size_nm=None,
        magnification=mag,
        voltage_kv=_voltage_kv(info.get("Acceleated Voltage") or info.get("Accelerated Voltage")),
        detector=info.get("Detector Mode") or None,
        acquired_at=_acquired_at(info.get("Date"), info.get("Time")),
        session=session,
        extra=extra,
    )
