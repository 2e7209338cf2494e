"""Training, the artifact (verified, never unpickled) and evaluation, on a tiny real model."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import Cli
from semwatch.config import Settings, load_settings
from semwatch.errors import UserError
from semwatch.model.artifact import MANIFEST, SCHEMA_VERSION, WEIGHTS, Manifest, read_manifest
from semwatch.model.backbone import Head
from semwatch.model.classify import Classifier
from semwatch.model.evaluate import evaluate_model, expected_calibration_error
from semwatch.model.train import TEMPERATURES, FeatureSet, calibrate_temperature, discover, split_images

pytestmark = pytest.mark.slow


def json_id(raw: dict[str, object]) -> str:
    """The model id as every semwatch version computes it: a hash of the manifest's JSON."""
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resign(raw: dict[str, object]) -> dict[str, object]:
    """`raw` with its manifest checksum recomputed (as `save_artifact` signs it)."""
    body = {k: v for k, v in raw.items() if k != "manifest_sha256"}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
    return body | {"manifest_sha256": digest}


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
    raw = json.loads((tiny_model / MANIFEST).read_text())
    assert set(raw) == {
        "schema_version", "format", "name", "classes", "class_info", "architecture", "tile_px",
        "tile_physical_px", "overlap", "intensity", "normalisation", "reference_pixel_size_nm",
        "reference_magnification", "head_hidden", "novelty_k", "unknown_threshold", "unknown_calibration",
        "novelty", "temperature", "training", "validation", "metrics", "split", "semwatch_version",
        "created_at", "weights_sha256", "manifest_sha256", "export", "export_sha256",
    }
    assert raw["schema_version"] == manifest.schema_version == SCHEMA_VERSION
    assert manifest.to_json() == raw  # read back exactly as written
    assert manifest.training["data_fingerprint"] and len(manifest.classes) == 12
    assert [c.name for c in manifest.class_info] == list(manifest.classes)
    assert not set(manifest.split["train"]) & set(manifest.split["val"])
    assert manifest.unknown_threshold > 0
    assert manifest.tile_px == load_settings(None, environ={}).tiling.tile_px
    assert manifest.metrics == {"validation": manifest.validation}
    # The export (its own signature) is no part of the id: a model exported later keeps its id.
    core = {k: v for k, v in raw.items() if k not in ("export", "export_sha256")}
    assert manifest.model_id == json_id(core) == Classifier.load(tiny_model, Settings()).model_id


def test_a_manifest_without_schema_version_still_loads(tiny_model: Path, tmp_path: Path) -> None:
    """Models trained before the manifest had a schema version (version 1) load, keep their model
    id, and classify; a manifest from a newer semwatch is refused."""
    model = _copy(tiny_model, tmp_path)
    raw = json.loads((model / MANIFEST).read_text())
    del raw["schema_version"], raw["export"], raw["export_sha256"]  # nor had they an export
    old = resign(raw)
    (model / MANIFEST).write_text(json.dumps(old, indent=2, sort_keys=True))
    manifest = read_manifest(model)
    assert manifest.schema_version == 1 and "schema_version" not in manifest.to_json()
    assert manifest.to_json() == old and manifest.model_id == json_id(old)
    clf = Classifier.load(model, Settings())
    assert clf.model_id == json_id(old) and clf.classes == list(manifest.classes)
    newer = resign(raw | {"schema_version": SCHEMA_VERSION + 1})
    (model / MANIFEST).write_text(json.dumps(newer))
    with pytest.raises(UserError, match="newer than this semwatch"):
        read_manifest(model)
    wrong = resign(raw | {"tile_px": "224"})
    (model / MANIFEST).write_text(json.dumps(wrong))
    with pytest.raises(UserError, match="tile_px is not a whole number"):
        read_manifest(model)


def test_unknown_manifest_keys_survive_a_round_trip(tiny_model: Path) -> None:
    raw = json.loads((tiny_model / MANIFEST).read_text()) | {"site_note": {"room": 3}}
    manifest = Manifest.from_json(raw)
    assert manifest.extra == {"site_note": {"room": 3}} and manifest.to_json() == raw


def test_train_cli_writes_the_model_its_split_and_a_json_summary(
    cli: Cli, ncm_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    for name in ("333", "811_cycled"):
        (data / name).mkdir(parents=True)
        for f in sorted((ncm_dir / name).glob("*.jpg"))[:3]:
            (data / name / f.name).symlink_to(f)
    (tmp_path / "config.toml").write_text(
        '[model]\ndevice = "cpu"\n[train]\ntiles_per_image = 2\naugment_copies = 0\n'
        "[tiling]\nmax_tiles = 4\n"
    )
    run = cli("train", data, "--out", tmp_path / "model", "--epochs", "1", "--split-out",
              tmp_path / "split.json", "--json")
    assert run.code == 0, run.err
    summary = json.loads(run.out)
    manifest = read_manifest(tmp_path / "model")
    assert summary["model_id"] == manifest.model_id and summary["classes"] == ["333", "811_cycled"]
    assert summary["n_train"] + summary["n_val"] + summary["n_test"] == 6
    assert summary["validation"] == manifest.validation and summary["skipped"] == []
    split = json.loads((tmp_path / "split.json").read_text())
    assert split == {k: list(v) for k, v in manifest.split.items()}
    assert list(split) == ["test", "train", "val"]
    assert manifest.training["n_images"] == 6 and manifest.training["epochs_run"] == 1


def test_loading_never_unpickles(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("torch.load (pickle) was called")

    monkeypatch.setattr(torch, "load", refuse)
    clf = Classifier.load(tiny_model, Settings())
    assert clf.classes == list(read_manifest(tiny_model).classes) and len(clf.classes) == 12
    assert clf.device.startswith(("cpu, ", "cuda")) and clf.runtime in clf.device


def test_the_loaded_network_answers_like_a_float32_cpu_reference(tiny_model: Path, ncm_dir: Path) -> None:
    """Whatever the device and precision (float16 on CUDA, bfloat16 on a capable CPU), the loaded
    model gives the answers of the same weights in float32 on the CPU."""
    from semwatch.reading.micrograph import read_micrograph

    here = Classifier.load(tiny_model, Settings())
    reference = Classifier.load(tiny_model, load_settings(None, environ={}, overrides={
        "model": {"device": "cpu", "cpu_precision": "float32"}}))
    image = sorted((ncm_dir / "523_formation").glob("*.jpg"))[0]
    tiles = reference.prepare(read_micrograph(image, reference.settings)).tiles
    got, want = here.predict(tiles), reference.predict(tiles)
    assert got.probabilities.shape == want.probabilities.shape == (len(tiles), 12)
    assert np.allclose(got.probabilities.sum(axis=1), 1.0, atol=1e-4)
    assert np.allclose(got.probabilities, want.probabilities, atol=0.02)
    # The novelty score keeps the backbone's low-variance directions (where foreign textures show),
    # and there bfloat16's 8-bit mantissa moves it: on the full model's held-out images the image
    # novelty in bfloat16 is 0.79-1.08 times the float32 one, with the same unknown decisions.
    assert np.allclose(got.novelty, want.novelty, rtol=0.25, atol=0.05)


def _copy(model: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(model, dst)
    return dst


def test_tampered_weights_are_refused(cli: Cli, tiny_model: Path, tmp_path: Path) -> None:
    model = _copy(tiny_model, tmp_path)
    blob = bytearray((model / WEIGHTS).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (model / WEIGHTS).write_bytes(bytes(blob))
    with pytest.raises(UserError, match="checksum mismatch"):
        Classifier.load(model, Settings())
    run = cli("classify", "x.jpg", "--model", model)
    assert run.code == 2 and run.out == ""
    assert "checksum mismatch" in run.err and len(run.err.strip().splitlines()) == 1


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


def test_evaluate_cli_reports_metrics_and_figures(
    cli: Cli, tiny_model: Path, ncm_dir: Path, tmp_path: Path
) -> None:
    # One view per tile: the tiny model is unsure of every tile, and 8 views each only cost time here.
    (tmp_path / "config.toml").write_text("[model]\ntest_time_views = 1\n")
    run = cli("evaluate", ncm_dir, "--model", tiny_model, "--split", "val", "--json",
              "--out", tmp_path / "figs", "--intensity-jitter")
    assert run.code == 0, run.err
    report = json.loads(run.out)
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
    assert report["n_images"] == len(read_manifest(tiny_model).split["val"])
    assert report["intensity_jitter"] is True
    assert len(report["confusion"]["matrix"]) == 12
    assert (tmp_path / "figs" / "confusion.png").stat().st_size > 1000
    assert (tmp_path / "figs" / "reliability.png").stat().st_size > 1000
    assert report["figures"] == {"confusion": str(tmp_path / "figs" / "confusion.png"),
                                 "reliability": str(tmp_path / "figs" / "reliability.png")}
    plain = cli("evaluate", ncm_dir, "--model", tiny_model, "--split", "val", "--out", tmp_path / "figs",
                "--intensity-jitter")
    assert plain.code == 0 and plain.out.startswith(f"{report['n_images']} images, ")
    assert f"image accuracy {report['image_accuracy']:.4f}" in plain.out  # seeded jitter: the same figure
    assert plain.out.splitlines()[1:] == [f"confusion: {tmp_path / 'figs' / 'confusion.png'}",
                                          f"reliability: {tmp_path / 'figs' / 'reliability.png'}"]


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
