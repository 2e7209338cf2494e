"""`[model] reprocess_outdated`: the daemon re-classifies outdated results while it is idle.

When nothing is waiting in the settle gate or the pipeline, the service hands the pipeline a few
outdated rows (current results of another model), oldest first, as catch-up jobs; their results
supersede the rows (`Reclassified`). New files always come first: a page is handed on only when
the pipeline is empty, so a file that arrives waits behind at most one page. A cursor walks the
ledger once per daemon run: rows that cannot be re-read keep their earlier result and are not tried
again until the next start (a new model means a restart anyway). Each row is read under its own
confinement (`listing.confinement_root`, as `semwatch reprocess` reads it): the watch folder for
its files, the file's own folder for a row that `reprocess FOLDER` ingested from an archive
outside it (read under the watch folder's, such a row would be refused as a link leaving it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from semwatch.store import db
from semwatch.store.selection import RowRef, Selection, count_outdated, select_rows

log = logging.getLogger("semwatch.catchup")


class Idle(Protocol):
    def counts(self) -> tuple[int, int]: ...

    def reclassify(self, row: RowRef) -> None: ...


class CatchUp:
    def __init__(self, database: Path, model_id: str, *, page: int) -> None:
        self.database, self.model_id, self.page = database, model_id, page
        self.after_id = 0
        self.finished = False
        self.handed = 0

    def start(self) -> None:
        conn = db.connect(self.database, readonly=True)
        try:
            outdated = count_outdated(conn, self.model_id)
        finally:
            conn.close()
        if outdated:
            log.info("%d outdated result(s) will be re-classified with model %s while idle "
                     "([model] reprocess_outdated)", outdated, self.model_id)
        else:
            self.finished = True

    def tick(self, pipeline: Idle, waiting: int) -> None:
        """Called about once a second by the service."""
        if self.finished or waiting or pipeline.counts() != (0, 0):
            return
        conn = db.connect(self.database, readonly=True)
        try:
            rows = list(select_rows(conn, Selection("outdated"), self.model_id, after_id=self.after_id,
                                    limit=self.page))
        finally:
            conn.close()
        if not rows:
            self.finished = True
            log.info("catch-up done: %d outdated result(s) handed for re-classification", self.handed)
            return
        for row in rows:
            pipeline.reclassify(row)
        self.after_id = rows[-1].id
        self.handed += len(rows)
