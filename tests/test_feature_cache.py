"""The feature cache (`[train] cache_features`, model.train.featurecache): a training that reads its
features from the cache makes the very model a training without it makes, and a change of what
decides the features (here the tiles per image) is a new key, computed again."""

from __future__ import annotations

from pathlib import Path

from semwatch.config import load_settings
from semwatch.model.train import train_model
from semwatch.model.train.featurecache import FOLDER


def test_cached_features_train_the_same_model(tmp_path: Path, ncm_dir: Path) -> None:
    def settings(cache: bool, tiles: int = 3) -> object:
        return load_settings(None, environ={}, overrides={
            "model": {"device": "cpu", "runtime": "onnxruntime", "registry": str(tmp_path / "registry")},
            "train": {"tiles_per_image": tiles, "augment_copies": 1, "cache_features": cache},
            "tiling": {"max_tiles": 4}})

    def train(name: str, cache: bool, tiles: int = 3) -> tuple[str, dict[str, object]]:
        result = train_model(ncm_dir, tmp_path / name, settings(cache, tiles),  # type: ignore[arg-type]
                             max_images_per_class=2, epochs=2, progress=False)
        # The weights (the model id also covers the manifest: its name, its wall time)
        return result.manifest.weights_sha256, dict(result.manifest.training)

    first_id, first = train("first", cache=True)
    assert first["features_cached"] == 0
    keys = list((tmp_path / "registry" / FOLDER).iterdir())
    assert len(keys) == 1 and len(list(keys[0].glob("train-*.npz"))) == 12  # one training image per class
    again_id, again = train("again", cache=True)
    assert again["features_cached"] == 24  # every training and validation image
    plain_id, plain = train("plain", cache=False)
    assert "features_cached" not in plain
    assert first_id == again_id == plain_id  # the cache changes the time, not the weights
    _, other = train("other", cache=True, tiles=2)
    assert other["features_cached"] == 0
    assert len(list((tmp_path / "registry" / FOLDER).iterdir())) == 2  # the newest two keys stay
