"""Prometheus metrics of the running daemon (`[metrics] listen`), with prometheus-client.

Two kinds of values. What only this process knows is counted as it happens: results by status,
tiles classified, the file-stable → verdict latency and the inference batch sizes (the pipeline
calls `result`/`batch`, its `Observer`). What the database knows (images and samples by status,
the last heartbeat, outdated results) is read at scrape time from a read-only connection, at most
every CACHE_SECONDS, so a scrape shows what `semwatch top`, the report and datasette show, and a
burst of scrapes cannot load the database. Queue depths are read from the threads' queues.

Everything is registered in a `CollectorRegistry` of our own (not prometheus-client's global one,
which would collect this process's Python internals and keep state between daemons in one test
process); the HTTP server is prometheus-client's, shut down and joined on `stop`. The metric names
are listed, Grafana-ready, in docs/OPERATIONS.md.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from semwatch.config import Settings, is_loopback
from semwatch.store import db
from semwatch.store.selection import count_outdated

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from semwatch.service.folderprobe import FolderState
    from semwatch.service.pipeline import Pipeline
    from semwatch.service.watcher import Watcher
    from semwatch.store.writer import Writer

log = logging.getLogger("semwatch.metrics")

CACHE_SECONDS = 5.0
LATENCY_BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
BATCH_IMAGE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
BATCH_TILE_BUCKETS = (1, 4, 8, 16, 32, 64, 128, 256)

Depths = Callable[[], Mapping[str, int]]


def queue_depths(pipeline: Pipeline, watcher: Watcher, writer: Writer) -> dict[str, int]:
    """Images waiting at each stage, in the order they pass through."""
    return {"settling": watcher.counts.waiting, "queued": pipeline.jobs.qsize(),
            "reading": pipeline.busy_readers, "prepared": pipeline.prepared.qsize(),
            "inference": pipeline.in_inference, "writer": writer.queue.qsize()}


def _epoch(text: str | None) -> float:
    if not text:
        return 0.0
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return 0.0


class _DatabaseCollector:
    """Gauges read from the database (cached) and the queue depths, at scrape time."""

    def __init__(self, database: Path, model_id: str, depths: Depths) -> None:
        self.database = database
        self.model_id = model_id
        self.depths = depths
        self._lock = threading.Lock()
        self._read_at = -CACHE_SECONDS
        self._images: dict[str, int] = {}
        self._samples: dict[str, int] = {}
        self._heartbeat = 0.0
        self._outdated = 0

    def follow(self, model_id: str) -> None:
        """Count outdated results against `model_id` from the next scrape on."""
        with self._lock:
            self.model_id = model_id
            self._read_at = -CACHE_SECONDS

    def _refresh(self) -> None:
        with self._lock:
            if time.monotonic() - self._read_at < CACHE_SECONDS:
                return
            conn = db.connect(self.database, readonly=True)
            try:
                self._images = {r[0]: r[1] for r in conn.execute(
                    "SELECT status, count(*) FROM images WHERE current = 1 GROUP BY status")}
                self._samples = {r[0]: r[1] for r in conn.execute(
                    "SELECT verdict, count(*) FROM samples GROUP BY verdict")}
                row = conn.execute("SELECT heartbeat_at FROM daemon WHERE id = 1").fetchone()
                self._heartbeat = _epoch(row[0] if row else None)
                self._outdated = count_outdated(conn, self.model_id)  # the console's and report's count
            finally:
                conn.close()
            self._read_at = time.monotonic()

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        try:
            self._refresh()
        except Exception as exc:  # a scrape must answer even when the database is busy or gone
            log.warning("metrics: reading the database failed: %s", exc)
        images = GaugeMetricFamily("semwatch_images", "Current images in the database by status",
                                   labels=["status"])
        for status in ("ok", "unknown", "rejected", "failed", "pending"):
            images.add_metric([status], self._images.get(status, 0))
        yield images
        samples = GaugeMetricFamily("semwatch_samples", "Samples in the database by verdict",
                                    labels=["verdict"])
        for verdict in ("pass", "fail", "uncertain", "unknown"):
            samples.add_metric([verdict], self._samples.get(verdict, 0))
        yield samples
        depth = GaugeMetricFamily("semwatch_queue_depth", "Images waiting at each pipeline stage",
                                  labels=["stage"])
        for stage, n in self.depths().items():
            depth.add_metric([stage], n)
        yield depth
        yield GaugeMetricFamily("semwatch_last_heartbeat_timestamp_seconds",
                                "When the daemon last wrote its status row (Unix time)",
                                value=self._heartbeat)
        yield GaugeMetricFamily("semwatch_outdated_results",
                                "Current results written by another model than the daemon's",
                                value=self._outdated)


class _Labelled:
    """Every metric of `inner` with the `instrument` label added to each sample: one rule for all
    of them (ours, prometheus-client's process metrics, any added later), so a central Prometheus
    that scrapes or federates several daemons tells them apart by the same label (docs/FLEET.md)."""

    def __init__(self, inner: CollectorRegistry, instrument: str) -> None:
        self.inner = inner
        self.instrument = instrument

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import Metric

        for family in self.inner.collect():
            out = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                out.add_sample(s.name, {**s.labels, "instrument": self.instrument}, s.value, s.timestamp,
                               s.exemplar)
            yield out


class Metrics:
    """The registry, the pipeline's observer and the HTTP server (`start`/`stop`). `registry` is
    what is served: `inner`'s metrics, each labelled with the instrument (`_Labelled`)."""

    def __init__(self, settings: Settings, *, model_id: str, device: str, depths: Depths,
                 folder: Callable[[], FolderState] | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector

        self.settings = settings
        self.registry = CollectorRegistry()
        self.inner = CollectorRegistry()
        self.registry.register(_Labelled(self.inner, settings.instrument.resolved_name()))
        self.results = Counter("semwatch_results", "Images classified or failed by this daemon, by status",
                               ["status"], registry=self.inner)
        self.tiles = Counter("semwatch_tiles_classified", "Tiles run through the network",
                             registry=self.inner)
        self.latency = Histogram("semwatch_verdict_latency_seconds",
                                 "From a file's settling (stable size and mtime) to its verdict",
                                 buckets=LATENCY_BUCKETS, registry=self.inner)
        self.batch_images = Histogram("semwatch_inference_batch_images", "Images per inference batch",
                                      buckets=BATCH_IMAGE_BUCKETS, registry=self.inner)
        self.batch_tiles = Histogram("semwatch_inference_batch_tiles", "Tiles per inference batch",
                                     buckets=BATCH_TILE_BUCKETS, registry=self.inner)
        self.device = device
        self.model = Info("semwatch_model", "The daemon's model and device", registry=self.inner)
        self.model.info({"model_id": model_id, "device": device, "site": settings.instrument.site})
        self.database = _DatabaseCollector(settings.store.database, model_id, depths)
        self.inner.register(self.database)
        if folder is not None:
            Gauge("semwatch_watch_folder_reachable", "1 while the watch folder answers a stat within "
                  "the limit, 0 while it does not (a frozen share) or is gone",
                  registry=self.inner).set_function(lambda: float(folder().problem() is None))
        ProcessCollector(registry=self.inner)  # process_cpu_seconds_total, resident memory, fds
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # --- the pipeline's observer -------------------------------------------------------------

    def result(self, status: str, seconds: float | None) -> None:
        """A verdict; `seconds` since its file settled (None: a re-classification, not timed)."""
        self.results.labels(status).inc()
        if seconds is not None:
            self.latency.observe(max(0.0, seconds))

    def batch(self, images: int, tiles: int) -> None:
        self.batch_images.observe(images)
        self.batch_tiles.observe(tiles)
        self.tiles.inc(tiles)

    def switched(self, model_id: str) -> None:
        """The daemon serves another model now: the info metric and the outdated count follow it."""
        self.model.info({"model_id": model_id, "device": self.device, "site": self.settings.instrument.site})
        self.database.follow(model_id)

    # --- the HTTP server ---------------------------------------------------------------------

    def start(self) -> None:
        from prometheus_client import start_http_server

        address = self.settings.metrics.address()
        assert address is not None
        host, port = address
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        shown = f"[{host}]" if ":" in host else host
        if is_loopback(host):
            log.info("metrics on http://%s:%d/metrics", shown, self._server.server_port)
        else:  # allowed by [metrics] allow_remote (config.py refuses it otherwise)
            log.warning("metrics on http://%s:%d/metrics, NOT loopback ([metrics] allow_remote = true): "
                        "anyone who can reach this port reads them, without authentication",
                        shown, self._server.server_port)

    @property
    def port(self) -> int | None:
        return self._server.server_port if self._server is not None else None

    def stop(self) -> None:
        server, thread, self._server, self._thread = self._server, self._thread, None, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(5.0)


def start_metrics(settings: Settings, *, model_id: str, device: str, depths: Depths,
                  folder: Callable[[], FolderState] | None = None) -> Metrics | None:
    """The metrics server, started; None when `[metrics] listen` is empty or it cannot listen (the
    daemon classifies without it: logged as an error)."""
    if not settings.metrics.listen:
        return None
    metrics = Metrics(settings, model_id=model_id, device=device, depths=depths, folder=folder)
    try:
        metrics.start()
    except OSError as exc:
        log.error("metrics: cannot listen on %s: %s; running without metrics", settings.metrics.listen,
                  exc.strerror or exc)
        return None
    return metrics
