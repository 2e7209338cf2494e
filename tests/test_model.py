"""Training, the artifact (verified, never unpickled) and evaluation, on a tiny real model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from semwatch.config import Settings
from semwatch.errors import UserError
from semwatch.model.artifact import MANIFEST, WEIGHTS, model_id, read_manifest
from semwatch.model.backbone import Head
from semwatch.model.classify import Classifier
from semwatch.model.evaluate import evaluate_model, expected_calibration_error
from semwatch.model.train import TEMPERATURES, FeatureSet, calibrate_temperature, discover, split_images

pytestmark = pytest.mark.slow


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "semwatch", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_split_is_by_image_stratified_and_seeded(ncm_dir: Path) -> None:
    classes, images = discover(ncm_dir, {})
    assert [c.name for c in classes][:3] == ["333", "333_cycled", "333_formation"]
    assert classes[0].state == "pristine" and classes[1].state == "cycled" and classes[1].composition == "333"
    split = split_images(images, len(classes), 0.15, 0.15, seed=1)
    parts = {k: {im.rel for im in v} for k, v in split.items()}
    assert not parts["train"] & parts["val"] and not parts["train"] & parts["test"]
    assert not parts["val"] & parts["test"]
    assert sum(len(v) for v in parts.values()) == len(images) == len({im.rel for im in images})
    for c in range(len(classes)):
        assert any(im.label == c for im in split["train"]) and any(im.label == c for im in split["val"])
    again = split_images(images, len(classes), 0.15, 0.15, seed=1)
    assert [im.rel for im in again["test"]] == [im.rel for im in split["test"]]


def test_class_map_renames_folders(tmp_path: Path, ncm_dir: Path) -> None:
    for src, dst in (("622", "NCM622 fresh"), ("811_cycled", "NCM811-100cyc")):
        (tmp_path / dst).mkdir()
        for f in sorted((ncm_dir / src).glob("*.jpg"))[:2]:
            (tmp_path / dst / f.name).symlink_to(f)
    classes, images = discover(tmp_path, {"NCM622 fresh": "622", "NCM811-100cyc": "811_cycled"})
    assert [(c.name, c.composition, c.state) for c in classes] == [
        ("622", "622", "pristine"),
        ("811_cycled", "811", "cycled"),
    ]
    assert len(images) == 4
    with pytest.raises(UserError, match="at least two class folders"):
        discover(tmp_path / "NCM622 fresh", {})


def test_artifact_manifest_records_everything(tiny_model: Path) -> None:
    manifest = read_manifest(tiny_model)
    for key in (
        "classes",
        "class_info",
        "architecture",
        "tile_px",
        "tile_physical_px",
        "reference_magnification",
        "reference_pixel_size_nm",
        "normalisation",
        "unknown_threshold",
        "training",
        "validation",
        "semwatch_version",
        "created_at",
        "split",
        "weights_sha256",
    ):
        assert key in manifest, key
    assert manifest["training"]["data_fingerprint"] and len(manifest["classes"]) == 12
    split = manifest["split"]
    assert not set(split["train"]) & set(split["val"])
    assert manifest["unknown_threshold"] > 0
    assert model_id(manifest) == Classifier.load(tiny_model, Settings()).model_id


def test_loading_never_unpickles(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("torch.load (pickle) was called")

    monkeypatch.setattr(torch, "load", refuse)
    clf = Classifier.load(tiny_model, Settings())
    assert (clf.classes and clf.device == "cpu") or clf.device.startswith("cuda")


def _copy(model: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(model, dst)
    return dst


def test_tampered_weights_are_refused(tiny_model: Path, tmp_path: Path) -> None:
    model = _copy(tiny_model, tmp_path)
    blob = bytearray((model / WEIGHTS).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (model / WEIGHTS).write_bytes(bytes(blob))
    with pytest.raises(UserError, match="checksum mismatch"):
        Classifier.load(model, Settings())
    proc = run_cli("classify", "x.jpg", "--model", str(model), cwd=tmp_path)
    assert proc.returncode == 2
    assert "checksum mismatch" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_edited_or_corrupt_manifest_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    model = _copy(tiny_model, tmp_path)
    manifest = json.loads((model / MANIFEST).read_text())
    manifest["unknown_threshold"] = 1e9
    (model / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="manifest checksum"):
        Classifier.load(model, Settings())
    (model / MANIFEST).write_text("{not json")
    with pytest.raises(UserError, match="corrupt manifest"):
        Classifier.load(model, Settings())
    with pytest.raises(UserError, match="not found"):
        Classifier.load(tmp_path / "nowhere", Settings())


def test_evaluate_cli_reports_metrics_and_figures(tiny_model: Path, ncm_dir: Path, tmp_path: Path) -> None:
    proc = run_cli(
        "evaluate",
        str(ncm_dir),
        "--model",
        str(tiny_model),
        "--split",
        "val",
        "--json",
        "--out",
        str(tmp_path / "figs"),
        "--intensity-jitter",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    for key in (
        "n_images",
        "n_tiles",
        "image_accuracy",
        "tile_accuracy",
        "composition_accuracy",
        "state_accuracy",
        "macro_f1",
        "ece",
        "unknown_rate",
        "per_class",
        "confusion",
    ):
        assert key in report, key
    assert report["n_images"] == len(read_manifest(tiny_model)["split"]["val"])
    assert report["intensity_jitter"] is True
    assert len(report["confusion"]["matrix"]) == 12
    assert (tmp_path / "figs" / "confusion.png").stat().st_size > 1000
    assert (tmp_path / "figs" / "reliability.png").stat().st_size > 1000


def test_evaluate_refuses_unknown_classes(tiny_model: Path, tmp_path: Path, ncm_dir: Path) -> None:
    for name in ("622", "lung-cells"):
        (tmp_path / "data" / name).mkdir(parents=True)
        src = next(iter(sorted((ncm_dir / "622").glob("*.jpg"))))
        (tmp_path / "data" / name / src.name).symlink_to(src)
    with pytest.raises(UserError, match="does not know: lung-cells"):
        evaluate_model(tmp_path / "data", tiny_model, Settings())


def test_expected_calibration_error() -> None:
    import numpy as np

    assert expected_calibration_error(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.0
    assert expected_calibration_error(np.array([0.9] * 10), np.array([1.0] * 5 + [0.0] * 5)) == pytest.approx(
        0.4
    )


def _features(separation: float, seed: int = 0) -> tuple[SimpleNamespace, FeatureSet]:
    """Two classes of 4-d features, 10 images of 6 tiles each; the first coordinate separates them."""
    gen = torch.Generator().manual_seed(seed)
    image_labels = torch.tensor([i % 2 for i in range(10)])
    image_of = torch.arange(10).repeat_interleave(6)
    labels = image_labels[image_of]
    feats = torch.randn((60, 4), generator=gen)
    feats[:, 0] += (labels.float() * 2 - 1) * separation
    head = Head(4, 2, hidden=0, dropout=0.0).eval()
    with torch.no_grad():
        head.mlp[-1].weight.copy_(torch.tensor([[-2.0, 0, 0, 0], [2.0, 0, 0, 0]]))
        head.mlp[-1].bias.zero_()
    return SimpleNamespace(head=head), FeatureSet(feats, labels, image_of, image_labels)


def test_temperature_is_finite_when_validation_images_are_all_right() -> None:
    # Separable images: the image-level NLL has no finite optimum, so the tile level decides.
    net, val = _features(separation=1.5)
    temperature, basis = calibrate_temperature(net, val)  # type: ignore[arg-type]
    assert basis == "tile" and TEMPERATURES[0] < temperature < TEMPERATURES[-1]
    assert float(net.head.temperature) == pytest.approx(temperature)
    # Overlapping classes (images wrong too): the image-level NLL has an interior optimum.
    net, val = _features(separation=0.1, seed=3)
    temperature, basis = calibrate_temperature(net, val)  # type: ignore[arg-type]
    assert basis == "image" and TEMPERATURES[0] < temperature < TEMPERATURES[-1]
