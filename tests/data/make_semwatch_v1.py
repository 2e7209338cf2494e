"""Writes tests/data/semwatch-v1.db and semwatch-v1.results.csv with the release whose schema is
user_version 1 (commit bf24cce), through that release's own Store and messages, so the migration
tests open a database exactly as a daemon in the field left it.

Run it against that release's code, not the working tree's:

    mkdir -p /tmp/v1 && git archive bf24cce daemon | tar -x -C /tmp/v1
    PYTHONPATH=/tmp/v1/daemon .venv/bin/python tests/data/make_semwatch_v1.py tests/data

The clock is fixed (every timestamp on 2026-03-02 UTC, one minute apart; only the daemon row's
pid and hostname are the machine's). What it holds (tests/test_migrations.py relies on it): eight
current image rows (ok x4, unknown, failed after attempts, refused unread, pending), one superseded
version, one finished row whose CSV line was never written (a kill -9 between the database and the
CSV), a name that is not UTF-8, three samples (one with an expected class), one model, the daemon
row (stopped).
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from semwatch.store import ledger, samples
from semwatch.store.ledger import (
    Attempt,
    DaemonStatus,
    Failed,
    Pending,
    Refused,
    Result,
    Started,
    Store,
)
from semwatch.values import FileKey, ImageVerdict

START = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.minutes = 0

    def __call__(self) -> str:
        self.minutes += 1
        return (START + timedelta(minutes=self.minutes)).isoformat(timespec="milliseconds")


def verdict(path: str, cls: str | None, conf: float, status: str = "ok",
            reasons: tuple[str, ...] = ()) -> ImageVerdict:
    comp, _, state = (cls or "").partition("_")
    probs = {cls: conf, "333_pristine": round(1 - conf, 6)} if cls else {"333_pristine": conf}
    return ImageVerdict(Path(path), status, cls, comp or None, state or None, conf, 0.9, 12,  # type: ignore[arg-type]
                        probs, reasons, "model-v1")


def main(out: Path) -> None:
    clock = Clock()
    ledger.utc_now = clock  # type: ignore[attr-defined]
    samples.utc_now = clock  # type: ignore[attr-defined]
    database, csv_path = out / "semwatch-v1.db", out / "semwatch-v1.results.csv"
    for p in (database, csv_path):
        p.unlink(missing_ok=True)
    store = Store(database, csv_path)
    try:
        store.register_model("model-v1", "ncm-v1", ["333_pristine", "622_cycled", "811_formation"],
                             clock(), {"image_accuracy": 0.97}, Path("/opt/semwatch/model"))
        store.start_daemon(device="cpu", model_id="model-v1", watch_folder=Path("/export"),
                           watch_mode="inotify")
        a1 = FileKey("/export/lotA/a1.tif", 1000, 1)
        a2 = FileKey("/export/lotA/a2.tif", 1001, 2)
        odd = FileKey(os.fsdecode(b"/export/lotA/caf\xe9-\xff.tif"), 1002, 3)  # not UTF-8
        b1_old = FileKey("/export/lotB/b1.tif", 2000, 4)
        b1 = FileKey("/export/lotB/b1.tif", 2100, 5)  # b1 rewritten: a new version
        b2 = FileKey("/export/lotB/b2.tif", 2001, 6)
        bad = FileKey("/export/lotC/broken.tif", 0, 7)
        far = FileKey("/export/lotC/" + "x" * 300 + ".tif", 10, 8)
        waiting = FileKey("/export/lotC/later.tif", 3000, 9)
        ids = store.apply([Pending(k, clock()) for k in (a1, a2, odd, b1_old, b2, bad, waiting)])
        assert ids == []
        done = store.apply([
            Started(a1), Result(a1, "a" * 64, "lotA", verdict(a1.path, "622_cycled", 0.95), "model-v1",
                                expected="622_cycled"),
            Started(a2), Result(a2, "b" * 64, "lotA", verdict(a2.path, "622_cycled", 0.91), "model-v1",
                                expected="622_cycled"),
            Started(odd), Result(odd, "c" * 64, "lotA", verdict(odd.path, "622_cycled", 0.88), "model-v1",
                                 expected="622_cycled"),
            Started(b1_old), Result(b1_old, "d" * 64, "lotB", verdict(b1_old.path, "811_formation", 0.9),
                                    "model-v1"),
        ])
        store.append_csv(done)
        b1_result = Result(b1, "e" * 64, "lotB", verdict(b1.path, "811_formation", 0.93), "model-v1")
        done = store.apply([Pending(b1, clock()), Started(b1), b1_result])
        store.append_csv(done)
        done = store.apply([
            Started(bad), Attempt(bad, 1, "empty file"), Started(bad),
            Failed(bad, 2, "empty file", sha256="f" * 64, sample_id="lotC"),
            Refused(far, clock(), "path too long to open"),
        ])
        store.append_csv(done)
        # The last result reaches the database but not the CSV: the daemon was killed in between.
        unsure = verdict(b2.path, None, 0.41, "unknown", ("far from the training data",))
        store.apply([Started(b2), Result(b2, "0" * 64, "lotB", unsure, "model-v1")])
        store.apply([DaemonStatus("stopped", done=6, failed=2, message="exit 0")])
    finally:
        store.close()
    print(f"wrote {database} ({database.stat().st_size} bytes) and {csv_path}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
