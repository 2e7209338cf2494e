"""`semwatch train --labels`: a model from the lab's own labels (beside, or instead of, class folders).

The labelled list is built from the ledger's current labels (`store.labels.current_labels`):
- `corrected` → the class the operator named (a class no model knows yet is a new class here);
- `confirmed` → the class the verdict had when it was confirmed (kept in the label);
- `foreign` → not trained: it is neither one of the classes nor a class of its own (one "foreign"
  class of stubs, test patterns and other materials would teach the head a catch-all and make the
  novelty detector call such images familiar); such images stay for the detector to call unknown.

Each labelled content is looked for where the ledger saw it (every current row with that sha256,
newest first) and read once, where it lies, through `safefs` with the row's confinement (the watch
folder for its files, else the file's own folder: `reprocess`'s rule) and the size limit; the bytes
read are hashed, and only bytes with the labelled sha256 are used: they (and the image's sidecar,
read the same way) are written to a private staging folder that the trainer reads, so a file
changed or swapped after the check cannot slip into the model. A label whose file is gone, or
whose every copy now holds other bytes, is skipped and counted. The trainer records the content
sha256 of every image the model saw in its manifest (`training.trained_on`).
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from semwatch.config import Settings
from semwatch.errors import ExitStatus, UserError
from semwatch.output import Output
from semwatch.reading.listing import confinement_root
from semwatch.reading.sidecar import sidecar_path
from semwatch.safefs import Confinement, RefusedFile, path_from_text, path_text, read_bounded, write_atomic
from semwatch.store import labels as lab
from semwatch.store.access import open_readonly
from semwatch.values import ClassInfo, parse_class

if TYPE_CHECKING:  # torch is imported only when a model is trained
    from semwatch.model.train import TrainResult

SIDECAR_MAX_BYTES = 1024 * 1024
LEDGER_PREFIX = "ledger/"  # the `rel` of a labelled image: "ledger/<sha256><suffix>"


@dataclass
class LabelledSet:
    """What the ledger's labels give to train on, and what they could not."""

    # (class name, staged file, sha256) per usable label
    images: list[tuple[str, Path, str]] = field(default_factory=list)
    foreign: int = 0  # not trained (see the module docstring)
    gone: int = 0  # no copy of the file is left
    changed: int = 0  # the files are there but hold other bytes now
    refused: int = 0  # safefs refused every copy (a link out of its folder, a FIFO, too large)
    no_class: int = 0  # a label without a class (never written by semwatch; counted, not trusted)
    in_folder: int = 0  # also in the class folder trained beside the labels: trained once, from there

    @property
    def skipped(self) -> int:
        return self.gone + self.changed + self.refused + self.no_class

    def counts(self) -> dict[str, int]:
        return {"labelled_images": len(self.images), "foreign": self.foreign, "gone": self.gone,
                "changed": self.changed, "refused": self.refused, "in_folder": self.in_folder}


def collect_labelled(conn: sqlite3.Connection, settings: Settings, staging: Path) -> LabelledSet:
    """Read every labelled image (see the module docstring) into `staging`."""
    found = LabelledSet()
    limit = int(settings.reading.max_file_mb * 1024 * 1024)
    for label in lab.current_labels(conn):
        if label.status == "foreign":
            found.foreign += 1
            continue
        if not label.class_name:
            found.no_class += 1
            continue
        outcome = _stage(conn, label.sha256, settings, staging, limit)
        if isinstance(outcome, Path):
            found.images.append((label.class_name, outcome, label.sha256))
        elif outcome == "gone":
            found.gone += 1
        elif outcome == "changed":
            found.changed += 1
        else:
            found.refused += 1
    return found


def _stage(conn: sqlite3.Connection, sha256: str, settings: Settings, staging: Path,
           limit: int) -> Path | str:
    """The staged copy of the first copy of `sha256` that still holds it, else why there is none."""
    import hashlib

    why = "gone"
    for row in lab.rows_with_content(conn, sha256):
        name = path_from_text(row.path)
        confine = Confinement(Path(confinement_root(name, settings.watch.folder)),
                              settings.watch.follow_symlinks)
        try:
            data = read_bounded(name, limit, confine=confine)
        except FileNotFoundError:
            continue
        except RefusedFile:
            why = "refused" if why == "gone" else why
            continue
        except OSError:
            continue
        if hashlib.sha256(data).hexdigest() != sha256:
            why = "changed"
            continue
        staged = staging / f"{sha256}{Path(name).suffix.lower()}"
        write_atomic(staged, data)
        try:
            sidecar = read_bounded(sidecar_path(name), SIDECAR_MAX_BYTES, confine=confine)
        except OSError:  # no sidecar (or not a readable one): the image's own metadata only
            pass
        else:
            write_atomic(Path(sidecar_path(str(staged))), sidecar)
        return staged
    return why


def merge_classes(folder_classes: list[ClassInfo], label_classes: list[str]) -> list[ClassInfo]:
    """The classes of a folder and of labels together; a label's class that means the same as a
    folder's (`622_pristine` and `622`) is the folder's."""
    out = list(folder_classes)
    meaning = {(c.composition, c.state): c for c in out}
    for name in sorted(set(label_classes)):
        info = parse_class(name)
        if name not in {c.name for c in out} and (info.composition, info.state) not in meaning:
            out.append(info)
            meaning[(info.composition, info.state)] = info
    return out


@dataclass
class LabelTraining:
    """A model trained from labels: the trainer's result, what the ledger gave, images per class."""

    result: TrainResult
    found: LabelledSet
    per_class: Counter[str]
    folder_images: int


def train_from_labels(settings: Settings, *, data_dir: Path | None, out_dir: Path, epochs: int | None,
                      max_images_per_class: int | None, out: Output) -> LabelTraining:
    """The ledger's labelled images (and the folder's, when given) → a model in `out_dir`. Skipped
    labels are counted on `out`'s stderr."""
    from semwatch.model.train import LabelledImage, content_hashes, discover, train_images

    database = settings.store.database
    if not database.is_file():
        raise UserError(f"no database at {path_text(database)}: there are no labels to train on",
                        ExitStatus.INPUT_FAILED)
    folder_classes: list[ClassInfo] = []
    folder_images: list[LabelledImage] = []
    if data_dir is not None:
        folder_classes, folder_images = discover(data_dir, settings.train.class_map)
    with tempfile.TemporaryDirectory(prefix="semwatch-labels-") as tmp:
        staging = Path(tmp)
        conn = open_readonly(database, busy_timeout_ms=settings.store.busy_timeout_ms, older="copy")
        try:
            if not lab.has_labels_table(conn):
                raise UserError(f"{path_text(database)} has no labels yet (`semwatch label`)",
                                ExitStatus.INPUT_FAILED)
            found = collect_labelled(conn, settings, staging)
        finally:
            conn.close()
        _tell_skipped(out, found)
        if not found.images and not folder_images:
            raise UserError("no labelled image can be trained on (see the counts above)",
                            ExitStatus.INPUT_FAILED)
        if folder_images:  # an image in both: the folder's (curated) label, trained once
            in_folder = set(content_hashes(folder_images, settings).values())
            kept = [item for item in found.images if item[2] not in in_folder]
            found.in_folder = len(found.images) - len(kept)
            found.images = kept
            if found.in_folder:
                out.say(f"{found.in_folder} labelled image(s) are also in {path_text(data_dir or '')}: "
                        "trained once, with the folder's class")
        classes = merge_classes(folder_classes, [c for c, _, _ in found.images])
        index = {c.name: i for i, c in enumerate(classes)}
        meaning = {(c.composition, c.state): i for i, c in enumerate(classes)}
        images = list(folder_images)
        for name, staged, sha in found.images:
            info = parse_class(name)
            label = index.get(name, meaning.get((info.composition, info.state)))
            assert label is not None
            images.append(LabelledImage(staged, f"{LEDGER_PREFIX}{sha}{staged.suffix}", label))
        source = "ledger labels" + (f" + {path_text(data_dir.resolve())}" if data_dir is not None else "")
        result = train_images(classes, images, out_dir, settings, source=source, data_dir=data_dir,
                              max_images_per_class=max_images_per_class, epochs=epochs, progress=True,
                              out=out)
    per_class = Counter(classes[im.label].name for im in images)
    return LabelTraining(result, found, per_class, len(folder_images))


def train_with_labels(settings: Settings, *, data_dir: Path | None, out_dir: Path, epochs: int | None,
                      max_images_per_class: int | None, split_out: Path | None, out: Output) -> int:
    """`semwatch train [DATA_DIR] --labels --out MODEL_DIR`: `train_from_labels`, reported (one JSON
    object with `--json`); images that could not be read are named on stderr (exit 1)."""
    trained = train_from_labels(settings, data_dir=data_dir, out_dir=out_dir, epochs=epochs,
                                max_images_per_class=max_images_per_class, out=out)
    result, found = trained.result, trained.found
    if split_out is not None:
        split = {k: list(v) for k, v in result.manifest.split.items()}
        write_atomic(split_out, (json.dumps(split, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    if out.json:
        out.emit({**result.to_json(), "labels": found.counts(), "images_per_class": dict(trained.per_class)})
    else:
        v = result.validation
        out.line(f"model {result.model_id} written to {path_text(result.model_dir)} in "
                 f"{result.wall_s:.0f} s: {len(result.classes)} classes, {len(found.images)} labelled "
                 "image(s) from the ledger"
                 f"{f' + {trained.folder_images} from the folder' if data_dir is not None else ''}; "
                 f"{result.n_train}/{result.n_val}/{result.n_test} train/val/test; validation image "
                 f"accuracy {v.get('image_accuracy', 'n/a')}")
    for line in result.skipped:
        out.say(f"skipped {line}")
    return ExitStatus.INPUT_FAILED if result.skipped else ExitStatus.OK


def _tell_skipped(out: Output, found: LabelledSet) -> None:
    parts = [f"{n} {what}" for n, what in (
        (found.gone, "gone (no copy of the file is left)"),
        (found.changed, "changed (the file holds other bytes than were labelled)"),
        (found.refused, "refused (safefs: outside the folder, not a regular file, or too large)"),
        (found.no_class, "without a class")) if n]
    if found.foreign:
        parts.append(f"{found.foreign} foreign (not trained)")
    if parts:
        out.say("labels not trained on: " + ", ".join(parts))
