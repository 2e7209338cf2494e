"""The promotion gate: score a challenger and the champion on the same images, one decision.

The images: the lab's frozen evaluation folder (`[lifecycle] eval_folder`, one sub-folder per class,
as `semwatch evaluate` reads) plus labelled ledger images (the operators' labels), less any image
either model trained on (by content: the sha256s a model records as `trained_on`). Both models go
through `model.classify.outcomes` → `engine.predict_images` (the one engine).

An image is right when the verdict is `ok` with the true class (`unknown` and `rejected` are not
right: a model that knows a composition must say so), or, for an image labelled `foreign`, when the
verdict is not `ok`. The paired test is the exact McNemar test, one-sided: of the images exactly
one model gets right, b by the challenger and c by the champion; under "equally good" each such
image is a fair coin. `worse`: P(X >= c) < alpha overall or on a class with at least
`[lifecycle] min_class_images` images; `better`: not worse and P(X >= b) < alpha overall; else
`not significantly worse` (the Intel Geti rule: accepted unless its drop is significant).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from semwatch.config import Settings
from semwatch.errors import ExitStatus, UserError
from semwatch.model.artifact import Manifest, canonical_sha256
from semwatch.model.evaluate import expected_calibration_error  # the same binning as `evaluate`
from semwatch.reading.micrograph import content_sha256
from semwatch.safefs import UNCONFINED, Confinement, RefusedFile, path_text, write_atomic
from semwatch.values import ImageVerdict, MicrographError

Decision = Literal["better", "not significantly worse", "worse"]
FOREIGN = "foreign"  # the truth of an image an operator marked foreign: not a class to know


@dataclass(frozen=True)
class GateImage:
    path: Path
    truth: str  # a class name, or FOREIGN
    source: str  # "folder" or "labels"
    sha256: str | None = None


@dataclass
class ModelScore:
    model_id: str
    right: list[bool] = field(default_factory=list)
    status: list[str] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)  # closed-set, for calibration
    closed_right: list[bool] = field(default_factory=list)

    def summary(self, truths: Sequence[str]) -> dict[str, object]:
        n = len(self.right)
        per_class: dict[str, dict[str, float | int]] = {}
        for cls in sorted(set(truths)):
            idx = [i for i, t in enumerate(truths) if t == cls]
            per_class[cls] = {"n": len(idx), "accuracy": _round(np.mean([self.right[i] for i in idx]))}
        return {
            "model_id": self.model_id,
            "n": n,
            "accuracy": _round(np.mean(self.right)) if n else 0.0,
            "unknown_rate": _round(self.status.count("unknown") / n) if n else 0.0,
            "ece": _round(expected_calibration_error(np.array(self.confidence),
                                                     np.array(self.closed_right, float))),
            "per_class": per_class,
        }


@dataclass(frozen=True)
class Comparison:
    decision: Decision
    champion: dict[str, object]
    challenger: dict[str, object]
    paired: dict[str, object]
    per_class_paired: dict[str, dict[str, object]]
    worse_classes: list[str]
    sources: dict[str, int]
    skipped: dict[str, int]
    alpha: float
    min_class_images: int

    def to_json(self) -> dict[str, object]:
        return {"decision": self.decision, "champion": self.champion, "challenger": self.challenger,
                "paired": self.paired, "per_class_paired": self.per_class_paired,
                "worse_classes": self.worse_classes, "images": self.sources, "skipped": self.skipped,
                "alpha": self.alpha, "min_class_images": self.min_class_images}


def mcnemar_one_sided(wins: int, losses: int) -> float:
    """P(X >= losses) for X ~ Binomial(wins + losses, 1/2): how likely this many or more losses
    among the discordant pairs if both models were equally good (exact, no approximation)."""
    n = wins + losses
    if n == 0 or losses == 0:
        return 1.0
    return min(1.0, sum(math.comb(n, k) for k in range(losses, n + 1)) / 2.0**n)


def folder_images(folder: Path, settings: Settings) -> list[GateImage]:
    """The frozen evaluation folder: `<class>/<image>` (the class map of `[train]` applies)."""
    from semwatch.model.train import IMAGE_SUFFIXES

    if not folder.is_dir():
        raise UserError(f"[lifecycle] eval_folder is not a folder: {path_text(folder)}", ExitStatus.CONFIG)
    out: list[GateImage] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        truth = settings.train.class_map.get(sub.name, sub.name)
        for p in sorted(sub.iterdir()):
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                out.append(GateImage(p, truth, "folder", _sha256(p, settings)))
    return out


def _sha256(path: Path, settings: Settings) -> str | None:
    """By content, as every image is known (bounded like every read); None when it cannot be read
    (it is scored, as failed, and kept nowhere)."""
    try:
        return content_sha256(path, settings, confine=UNCONFINED)
    except (OSError, RefusedFile):
        return None


def trained_on(manifest: Manifest) -> set[str]:
    """The sha256s of the images a model was trained on, where its manifest records them."""
    for where in (manifest.training, manifest.extra):
        value = where.get("trained_on") if isinstance(where, dict) else None
        if isinstance(value, list):
            return {v for v in value if isinstance(v, str)}
        if isinstance(value, dict):  # {sha256: path} or {"sha256": [...]}
            inner = value.get("sha256")
            return {v for v in inner if isinstance(v, str)} if isinstance(inner, list) else set(value)
    return set()


def unseen(images: Iterable[GateImage], *manifests: Manifest) -> tuple[list[GateImage], int]:
    """The images neither model trained on (by content), and how many were left out."""
    seen: set[str] = set()
    for m in manifests:
        seen |= trained_on(m)
    kept: list[GateImage] = []
    dropped = 0
    for im in images:
        if im.sha256 is not None and im.sha256 in seen:
            dropped += 1
        else:
            kept.append(im)
    return kept, dropped


# --- each model's verdicts, kept by content ---------------------------------------------------------
# A model (its id) gives the same verdict on the same bytes under the same settings, so the gate
# keeps them in `<registry>/.gate-scores/<model id>-<settings key>.json`: `promote` right after
# `compare`, and the champion against the next challenger, score only what is new.

SCORES_FOLDER = ".gate-scores"


def _scores_path(settings: Settings, model_id: str, runtime: str) -> Path | None:
    registry = settings.model.registry
    if registry is None:
        return None
    from semwatch import __version__

    key = canonical_sha256({"model": dataclasses.asdict(settings.model),
                            "tiling": dataclasses.asdict(settings.tiling),
                            "reading": dataclasses.asdict(settings.reading), "runtime": runtime,
                            "semwatch": __version__})[:16]
    return registry / SCORES_FOLDER / f"{model_id}-{key}.json"


def _read_scores(path: Path | None) -> dict[str, dict[str, object]]:
    if path is None:
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in raw.items() if isinstance(v, dict)} if isinstance(raw, dict) else {}


def _write_scores(path: Path | None, scores: dict[str, dict[str, object]]) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(scores, sort_keys=True).encode("utf-8"))
    except OSError:  # the cache is a saving, not a duty
        pass


def _verdict_record(result: ImageVerdict | MicrographError) -> dict[str, object]:
    if isinstance(result, MicrographError):
        return {"status": "failed"}
    best = max(result.probabilities, key=result.probabilities.__getitem__) if result.probabilities else None
    return {"status": result.status, "predicted": result.predicted_class,
            "best": best if result.n_tiles else None,
            "p": float(result.probabilities[best]) if best is not None and result.n_tiles else None}


def score(model_dir: Path, images: Sequence[GateImage], settings: Settings) -> ModelScore:
    """One model's verdicts on the images, through the one engine (those it gave before on the same
    content and settings from the registry's score cache)."""
    from semwatch.model.classify import Classifier, outcomes

    classifier = Classifier.load(model_dir, settings)
    cache_path = _scores_path(settings, classifier.model_id, classifier.runtime)
    known = _read_scores(cache_path)
    todo = [im for im in images if im.sha256 is None or im.sha256 not in known]
    # Ledger images come from the watch folder (untrusted): read confined to it, as the daemon reads
    # them; the evaluation folder is the lab's own (configured).
    watched = Confinement(Path(settings.watch.folder).absolute(), settings.watch.follow_symlinks)
    ledger = {im.path for im in todo if im.source == "labels"}

    def confine(path: Path) -> Confinement:
        return watched if path in ledger else UNCONFINED

    fresh: dict[Path, dict[str, object]] = {}
    for im, o in zip(todo, outcomes(classifier, [im.path for im in todo], confine=confine), strict=True):
        fresh[im.path] = _verdict_record(o.result)
        if im.sha256 is not None and fresh[im.path]["status"] != "failed":  # a failed read is tried again
            known[im.sha256] = fresh[im.path]
    if todo:
        _write_scores(cache_path, known)
    result = ModelScore(classifier.model_id)
    for im in images:
        # Scored now (every image without a sha256 is), else kept from before.
        v = fresh[im.path] if im.path in fresh else known[str(im.sha256)]
        status = str(v["status"])
        result.status.append(status)
        if im.truth == FOREIGN:
            result.right.append(status != "ok")
            continue
        result.right.append(status == "ok" and v.get("predicted") == im.truth)
        best, p = v.get("best"), v.get("p")
        if isinstance(best, str) and isinstance(p, int | float):
            result.confidence.append(float(p))
            result.closed_right.append(best == im.truth)
    return result


def decide(champion: ModelScore, challenger: ModelScore, images: Sequence[GateImage], *, alpha: float,
           min_class_images: int, skipped: dict[str, int] | None = None) -> Comparison:
    truths = [im.truth for im in images]
    paired = _paired(champion.right, challenger.right)
    per_class: dict[str, dict[str, object]] = {}
    worse_classes: list[str] = []
    for cls in sorted(set(truths)):
        idx = [i for i, t in enumerate(truths) if t == cls]
        stats = _paired([champion.right[i] for i in idx], [challenger.right[i] for i in idx])
        stats["gated"] = len(idx) >= min_class_images
        per_class[cls] = stats
        if stats["gated"] and float(stats["p_worse"]) < alpha:  # type: ignore[arg-type]
            worse_classes.append(cls)
    decision: Decision
    if float(paired["p_worse"]) < alpha or worse_classes:  # type: ignore[arg-type]
        decision = "worse"
    elif float(paired["p_better"]) < alpha:  # type: ignore[arg-type]
        decision = "better"
    else:
        decision = "not significantly worse"
    sources: dict[str, int] = {}
    for im in images:
        sources[im.source] = sources.get(im.source, 0) + 1
    return Comparison(decision, champion.summary(truths), challenger.summary(truths), paired, per_class,
                      worse_classes, sources, dict(skipped or {}), alpha, min_class_images)


def compare_models(settings: Settings, champion_dir: Path, challenger_dir: Path,
                   images: Sequence[GateImage], *, skipped: dict[str, int] | None = None) -> Comparison:
    """Score both models on the same images and decide (see the module docstring)."""
    from semwatch.model.artifact import read_manifest

    kept, dropped = unseen(images, read_manifest(champion_dir), read_manifest(challenger_dir))
    skipped = {**(skipped or {}), "trained_on": dropped}
    if not kept:
        raise UserError("no evaluation images: set [lifecycle] eval_folder or label ledger images "
                        "that neither model trained on")
    a = score(champion_dir, kept, settings)
    b = score(challenger_dir, kept, settings)
    lc = settings.lifecycle
    return decide(a, b, kept, alpha=lc.alpha, min_class_images=lc.min_class_images, skipped=skipped)


def _paired(champion: Sequence[bool], challenger: Sequence[bool]) -> dict[str, object]:
    wins = sum(1 for a, b in zip(champion, challenger, strict=True) if b and not a)
    losses = sum(1 for a, b in zip(champion, challenger, strict=True) if a and not b)
    return {"n": len(champion), "challenger_only_right": wins, "champion_only_right": losses,
            "p_worse": _round(mcnemar_one_sided(wins, losses), 6),
            "p_better": _round(mcnemar_one_sided(losses, wins), 6)}


def _round(value: float | np.floating, digits: int = 4) -> float:
    return round(float(value), digits)
