"""The novelty detector's fit: the layer-wise detector on the training images' grid tiles, each layer
scaled by its validation median, and the unknown threshold from the validation images."""

from __future__ import annotations

import numpy as np
import torch

from semwatch.config import Settings
from semwatch.model.artifact import Json
from semwatch.model.backbone import LAYERS, TileNet
from semwatch.model.train.features import FeatureSet

# Shrinkage of each layer's tied covariance towards a multiple of the identity: a few thousand
# tiles cannot estimate the smallest of 1,280 variances, and their inverse would dominate.
NOVELTY_SHRINK = 0.05
DETECTOR_STATISTIC = ("median over tiles of the largest per-layer squared Mahalanobis distance to the "
                      "nearest class (tied shrunk covariance), each layer scaled by its validation median")


def detector_record() -> dict[str, Json]:
    """The manifest's `novelty` entry for the layer-wise detector."""
    return {"detector": LAYERS, "shrinkage": NOVELTY_SHRINK, "fitted_on": "grid tiles of the training images",
            "layers": "channel means of blocks 1, 3, 5, 7, 10, 14, 15 and of the head"}


def calibration_record(settings: Settings) -> dict[str, Json]:
    """The manifest's `unknown_calibration`: how its threshold was set."""
    t = settings.train
    rule: dict[str, Json] = ({"rule": "quantile", "quantile": t.unknown_quantile, "margin": t.unknown_margin}
                             if t.unknown_calibration == "quantile" else
                             {"rule": "robust", "spread": t.unknown_spread, "min_log_spread": MIN_LOG_SPREAD})
    return {**rule, "statistic": DETECTOR_STATISTIC}


def tile_novelty(net: TileNet, fs: FeatureSet) -> torch.Tensor:
    """The novelty score `TileNet.forward` gives these tiles (from their cached features)."""
    with torch.no_grad():
        return net.layers(fs.stats) if net.detector == LAYERS else net.novelty(fs.feats)


def image_novelty(scores: torch.Tensor, image_of: torch.Tensor, n_images: int) -> np.ndarray:
    """Median tile novelty per image (as `classify.aggregate` does)."""
    out = np.full(n_images, np.nan)
    s, idx = scores.numpy(), image_of.numpy()
    for i in range(n_images):
        mine = s[idx == i]
        if len(mine):
            out[i] = float(np.median(mine))
    return out


def fit_detector(
    net: TileNet, train: FeatureSet, val: FeatureSet, n_classes: int, settings: Settings
) -> float:
    """Fit the layer-wise detector on the training images' grid tiles (`plain`), scale each layer by its
    validation tiles' median, and return the unknown threshold (`novelty_threshold`)."""
    if net.detector == LAYERS:
        keep = train.plain if bool(train.plain.any()) else torch.ones(len(train.labels), dtype=torch.bool)
        net.layers.fit(train.stats[keep], train.labels[keep], n_classes, NOVELTY_SHRINK)
        basis = val.stats if len(val.stats) else train.stats[keep]
        with torch.no_grad():
            net.layers.reference.copy_(net.layers.layer_scores(basis).median(dim=0).values.clamp_min(1e-6))
    return novelty_threshold(net, train, val, settings)


def novelty_threshold(net: TileNet, train: FeatureSet, val: FeatureSet, settings: Settings) -> float:
    """The unknown threshold from the validation images' novelty (the training tiles' where no
    validation image has tiles), by `[train] unknown_calibration` (see `calibrate_threshold`)."""
    val_scores = image_novelty(tile_novelty(net, val), val.image_of, len(val.image_labels))
    finite = val_scores[np.isfinite(val_scores)]
    basis = finite if len(finite) else tile_novelty(net, train).numpy()
    return calibrate_threshold(basis, settings)


# The least spread the robust rule assumes (log units): a few nearly equal validation scores (a tiny
# model) must not put the threshold on top of them.
MIN_LOG_SPREAD = 0.1


def calibrate_threshold(scores: np.ndarray, settings: Settings) -> float:
    """"robust": exp(median + spread x 1.4826 MAD) of the log scores, a normal tail estimated from the
    bulk (a few odd in-distribution images, 3 % of the shared data with novelty 10-21 against a bulk
    under 6, do not move it, where a 0.99 quantile of ~100 images lands on them); "quantile": the
    quantile times the margin."""
    t = settings.train
    if t.unknown_calibration == "quantile":
        return float(np.quantile(scores, t.unknown_quantile)) * t.unknown_margin
    logs = np.log(np.clip(scores, 1e-6, None))
    centre = float(np.median(logs))
    spread = max(1.4826 * float(np.median(np.abs(logs - centre))), MIN_LOG_SPREAD)
    return float(np.exp(centre + t.unknown_spread * spread))
