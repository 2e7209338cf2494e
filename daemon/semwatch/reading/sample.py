"""Which sample an image belongs to, and what it is expected to be: derived from its path, its
metadata and the folder's `expected.txt` (read through `safefs`, never blocking)."""

from __future__ import annotations

import re
from pathlib import Path

from semwatch.config import SampleSettings
from semwatch.safefs import UNCONFINED, Confinement, read_bounded
from semwatch.values import Metadata

EXPECTED_FILE = "expected.txt"
# An expected.txt holds a class name or two; anything larger is not one (or a link to /dev/zero).
MAX_EXPECTED_BYTES = 64 * 1024


def sample_key(path: Path, watch_folder: Path, settings: SampleSettings,
               metadata: Metadata | None = None) -> str:
    """The sample id of the image at `path`.

    parent: the image's folder relative to the watch folder ("." for the folder itself);
    regex: the `sample` group of `settings.regex` searched in the file name;
    metadata: the metadata field `settings.metadata_field` (e.g. the SNE session folder).
    Where the regex does not match or the field is missing, the parent folder is used.
    """
    if settings.key == "regex":
        match = re.search(settings.regex, path.name)
        if match and match.group("sample"):
            return match.group("sample")
    elif settings.key == "metadata" and metadata is not None:
        value = getattr(metadata, settings.metadata_field, None)
        if value is None:
            value = metadata.extra.get(settings.metadata_field)
        if value not in (None, ""):
            return str(value)
    return parent_key(path, watch_folder)


def parent_key(path: Path, watch_folder: Path) -> str:
    try:
        rel = path.parent.relative_to(watch_folder)
    except ValueError:
        return str(path.parent)
    return rel.as_posix() or "."


def expected_class(sample_id: str, image_path: Path, settings: SampleSettings, *,
                   confine: Confinement = UNCONFINED) -> str | None:
    """The class a sample should be: the first `[[samples.expect]]` rule whose pattern matches the
    sample id, else `expected.txt` in the image's folder (first non-empty line), else None.

    expected.txt is read through `safefs.read_bounded`: a FIFO, a device, a link `confine`
    forbids or a file over `MAX_EXPECTED_BYTES` means no expectation, at once."""
    for rule in settings.expect:
        if re.search(rule.pattern, sample_id):
            return rule.expected_class
    candidate = image_path.parent / EXPECTED_FILE
    try:
        text = read_bounded(candidate, MAX_EXPECTED_BYTES, confine=confine).decode("utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return None
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return line
    return None
