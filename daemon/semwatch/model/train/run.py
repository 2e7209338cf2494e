"""`semwatch train DATA_DIR --out MODEL_DIR`: one folder per class → a verified model artifact.

Recipe (CPU-friendly; timings in benchmarks/results/HISTORY.md): the ImageNet backbone stays frozen;
its multi-level pooled features are computed once per (tile, augmentation) and a small head is
trained on them with early stopping on validation. Tiles are intensity-equalised, so a session's
brightness/contrast/gamma cannot be learnt; augmentation adds blur, noise, flips and rotations.
Validation images then calibrate the temperature (image-level NLL, tile-level where that has
no finite optimum) and the unknown threshold.
The split is by image, stratified and seeded, and is recorded in the manifest.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from semwatch import __version__
from semwatch.config import Settings
from semwatch.errors import ConfigError, ExitStatus, UserError
from semwatch.model.artifact import SCHEMA_VERSION, Json, Manifest, save_artifact
from semwatch.model.backbone import LAYERS, TileNet, architecture
from semwatch.model.export import ONNX_FILE, export_backbone
from semwatch.model.runtime import cpu_bfloat16, select_device
from semwatch.model.runtimes import build, cache_key, choose, write_cache
from semwatch.model.train.data import (
    LabelledImage,
    Recipe,
    check_images,
    content_hashes,
    discover,
    fingerprint,
    recipe_for,
    split_images,
    subsample,
)
from semwatch.model.train.detector import calibration_record, detector_record, fit_detector
from semwatch.model.train.featurecache import open_cache
from semwatch.model.train.features import Features, grid_features, training_features
from semwatch.model.train.finetune import backbone_mode, finetune
from semwatch.model.train.head import HEAD_HIDDEN, Fit, fit_head_and_novelty, train_head, validation_metrics
from semwatch.output import Output
from semwatch.safefs import path_text, write_atomic
from semwatch.values import ClassInfo

NOVELTY_K = 64


@dataclass
class TrainResult:
    model_dir: Path
    manifest: Manifest
    n_train: int
    n_val: int
    n_test: int
    wall_s: float
    skipped: list[str] = field(default_factory=list)

    @property
    def model_id(self) -> str:
        return self.manifest.model_id

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.classes)

    @property
    def validation(self) -> dict[str, Json]:
        return dict(self.manifest.validation)

    def to_json(self) -> dict[str, Json]:
        return {
            "model_dir": path_text(self.model_dir),
            "model_id": self.model_id,
            "classes": list[Json](self.manifest.classes),
            "n_train": self.n_train,
            "n_val": self.n_val,
            "n_test": self.n_test,
            "validation": self.validation,
            "wall_s": round(self.wall_s, 1),
            "skipped": list(self.skipped),
        }


def _export(net: TileNet, settings: Settings, out_dir: Path,
            out: Output | None) -> tuple[bytes | None, dict[str, Json]]:
    """Export the backbone into `out_dir` (`model.export`); a model without an export still works
    (torch), so a failure is said and training goes on."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        record = export_backbone(net.backbone, settings.tiling.tile_px, out_dir)
    except Exception as exc:  # an exporter bug must not cost a training run
        if out is not None:
            out.say(f"train: no ONNX export ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                    f"the model runs in torch")
        return None, {}
    return (out_dir / ONNX_FILE).read_bytes(), record


def _sha(export: Mapping[str, Json]) -> str | None:
    onnx = export.get("onnx")
    return str(onnx["sha256"]) if isinstance(onnx, dict) else None


def _rates(rates: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f} tiles/s" for k, v in sorted(rates.items(), key=lambda kv: -kv[1]))


def _precision(device: torch.device, settings: Settings, runtime: str = "torch") -> str:
    if runtime != "torch":
        return "float32"
    if device.type == "cuda" and settings.model.mixed_precision:
        return "float16"
    if device.type == "cpu" and cpu_bfloat16(settings):
        return "bfloat16"
    return "float32"


def describe_model(
    out_dir: Path,
    source: str,
    settings: Settings,
    classes: list[ClassInfo],
    images: list[LabelledImage],
    split: dict[str, list[LabelledImage]],
    recipe: Recipe,
    features: Features,
    fit: Fit,
    device: torch.device,
    wall_s: float,
    *,
    hashes: Mapping[str, str],
    data_dir: Path | None = None,
) -> Manifest:
    """The manifest of a model just fitted (its checksums are added by `save_artifact`). `hashes`
    maps each image's `rel` to its content sha256, taken before training."""
    t, tiling = settings.train, settings.tiling
    # "Did this model see this image": every image whose tiles shaped the weights, the temperature
    # or the unknown threshold (training and validation), by content; test images are held out.
    seen = sorted({hashes[im.rel] for name in ("train", "val") for im in split[name]})
    return Manifest(
        name=out_dir.name,
        classes=tuple(c.name for c in classes),
        class_info=tuple(classes),
        architecture=settings.model.architecture,
        tile_px=tiling.tile_px,
        tile_physical_px=tiling.tile_physical_px,
        overlap=tiling.overlap,
        intensity=tiling.intensity,
        normalisation={
            "intensity": tiling.intensity,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "channels": "grey repeated x3",
        },
        reference_pixel_size_nm=recipe.ref_pixel_nm,
        reference_magnification=recipe.ref_magnification,
        head_hidden=HEAD_HIDDEN,
        novelty_k=NOVELTY_K,
        unknown_threshold=round(fit.unknown_threshold, 5),
        unknown_calibration=calibration_record(settings),
        novelty=detector_record(),
        temperature=round(fit.temperature, 5),
        training={
            **({"data_dir": path_text(data_dir.resolve())} if data_dir is not None else {}),
            "source": source,
            "data_fingerprint": fingerprint(images, hashes),
            "n_images": len(images),
            "n_train_tiles": len(features.train.feats),
            "seed": t.seed,
            "epochs_run": fit.epochs_run,
            "tiles_per_image": t.tiles_per_image,
            "augment_copies": t.augment_copies,
            "device": str(device),
            "precision": _precision(device, settings),
            "wall_s": round(wall_s, 1),
            "skipped": list(features.skipped),
            "trained_on": list[Json](seen),
        },
        # The same figures under two keys: `validation` is what the first models had, `metrics` is
        # what the daemon registers with the model (room for more than validation).
        validation=fit.validation,
        metrics={"validation": fit.validation},
        split={k: tuple(sorted(im.rel for im in v)) for k, v in split.items()},
        semwatch_version=__version__,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def train_model(
    data_dir: Path,
    out_dir: Path,
    settings: Settings,
    *,
    max_images_per_class: int | None = None,
    epochs: int | None = None,
    progress: bool = True,
    out: Output | None = None,
) -> TrainResult:
    """Train on `data_dir` (one folder per class) and write the artifact to `out_dir`; progress on
    `out`'s stderr (the process's by default) unless `progress` is off."""
    classes, images = discover(data_dir, settings.train.class_map)
    return train_images(classes, images, out_dir, settings, source=path_text(data_dir.resolve()),
                        data_dir=data_dir, max_images_per_class=max_images_per_class, epochs=epochs,
                        progress=progress, out=out)


def train_images(
    classes: list[ClassInfo],
    images: list[LabelledImage],
    out_dir: Path,
    settings: Settings,
    *,
    source: str,
    data_dir: Path | None = None,
    max_images_per_class: int | None = None,
    epochs: int | None = None,
    progress: bool = True,
    out: Output | None = None,
) -> TrainResult:
    """Train on an explicit list of labelled images (`label` indexes `classes`; `rel` is each image's
    unique, stable key: see `data`) and write the artifact to `out_dir`. `source` says where the list
    came from (a folder, the label ledger) and is recorded in the manifest with the content sha256 of
    every image the model saw (`training.trained_on`)."""
    started = time.monotonic()
    t = settings.train
    try:
        architecture(settings.model.architecture)
    except ValueError as exc:
        raise ConfigError(f"[model] architecture: {exc}") from None
    check_images(classes, images)
    torch.manual_seed(t.seed)
    images = subsample(images, len(classes), max_images_per_class, t.seed)
    hashes = content_hashes(images, settings)
    split = split_images(images, len(classes), t.val_fraction, t.test_fraction, t.seed)
    recipe = recipe_for(settings, split["train"])
    device = select_device(settings.model.device)
    if settings.model.cpu_threads > 0:
        torch.set_num_threads(settings.model.cpu_threads)
    net = TileNet(settings.model.architecture, settings.tiling.tile_px, len(classes), hidden=HEAD_HIDDEN,
                  novelty_k=NOVELTY_K, pretrained=True)
    shown = (out or Output()) if progress else None
    # The frozen backbone's export is the model's (its weights do not change); after fine-tuning it
    # is made again. The feature passes run in the runtime `[model] runtime` picks, as inference does.
    graph, export = _export(net, settings, out_dir, shown)
    net.backbone.to(device).to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
    runner, choice = choose(net.backbone, graph, device, settings, model_id="", graph_sha256=_sha(export),
                            tile_px=settings.tiling.tile_px, model_dir=None)
    if shown is not None:
        shown.say(f"train: backbone passes in {choice.runtime} ({choice.reason}"
                  + (f": {_rates(choice.rates)})" if choice.rates else ")"))
    cache = open_cache(settings, recipe, _sha(export), runner.name)
    features = training_features(net, split, recipe, settings, device, shown, runner, hashes=hashes,
                                 cache=cache)
    if shown is not None and features.cached is not None:
        shown.say(f"train: features of {features.cached} of {len(split['train']) + len(split['val'])} "
                  f"images from the feature cache ({path_text(cache.folder) if cache else '-'})")
    if not len(features.train.feats):
        raise UserError(
            f"{source}: no usable training tiles (all images unreadable or blank)", ExitStatus.INPUT_FAILED
        )
    mode = backbone_mode(settings, device)
    tuned: dict[str, Json] = {}
    head_trained: tuple[int, float] | None = None
    described = features  # what calibration and the novelty detector are fitted on
    if mode == "finetune":
        head_trained = train_head(net, features.train, features.val, len(classes), settings,
                                  epochs or t.epochs)
        tuned = finetune(net, split["train"], recipe, len(classes), settings, device, shown)
        # The features moved with the backbone: the grid tiles, all that calibration and the
        # detector use once the head is trained, are taken again (not the augmented crops), in the
        # same runtime from the fine-tuned backbone's own export.
        net.head.to("cpu")
        net.backbone.eval()
        graph, export = _export(net, settings, out_dir, shown)
        net.backbone.to(device)
        kind = choice.runtime if graph is not None else "torch"
        runner = build(kind, net.backbone, graph, device, settings)
        described = grid_features(net, split, recipe, settings, device, shown, "features (fine-tuned)",
                                  runner)
    net.to("cpu")
    fit = fit_head_and_novelty(net, described, len(classes), settings, epochs or t.epochs,
                               head_trained=head_trained)
    manifest = describe_model(out_dir, source, settings, classes, images, split, recipe, features, fit,
                              device, time.monotonic() - started, hashes=hashes, data_dir=data_dir)
    manifest = dataclasses.replace(
        manifest, export=export,
        training={**manifest.training, "backbone": mode, **({"finetune": tuned} if tuned else {}),
                  "runtime": runner.name, "precision": _precision(device, settings, runner.name),
                  **({"features_cached": features.cached} if features.cached is not None else {}),
                  **({"runtime_tiles_per_s": dict(choice.rates)} if choice.rates else {})})
    saved = save_artifact(out_dir, dict(net.state_dict()), manifest)
    if choice.rates and graph is not None:  # the first load need not measure again
        write_cache(out_dir, cache_key(saved.model_id, _sha(export), device, settings, saved.tile_px),
                    choice.runtime, choice.rates)
    return TrainResult(out_dir, saved, len(split["train"]), len(split["val"]), len(split["test"]),
                       time.monotonic() - started, features.skipped)


def refit_novelty(model_dir: Path, data_dir: Path, out_dir: Path, settings: Settings, *,
                  out: Output | None = None) -> Manifest:
    """Give an existing model the layer-wise novelty detector (fitted again, or for the first time on
    a model of schema 1-2) without retraining its head: the split its manifest records, the grid
    tiles of its training images as they are, its threshold calibrated on its validation images.
    Writes a new artifact to `out_dir` (a new model id); the source is not changed. Costs one
    backbone pass over the training and validation images (minutes), not a training run."""
    from semwatch.model.artifact import export_bytes, load_artifact

    state, manifest = load_artifact(model_dir)
    classes = list(manifest.classes)
    net = TileNet(manifest.architecture, manifest.tile_px, len(classes), hidden=manifest.head_hidden,
                  novelty_k=manifest.novelty_k, pretrained=False, detector=LAYERS)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("layers.") for k in missing):
        raise UserError(f"{model_dir}: weights do not match the manifest")
    found, images = discover(data_dir, settings.train.class_map)
    by_rel = {im.rel: im for im in images}
    index = {c: i for i, c in enumerate(classes)}
    split: dict[str, list[LabelledImage]] = {}
    for name in ("train", "val"):
        rels = [r for r in manifest.split.get(name, ()) if r in by_rel]
        if not rels:
            raise UserError(f"{data_dir}: none of the model's '{name}' images are in this folder")
        unknown = sorted({found[by_rel[r].label].name for r in rels} - set(index))
        if unknown:
            raise UserError(f"{data_dir}: class {unknown[0]} is not one of the model's classes")
        split[name] = [LabelledImage(by_rel[r].path, r, index[found[by_rel[r].label].name]) for r in rels]
    tiling = settings.tiling
    recipe = Recipe(manifest.tile_px, manifest.tile_physical_px, manifest.overlap or tiling.overlap,
                    tiling.max_tiles, tiling.tile_std_min, tiling.tile_saturated_max, manifest.intensity,
                    manifest.reference_pixel_size_nm, manifest.reference_magnification)
    device = select_device(settings.model.device)
    net.backbone.to(device).to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
    fs = grid_features(net, split, recipe, settings, device, out, "novelty features")
    net.to("cpu")
    threshold = fit_detector(net, fs.train, fs.val, len(classes), settings)
    validation = {**manifest.validation,
                  **validation_metrics(net, fs.val, threshold, settings.model.min_confidence)}
    new = dataclasses.replace(
        manifest,
        name=out_dir.name,
        unknown_threshold=round(threshold, 5),
        unknown_calibration=calibration_record(settings),
        novelty={**detector_record(), "fitted_on": "grid tiles of the training images (refit)",
                 "refit_of": manifest.model_id},
        validation=validation,
        metrics={**manifest.metrics, "validation": validation},
        schema_version=SCHEMA_VERSION,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    # The backbone is unchanged, so its export (if the source has one) is still this model's graph.
    graph = export_bytes(model_dir, manifest)
    if graph is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(out_dir / ONNX_FILE, graph)
    return save_artifact(out_dir, dict(net.state_dict()), new)


def train_folder(
    data_dir: Path,
    settings: Settings,
    *,
    out_dir: Path,
    epochs: int | None,
    max_images_per_class: int | None,
    split_out: Path | None,
    out: Output,
) -> int:
    """`semwatch train`: train, optionally write the split as JSON to `split_out`, report the model
    (one JSON object with `--json`); images that could not be read are named on stderr (exit 1)."""
    result = train_model(data_dir, out_dir, settings, max_images_per_class=max_images_per_class,
                         epochs=epochs, progress=True, out=out)
    if split_out is not None:
        split = {k: list(v) for k, v in result.manifest.split.items()}
        write_atomic(split_out, (json.dumps(split, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    if out.json:
        out.emit(result.to_json())
    else:
        v = result.validation
        out.line(
            f"model {result.model_id} written to {path_text(result.model_dir)} in {result.wall_s:.0f} s: "
            f"{len(result.classes)} classes, {result.n_train}/{result.n_val}/{result.n_test} images "
            f"train/val/test; validation image accuracy {v.get('image_accuracy', 'n/a')}, "
            f"tile accuracy {v.get('tile_accuracy', 'n/a')}"
        )
    for line in result.skipped:
        out.say(f"skipped {line}")
    return ExitStatus.INPUT_FAILED if result.skipped else ExitStatus.OK
