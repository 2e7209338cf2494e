"""The backbone's runtimes (torch, ONNX Runtime, OpenVINO) on a tiny real model: the same verdicts,
the export verified like the weights, a model without an export still served, and `auto` choosing
by measurement with its cache invalidated by what it depends on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import Cli
from semwatch.config import Settings, load_settings
from semwatch.errors import UserError
from semwatch.model import runtimes
from semwatch.model.artifact import MANIFEST, add_export, read_manifest
from semwatch.model.classify import Classifier, outcomes
from semwatch.model.export import ONNX_FILE
from semwatch.values import ImageVerdict

pytestmark = pytest.mark.slow

if runtimes.available("openvino"):
    import openvino  # noqa: F401 - its import starts a telemetry thread that outlives any test

# Novelty scores of the same tiles from two float32 runtimes differ by summation order and kernel
# choice only (OpenVINO's float32 kernels: up to 6e-4 relative measured on the tiny model); the
# image verdicts must be identical. Torch's bfloat16 autocast (a CPU with native bfloat16) is
# compared on verdicts and on each image's median novelty within NOVELTY_BF16: bfloat16 keeps 8
# bits of mantissa, and a tile's novelty (squared whitened distances) moved by up to 0.29 relative
# against float32 features on the tiny model (which was fitted on float32 features).
NOVELTY_F32 = 3e-3  # relative, per tile
PROB_F32 = 1e-4  # absolute, per class probability
NOVELTY_BF16 = 0.3  # relative, per image (median over its tiles, what the unknown threshold judges)


def settings_for(runtime: str, **model: object) -> Settings:
    return load_settings(None, environ={}, overrides={
        # One view per tile: the comparison is of the network's outputs, not of the views' policy.
        "model": {"device": "cpu", "runtime": runtime, "cpu_precision": "float32", "test_time_views": 1,
                  **model},
        "tiling": {"max_tiles": 4},
    })


def held_out(tiny_model: Path, ncm_dir: Path) -> list[Path]:
    """One image per class that the tiny model neither trained nor calibrated on (12)."""
    seen = {r for part in read_manifest(tiny_model).split.values() for r in part}
    out = []
    for folder in sorted(p for p in ncm_dir.iterdir() if p.is_dir()):
        files = [f for f in sorted(folder.glob("*.jpg")) if f"{folder.name}/{f.name}" not in seen]
        out.append(files[0])
    return out


def verdicts(model: Path, settings: Settings,
             paths: list[Path]) -> tuple[str, list[ImageVerdict], np.ndarray, np.ndarray]:
    """(runtime, verdicts, every tile's novelty, each image's median novelty)."""
    clf = Classifier.load(model, settings)
    got = list(outcomes(clf, paths))
    results = [o.result for o in got]
    assert all(isinstance(r, ImageVerdict) for r in results)
    tiles = [o.output.novelty for o in got if o.output is not None]
    per_image = np.array([float(np.median(t)) for t in tiles])
    return clf.runtime, results, np.concatenate(tiles), per_image  # type: ignore[return-value]


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(runtimes.CACHE_FILE))
    return dst


def without_export(model: Path) -> Path:
    """The model as one trained before exports existed: no graph, no export record."""
    (model / ONNX_FILE).unlink()
    add_export(model, read_manifest(model), {})
    return model


def test_every_runtime_gives_the_same_verdicts(tiny_model: Path, ncm_dir: Path) -> None:
    paths = held_out(tiny_model, ncm_dir)
    assert read_manifest(tiny_model).export["onnx"]  # `semwatch train` exported the backbone
    ran = {}
    for kind in runtimes.RUNTIMES:
        if runtimes.available(kind):
            ran[kind] = verdicts(tiny_model, settings_for(kind), paths)
    assert ran["torch"][0] == "torch" and ran["onnxruntime"][0] == "onnxruntime"
    _, ref, ref_novelty, ref_images = ran["torch"]
    for kind, (name, got, novelty, _) in ran.items():
        assert name == kind
        for a, b in zip(ref, got, strict=True):
            assert (a.status, a.predicted_class) == (b.status, b.predicted_class), (kind, a.path)
            for c in a.probabilities:
                assert abs(a.probabilities[c] - b.probabilities[c]) < PROB_F32, (kind, c)
        assert np.allclose(novelty, ref_novelty, rtol=NOVELTY_F32, atol=1e-6), kind
    # Torch as it runs by default on a CPU with native bfloat16: the same verdicts, novelty close.
    _, bf16, _, bf16_images = verdicts(tiny_model, settings_for("torch", cpu_precision="bfloat16"), paths)
    assert [(v.status, v.predicted_class) for v in bf16] == [(v.status, v.predicted_class) for v in ref]
    worst = float(np.abs(bf16_images / ref_images - 1).max())
    assert worst < NOVELTY_BF16, worst


def test_a_tampered_export_is_refused(tiny_model: Path, tmp_path: Path, cli: Cli, ncm_dir: Path) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    graph = bytearray((model / ONNX_FILE).read_bytes())
    graph[len(graph) // 2] ^= 0x01
    (model / ONNX_FILE).write_bytes(bytes(graph))
    for kind in ("auto", "torch", "onnxruntime"):
        with pytest.raises(UserError, match=r"checksum mismatch.*export is corrupt or was altered"):
            Classifier.load(model, settings_for(kind))
    image = held_out(tiny_model, ncm_dir)[0]
    run = cli("classify", "--model", model, image)
    assert run.code != 0 and "export is corrupt or was altered" in run.err and "Traceback" not in run.err
    # The record edited to name the tampered file's hash: the manifest's export signature refuses it.
    raw = json.loads((model / MANIFEST).read_text())
    raw["export"]["onnx"]["sha256"] = "0" * 64
    (model / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(UserError, match="export record checksum mismatch"):
        read_manifest(model)


def test_a_model_without_export_runs_in_torch_and_says_how_to_add_one(
    tiny_model: Path, tmp_path: Path, cli: Cli, ncm_dir: Path
) -> None:
    model = without_export(copy_model(tiny_model, tmp_path / "m"))
    manifest = read_manifest(model)
    assert not manifest.export and manifest.model_id == read_manifest(tiny_model).model_id
    clf = Classifier.load(model, settings_for("auto"))
    assert clf.runtime == "torch" and clf.runtime_note is not None
    assert "semwatch models export" in clf.runtime_note
    with pytest.raises(Exception, match="needs the model's ONNX export"):
        Classifier.load(model, settings_for("onnxruntime"))
    image = held_out(tiny_model, ncm_dir)[0]
    run = cli("classify", "--model", model, image)
    assert run.code == 0 and "semwatch models export" in run.err
    # `semwatch models export` gives it one; the model id (and so its results) stays the same.
    run = cli("models", "export", model)
    assert run.code == 0, run.err
    assert "backbone exported" in run.out
    again = read_manifest(model)
    assert again.model_id == manifest.model_id and again.export["onnx"]
    onnx = again.export["onnx"]
    assert isinstance(onnx, dict)
    assert float(onnx["max_difference_vs_torch_float32"]["relative"]) < 1e-3  # type: ignore[index,call-overload]
    assert Classifier.load(model, settings_for("onnxruntime")).runtime == "onnxruntime"


def test_auto_chooses_by_measurement_and_measures_again_when_what_it_depends_on_changes(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    settings = settings_for("auto", batch_size=4)
    first = Classifier.load(model, settings)
    choice = first.choice
    assert choice is not None and not choice.cached
    assert set(choice.rates) == set(runtimes.candidates(b"graph", first.torch_device))
    assert choice.runtime == max(choice.rates, key=lambda k: choice.rates[k])  # the fastest measured
    cache = json.loads((model / runtimes.CACHE_FILE).read_text())
    assert cache["runtime"] == choice.runtime and cache["key"]["model_id"] == first.model_id
    assert cache["key"]["cpu"] == runtimes.cpu_signature()

    second = Classifier.load(model, settings).choice
    assert second is not None and second.cached and second.runtime == choice.runtime

    # Another CPU (here: a different oneDNN instruction-set cap): measured again.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    third = Classifier.load(model, settings).choice
    assert third is not None and not third.cached
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")

    # Another model in the folder (its id differs): the cache beside it is not used.
    other = copy_model(tiny_model, tmp_path / "other")
    shutil.copy(model / runtimes.CACHE_FILE, other / runtimes.CACHE_FILE)
    raw = json.loads((other / runtimes.CACHE_FILE).read_text())
    raw["key"]["model_id"] = "0123456789abcdef"
    (other / runtimes.CACHE_FILE).write_text(json.dumps(raw))
    fourth = Classifier.load(other, settings).choice
    assert fourth is not None and not fourth.cached

    # A cache edited by hand can only pick among verified runtimes (a name it does not know: ignored).
    raw = json.loads((model / runtimes.CACHE_FILE).read_text())
    raw["runtime"] = "something-else"
    (model / runtimes.CACHE_FILE).write_text(json.dumps(raw))
    fifth = Classifier.load(model, settings).choice
    assert fifth is not None and not fifth.cached


def test_training_ran_its_feature_passes_in_the_configured_runtime(tiny_model: Path) -> None:
    training = read_manifest(tiny_model).training
    assert training["runtime"] == "onnxruntime" and training["precision"] == "float32"  # conftest's


def test_ray_actors_get_the_runtime_measured_once_and_the_export(tiny_model: Path, tmp_path: Path) -> None:
    """The Ray driver resolves `auto` once, with the actors' thread count, and ships the export with
    the weights (each actor verifies it as `Classifier.load` does)."""
    import torch

    from semwatch.reprocess.ray_engine import _actor_settings, _artifact_blobs

    model = copy_model(tiny_model, tmp_path / "m")
    settings = settings_for("auto", batch_size=4)
    threads = torch.get_num_threads()
    try:
        actor = _actor_settings(settings, model, gpus_per_worker=0)
    finally:
        torch.set_num_threads(threads)  # the driver's load set the actors' count in this process
    assert actor.model.runtime in runtimes.RUNTIMES
    assert actor.model.cpu_threads == max(1, round(settings.scale.cpus_per_worker))
    assert actor.model.runtime == json.loads((model / runtimes.CACHE_FILE).read_text())["runtime"]
    assert ONNX_FILE in _artifact_blobs(model)
    assert _actor_settings(settings, model, gpus_per_worker=1) is settings  # a GPU actor chooses there
