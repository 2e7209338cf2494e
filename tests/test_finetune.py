"""`[train] backbone = "finetune"`: the whole backbone trained end to end (a tiny CPU run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from semwatch.config import load_settings
from semwatch.errors import ConfigError
from semwatch.model.artifact import load_artifact
from semwatch.model.backbone import TileNet
from semwatch.model.classify import Classifier
from semwatch.model.train import backbone_mode, train_model


def tiny_folder(ncm_dir: Path, root: Path) -> Path:
    """Two classes of two real images each (links to the shared data)."""
    for name in ("333", "811_cycled"):
        (root / name).mkdir(parents=True)
        for src in sorted((ncm_dir / name).glob("*.jpg"))[:2]:
            (root / name / src.name).symlink_to(src)
            side = src.with_name(src.name + ".txt")
            if side.exists():
                (root / name / side.name).symlink_to(side)
    return root


def test_finetune_changes_the_backbone_and_the_artifact_classifies(ncm_dir: Path, tmp_path: Path) -> None:
    settings = load_settings(None, environ={}, overrides={
        "model": {"device": "cpu"},
        "train": {"backbone": "finetune", "tiles_per_image": 2, "augment_copies": 1, "batch_size": 4,
                  "finetune_epochs": 1},
        "tiling": {"max_tiles": 2},
    })
    data = tiny_folder(ncm_dir, tmp_path / "data")
    result = train_model(data, tmp_path / "model", settings, epochs=2, progress=False)
    training = result.manifest.training
    assert training["backbone"] == "finetune"
    tuned = training["finetune"]
    assert isinstance(tuned, dict) and tuned["steps"] == 2 and tuned["epochs"] == 1  # 2 images x 4 tiles / 4
    state, _ = load_artifact(tmp_path / "model")
    fresh = TileNet("efficientnet-lite0", 288, 2, hidden=8, novelty_k=4, pretrained=True)
    pretrained = fresh.backbone.state_dict()
    changed = [k for k, v in pretrained.items()
               if v.is_floating_point() and not torch.equal(v, state[f"backbone.{k}"])]
    assert any("_conv_stem" in k for k in changed) and any("_conv_head" in k for k in changed)
    # BatchNorm statistics stay the pretrained network's
    assert all("running_" not in k for k in changed)
    clf = Classifier.load(tmp_path / "model", settings)
    verdict = clf.classify_paths([next((data / "333").glob("*.jpg"))])[0]
    assert not isinstance(verdict, Exception) and verdict.n_tiles > 0 and verdict.model_id == result.model_id


def test_auto_finetunes_on_cuda_only() -> None:
    settings = load_settings(None, environ={})
    assert settings.train.backbone == "auto"
    assert backbone_mode(settings, torch.device("cpu")) == "frozen"
    assert backbone_mode(settings, torch.device("cuda", 0)) == "finetune"
    frozen = load_settings(None, environ={}, overrides={"train": {"backbone": "frozen"}})
    assert backbone_mode(frozen, torch.device("cuda", 0)) == "frozen"
    with pytest.raises(ConfigError, match="backbone"):
        load_settings(None, environ={}, overrides={"train": {"backbone": "thaw"}})
