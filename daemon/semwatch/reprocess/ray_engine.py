"""The Ray engine: Ray Data reads and tiles on CPU tasks, an actor pool holds the network.

Work items, `CHUNK_ITEMS` at a time → pandas blocks → `map_batches(_read_batch)` (tasks of
`[scale] cpus_per_reader` CPUs each calling `work.read_bounded`: `work.read_item` under `[watch]
read_timeout_seconds`) → `map_batches(_Classify)` (an actor pool of `[scale] workers` actors, each
holding the loaded `Classifier` on a GPU or `cpus_per_worker` CPUs, calling `work.classify_items`)
→ outcomes streamed back to the driver (`run.py`), which alone writes the database. Both halves are
the local engine's functions, so a file gets the same verdict either way. The work list is a stream
(an archive's listing, the ledger paged by id): the driver holds one chunk of it at a time, never a
million-file archive. Workers get a `work.WorkerSettings` (what reading and classifying need), never
the whole `Settings` with its alert URLs.

The model reaches each actor as bytes through the object store (no shared model path): the actor
checks every file's SHA-256 and the loaded model id against what the driver sent, and refuses to
start otherwise. Archive paths, though, are opened by the reader tasks where they run: every node
must see them at the same path (docs/SCALE-OUT.md).

Failures: Ray restarts a dead actor and re-runs its batch, and re-runs a failed reader task; a batch
may thus be computed twice, which the driver's exactly-once rule (`Reclassified` supersedes a row
only while it is current) makes harmless.

`ray` is imported only here, inside functions: everything else in semwatch works without it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from semwatch.config import Settings
from semwatch.errors import ExitStatus, UserError
from semwatch.reprocess.work import (
    Outcome,
    Prepared,
    WorkerSettings,
    WorkItem,
    classify_items,
    read_bounded,
    read_item,
)
from semwatch.urls import mask_url, mask_urls_in

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.data import Dataset

    from semwatch.model.artifact import Manifest

log = logging.getLogger("semwatch.reprocess")

INSTALL_HINT = "--engine ray needs Ray: pip install 'semwatch[ray]'"
# Work items per Ray Data block, i.e. per reader task: small enough that a few tasks keep every
# reader CPU busy and a block of tiles (about 2 MB an image) stays far below Ray's block size
# target, large enough that the per-task overhead (a few ms) is noise next to reading an image.
ITEMS_PER_BLOCK = 4
# Work items per Ray Data dataset: the driver builds the blocks of one chunk at a time (each chunk
# starts its own actor pool: a few seconds of model loading per chunk, against the thousands of
# images it holds), so its memory is bounded whatever the size of the archive.
CHUNK_ITEMS = 20_000
# Images per call of a model actor: cut there into `[model] batch_size` groups of tiles
# (`engine.batch_groups`), as the local engine does; a few groups per call keep the remainder
# group (the one smaller pass) rare.
IMAGES_PER_CALL = 16
# Test-only fault injection: "N:PATH" makes a model actor exit (os._exit, as a killed process does)
# at its (N+1)-th call, once per PATH (created when it dies), so that a test can check that Ray
# restarts it, re-runs the batch, and the ledger still holds every result exactly once.
KILL_ENV = "SEMWATCH_TEST_KILL_ACTOR_AFTER"
# Test-only fault injection: "NAME" makes a Ray reader task's read of a file named NAME block in the
# kernel for good (a read from a pipe nobody writes to, as a read on a dead network share blocks),
# so that a test can check that the read is given up after `[watch] read_timeout_seconds`.
HANG_ENV = "SEMWATCH_TEST_HANG_READ"
# How long the head of `[scale] ray_address` may take to accept a connection before the command gives
# up with one line (exit 78): Ray's own connect retries an unreachable address for minutes.
CONNECT_SECONDS = 10.0
ARTIFACT_FILES = ("manifest.json", "model.safetensors")  # what `Classifier.load` reads
REFUSAL = "semwatch model actor:"  # how an actor's refusal starts (found again in Ray's error text)


def _import_ray() -> ModuleType:
    try:
        import ray
        import ray.data
    except ImportError:
        raise UserError(INSTALL_HINT, ExitStatus.CONFIG) from None
    return ray


class RayEngine:
    """Classify on a Ray cluster (a private local one when `[scale] ray_address` is empty)."""

    name = "ray"

    def __init__(self, settings: Settings, model_dir: Path) -> None:
        from semwatch.model.artifact import read_manifest

        ray = _import_ray()
        self.settings = settings
        self.worker = WorkerSettings.of(settings)  # all that the workers get of the settings
        self.manifest: Manifest = read_manifest(model_dir)
        self.model_id = self.manifest.model_id
        blobs = _artifact_blobs(model_dir)
        self._digests = {name: hashlib.sha256(blob).hexdigest() for name, blob in blobs.items()}
        self._connected = False
        self._kill: tuple[int, str] | None = _kill_injection()
        self._hang = os.environ.get(HANG_ENV) or None
        self._start(ray)
        try:
            self._configure_data(ray)
            self.workers, self.gpus_per_worker, self.device = self._shape(ray)
            self.settings = _actor_settings(settings, model_dir, self.gpus_per_worker)
            # The weights once into the object store; every actor (on any node) fetches them from there.
            self._model_ref = ray.put(blobs)
        except BaseException:
            self.close()
            raise

    def _start(self, ray: ModuleType) -> None:
        """Join `[scale] ray_address`, reuse this process's Ray connection, or start a private Ray."""
        # ERROR: Ray's start-up warnings (token authentication on, by design) are not the user's business.
        quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
        if ray.is_initialized():  # already connected (a caller's own `ray.init`): use it, leave it
            return
        address = self.settings.scale.ray_address
        if address:
            unreachable = _unreachable(address, CONNECT_SECONDS)
            if unreachable is not None:
                raise UserError(f"cannot join the Ray cluster at {address!r} ([scale] ray_address): "
                                f"{unreachable}", ExitStatus.CONFIG)
        try:
            if address:
                ray.init(address=address, **quiet)
            else:  # "local": a new Ray even where RAY_ADDRESS or a `ray start` on this machine exists
                ray.init(address="local", include_dashboard=False, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            shown = mask_url(address) if "://" in address else address  # ray://user:pass@head:10001
            where = f"the Ray cluster at {shown!r} ([scale] ray_address)" if address else "a local Ray"
            raise UserError(f"cannot start or join {where}: {mask_urls_in(str(exc).strip().splitlines()[0])}",
                            ExitStatus.CONFIG) from None
        self._connected = True

    @staticmethod
    def _configure_data(ray: ModuleType) -> None:
        """No progress bars, execution banners or statistics of Ray Data's own: the driver shows its
        progress. Its logger at ERROR: it warns that the bars are off, at WARNING."""
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        ctx.enable_auto_log_stats = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)

    def _shape(self, ray: ModuleType) -> tuple[int, float, str]:
        """(model actors, GPUs per actor, the cluster in words); refuses a shape the cluster cannot
        hold, which Ray Data would otherwise wait for forever.

        On GPUs the readers are CPU tasks beside the GPU actors. On CPUs only, with
        `cpus_per_reader == cpus_per_worker` (the default), Ray Data fuses the reading into the
        model actors (operator fusion: the two stages ask for the same resources), so each actor
        reads, tiles and classifies its own items and `workers = 0` gives one actor per
        `cpus_per_worker` CPUs of the cluster; otherwise the readers keep `cpus_per_reader` CPUs
        of their own beside the actors."""
        scale = self.settings.scale
        resources = ray.cluster_resources()
        cpus, gpus = float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        per_gpu = scale.gpus_per_worker if scale.gpus_per_worker >= 0 else (1.0 if gpus >= 1 else 0.0)
        fused = per_gpu == 0 and scale.cpus_per_reader == scale.cpus_per_worker
        reader_cpus = 0.0 if fused else scale.cpus_per_reader
        if scale.workers > 0:
            workers = scale.workers
        elif per_gpu > 0:
            workers = max(1, int(gpus // per_gpu))
        else:
            workers = max(1, int((cpus - reader_cpus) // scale.cpus_per_worker))
        if per_gpu * workers > gpus:
            raise UserError(f"[scale] workers = {workers} x gpus_per_worker = {per_gpu:g} needs "
                            f"{per_gpu * workers:g} GPUs; the Ray cluster has {gpus:g}", ExitStatus.CONFIG)
        actor_cpus = 0.0 if per_gpu > 0 else scale.cpus_per_worker * workers
        if actor_cpus + reader_cpus > cpus:
            raise UserError(
                f"[scale] {workers} model actor(s) x cpus_per_worker {scale.cpus_per_worker:g}"
                + (f" + cpus_per_reader {reader_cpus:g}" if reader_cpus else "")
                + f" need {actor_cpus + reader_cpus:g} CPUs; the Ray cluster has {cpus:g}", ExitStatus.CONFIG)
        kind = "GPU" if per_gpu > 0 else "CPU"
        hardware = f"{cpus:g} CPUs" + (f", {gpus:g} GPUs" if gpus else "")
        device = (f"ray: {workers} {kind} model actor{'s' * (workers != 1)} on {nodes} "
                  f"node{'s' * (nodes != 1)} ({hardware})")
        return workers, per_gpu, device

    def run(self, items: Iterable[WorkItem]) -> Iterator[Outcome]:
        """Each item's outcome, in the order Ray finishes them; `items` is consumed `CHUNK_ITEMS` at a
        time, each chunk one Ray Data run."""
        stream = iter(items)
        while chunk := list(itertools.islice(stream, CHUNK_ITEMS)):
            yield from self._run_chunk(chunk)

    def stages(self) -> tuple[Callable[..., dict[str, np.ndarray]], dict[str, object]]:
        """What the workers are sent: the reader tasks' function (its arguments bound) and the model
        actors' constructor arguments. A test checks that no secret of the settings is in them."""
        read = partial(_read_batch, worker=self.worker, manifest=self.manifest, hang=self._hang)
        actor = {"worker": self.worker, "model": [self._model_ref], "digests": self._digests,
                 "model_id": self.model_id, "threads": max(1, round(self.settings.scale.cpus_per_worker)),
                 "kill": self._kill}
        return read, actor

    def _run_chunk(self, work: list[WorkItem]) -> Iterator[Outcome]:
        import pandas as pd
        import ray.data

        scale = self.settings.scale
        # One object column of Python values rather than an Arrow schema: the values are frozen
        # dataclasses holding nested records and tile arrays of varying shape; Ray pickles object
        # columns itself, and a hand-made schema would have to follow every field of WorkItem,
        # Prepared and Outcome. Pandas blocks hold such a column as it is (`from_items` would try
        # Arrow first, fail, and warn).
        blocks = [pd.DataFrame({"item": work[i : i + ITEMS_PER_BLOCK]})
                  for i in range(0, len(work), ITEMS_PER_BLOCK)]
        ds: Dataset = ray.data.from_pandas(blocks)
        del blocks  # in the object store now
        read, actor = self.stages()
        # Retries are Ray Data's defaults: a failed reader task is re-run, a dead actor restarted and
        # its batch re-sent (max_retries / max_restarts / max_task_retries = -1; passing them is
        # deprecated in Ray 2.6x).
        ds = ds.map_batches(read, batch_size=ITEMS_PER_BLOCK, batch_format="numpy", zero_copy_batch=True,
                            num_cpus=scale.cpus_per_reader)
        ds = ds.map_batches(
            _Classify, batch_size=IMAGES_PER_CALL, batch_format="numpy", zero_copy_batch=True,
            fn_constructor_kwargs=actor,
            compute=ray.data.ActorPoolStrategy(size=min(self.workers, -(-len(work) // ITEMS_PER_BLOCK))),
            num_cpus=0 if self.gpus_per_worker > 0 else scale.cpus_per_worker,
            num_gpus=self.gpus_per_worker or None)
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                yield from batch["outcome"]
        except ray.exceptions.RayError as exc:
            refused = _refusal(str(exc))
            if refused is None:
                raise
            raise UserError(refused, ExitStatus.CONFIG) from None

    def close(self) -> None:
        """Stop the private Ray (or disconnect from the cluster); nothing when the caller's."""
        if not self._connected:
            return
        import ray

        self._connected = False
        ray.shutdown()


# --- what runs on the workers ----------------------------------------------------------------------


def _objects(values: list[object]) -> np.ndarray:
    """A 1-D object array of `values` (np.array would try to see sequences inside them)."""
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def _read_batch(batch: dict[str, np.ndarray], *, worker: WorkerSettings, manifest: Manifest,
                hang: str | None = None) -> dict[str, np.ndarray]:
    """Reader task: each work item read and tiled, or its error outcome, through the local engine's
    bounded read (`work.read_bounded`): a read still blocked after `[watch] read_timeout_seconds`
    is given up (its thread left behind: nothing can interrupt a read blocked in the kernel) and
    the item's outcome says "timed out"; the other items go on. One reading thread at a time: the
    task has `cpus_per_reader` CPUs."""
    settings = worker.settings()
    items = list(batch["item"])
    read = partial(_hanging_read, settings=settings, manifest=manifest, hang=hang) if hang else None
    bounded = read_bounded(items, settings, manifest, workers=1, prefetch=len(items), read=read,
                           name="semwatch-ray-read")
    return {"prepared": _objects([result for _, result in bounded])}


def _hanging_read(item: WorkItem, *, settings: Settings, manifest: Manifest, hang: str) -> Prepared | Outcome:
    """Test-only (HANG_ENV): the read of a file named `hang` blocks in the kernel for good."""
    if Path(item.path).name == hang:
        r, _w = os.pipe()
        os.read(r, 1)  # nobody ever writes: blocked like a read on a dead share
    return read_item(item, settings, manifest)


class _Classify:
    """A model actor: loads the model sent through the object store, then classifies batches."""

    def __init__(self, worker: WorkerSettings, model: list[ObjectRef[dict[str, bytes]]],
                 digests: dict[str, str], model_id: str, threads: int, kill: tuple[int, str] | None) -> None:
        import ray
        import torch

        from semwatch.model.classify import Classifier

        blobs: dict[str, bytes] = ray.get(model[0])  # in a list: Ray would not resolve it for us here
        for name, digest in digests.items():
            got = hashlib.sha256(blobs.get(name, b"")).hexdigest()
            if got != digest:
                raise RuntimeError(f"{REFUSAL} {name} arrived with sha256 {got[:16]}, "
                                   f"the driver sent {digest[:16]}; refusing to classify with it")
        folder = Path(tempfile.mkdtemp(prefix="semwatch-model-"))
        try:
            for name, blob in blobs.items():
                (folder / name).write_bytes(blob)
            torch.set_num_threads(threads)
            self.classifier = Classifier.load(folder, worker.settings())
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if self.classifier.model_id != model_id:
            raise RuntimeError(f"{REFUSAL} loaded model {self.classifier.model_id}, the "
                               f"driver classifies with {model_id}; refusing")
        self.kill = kill
        self.calls = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from semwatch.model.engine import batch_groups

        self.calls += 1
        if self.kill is not None and self.calls > self.kill[0]:
            _die_once(self.kill[1])
        entries: list[Prepared | Outcome] = list(batch["prepared"])
        ready = [e for e in entries if isinstance(e, Prepared)]
        done: dict[int, Outcome] = {}
        # The local engine's grouping (images until their tiles fill a batch), so a file's tiles go
        # through the network in the same kind of batches under both engines.
        for group in batch_groups(ready, lambda p: len(p.image.tiles), self.classifier.batch_size):
            for prepared, outcome in zip(group, classify_items(self.classifier, group), strict=True):
                done[id(prepared)] = outcome
        return {"outcome": _objects([done[id(e)] if isinstance(e, Prepared) else e for e in entries])}


def _die_once(marker: str) -> None:
    """Test-only (KILL_ENV): exit like a killed process, the first time only."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(1)


# --- the driver's helpers ----------------------------------------------------------------------------


def _actor_settings(settings: Settings, model_dir: Path, gpus_per_worker: float) -> Settings:
    """The settings each model actor loads the model with: on CPU actors, the backbone's threads are
    the actor's CPUs, and `[model] runtime = "auto"` is resolved once here, by the same measurement
    (with those threads, cached beside the model) that a local run makes, so every actor runs the
    runtime measured fastest rather than each measuring again. GPU actors choose on their device."""
    if gpus_per_worker > 0:
        return settings
    from semwatch.model.classify import Classifier

    threads = max(1, round(settings.scale.cpus_per_worker))
    model = dataclasses.replace(settings.model, cpu_threads=threads)
    if model.runtime == "auto":
        model = dataclasses.replace(model, runtime=Classifier.load(model_dir, dataclasses.replace(
            settings, model=model)).runtime)  # type: ignore[arg-type]
    return dataclasses.replace(settings, model=model)


def _artifact_blobs(model_dir: Path) -> dict[str, bytes]:
    from semwatch.model.export import ONNX_FILE
    from semwatch.model.runtimes import CACHE_FILE

    blobs: dict[str, bytes] = {}
    for name in (ONNX_FILE, CACHE_FILE):  # the export (verified by the actor's load) and its timing
        if (model_dir / name).is_file():
            try:
                blobs[name] = (model_dir / name).read_bytes()
            except OSError:
                pass
    for name in ARTIFACT_FILES:
        try:
            blobs[name] = (model_dir / name).read_bytes()
        except OSError as exc:
            raise UserError(f"[model] path: cannot read {model_dir / name}: {exc.strerror or exc}",
                            ExitStatus.CONFIG) from None
    return blobs


def _refusal(text: str) -> str | None:
    """The model actor's own refusal inside a Ray error's text (tracebacks around it), if any."""
    for line in text.splitlines():
        at = line.find(REFUSAL)
        if at >= 0:
            return line[at:].strip()
    return None


def _unreachable(address: str, seconds: float) -> str | None:
    """Why nothing answers at `address` ("host:port", "ray://host:port"), or None if something
    does (or Ray is to find the cluster itself: "auto")."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return None  # "auto", or a form Ray resolves itself
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=seconds):
            return None
    except TimeoutError:
        return f"no answer from {host}:{port} within {seconds:g} s"
    except OSError as exc:
        return f"cannot connect to {host}:{port}: {exc.strerror or exc}"


def _kill_injection() -> tuple[int, str] | None:
    raw = os.environ.get(KILL_ENV)
    if not raw:
        return None
    after, _, marker = raw.partition(":")
    if not after.isdigit() or not marker:
        raise UserError(f"{KILL_ENV} must be N:PATH (test-only fault injection), not {raw!r}",
                        ExitStatus.CONFIG)
    return int(after), marker
