"""Database fixtures for the operator tests: the daemon's schema with rows inserted directly."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from semwatch.store import db
from semwatch.store.schema import create_schema


def iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="milliseconds")


def settled(now: datetime) -> datetime:
    """Ten minutes before `now`, never before its UTC midnight: today's rows stay today's just after 00:00."""
    midnight = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(now - timedelta(minutes=10), midnight)


def make_database(path: Path, *, now: datetime, images: list[dict[str, object]],
                  samples: list[dict[str, object]] | None = None, heartbeat_age_s: float = 1.0,
                  daemon_state: str = "running", message: str | None = None) -> None:
    """Create the schema and insert `images` (missing columns defaulted), samples and the daemon row."""
    conn = db.connect(path)
    try:
        create_schema(conn)
        for i, img in enumerate(images):
            row: dict[str, object] = {
                "path": f"/export/s1/img{i}.tif", "sha256": f"{i:064x}", "size_bytes": 1000 + i,
                "mtime_ns": i, "status": "ok", "sample_id": "s1", "predicted_class": "622_pristine",
                "composition": "622", "state": "pristine", "confidence": 0.9, "tile_agreement": 0.9,
                "n_tiles": 12, "error": None, "model_id": "m1",
                "detected_at": iso(settled(now)),
                "processed_at": iso(settled(now) + timedelta(seconds=i)),
                "probabilities": json.dumps({"622_pristine": 0.9, "811_cycled": 0.1}), "reasons": "[]",
                "attempts": 1, "current": 1,
            }
            row.update(img)
            cols = ", ".join(row)
            conn.execute(f"INSERT INTO images ({cols}) VALUES ({', '.join('?' * len(row))})",
                         tuple(row.values()))
        for s in samples or []:
            srow: dict[str, object] = {"sample_id": "s1", "n_images": 1, "composition": "622",
                                       "state": "pristine", "predicted_class": "622_pristine",
                                       "confidence": 0.9, "uniformity": 0.95, "expected": None,
                                       "verdict": "pass", "updated_at": iso(now)}
            srow.update(s)
            conn.execute(f"INSERT INTO samples ({', '.join(srow)}) VALUES ({', '.join('?' * len(srow))})",
                         tuple(srow.values()))
        conn.execute(
            "INSERT INTO models (model_id, name, classes, created_at, metrics) VALUES (?, ?, ?, ?, ?)",
            ("m1", "ncm", json.dumps(["622_pristine", "811_cycled"]), iso(now), "{}"))
        conn.execute(
            "INSERT INTO daemon (id, pid, hostname, started_at, heartbeat_at, device, model_id, "
            "watch_folder, waiting, in_progress, done, failed, images_per_s, tiles_per_s, state, message) "
            "VALUES (1, 4242, 'sem-ws1', ?, ?, 'cpu', 'm1', '/export', 3, 2, ?, ?, 1.25, 30.5, ?, ?)",
            (iso(now - timedelta(hours=1)), iso(now - timedelta(seconds=heartbeat_age_s)),
             sum(1 for i in images if i.get("status", "ok") != "failed"),
             sum(1 for i in images if i.get("status") == "failed"), daemon_state, message))
    finally:
        conn.close()


def model_events(database: Path) -> list[dict[str, object]]:
    """The `model_events` rows (alias moves), oldest first."""
    conn = db.connect(database, readonly=True)
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM model_events ORDER BY id")]
    finally:
        conn.close()
