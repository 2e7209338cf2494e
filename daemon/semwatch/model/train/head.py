"""The head on cached features: training with early stopping, temperature calibration, and the
validation figures (`fit_head_and_novelty` does all three and the detector's fit)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from semwatch.config import Settings
from semwatch.model.artifact import Json
from semwatch.model.backbone import TileNet
from semwatch.model.train.detector import fit_detector, image_novelty, tile_novelty
from semwatch.model.train.features import Features, FeatureSet

HEAD_HIDDEN = 512


def image_log_probs(tile_logits: torch.Tensor, image_of: torch.Tensor, n_images: int) -> torch.Tensor:
    """Mean tile log-probability per image, renormalised (as `classify.aggregate` does)."""
    logp = torch.log_softmax(tile_logits, dim=1)
    sums = torch.zeros((n_images, logp.shape[1]), dtype=logp.dtype).index_add_(0, image_of, logp)
    counts = torch.bincount(image_of, minlength=n_images).clamp_min(1).unsqueeze(1)
    return torch.log_softmax(sums / counts, dim=1)


def train_head(
    net: TileNet, train: FeatureSet, val: FeatureSet, n_classes: int, settings: Settings, epochs: int
) -> tuple[int, float]:
    """AdamW on cached features, class-balanced loss, early stopping on validation loss."""
    t = settings.train
    head = net.head
    mean = train.feats.mean(0)
    std = train.feats.std(0).clamp_min(1e-4)
    head.feat_mean.copy_(mean)
    head.feat_std.copy_(std)
    counts = torch.bincount(train.labels, minlength=n_classes).float().clamp_min(1.0)
    weights = (counts.sum() / (n_classes * counts)).clamp(max=20.0)
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=0.05)
    opt = torch.optim.AdamW(head.mlp.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    gen = torch.Generator().manual_seed(t.seed)
    best = (math.inf, 0, {k: v.clone() for k, v in head.state_dict().items()})
    since = 0
    ran = 0
    for epoch in range(epochs):
        ran = epoch + 1
        head.train()
        order = torch.randperm(len(train.feats), generator=gen)
        for s in range(0, len(order), t.batch_size):
            idx = order[s : s + t.batch_size]
            opt.zero_grad()
            loss = loss_fn(head(train.feats[idx]), train.labels[idx])
            loss.backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            if len(val.feats):
                val_loss = float(nn.functional.cross_entropy(head(val.feats), val.labels))
            else:
                val_loss = float(loss_fn(head(train.feats), train.labels))
        if val_loss < best[0] - 1e-4:
            best = (val_loss, epoch + 1, {k: v.clone() for k, v in head.state_dict().items()})
            since = 0
        else:
            since += 1
            if since >= t.patience:
                break
    head.load_state_dict(best[2])
    head.eval()
    return ran, best[0]


TEMPERATURES = np.exp(np.linspace(math.log(0.05), math.log(10.0), 80))


def _best_temperature(nll: Callable[[float], float]) -> tuple[float, bool]:
    """Grid minimum of `nll`, and whether it lies inside the grid (not on its edge)."""
    values = [nll(float(t)) for t in TEMPERATURES]
    best = int(np.argmin(values))
    return float(TEMPERATURES[best]), 0 < best < len(TEMPERATURES) - 1


def calibrate_temperature(net: TileNet, val: FeatureSet) -> tuple[float, str]:
    """The temperature minimising validation images' NLL of the aggregated (image) prediction.

    Averaging tile log-probabilities leaves image verdicts underconfident, so that optimum is
    usually below 1. When every validation image is already right, the image NLL keeps falling as
    the temperature goes to 0 (no finite optimum; it would make every verdict certain): then the
    tile-level NLL, which tile errors keep well-posed, chooses it instead. Returns (T, basis).
    """
    head = net.head
    if not len(val.feats):
        return 1.0, "none"
    head.temperature.fill_(1.0)
    with torch.no_grad():
        logits = head(val.feats)
    n_images = len(val.image_labels)
    seen = torch.bincount(val.image_of, minlength=n_images) > 0

    def image_nll(temp: float) -> float:
        lp = image_log_probs(logits / temp, val.image_of, n_images)[seen]
        return float(nn.functional.nll_loss(lp, val.image_labels[seen]))

    def tile_nll(temp: float) -> float:
        return float(nn.functional.cross_entropy(logits / temp, val.labels))

    temp, interior = _best_temperature(image_nll)
    basis = "image"
    if not interior:
        temp, _ = _best_temperature(tile_nll)
        basis = "tile"
    head.temperature.fill_(temp)
    return temp, basis


def validation_metrics(net: TileNet, val: FeatureSet, threshold: float, min_conf: float) -> dict[str, Json]:
    if not len(val.feats):
        return {"n_images": 0}
    n_images = len(val.image_labels)
    with torch.no_grad():
        logits = net.head(val.feats)
    novelty = tile_novelty(net, val)
    seen = torch.bincount(val.image_of, minlength=n_images) > 0
    # as `classify.aggregate` votes: the familiar tiles, or all of an image's tiles if none is
    familiar = ~(novelty > threshold)
    has_familiar = torch.zeros(n_images, dtype=torch.bool).index_fill_(0, val.image_of[familiar], True)
    voters = familiar | ~has_familiar[val.image_of]
    lp = image_log_probs(logits[voters], val.image_of[voters], n_images)[seen]
    conf, pred = lp.exp().max(dim=1)
    truth = val.image_labels[seen]
    nov = image_novelty(novelty, val.image_of, n_images)[seen.numpy()]
    unknown = (nov > threshold) | (conf.numpy() < min_conf)
    return {
        "n_images": int(seen.sum()),
        "n_tiles": len(val.feats),
        "image_accuracy": round(float((pred == truth).float().mean()), 4),
        "tile_accuracy": round(float((logits.argmax(1) == val.labels).float().mean()), 4),
        "unknown_rate": round(float(unknown.mean()), 4),
        "mean_confidence": round(float(conf.mean()), 4),
    }


@dataclass(frozen=True)
class Fit:
    """What fitting the head, its temperature and the novelty score produced."""

    epochs_run: int
    unknown_threshold: float
    temperature: float
    validation: dict[str, Json]


def fit_head_and_novelty(net: TileNet, features: Features, n_classes: int, settings: Settings,
                         epochs: int, *, head_trained: tuple[int, float] | None = None) -> Fit:
    """Train the head (unless `head_trained` says it was: epochs run, validation loss), calibrate
    its temperature, fit the novelty score and its threshold, and measure the result on the
    validation images."""
    train, val = features.train, features.val
    ran, val_loss = head_trained or train_head(net, train, val, n_classes, settings, epochs)
    temperature, temperature_basis = calibrate_temperature(net, val)
    net.novelty.fit(train.feats, train.labels, n_classes)
    threshold = fit_detector(net, train, val, n_classes, settings)
    validation = validation_metrics(net, val, threshold, settings.model.min_confidence)
    validation.update(val_loss=round(val_loss, 5), temperature=round(temperature, 4),
                      temperature_basis=temperature_basis, epochs_run=ran)
    return Fit(ran, threshold, temperature, validation)
