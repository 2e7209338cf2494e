"""`semwatch train`: labelled images → a verified model artifact. One module per job:

- `data`: discovery of class folders, the split, the fingerprint, the tiles cut for training;
- `features`: the frozen backbone's streaming pass over those tiles (`FeatureSet`);
- `head`: the head trained on cached features, its temperature, the validation figures;
- `detector`: the novelty detector's fit and the unknown threshold;
- `finetune`: end-to-end fine-tuning of the backbone (torch, gradients);
- `run`: the whole thing — `train_model` (a folder) = `discover` + `train_images` (any list of
  labelled images, e.g. the lab's labels), `refit_novelty`, and the CLI's `train_folder`.

The names below are the package's public interface (cli, views, tests, benchmarks import them here).
"""

from __future__ import annotations

from semwatch.model.train.data import (
    IMAGE_SUFFIXES,
    LabelledImage,
    Recipe,
    check_images,
    content_hashes,
    discover,
    fingerprint,
    grid_tiles,
    split_images,
    training_tiles,
)
from semwatch.model.train.detector import (
    DETECTOR_STATISTIC,
    NOVELTY_SHRINK,
    detector_record,
    fit_detector,
    image_novelty,
    novelty_threshold,
    tile_novelty,
)
from semwatch.model.train.features import (
    FEATURE_BATCH,
    Features,
    FeatureSet,
    extract_features,
    grid_then,
    stream_tiles,
)
from semwatch.model.train.finetune import backbone_mode, finetune
from semwatch.model.train.head import (
    HEAD_HIDDEN,
    TEMPERATURES,
    Fit,
    calibrate_temperature,
    fit_head_and_novelty,
    image_log_probs,
    train_head,
    validation_metrics,
)
from semwatch.model.train.run import (
    NOVELTY_K,
    TrainResult,
    describe_model,
    refit_novelty,
    train_folder,
    train_images,
    train_model,
)

__all__ = [
    "DETECTOR_STATISTIC",
    "FEATURE_BATCH",
    "HEAD_HIDDEN",
    "IMAGE_SUFFIXES",
    "NOVELTY_K",
    "NOVELTY_SHRINK",
    "TEMPERATURES",
    "FeatureSet",
    "Features",
    "Fit",
    "LabelledImage",
    "Recipe",
    "TrainResult",
    "backbone_mode",
    "calibrate_temperature",
    "check_images",
    "content_hashes",
    "describe_model",
    "detector_record",
    "discover",
    "extract_features",
    "finetune",
    "fingerprint",
    "fit_detector",
    "fit_head_and_novelty",
    "grid_then",
    "grid_tiles",
    "image_log_probs",
    "image_novelty",
    "novelty_threshold",
    "refit_novelty",
    "split_images",
    "stream_tiles",
    "tile_novelty",
    "train_folder",
    "train_head",
    "train_images",
    "train_model",
    "training_tiles",
    "validation_metrics",
]
