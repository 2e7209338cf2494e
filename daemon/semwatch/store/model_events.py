"""The model lifecycle's tables (schema v5): `model_events` (every registry alias move) and
`shadow_results` (the shadow model's verdicts), as SQL. The writers are `semwatch.lifecycle` (alias
moves, under the database's write lock) and the daemon's writer thread (shadow verdicts, message
`ShadowResult`); readers are `semwatch models`, the console and the report."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime

from semwatch.values import utc_now


@dataclass(frozen=True)
class ModelEvent:
    id: int
    at: str
    alias: str
    model_id: str | None
    previous_model_id: str | None
    action: str
    by: str
    reason: str | None
    evidence: dict[str, object] | None
    token: str | None

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "at": self.at, "alias": self.alias, "model_id": self.model_id,
                "previous_model_id": self.previous_model_id, "action": self.action, "by": self.by,
                "reason": self.reason, "evidence": self.evidence}


def insert_event(conn: sqlite3.Connection, *, alias: str, model_id: str | None,
                 previous_model_id: str | None, action: str, by: str, reason: str | None,
                 evidence: dict[str, object] | None, token: str | None, at: str | None = None) -> int:
    """One alias move, inside the caller's transaction; its row id."""
    cur = conn.execute(
        "INSERT INTO model_events (at, alias, model_id, previous_model_id, action, by, reason, evidence, "
        "token) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (at or utc_now(), alias, model_id, previous_model_id, action, by, reason,
         json.dumps(evidence, sort_keys=True) if evidence is not None else None, token))
    return int(cur.lastrowid or 0)


def has_token(conn: sqlite3.Connection, token: str) -> bool:
    return conn.execute("SELECT 1 FROM model_events WHERE token = ?", (token,)).fetchone() is not None


def events(conn: sqlite3.Connection, *, model_id: str | None = None, limit: int = 1000) -> list[ModelEvent]:
    """Alias moves, newest first (of one model, as the new or the previous one, when given)."""
    if model_id:
        rows = conn.execute("SELECT * FROM model_events WHERE model_id = ? OR previous_model_id = ? "
                            "ORDER BY id DESC LIMIT ?", (model_id, model_id, limit))
    else:
        rows = conn.execute("SELECT * FROM model_events ORDER BY id DESC LIMIT ?", (limit,))
    return [_event(r) for r in rows]


def last_move_to(conn: sqlite3.Connection, alias: str, model_id: str) -> ModelEvent | None:
    """The newest move that gave `model_id` the alias `alias`."""
    row = conn.execute("SELECT * FROM model_events WHERE alias = ? AND model_id = ? "
                       "ORDER BY id DESC LIMIT 1", (alias, model_id)).fetchone()
    return _event(row) if row is not None else None


def champion_at(conn: sqlite3.Connection, when: str) -> str | None:
    """The champion recorded as live at UTC time `when` (which model made a result then)."""
    row = conn.execute("SELECT model_id FROM model_events WHERE alias = 'champion' AND at <= ? "
                       "ORDER BY at DESC, id DESC LIMIT 1", (when,)).fetchone()
    return row[0] if row is not None else None


def _event(row: sqlite3.Row) -> ModelEvent:
    return ModelEvent(row["id"], row["at"], row["alias"], row["model_id"], row["previous_model_id"],
                      row["action"], row["by"], row["reason"],
                      json.loads(row["evidence"]) if row["evidence"] else None, row["token"])


# --- shadow verdicts -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    model_id: str | None
    n: int
    agree: int

    @property
    def rate(self) -> float | None:
        return self.agree / self.n if self.n else None


NO_SHADOW = Agreement(None, 0, 0)


def shadow_agreement(conn: sqlite3.Connection, *, since: datetime | str | None = None,
                     until: datetime | str | None = None) -> Agreement:
    """How often the newest shadow model agreed with the live verdict (in a time range)."""
    if not _has_table(conn, "shadow_results"):
        return Agreement(None, 0, 0)
    row = conn.execute("SELECT model_id FROM shadow_results ORDER BY id DESC LIMIT 1").fetchone()
    if row is None:
        return Agreement(None, 0, 0)
    model_id = row[0]
    sql = "SELECT COUNT(*), COALESCE(SUM(agrees), 0) FROM shadow_results WHERE model_id = ?"
    args: list[object] = [model_id]
    if since is not None:
        sql += " AND created_at >= ?"
        args.append(_iso(since))
    if until is not None:
        sql += " AND created_at < ?"
        args.append(_iso(until))
    n, agree = conn.execute(sql, args).fetchone()
    return Agreement(model_id, int(n), int(agree))


def _iso(when: datetime | str) -> str:
    return when if isinstance(when, str) else when.astimezone(UTC).isoformat(timespec="milliseconds")


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                        (name,)).fetchone() is not None
