"""The CSV files semwatch writes, their columns, and the one function that writes their rows.

Three files: `results.csv` (live: one line per finished version, appended by the writer, see
`results_csv`) and the day's report `images.csv` and `samples.csv` (`report.daily`). Their column
lists stand side by side here because each is a contract with somebody's spreadsheet or script:
change one on purpose, and document it.

Every cell goes through `safefs.csv_cell`: file names, sample ids and errors come from the export
folder, and a cell such as `=HYPERLINK(...)` must stay text when the file is opened in a
spreadsheet. None is an empty cell; an image's reasons are one cell, joined with "; ".
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence

from semwatch.safefs import csv_cell

# results.csv: the ledger's finished rows (with the version's identity: sha256, size, mtime).
RESULTS_COLUMNS = (
    "id", "path", "sample_id", "status", "predicted_class", "composition", "state", "confidence",
    "tile_agreement", "n_tiles", "model_id", "sha256", "size_bytes", "mtime_ns", "detected_at",
    "processed_at", "error", "reasons",
    "instrument",  # added by schema step 6 (fleet): the last column, so older readers still work
)
# The report's images.csv: the day's finished rows, with the time in the report's time zone;
# `supersedes` is the id of the result a re-classification replaced (`semwatch reprocess`).
REPORT_IMAGE_COLUMNS = (
    "id", "path", "sample_id", "status", "predicted_class", "composition", "state", "confidence",
    "tile_agreement", "n_tiles", "model_id", "detected_at", "processed_at", "processed_local", "error",
    "reasons", "supersedes",
)
# The report's samples.csv: the samples of the day's images, with how many were that day's and the
# models of their current images (two ids: partly classified by an older model).
REPORT_SAMPLE_COLUMNS = (
    "sample_id", "verdict", "composition", "state", "predicted_class", "confidence", "uniformity",
    "expected", "n_images", "images_this_day", "updated_at", "model_ids",
)


def csv_bytes(columns: Sequence[str], rows: Iterable[Mapping[str, object]], *, header: bool = True) -> bytes:
    """UTF-8 CSV of `rows` (the `columns` of each; a missing key is an empty cell), with a header
    line unless `header` is False (an append to an existing file)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if header:
        writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    return buf.getvalue().encode("utf-8")


def reasons_text(stored: str | None) -> str:
    """The `images.reasons` column (a JSON list of text) as one cell; text that is not such a list
    is shown as it is."""
    try:
        items = json.loads(stored) if stored else []
    except ValueError:
        return stored or ""
    return "; ".join(map(str, items)) if isinstance(items, list) else str(items)


def _cell(value: object) -> object:
    return "" if value is None else csv_cell(value)
