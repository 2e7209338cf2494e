"""Training from an explicit list of labelled images (what the lab's labels feed), and the record of
which images a model saw."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from semwatch.config import load_settings
from semwatch.errors import UserError
from semwatch.model.artifact import read_manifest
from semwatch.model.train import LabelledImage, discover, train_images
from semwatch.values import parse_class

pytestmark = pytest.mark.slow


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_train_images_keys_by_content_and_records_what_it_saw(tmp_path: Path, ncm_dir: Path) -> None:
    classes = [parse_class("622"), parse_class("811_cycled")]
    files = [sorted((ncm_dir / c.name).glob("*.jpg"))[:3] for c in classes]
    # Keys that are not "<folder>/<file>": the split and the manifest use them as given.
    images = [LabelledImage(p, f"sha256:{sha(p)}", label) for label, group in enumerate(files) for p in group]
    settings = load_settings(None, environ={}, overrides={
        "model": {"device": "cpu"},
        "train": {"tiles_per_image": 2, "augment_copies": 1, "val_fraction": 0.34, "test_fraction": 0.34},
        "tiling": {"max_tiles": 4},
    })
    result = train_images(classes, images, tmp_path / "m", settings, source="labels: test", epochs=1,
                          progress=False)
    manifest = read_manifest(tmp_path / "m")
    assert manifest.model_id == result.model_id
    split = manifest.split
    assert {k for part in split.values() for k in part} == {im.rel for im in images}
    assert all(k.startswith("sha256:") for k in split["train"])
    training = manifest.training
    assert training["source"] == "labels: test" and "data_dir" not in training
    seen = set(training["trained_on"])  # type: ignore[arg-type]
    # Training and validation images were seen, the held-out test images were not.
    assert seen == {k.removeprefix("sha256:") for k in (*split["train"], *split["val"])}
    assert split["test"] and not seen & {k.removeprefix("sha256:") for k in split["test"]}


def test_train_images_refuses_a_list_it_cannot_train(tmp_path: Path, ncm_dir: Path) -> None:
    classes, images = discover(ncm_dir, {})
    settings = load_settings(None, environ={})
    twice = [images[0], LabelledImage(images[1].path, images[0].rel, images[1].label)]
    with pytest.raises(UserError, match="same key"):
        train_images(classes, twice, tmp_path / "m", settings, source="t", progress=False)
    with pytest.raises(UserError, match="not one of"):
        train_images(classes, [LabelledImage(images[0].path, "x", 99)], tmp_path / "m", settings, source="t")
    one_class = [im for im in images if im.label == 0]
    with pytest.raises(UserError, match="two classes"):
        train_images(classes, one_class, tmp_path / "m", settings, source="t", progress=False)


def test_folder_training_records_its_folder_and_the_images_seen(tiny_model: Path, ncm_dir: Path) -> None:
    training = read_manifest(tiny_model).training
    assert training["data_dir"] == training["source"] == str(ncm_dir.resolve())
    seen = set(training["trained_on"])  # type: ignore[arg-type]
    split = read_manifest(tiny_model).split
    assert seen == {sha(ncm_dir / rel) for rel in (*split["train"], *split["val"])}
