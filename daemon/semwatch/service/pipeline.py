"""Threads and queues: readers → batched inference → the single writer.

    watcher ──submit──▶ jobs ──▶ reader threads (hash, decode, tile) ──▶ prepared
        ▲                                                                  │
        └── inbox: Finished / Retry / Changed ◀── inference thread (dynamic batches, latency cap,
                                                   │                 `engine.predict_images`)
                                                   ▼
                                       writer thread (SQLite + CSV)

A file's bytes are hashed before decoding: a content already classified by the same model (a
copy, a re-export, a touched file) reuses that result instead of running the network again, and
copies arriving together wait for the first one. Files are opened only through `safefs` (regular
files, the symlink policy, bounded size). Each attempt is committed to the ledger before the file
is read, so a file that kills the daemon is `failed` after `max_attempts` restarts instead of a
crash loop. A file refused on sight (a FIFO, a link outside the folder) or whose content cannot be
decoded fails at once; a read error that may pass (I/O, permission, a truncated file still being
written) is retried with back-off. A read that outlives `[watch] read_timeout_seconds` is abandoned
(`check_readers`): the file is recorded failed and the stuck reader thread replaced. A file that
changed while it was read goes back to the settle gate. On stop, work in flight is finished and
queued work is left `pending` for the next start.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from semwatch.config import Settings
from semwatch.liveness import Liveness, Stage
from semwatch.model.engine import predict_images
from semwatch.reading.listing import confinement_root, stat_path
from semwatch.reading.micrograph import content_sha256
from semwatch.reading.sample import expected_class, sample_key
from semwatch.safefs import Confinement, RefusedFile
from semwatch.service.inbox import Changed, Finished, Inbox, Retry
from semwatch.service.jobs import ClassifierLike, Job, Observer, Prepared, Rates, Reader
from semwatch.service.logs import PER_FILE
from semwatch.service.stability import Candidate
from semwatch.store import db
from semwatch.store.ledger import find_verdict_by_content
from semwatch.store.messages import Attempt, Failed, Gone, Pending, Reclassified, Result, Started
from semwatch.store.selection import RowRef
from semwatch.store.writer import Writer
from semwatch.values import FileKey, ImageVerdict, MicrographError, is_transient

log = logging.getLogger("semwatch.pipeline")

RECENT_RESULTS = 512  # in-memory cache of verdicts by content hash (the database backs it up)


class _Abandoned(Exception):
    """The reader was given up on by `check_readers` while it worked: drop what it produced."""


@dataclass
class ReaderSlot:
    """One reader thread and what it is doing (for the read timeout)."""

    stage: Stage
    thread: threading.Thread | None = None
    job: Job | None = None
    sha256: str | None = None
    started: float = 0.0
    abandoned: bool = False


class Pipeline:
    """Reader threads, one inference thread; results go to the writer, what became of each file
    to the watcher's `inbox`."""

    def __init__(self, settings: Settings, classifier: ClassifierLike, writer: Writer, watch_folder: Path,
                 *, inbox: Inbox, read: Reader, database: Path, liveness: Liveness | None = None) -> None:
        self.settings = settings
        self.classifier = classifier
        self.writer = writer
        self.watch_folder = watch_folder
        self.inbox = inbox
        self.read = read
        self.database = database
        self.liveness = liveness or Liveness()
        self.confine = Confinement(watch_folder, settings.watch.follow_symlinks)
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.prepared: queue.Queue[Prepared] = queue.Queue(maxsize=max(4, 2 * settings.watch.reader_threads))
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.rates = Rates()
        self.done = 0
        self.failed = 0
        self.timed_out = 0
        self.busy_readers = 0
        self.in_inference = 0
        self._lock = threading.Lock()
        self._leaders: dict[str, list[tuple[Job, str, str | None]]] = {}
        self._recent: OrderedDict[str, ImageVerdict] = OrderedDict()
        self._dedupe = settings.samples.key != "metadata"  # metadata keys depend on the sidecar too
        self._slots: list[ReaderSlot] = []
        self._abandoned: list[ReaderSlot] = []
        self._inference: threading.Thread | None = None
        self._inference_stage = self.liveness.stage("inference")
        self._readers_left = 0
        self._next_slot = 0
        self.observer: Observer | None = None  # the metrics (service.metrics), set before start
        # Called on the inference thread after each live batch (the shadow model); set before start.
        self.after_batch: Callable[[list[tuple[Prepared, ImageVerdict]]], None] | None = None

    # --- control ----------------------------------------------------------------------------

    def start(self) -> None:
        for _ in range(self.settings.watch.reader_threads):
            self._start_reader()
        self._inference = threading.Thread(target=self._inference_main, name="semwatch-inference",
                                           daemon=True)
        self._inference.start()

    def _start_reader(self) -> ReaderSlot:
        index = self._next_slot
        self._next_slot += 1
        slot = ReaderSlot(self.liveness.stage(f"reader-{index}"))
        slot.thread = threading.Thread(target=self._reader_main, args=(slot,),
                                       name=f"semwatch-reader-{index}", daemon=True)
        with self._lock:
            self._slots.append(slot)
            self._readers_left += 1
        slot.thread.start()
        return slot

    def submit(self, cand: Candidate) -> None:
        """From the watcher thread: a settled file. Its ledger row is written before any result."""
        self.writer.put(Pending(cand.key, _utc(cand.detected_at), cand.attempts))
        self.jobs.put(Job(cand.key, cand.attempts))

    def reclassify(self, row: RowRef) -> None:
        """From the service, when idle: classify a finished version again with this model
        ([model] reprocess_outdated). Its result supersedes the row (`Reclassified`)."""
        root = Path(confinement_root(row.key.path, self.watch_folder))
        self.jobs.put(Job(row.key, 0, counted=True, supersedes=row.id, sample_id=row.sample_id, root=root))

    def live_work_waiting(self) -> bool:
        """Whether tiled images wait for the live model (the shadow model yields to them)."""
        return not self.prepared.empty()

    def switch(self, classifier: ClassifierLike) -> None:
        """Serve another model from now on (a registry alias moved). Files already tiled finish
        with the model they were tiled for; files read from now on get the new one."""
        with self._lock:
            self.classifier = classifier
            self._recent.clear()

    def stop(self, timeout: float) -> bool:
        """Finish work in flight (queued jobs stay pending); True if everything ended in time.
        Abandoned (stuck) readers are not waited for: they hold nothing the ledger needs."""
        self.stopping.set()
        deadline = time.monotonic() + timeout
        for t in self._threads():
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads())

    def _threads(self) -> list[threading.Thread]:
        with self._lock:
            threads = [s.thread for s in self._slots if s.thread is not None]
        return threads + ([self._inference] if self._inference is not None else [])

    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads()) and self.error is None

    def counts(self) -> tuple[int, int]:
        """(queued, in progress) images."""
        return self.jobs.qsize(), self.busy_readers + self.prepared.qsize() + self.in_inference

    def check_readers(self, now: float | None = None) -> None:
        """Called about once a second by the service: a reader busy with one file for longer than
        `[watch] read_timeout_seconds` is abandoned (Python cannot kill a thread blocked in a
        system call): its file is recorded failed, a fresh reader takes its place. Too many stuck
        threads at once (a hung share) is an error: the service exits for systemd to restart it."""
        now = time.monotonic() if now is None else now
        limit = self.settings.watch.read_timeout_seconds
        with self._lock:
            late = [s for s in self._slots
                    if s.job is not None and not s.abandoned and now - s.started > limit]
            for slot in late:
                slot.abandoned = True
                self._slots.remove(slot)
                self._abandoned.append(slot)
                self._readers_left -= 1
            self._abandoned = [s for s in self._abandoned if s.thread is not None and s.thread.is_alive()]
            stuck = len(self._abandoned)
        for slot in late:
            job = slot.job
            assert job is not None
            self.liveness.remove(slot.stage.name)
            log.error("reading %s took longer than %.0f s; giving up on it and starting a new reader",
                      job.key.path, limit)
            if job.supersedes is None:
                self.writer.put(Failed(job.key, max(job.attempts + 1, 1),
                                       f"timed out: reading took longer than {limit:g} s "
                                       "([watch] read_timeout_seconds)", slot.sha256, None))
            with self._lock:
                self.failed += 1
                self.timed_out += 1
            if slot.sha256 is not None:
                self._release(slot.sha256, retry_followers=True)
            self._tell_watcher(job, Finished(job.key))
            if not self.stopping.is_set():
                self._start_reader()
        if stuck > 2 * self.settings.watch.reader_threads:
            self.error = RuntimeError(f"{stuck} reader threads are stuck in reads that never return")

    # --- readers ----------------------------------------------------------------------------

    def _reader_main(self, slot: ReaderSlot) -> None:
        conn = db.connect(self.database, readonly=True, busy_timeout_ms=self.settings.store.busy_timeout_ms,
                          check_same_thread=False)
        try:
            while not self.stopping.is_set() and not slot.abandoned:
                try:
                    job = self.jobs.get(timeout=0.2)
                except queue.Empty:
                    continue
                with self._lock:
                    if slot.abandoned:
                        self.jobs.put(job)
                        return
                    self.busy_readers += 1
                    slot.job, slot.sha256, slot.started = job, None, time.monotonic()
                slot.stage.busy(f"reading {job.key.path}")
                try:
                    self._read_one(job, conn, slot)
                except _Abandoned:
                    return
                except Exception as exc:  # never let one file stop a reader
                    log.exception("unexpected error reading %s", job.key.path)
                    self._failure(job, f"internal error: {type(exc).__name__}: {exc}", None, None, slot)
                finally:
                    with self._lock:
                        self.busy_readers -= 1
                        slot.job = None
                    slot.stage.idle()
        except _Abandoned:
            return
        except BaseException as exc:  # pragma: no cover - the service sees `error`
            self.error = exc
        finally:
            conn.close()
            with self._lock:
                if not slot.abandoned:
                    self._readers_left -= 1

    def _check(self, slot: ReaderSlot) -> None:
        if slot.abandoned:
            raise _Abandoned

    def _record_attempt(self, job: Job, slot: ReaderSlot) -> None:
        """Commit the attempt before reading (see the module docstring); waits for the writer."""
        done = threading.Event()
        self.writer.put(Started(job.key, done))
        while not done.wait(0.5):
            if not self.writer.is_alive():
                return
            slot.stage.beat()  # waiting on the writer (e.g. a full disk it retries): not stuck here
            self._check(slot)

    def _read_one(self, job: Job, conn: db.TrackedConnection, slot: ReaderSlot) -> None:
        path = Path(job.key.path)
        classifier = self.classifier  # this file is read, tiled and classified for one model
        limit = self.settings.watch.max_attempts
        if job.attempts >= limit:
            # Attempts are counted before reading: this file was being read each time the daemon
            # stopped or crashed. Reading it again could crash the daemon again.
            self._final_failure(job, f"interrupted {job.attempts} time(s) while being read "
                                f"(the daemon stopped or crashed each time)", None, None)
            return
        if not job.counted:
            self._record_attempt(job, slot)
        policy = self.settings.watch.follow_symlinks
        confine = self.confine if job.root is None else Confinement(job.root, policy)
        try:
            sha = self._sha256(path, slot, confine)
        except RefusedFile as exc:
            self._check(slot)
            self._final_failure(job, f"refused: {exc.strerror}", None, None, attempts=job.attempts + 1)
            return
        except OSError as exc:
            self._check(slot)
            if not _exists(path):
                self._gone(job)
            else:
                self._failure(job, f"cannot read file: {exc.strerror or exc}", None, None, slot)
            return
        self._check(slot)
        slot.sha256 = sha
        if self._changed(job):
            return
        sample_id = job.sample_id or sample_key(path, self.watch_folder, self.settings.samples)
        if self._dedupe:
            expected = expected_class(sample_id, path, self.settings.samples, confine=confine)
            with self._lock:
                followers = self._leaders.get(sha)
                if followers is not None:
                    followers.append((job, sample_id, expected))  # the same content is being classified
                    return
                cached = self._recent.get(sha)
                if cached is not None and cached.model_id != classifier.model_id:
                    cached = None  # made by the model served before a switch
                if cached is None:
                    self._leaders[sha] = []
            if cached is None:
                cached = find_verdict_by_content(conn, sha, classifier.model_id, path)
                if cached is not None:
                    with self._lock:
                        followers = self._leaders.pop(sha, [])
                    self._emit_copies(cached, sha, followers)
            if cached is not None:
                self._emit(job, sha, sample_id, expected, _with_path(cached, path), 0)
                return
        try:
            micrograph = self.read(path, self.settings, confine=confine)
        except MicrographError as exc:
            self._check(slot)
            if is_transient(str(exc)):
                self._release(sha, retry_followers=True)
            else:  # copies of the same bytes fail the same way: no need to read each again
                self._release(sha, retry_followers=False, error=str(exc))
            if not self._changed(job):
                self._failure(job, str(exc), sha, sample_id, slot)
            return
        self._check(slot)
        if self._changed(job):
            self._release(sha, retry_followers=True)
            return
        if self.settings.samples.key == "metadata" and job.sample_id is None:
            sample_id = sample_key(path, self.watch_folder, self.settings.samples, micrograph.metadata)
        expected = expected_class(sample_id, path, self.settings.samples, confine=confine)
        prepared = classifier.prepare(micrograph)
        del micrograph
        n_tiles = len(prepared.tiles)
        self._check(slot)
        while True:  # bounded queue: wait for inference, but stay abandonable
            try:
                self.prepared.put(Prepared(job, sha, sample_id, expected, prepared, n_tiles, classifier),
                                  timeout=0.5)
                return
            except queue.Full:
                slot.stage.beat()  # waiting for the inference stage, which has its own liveness
                self._check(slot)

    def _sha256(self, path: Path, slot: ReaderSlot, confine: Confinement) -> str:
        """The file's SHA-256 through the safe open with the size limit; each chunk beats the
        reader's liveness stage (a big file on a slow share is not a stuck reader) and checks
        whether the reader was abandoned."""
        def progress() -> None:
            slot.stage.beat()
            self._check(slot)

        return content_sha256(path, self.settings, confine=confine, on_chunk=progress)

    def _changed(self, job: Job) -> bool:
        """The file changed or vanished since it settled: back to the gate, no attempt counted."""
        try:
            key = FileKey.of(job.key.path, stat_path(job.key.path))
        except OSError:
            self._gone(job)
            return True
        if key != job.key:
            self._gone(job)
            return True
        return False

    def _gone(self, job: Job) -> None:
        """Drop the version's pending row; the watcher looks at the path again."""
        if job.supersedes is not None:
            log.info("not re-classified: %s changed or vanished", job.key.path, extra=PER_FILE)
            return
        self.writer.put(Gone(job.key))
        self.inbox.put(Changed(job.key))

    def _failure(self, job: Job, error: str, sha: str | None, sample_id: str | None,
                 slot: ReaderSlot | None = None, *, transient: bool | None = None) -> None:
        """A failed attempt: retried with back-off where the cause may pass, else final."""
        attempts = job.attempts + 1
        if slot is not None and slot.abandoned:
            return
        if job.supersedes is not None:
            log.warning("cannot re-classify %s: %s (its earlier result stays)", job.key.path, error,
                        extra=PER_FILE)
            return
        if transient is None:
            transient = is_transient(error)
        if attempts >= self.settings.watch.max_attempts or not transient:
            self._final_failure(job, error, sha, sample_id, attempts=attempts)
            return
        delay = self.settings.watch.retry_backoff_seconds * 2 ** (attempts - 1)
        log.warning("cannot read %s: %s; retry %d/%d in %.1f s", job.key.path, error, attempts,
                    self.settings.watch.max_attempts - 1, delay, extra=PER_FILE)
        self.writer.put(Attempt(job.key, attempts, error))
        self.inbox.put(Retry(job.key, attempts, delay))

    def _final_failure(self, job: Job, error: str, sha: str | None, sample_id: str | None, *,
                       attempts: int | None = None) -> None:
        attempts = job.attempts if attempts is None else attempts
        if job.supersedes is not None:
            log.warning("cannot re-classify %s: %s (its earlier result stays)", job.key.path, error,
                        extra=PER_FILE)
            return
        log.error("failed: %s: %s (after %d attempt(s))", job.key.path, error, attempts, extra=PER_FILE)
        self.writer.put(Failed(job.key, attempts, error, sha, sample_id))
        with self._lock:
            self.failed += 1
        self.inbox.put(Finished(job.key))

    def _release(self, sha: str, *, retry_followers: bool, error: str | None = None) -> None:
        """The leader for `sha` gave up: its followers are read on their own, or (`error`: the
        content itself cannot be read) fail with the leader's reason."""
        with self._lock:
            followers = self._leaders.pop(sha, [])
        for job, sample_id, _ in followers:
            if error is not None and not retry_followers:
                self._final_failure(job, error, sha, sample_id, attempts=job.attempts + 1)
            else:
                self.jobs.put(dataclasses.replace(job, counted=True))

    # --- inference --------------------------------------------------------------------------

    def _inference_main(self) -> None:
        try:
            while True:
                batch = self._collect()
                if not batch:
                    with self._lock:
                        readers_left = self._readers_left
                    if self.stopping.is_set() and readers_left == 0 and self.prepared.empty():
                        return
                    continue
                tiles = sum(b.n_tiles for b in batch)
                if self.observer is not None:
                    self.observer.batch(len(batch), tiles)
                with self._inference_stage.working(f"classifying {len(batch)} image(s), {tiles} tile(s)"):
                    self._run_batch(batch)
        except BaseException as exc:
            self.error = exc
            log.error("inference stopped: %s", exc)

    def _collect(self) -> list[Prepared]:
        """A dynamic batch: images until batch_size tiles, or the latency cap, or nothing more coming."""
        try:
            first = self.prepared.get(timeout=0.2)
        except queue.Empty:
            return []
        with self._lock:
            self.in_inference += 1
        batch, tiles = [first], first.n_tiles
        cap = self.settings.model.max_batch_latency_ms / 1000.0
        deadline = time.monotonic() + cap
        while tiles < self.settings.model.batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if self.prepared.empty() and self.busy_readers == 0 and self.jobs.empty():
                break  # nothing else is on its way: do not wait for the cap
            try:
                item = self.prepared.get(timeout=min(remaining, 0.02))
            except queue.Empty:
                continue
            with self._lock:
                self.in_inference += 1
            batch.append(item)
            tiles += item.n_tiles
        return batch

    def _run_batch(self, batch: list[Prepared]) -> None:
        """One dynamic batch; images tiled for a model served before a switch are classified by
        that model (its own engine call), so every verdict names the model that made it."""
        groups: dict[int, list[Prepared]] = {}
        for item in batch:
            groups.setdefault(id(item.classifier), []).append(item)
        done: list[tuple[Prepared, ImageVerdict]] = []
        for group in groups.values():
            self._run_group(group, group[0].classifier or self.classifier, done)
        if self.after_batch is not None and done:
            try:
                self.after_batch(done)
            except Exception:  # the shadow model must never stop the live one
                log.exception("the shadow model failed on a batch; the live results are kept")

    def _run_group(self, batch: list[Prepared], classifier: ClassifierLike,
                   done: list[tuple[Prepared, ImageVerdict]]) -> None:
        try:
            outputs = predict_images(classifier, [item.prepared for item in batch])
        except Exception as exc:
            log.exception("inference failed for a batch of %d image(s)", len(batch))
            for item in batch:
                self._release(item.sha256, retry_followers=True)
                self._failure(item.job, f"inference failed: {type(exc).__name__}: {exc}", item.sha256,
                              item.sample_id, transient=True)
            with self._lock:
                self.in_inference -= len(batch)
            return
        for item, out in zip(batch, outputs, strict=True):
            try:
                verdict = classifier.verdict(item.prepared, out)
            except Exception as exc:
                log.exception("aggregation failed for %s", item.job.key.path)
                self._release(item.sha256, retry_followers=True)
                self._failure(item.job, f"aggregation failed: {type(exc).__name__}: {exc}", item.sha256,
                              item.sample_id)
                continue
            self._emit(item.job, item.sha256, item.sample_id, item.expected, verdict, item.n_tiles)
            if item.job.supersedes is None:
                done.append((item, verdict))
            if self._dedupe:
                with self._lock:
                    self._recent[item.sha256] = verdict
                    if len(self._recent) > RECENT_RESULTS:
                        self._recent.popitem(last=False)
                    followers = self._leaders.pop(item.sha256, [])
                self._emit_copies(verdict, item.sha256, followers)
        with self._lock:
            self.in_inference -= len(batch)

    # --- results ----------------------------------------------------------------------------

    def _emit(self, job: Job, sha: str, sample_id: str, expected: str | None, verdict: ImageVerdict,
              n_tiles: int) -> None:
        model_id = verdict.model_id or self.classifier.model_id
        if job.supersedes is not None:
            self.writer.put(Reclassified(job.key, job.supersedes, sha, sample_id, verdict, model_id,
                                         expected))
        else:
            self.writer.put(Result(job.key, sha, sample_id, verdict, model_id, expected))
        self.rates.add(n_tiles)
        if self.observer is not None:  # latency from settling: a catch-up job did not just settle
            self.observer.result(verdict.status,
                                 time.monotonic() - job.settled_at if job.supersedes is None else None)
        with self._lock:
            self.done += 1
        log.info("%s: %s %s conf %.2f (%d tiles) [%s]", job.key.path, verdict.status,
                 verdict.predicted_class or "-", verdict.confidence, verdict.n_tiles, sample_id,
                 extra=PER_FILE)
        self._tell_watcher(job, Finished(job.key))

    def _tell_watcher(self, job: Job, message: Finished) -> None:
        if job.supersedes is None:  # a catch-up job is none of the watcher's business
            self.inbox.put(message)

    def _emit_copies(self, verdict: ImageVerdict, sha: str,
                     followers: list[tuple[Job, str, str | None]]) -> None:
        for job, sample_id, expected in followers:
            self._emit(job, sha, sample_id, expected, _with_path(verdict, Path(job.key.path)), 0)


def _exists(path: Path) -> bool:
    try:
        os.lstat(path)
    except OSError:
        return False
    return True


def _with_path(verdict: ImageVerdict, path: Path) -> ImageVerdict:
    return dataclasses.replace(verdict, path=path)


def _utc(epoch: float) -> str:
    from semwatch.values import utc_from_epoch

    return utc_from_epoch(epoch)
