"""The console's Review tab: which results are worth an operator's minute first.

Only results nobody has labelled yet (no current label on their content), among the newest
`WINDOW` current results (an index range on the primary key: the query costs the same on a ledger
of any size; older results are the report's and `semwatch label --import`'s). Ranked by why:
1. `unknown` verdicts (the model does not know: the likeliest new material);
2. a shadow model disagrees (`shadow_results`, schema step 5, read only when the table exists);
3. the image's sample failed its expectation;
4. low confidence (an `ok` verdict below `low`);
5. the rest, least confident first.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from semwatch.store.labels import has_labels_table

WINDOW = 5000
REASONS = {1: "unknown", 2: "shadow", 3: "fail", 4: "low conf", 5: "unlabelled"}


@dataclass(frozen=True)
class ReviewRow:
    id: int
    path: str
    sha256: str
    status: str
    predicted_class: str | None
    confidence: float | None
    sample_id: str | None
    rank: int

    @property
    def why(self) -> str:
        return REASONS[self.rank]


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                        (name,)).fetchone() is not None


def review_queue(conn: sqlite3.Connection, *, low: float, limit: int = 500) -> list[ReviewRow]:
    """The unlabelled results to look at first (see the module docstring)."""
    labelled = ("AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.sha256 = i.sha256 AND l.status != 'cleared' "
                "AND NOT EXISTS (SELECT 1 FROM labels u WHERE u.undoes = l.id))"
                if has_labels_table(conn) else "")
    shadow = ("EXISTS (SELECT 1 FROM shadow_results r WHERE r.sha256 = i.sha256 AND r.agrees = 0)"
              if _has_table(conn, "shadow_results") else "0")
    rows = conn.execute(
        "SELECT i.id, i.path, i.sha256, i.status, i.predicted_class, i.confidence, i.sample_id, "
        f"CASE WHEN i.status = 'unknown' THEN 1 WHEN {shadow} THEN 2 "
        "WHEN s.verdict = 'fail' THEN 3 WHEN i.confidence < ? THEN 4 ELSE 5 END AS rank "
        "FROM images i LEFT JOIN samples s ON s.sample_id = i.sample_id "
        "WHERE i.id > (SELECT coalesce(max(id), 0) FROM images) - ? AND i.current = 1 "
        f"AND i.status IN ('ok', 'unknown') AND i.sha256 IS NOT NULL {labelled} "
        "ORDER BY rank, coalesce(i.confidence, 0), i.id DESC LIMIT ?",
        (low, WINDOW, limit)).fetchall()
    return [ReviewRow(int(r["id"]), r["path"], r["sha256"], r["status"], r["predicted_class"],
                      r["confidence"], r["sample_id"], int(r["rank"])) for r in rows]
