"""Inference and aggregation: micrograph → tiles → tile probabilities → ImageVerdict.

`prepare` (CPU, thread-safe) and `verdict` are pure functions of the manifest and settings;
`predict` runs the network and is called from one inference thread. Batching across images is
`engine.predict_images`, the same for `semwatch classify`, evaluate, bench and the daemon.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from semwatch.config import Settings
from semwatch.errors import ExitStatus, UserError
from semwatch.model.artifact import Manifest, export_bytes, load_artifact
from semwatch.model.backbone import TileNet
from semwatch.model.engine import PreparedImage, TileOutput, batch_groups, predict_images, prefetched
from semwatch.model.runtime import describe_device, select_device
from semwatch.model.runtimes import NO_EXPORT, Choice, Runner, TorchRunner, choose
from semwatch.output import Output
from semwatch.reading.tiles import cut_tiles, scale_for
from semwatch.safefs import UNCONFINED, Confinement, path_text
from semwatch.values import ClassInfo, ImageVerdict, Micrograph, MicrographError

# The dihedral views of a (N, C, H, W) batch, in the order `test_time_views` takes them; each prefix
# is a group (2: the tile and its mirror image; 4: with both flipped, i.e. turned 180°; 8: all).
VIEWS: tuple[Callable[[torch.Tensor], torch.Tensor], ...] = (
    lambda t: t,
    lambda t: torch.flip(t, (3,)),
    lambda t: torch.flip(t, (2, 3)),
    lambda t: torch.flip(t, (2,)),
    lambda t: torch.rot90(t, 1, (2, 3)),
    lambda t: torch.flip(torch.rot90(t, 1, (2, 3)), (3,)),
    lambda t: torch.rot90(t, 3, (2, 3)),
    lambda t: torch.flip(torch.rot90(t, 3, (2, 3)), (3,)),
)


@dataclass
class Classifier:
    net: TileNet
    manifest: Manifest
    settings: Settings
    torch_device: torch.device
    model_id: str
    device: str
    classes: list[str]
    class_info: list[ClassInfo] = field(default_factory=list)
    # What runs the backbone (`model.runtimes`) and why; torch eager when None (built by hand).
    runner: Runner | None = None
    choice: Choice | None = None
    model_dir: Path | None = None

    @classmethod
    def load(cls, model_dir: Path, settings: Settings) -> Classifier:
        state, manifest = load_artifact(Path(model_dir))
        classes = list(manifest.classes)
        try:
            net = TileNet(
                manifest.architecture,
                manifest.tile_px,
                len(classes),
                hidden=manifest.head_hidden,
                novelty_k=manifest.novelty_k,
                pretrained=False,
                detector=manifest.detector,
            )
            net.load_state_dict(state, strict=True)
        except (ValueError, RuntimeError, KeyError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{model_dir}: weights do not match the manifest ({first})") from None
        if settings.model.cpu_threads > 0:
            torch.set_num_threads(settings.model.cpu_threads)
        device = select_device(settings.model.device)
        net = net.to(device).to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
        graph = export_bytes(Path(model_dir), manifest)  # verified against the manifest, or None
        onnx = manifest.export.get("onnx")
        sha = str(onnx["sha256"]) if isinstance(onnx, dict) and graph is not None else None
        runner, choice = choose(net.backbone, graph, device, settings, model_id=manifest.model_id,
                                graph_sha256=sha, tile_px=manifest.tile_px, model_dir=Path(model_dir))
        return cls(
            net,
            manifest,
            settings,
            device,
            manifest.model_id,
            f"{describe_device(device)}, {choice.runtime}",
            classes,
            list(manifest.class_info),
            runner,
            choice,
            Path(model_dir),
        )

    @property
    def runtime(self) -> str:
        """The runtime running the backbone: "torch", "onnxruntime" or "openvino"."""
        return self.choice.runtime if self.choice is not None else "torch"

    @property
    def runtime_note(self) -> str | None:
        """One line for the operator when the model cannot use the faster runtimes (no export)."""
        if self.choice is None or self.choice.reason != NO_EXPORT:
            return None
        where = path_text(self.model_dir) if self.model_dir is not None else "MODEL_DIR"
        what = "its ONNX export file is missing" if self.manifest.export else "it has no ONNX export"
        return (f"model {self.model_id}: {what}, so its backbone runs in eager torch; "
                f"`semwatch models export {where}` adds one (ONNX Runtime / OpenVINO, faster on most CPUs)")

    @property
    def batch_size(self) -> int:
        return self.settings.model.batch_size

    @property
    def unknown_threshold(self) -> float:
        configured = self.settings.model.unknown_threshold
        return float(configured) if configured >= 0 else float(self.manifest.unknown_threshold)

    # --- the three stages ------------------------------------------------------------------

    def prepare(self, micrograph: Micrograph) -> PreparedImage:
        return prepare_micrograph(self.manifest, self.settings, micrograph)

    def predict(self, tiles: np.ndarray) -> TileOutput:
        """Per-tile probabilities and novelty for one batch (`engine.predict_images` makes batches).

        Each tile is first seen as it is. Those whose confidence is below `[model] test_time_below`
        are then also seen in the other `test_time_views` - 1 flips/rotations, and get the geometric
        mean of the probabilities over all views: a specimen has no up or left, so every view is an
        equally valid look at it. Novelty stays that of the tile as it is, the quantity its threshold
        was calibrated on (averaged over views it fell, and a foreign image slipped under it). Tile
        errors are nearly all among the unsure tiles, so this buys most of what looking at every
        tile 8 times does at a fraction of the cost (measured: benchmarks/results/HISTORY.md).
        """
        n_classes = len(self.classes)
        if len(tiles) == 0:
            return TileOutput.empty(n_classes)
        m = self.settings.model
        x = torch.from_numpy(np.ascontiguousarray(tiles, dtype=np.float32))
        if self.runner is None or self.runner.name == "torch":
            x = x.to(self.torch_device)
        with torch.inference_mode():
            log_probs, novelty = self._look(x)
            if m.test_time_views > 1:
                unsure = torch.nonzero(log_probs.exp().max(dim=1).values < m.test_time_below).flatten()
                if len(unsure):
                    # All extra views of the unsure tiles in full batches: a few unsure tiles per
                    # view would make many small, slow passes.
                    xu = x[unsure]
                    views = torch.cat([view(xu) for view in VIEWS[1 : m.test_time_views]])
                    parts = range(0, len(views), m.batch_size)
                    more = torch.cat([self._look(views[i : i + m.batch_size])[0] for i in parts])
                    more = more.view(m.test_time_views - 1, len(unsure), n_classes).sum(dim=0)
                    log_probs[unsure] = (log_probs[unsure] + more) / float(m.test_time_views)
            probs = torch.softmax(log_probs, dim=1)
        return TileOutput(probs.cpu().numpy().astype(np.float32), novelty.cpu().numpy().astype(np.float32))

    def _look(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch through the backbone (whichever runtime holds it) and then the head and the
        detector (torch, float32) → (log-probabilities, novelty)."""
        runner = self.runner or TorchRunner(self.net.backbone, self.torch_device, self.settings)
        pooled, stats = runner.features(x)
        logits, novelty = self.net.scores(pooled.to(self.torch_device), stats.to(self.torch_device))
        return torch.log_softmax(logits.float(), dim=1), novelty.float()

    def verdict(self, prepared: PreparedImage, output: TileOutput) -> ImageVerdict:
        return aggregate(
            prepared,
            output,
            self.classes,
            self.class_info,
            unknown_threshold=self.unknown_threshold,
            min_confidence=self.settings.model.min_confidence,
            min_tiles=self.settings.model.min_tiles,
            model_id=self.model_id,
        )

    # --- conveniences ------------------------------------------------------------------------

    def classify_paths(self, paths: Sequence[Path]) -> list[ImageVerdict | MicrographError]:
        return [o.result for o in outcomes(self, paths)]

    def explain(self, micrograph: Micrograph) -> np.ndarray:
        """(H, W, 3) uint8 RGB: the micrograph with the Grad-CAM map of the class it is given."""
        from semwatch.model.gradcam import overlay, tile_cams

        prepared = self.prepare(micrograph)
        if len(prepared.tiles) == 0:
            return overlay(micrograph.pixels, np.zeros((0, 1, 1), np.float32), [], (0, 0), 0)
        verdict = self.verdict(prepared, predict_images(self, [prepared])[0])
        target = int(np.argmax([verdict.probabilities[c] for c in self.classes]))
        cams = tile_cams(self.net, self.torch_device, prepared.tiles, target)
        # positions are at the network's scale, where a tile is tile_px wide
        return overlay(micrograph.pixels, cams, prepared.positions, prepared.resampled_shape,
                       self.manifest.tile_px)


def prepare_micrograph(manifest: Manifest, settings: Settings, micrograph: Micrograph) -> PreparedImage:
    """Cut a micrograph into network-ready tiles at the model's scale. Needs the manifest, not the
    network: a reader process (a Ray reader task) prepares images without loading the weights."""
    m = manifest
    scale = scale_for(micrograph.metadata, m.reference_pixel_size_nm, m.reference_magnification)
    limit = settings.tiling.max_scale_ratio
    ratio = max(scale.factor, 1.0 / scale.factor)
    scale_ok = ratio <= limit
    # Far outside the model's range: tile at the nearest allowed scale (the verdict says unknown).
    factor = scale.factor if scale_ok else min(max(scale.factor, 1.0 / limit), limit)
    t = settings.tiling
    ts = cut_tiles(
        micrograph.pixels,
        factor=factor,
        tile_physical_px=m.tile_physical_px,
        tile_px=m.tile_px,
        overlap=t.overlap,
        max_tiles=t.max_tiles,
        std_min=t.tile_std_min,
        saturated_max=t.tile_saturated_max,
        intensity=m.intensity,
    )
    return PreparedImage(
        micrograph.path,
        ts.tiles,
        ts.positions,
        ts.n_candidates,
        scale,
        scale_ok,
        ts.resampled_shape,
        micrograph.quality,
    )


def aggregate(
    prepared: PreparedImage,
    output: TileOutput,
    classes: list[str],
    info: list[ClassInfo],
    *,
    unknown_threshold: float,
    min_confidence: float,
    min_tiles: int,
    model_id: str | None,
) -> ImageVerdict:
    """Tile outputs → one verdict. Mean log-probability (a normalised geometric mean) over the tiles
    that look like the training images: a tile beyond the novelty threshold (a burnt scan window, a
    smear) does not vote, since the network's answer there is a guess (on damaged held-out images
    such tiles outvoted the familiar ones at 0.86 confidence). The image is unknown when its median
    tile is beyond the threshold or fewer than `min_tiles` tiles are familiar."""
    n = len(output.probabilities)
    reasons: list[str] = []
    probs = np.zeros(len(classes), np.float64)
    agreement = 0.0
    novelty = math.nan
    familiar = ~(output.novelty > unknown_threshold)  # NaN (no score) counts as familiar
    n_familiar = int(np.count_nonzero(familiar))
    if n:
        voters = output.probabilities[familiar] if n_familiar else output.probabilities
        logp = np.log(np.clip(voters.astype(np.float64), 1e-12, 1.0)).mean(axis=0)
        probs = np.exp(logp - logp.max())
        probs /= probs.sum()
        best = int(probs.argmax())
        agreement = float(np.mean(voters.argmax(axis=1) == best))
        novelty = float(np.median(output.novelty))
    # Reasons are read by operators: each says which test refused the image, in their words first,
    # the figures after.
    out_of_range = not prepared.scale_ok
    if out_of_range:
        reasons.append(
            f"scale x{prepared.scale.factor:.2f} ({prepared.scale.basis}) is outside the model's range: "
            "the image was taken at a magnification the model was not trained for"
        )
    foreign = n > 0 and (novelty > unknown_threshold or n_familiar < min(min_tiles, n))
    if foreign:
        beyond = n - n_familiar
        reasons.append(
            f"unlike the training images: the specimen does not look like the NCM cathodes the model "
            f"knows (novelty {novelty:.2f} > {unknown_threshold:.2f}, {beyond} of {n} tiles)"
            if novelty > unknown_threshold else
            f"unlike the training images: only {n_familiar} of {n} tiles look like the NCM cathodes the "
            f"model knows (novelty threshold {unknown_threshold:.2f}), need {min(min_tiles, n)}"
        )
    quality_bad = prepared.quality is not None and not prepared.quality.ok
    if quality_bad and prepared.quality is not None:
        reasons.extend(prepared.quality.reasons or ("quality gate failed",))
    # Too small at the model's scale to judge is "unknown"; blank/saturated tiles are "rejected".
    too_small = prepared.n_candidates < min_tiles
    if too_small:
        reasons.append(f"only {prepared.n_candidates} tile(s) fit at the model's scale, need {min_tiles}")
    few_tiles = n < min_tiles and not too_small
    if few_tiles:
        reasons.append(f"{n} usable tile(s) of {prepared.n_candidates}, need {min_tiles}")
    confidence = float(probs.max()) if n else 0.0
    low_conf = n > 0 and confidence < min_confidence
    if low_conf:
        reasons.append(
            f"low confidence {confidence:.2f} < {min_confidence:.2f}: the model cannot tell the classes apart"
        )

    if out_of_range or foreign or too_small:
        status = "unknown"
    elif quality_bad or few_tiles:
        status = "rejected"
    elif low_conf:
        status = "unknown"
    else:
        status = "ok"
    best_info = info[int(probs.argmax())] if n else None
    ok = status == "ok" and best_info is not None
    composition, state = _marginals(probs, info) if ok else (None, None)
    return ImageVerdict(
        path=prepared.path,
        status=status,  # type: ignore[arg-type]
        predicted_class=best_info.name if ok and best_info else None,
        composition=composition,
        state=state,
        confidence=round(confidence, 6),
        tile_agreement=round(agreement, 6),
        n_tiles=n,
        probabilities={c: round(float(p), 6) for c, p in zip(classes, probs, strict=True)},
        reasons=tuple(reasons),
        model_id=model_id,
    )


def _marginals(probs: np.ndarray, info: list[ClassInfo]) -> tuple[str | None, str | None]:
    comp: dict[str, float] = {}
    state: dict[str, float] = {}
    for p, ci in zip(probs, info, strict=True):
        if ci.composition is not None:
            comp[ci.composition] = comp.get(ci.composition, 0.0) + float(p)
        if ci.state is not None:
            state[ci.state] = state.get(ci.state, 0.0) + float(p)
    return (
        max(comp, key=comp.__getitem__) if comp else None,
        max(state, key=state.__getitem__) if state else None,
    )


# --- streaming: decode and tile on worker threads while the network runs -----------------------

Transform = Callable[[Micrograph], Micrograph]


@dataclass(frozen=True)
class Outcome:
    """One image's result with its tiles' outputs (for evaluation and benchmarks)."""

    path: Path
    result: ImageVerdict | MicrographError
    output: TileOutput | None = None


def read_and_prepare(
    classifier: Classifier,
    path: Path,
    *,
    transform: Transform | None = None,
    confine: Confinement = UNCONFINED,
) -> PreparedImage | MicrographError:
    """`read_micrograph` then `prepare` (what a daemon reader does), the error as a value."""
    from semwatch.reading.micrograph import read_micrograph

    try:
        micrograph = read_micrograph(path, classifier.settings, confine=confine)
        return classifier.prepare(transform(micrograph) if transform else micrograph)
    except MicrographError as exc:
        return exc


def outcomes(
    classifier: Classifier,
    paths: Iterable[Path],
    *,
    workers: int | None = None,
    prefetch: int = 8,
    transform: Transform | None = None,
    confine: Callable[[Path], Confinement] | None = None,
) -> Iterator[Outcome]:
    """Each image's verdict (or error) and tile outputs, in input order. Images are read and tiled
    on `workers` threads while the network runs; taken in order until their tiles fill a batch,
    they go through `predict_images` together. `transform` alters each micrograph first; `confine`
    says where each path may be read from (an untrusted one: the watch folder), unconfined if None."""
    settings = classifier.settings
    workers = workers or max(1, settings.watch.reader_threads)

    def prepare(path: Path) -> PreparedImage | MicrographError:
        return read_and_prepare(classifier, path, transform=transform,
                                confine=confine(path) if confine is not None else UNCONFINED)

    stream = prefetched(prepare, (Path(p) for p in paths), workers=workers, prefetch=prefetch)
    for group in batch_groups(stream, _tiles_of, classifier.batch_size):
        yield from _run_group(classifier, group)


def _tiles_of(entry: tuple[Path, PreparedImage | MicrographError]) -> int:
    item = entry[1]
    return len(item.tiles) if isinstance(item, PreparedImage) else 0


def _run_group(
    classifier: Classifier, group: list[tuple[Path, PreparedImage | MicrographError]]
) -> Iterator[Outcome]:
    prepared = [item for _, item in group if isinstance(item, PreparedImage)]
    outputs = iter(predict_images(classifier, prepared))
    for path, item in group:
        if isinstance(item, MicrographError):
            yield Outcome(path, item)
            continue
        out = next(outputs)
        yield Outcome(path, classifier.verdict(item, out), out)


# --- command -------------------------------------------------------------------------------------


def classify_files(
    paths: list[Path], settings: Settings, *, model_dir: Path | None, explain_dir: Path | None, out: Output
) -> int:
    """`semwatch classify FILE...`: one line per file, or one JSON object per line with `--json`;
    with `explain_dir`, a Grad-CAM overlay per classified file there. File names and errors are
    untrusted: JSON carries paths in `safefs.path_text` form, plain lines show them `printable`."""
    from semwatch.model.registry import live_model_dir

    classifier = Classifier.load(model_dir or live_model_dir(settings.model), settings)
    if classifier.runtime_note:
        out.say(classifier.runtime_note)
    if explain_dir is not None:
        explain_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    for o in outcomes(classifier, paths):
        name = path_text(o.path)
        if isinstance(o.result, MicrographError):
            failed += 1
            if out.json:
                out.emit({"path": name, "error": str(o.result)})
            else:
                out.say(f"{name}: {o.result}")
            continue
        result = o.result
        record: dict[str, object] = {**result.to_json(), "path": name}
        if explain_dir is not None:
            record["explanation"] = path_text(_explain(classifier, o.path, explain_dir))
        if out.json:
            out.emit(record)
        else:
            label = result.predicted_class or "-"
            why = f"  ({'; '.join(result.reasons)})" if result.reasons else ""
            out.line(
                f"{name}: {result.status} {label} conf {result.confidence:.3f} "
                f"agree {result.tile_agreement:.2f} tiles {result.n_tiles}{why}"
            )
    return ExitStatus.INPUT_FAILED if failed else ExitStatus.OK


def _explain(classifier: Classifier, path: Path, out_dir: Path) -> Path:
    import cv2

    from semwatch.reading.micrograph import read_micrograph

    overlay = classifier.explain(read_micrograph(path, classifier.settings))
    target = out_dir / f"{path.stem}.gradcam.png"
    ok, buf = cv2.imencode(".png", cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - encoding an RGB uint8 array does not fail
        raise UserError(f"cannot encode the Grad-CAM overlay for {path}", ExitStatus.INPUT_FAILED)
    target.write_bytes(buf.tobytes())
    return target
