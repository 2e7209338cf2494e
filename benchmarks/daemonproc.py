"""`semwatch watch` as a subprocess on a temporary folder, for the daemon benchmarks
(daemon_bench.py, shadow_bench.py): its config, start, the database read-only, stop."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def ncm_images(data: Path) -> list[Path]:
    return sorted(p for p in data.rglob("*.jpg"))


def unique_copy(src: Path, dst: Path, tag: int) -> None:
    """A copy whose bytes differ (8 bytes after the JPEG end marker, ignored by decoders)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes() + tag.to_bytes(8, "little"))


class Daemon:
    def __init__(self, root: Path, model: Path, folder: Path, settle: float = 2.0, **extra: Any) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.db = root / "semwatch.db"
        self.log = root / "daemon.log"
        self.config = root / "config.toml"
        watch = {"folder": str(folder), "settle_seconds": settle, **extra}
        lines = ["[watch]"] + [f"{k} = {json.dumps(v)}" for k, v in watch.items()]
        lines += ["[store]", f"database = {json.dumps(str(self.db))}",
                  f"results_csv = {json.dumps(str(root / 'results.csv'))}",
                  "[model]", f"path = {json.dumps(str(model))}", "[report]", "enabled = false"]
        self.config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.started = time.monotonic()
            self.proc = subprocess.Popen([sys.executable, "-m", "semwatch", "watch", "--config",
                                          str(self.config), "--plain"], stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.root)
        while not self.running():
            self.check()
            time.sleep(0.05)

    def check(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise SystemExit(f"daemon exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")

    def query(self, sql: str) -> list[Any]:
        if not self.db.exists():
            return []
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute(sql).fetchall()
        except sqlite3.OperationalError:
            return []
        finally:
            conn.close()

    def running(self) -> bool:
        rows = self.query("SELECT state FROM daemon")
        return bool(rows) and rows[0][0] == "running"

    def count(self, where: str) -> int:
        rows = self.query(f"SELECT count(*) FROM images WHERE {where}")
        return int(rows[0][0]) if rows else 0

    def wait_count(self, where: str, n: int, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while self.count(where) < n:
            self.check()
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {n} rows where {where}")
            time.sleep(0.05)
        return time.monotonic()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
