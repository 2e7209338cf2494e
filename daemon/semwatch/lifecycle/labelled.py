"""Labelled ledger images for the promotion gate: each content's current label (`store.labels`)
with a file that still holds that content.

The file is the newest current `images` row with the label's sha256 (else the path the label was
made on); it is untrusted like everything from the watch folder, so it is hashed through the one
safe open (`reading.micrograph.content_sha256`, confined to `[watch] folder`, bounded in bytes). A label whose
file is gone, refused or changed (another sha256) is skipped and counted, never scored.
"""

from __future__ import annotations

from pathlib import Path

from semwatch.config import Settings
from semwatch.lifecycle.gate import FOREIGN, GateImage
from semwatch.reading.micrograph import content_sha256
from semwatch.safefs import Confinement, RefusedFile, path_from_text
from semwatch.store.access import open_readonly
from semwatch.store.labels import current_labels, has_labels_table


def ledger_images(settings: Settings) -> tuple[list[GateImage], dict[str, int]]:
    """(images with their label's truth, {"missing": n, "changed": n})."""
    skipped = {"missing": 0, "changed": 0}
    database = settings.store.database
    if not database.is_file():
        return [], skipped
    conn = open_readonly(database, busy_timeout_ms=settings.store.busy_timeout_ms, older="copy")
    try:
        if not has_labels_table(conn):
            return [], skipped
        labels = current_labels(conn)
        where: dict[str, str] = {}
        for label in labels:
            row = conn.execute("SELECT path FROM images WHERE sha256 = ? AND current = 1 ORDER BY id DESC "
                               "LIMIT 1", (label.sha256,)).fetchone()
            text = row["path"] if row is not None else label.path
            if text:
                where[label.sha256] = text
    finally:
        conn.close()
    confine = Confinement(Path(settings.watch.folder).absolute(), settings.watch.follow_symlinks)
    out: list[GateImage] = []
    for label in labels:
        text = where.get(label.sha256)
        if text is None:
            skipped["missing"] += 1
            continue
        path = Path(path_from_text(text))
        try:
            sha = content_sha256(path, settings, confine=confine)
        except (OSError, RefusedFile):
            skipped["missing"] += 1
            continue
        if sha != label.sha256:
            skipped["changed"] += 1
            continue
        truth = FOREIGN if label.status == "foreign" else label.class_name
        if truth is None:
            continue
        out.append(GateImage(path, truth, "labels", sha))
    return out, skipped
