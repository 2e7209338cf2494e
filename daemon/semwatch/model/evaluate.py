"""`semwatch evaluate DATA_DIR --model MODEL_DIR`: accuracy, calibration and unknown rate.

Image-level figures use the aggregated (closed-set) prediction, so accuracy is not hidden by
images reported `unknown`; `unknown_rate` says how many were. `--intensity-jitter` changes each
image's brightness/contrast/gamma at random (seeded) before it is tiled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from semwatch.config import Settings
from semwatch.errors import ExitStatus, UserError
from semwatch.model.augment import intensity_jitter
from semwatch.model.classify import Classifier, Outcome, outcomes
from semwatch.model.train import discover
from semwatch.output import Output
from semwatch.safefs import path_text
from semwatch.values import ClassInfo, ImageVerdict, Micrograph, MicrographError, parse_class

ECE_BINS = 15


@dataclass(frozen=True)
class ClassScore:
    n: int  # images of this class that were scored
    precision: float
    recall: float
    f1: float


@dataclass(frozen=True)
class Evaluation:
    """A model's figures on a labelled folder; `to_json` is the `--json` report."""

    n_images: int  # read and given a verdict
    n_scored: int  # of those, with tiles (the others cannot be scored)
    n_failed: int  # could not be read
    n_tiles: int
    image_accuracy: float
    tile_accuracy: float
    composition_accuracy: float
    state_accuracy: float
    macro_f1: float
    ece: float
    unknown_rate: float
    rejected_rate: float
    per_class: dict[str, ClassScore]
    labels: list[str]
    confusion: list[list[int]]  # [true][predicted] image counts
    failed: list[tuple[str, str]]  # (path in `path_text` form, why)
    confidence: list[float]  # per scored image, for the reliability figure
    correct: list[bool]
    split: str = "all"
    intensity_jitter: bool = False
    model_id: str = ""
    device: str = ""
    figures: dict[str, str] = field(default_factory=dict)  # name -> PNG path, when written

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "n_images": self.n_images,
            "n_scored": self.n_scored,
            "n_failed": self.n_failed,
            "n_tiles": self.n_tiles,
            "image_accuracy": self.image_accuracy,
            "tile_accuracy": self.tile_accuracy,
            "composition_accuracy": self.composition_accuracy,
            "state_accuracy": self.state_accuracy,
            "macro_f1": self.macro_f1,
            "ece": self.ece,
            "unknown_rate": self.unknown_rate,
            "rejected_rate": self.rejected_rate,
            "per_class": {c: dataclasses.asdict(score) for c, score in self.per_class.items()},
            "confusion": {"labels": self.labels, "matrix": self.confusion},
            "failed": [{"path": path, "error": error} for path, error in self.failed],
            "split": self.split,
            "intensity_jitter": self.intensity_jitter,
            "model_id": self.model_id,
            "device": self.device,
        }
        if self.figures:
            out["figures"] = self.figures
        return out


def jitter_transform(seed: int) -> Callable[[Micrograph], Micrograph]:
    """Random brightness/contrast/gamma per image, seeded by the seed and the file name."""
    import zlib

    def apply(m: Micrograph) -> Micrograph:
        rng = np.random.default_rng([seed, zlib.crc32(str(m.path).encode())])
        return dataclasses.replace(m, pixels=intensity_jitter(m.pixels, rng))

    return apply


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    if not len(confidence):
        return 0.0
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            ece += mask.mean() * abs(float(correct[mask].mean()) - float(confidence[mask].mean()))
    return float(ece)


def _f1(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def _marginal(probs: np.ndarray, info: list[ClassInfo], attr: str) -> str | None:
    totals: dict[str, float] = {}
    for p, ci in zip(probs, info, strict=True):
        key = getattr(ci, attr)
        if key is not None:
            totals[key] = totals.get(key, 0.0) + float(p)
    return max(totals, key=totals.__getitem__) if totals else None


def evaluate_model(
    data_dir: Path,
    model_dir: Path,
    settings: Settings,
    *,
    split: str = "all",
    intensity_jitter: bool = False,
    seed: int = 0,
    out_dir: Path | None = None,
) -> Evaluation:
    classifier = Classifier.load(model_dir, settings)
    _, images = discover(Path(data_dir), settings.train.class_map)
    folder_classes = {
        im.rel: parse_class(settings.train.class_map.get(im.path.parent.name, im.path.parent.name))
        for im in images
    }
    if split != "all":
        chosen = set(classifier.manifest.split.get(split, ()))
        if not chosen:
            raise UserError(f"{model_dir}: the model records no '{split}' split")
        images = [im for im in images if im.rel in chosen]
        if not images:
            raise UserError(f"{data_dir}: none of the model's '{split}' images are in this folder")
    index = {c: i for i, c in enumerate(classifier.classes)}
    foreign = sorted({folder_classes[im.rel].name for im in images} - set(index))
    if foreign:
        raise UserError(f"{data_dir}: classes the model does not know: {', '.join(foreign)}")
    truth_of = {im.path: index[folder_classes[im.rel].name] for im in images}
    transform = jitter_transform(seed) if intensity_jitter else None
    results: list[Outcome] = list(outcomes(classifier, [im.path for im in images], transform=transform))
    report = dataclasses.replace(
        summarise(results, truth_of, classifier),
        split=split,
        intensity_jitter=intensity_jitter,
        model_id=classifier.model_id,
        device=classifier.device,
    )
    if out_dir is not None:
        report = dataclasses.replace(report, figures=write_figures(report, out_dir))
    return report


def summarise(results: list[Outcome], truth_of: dict[Path, int], classifier: Classifier) -> Evaluation:
    classes, info = classifier.classes, classifier.class_info
    n_classes = len(classes)
    confusion = np.zeros((n_classes, n_classes), int)
    conf: list[float] = []
    correct: list[bool] = []
    comp_ok: list[bool] = []
    state_ok: list[bool] = []
    tile_hits = tile_total = 0
    statuses: list[str] = []
    failed: list[tuple[str, str]] = []
    for o in results:
        if isinstance(o.result, MicrographError):
            failed.append((path_text(o.path), str(o.result)))
            continue
        verdict: ImageVerdict = o.result
        truth = truth_of[o.path]
        statuses.append(verdict.status)
        if verdict.n_tiles == 0 or o.output is None:
            continue
        probs = np.array([verdict.probabilities[c] for c in classes])
        pred = int(probs.argmax())
        confusion[truth, pred] += 1
        conf.append(float(probs.max()))
        correct.append(pred == truth)
        comp_ok.append(_marginal(probs, info, "composition") == info[truth].composition)
        state_ok.append(_marginal(probs, info, "state") == info[truth].state)
        tile_hits += int((o.output.probabilities.argmax(axis=1) == truth).sum())
        tile_total += len(o.output.probabilities)
    per_class: dict[str, ClassScore] = {}
    f1s = []
    for i, c in enumerate(classes):
        tp = float(confusion[i, i])
        fp = float(confusion[:, i].sum() - tp)
        fn = float(confusion[i, :].sum() - tp)
        precision, recall, f1 = _f1(tp, fp, fn)
        n = int(confusion[i, :].sum())
        if n:
            f1s.append(f1)
        per_class[c] = ClassScore(n, round(precision, 4), round(recall, 4), round(f1, 4))
    n_scored = len(correct)
    return Evaluation(
        n_images=len(statuses),
        n_scored=n_scored,
        n_failed=len(failed),
        n_tiles=tile_total,
        image_accuracy=round(float(np.mean(correct)), 4) if n_scored else 0.0,
        tile_accuracy=round(tile_hits / tile_total, 4) if tile_total else 0.0,
        composition_accuracy=round(float(np.mean(comp_ok)), 4) if n_scored else 0.0,
        state_accuracy=round(float(np.mean(state_ok)), 4) if n_scored else 0.0,
        macro_f1=round(float(np.mean(f1s)), 4) if f1s else 0.0,
        ece=round(expected_calibration_error(np.array(conf), np.array(correct, float)), 4),
        unknown_rate=round(statuses.count("unknown") / len(statuses), 4) if statuses else 0.0,
        rejected_rate=round(statuses.count("rejected") / len(statuses), 4) if statuses else 0.0,
        per_class=per_class,
        labels=list(classes),
        confusion=confusion.tolist(),
        failed=failed,
        confidence=conf,
        correct=correct,
    )


def write_figures(report: Evaluation, out_dir: Path) -> dict[str, str]:
    """The confusion matrix and the reliability diagram as PNGs in `out_dir`; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    labels = report.labels
    matrix = np.array(report.confusion)
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), v in np.ndenumerate(matrix):
        if v:
            ax.text(
                j,
                i,
                str(v),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if v > matrix.max() / 2 else "black",
            )
    ax.set_title(f"image accuracy {report.image_accuracy:.3f}")
    fig.tight_layout()
    confusion_png = out_dir / "confusion.png"
    fig.savefig(confusion_png, dpi=120)
    plt.close(fig)

    conf = np.array(report.confidence)
    correct = np.array(report.correct, float)
    edges = np.linspace(0, 1, ECE_BINS + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1]), 0, ECE_BINS - 1) if len(conf) else np.array([], int)
    centres = (edges[:-1] + edges[1:]) / 2
    acc = [correct[idx == b].mean() if (idx == b).any() else np.nan for b in range(ECE_BINS)]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.bar(centres, np.nan_to_num(acc), width=1 / ECE_BINS, edgecolor="k", alpha=0.7)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE {report.ece:.3f})")
    fig.tight_layout()
    reliability_png = out_dir / "reliability.png"
    fig.savefig(reliability_png, dpi=120)
    plt.close(fig)
    return {"confusion": path_text(confusion_png), "reliability": path_text(reliability_png)}


def evaluate_folder(
    data_dir: Path,
    settings: Settings,
    *,
    model_dir: Path,
    out_dir: Path | None,
    intensity_jitter: bool,
    split: str,
    seed: int,
    out: Output,
) -> int:
    """`semwatch evaluate`: the report as one JSON object (`--json`) or one summary line; the
    images that could not be read on stderr (and exit status 1)."""
    report = evaluate_model(
        data_dir,
        model_dir,
        settings,
        split=split,
        intensity_jitter=intensity_jitter,
        seed=seed,
        out_dir=out_dir,
    )
    for path, error in report.failed:
        out.say(f"{path}: {error}")
    if out.json:
        out.emit(report.to_json())
    else:
        r = report
        out.line(
            f"{r.n_images} images, {r.n_tiles} tiles: image accuracy {r.image_accuracy:.4f}, "
            f"tile accuracy {r.tile_accuracy:.4f}, composition {r.composition_accuracy:.4f}, "
            f"state {r.state_accuracy:.4f}, macro F1 {r.macro_f1:.4f}, ECE {r.ece:.4f}, "
            f"unknown {r.unknown_rate:.4f}"
        )
        for name, path in r.figures.items():
            out.line(f"{name}: {path}")
    return ExitStatus.INPUT_FAILED if report.failed else ExitStatus.OK
