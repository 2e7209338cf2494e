"""Classifier contract, aggregation rules and `semwatch classify` on real and broken files."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from semwatch.config import Settings, load_settings
from semwatch.model.classify import Classifier, PreparedImage, TileOutput, aggregate
from semwatch.reading.tiles import Scale
from semwatch.values import ClassInfo, ImageVerdict, MicrographError, parse_class

CLASSES = ["333", "333_cycled", "811", "811_cycled"]
INFO = [parse_class(c) for c in CLASSES]


def prepared(n: int, *, scale_ok: bool = True, candidates: int = 4) -> PreparedImage:
    return PreparedImage(
        Path("x.jpg"),
        np.zeros((n, 3, 8, 8), np.float32),
        [(0, 0)] * n,
        candidates,
        Scale(1.0, "none"),
        scale_ok,
        (8, 8),
    )


def verdict(probs: list[list[float]], novelty: float = 0.1, *, scale_ok: bool = True) -> ImageVerdict:
    p = np.array(probs, np.float32)
    out = TileOutput(p, np.full(len(p), novelty, np.float32))
    return aggregate(
        prepared(len(p), scale_ok=scale_ok),
        out,
        CLASSES,
        INFO,
        unknown_threshold=1.0,
        min_confidence=0.5,
        min_tiles=2,
        model_id="m",
    )


def test_parse_class_defaults_to_pristine() -> None:
    assert parse_class("622") == ClassInfo("622", "622", "pristine")
    assert parse_class("811_formation") == ClassInfo("811_formation", "811", "formation")


def test_aggregation_marginals_and_agreement() -> None:
    v = verdict([[0.05, 0.05, 0.1, 0.8], [0.05, 0.05, 0.2, 0.7], [0.1, 0.1, 0.6, 0.2]])
    assert v.status == "ok" and v.predicted_class == "811_cycled"
    assert v.composition == "811" and v.state == "cycled"
    assert v.tile_agreement == pytest.approx(2 / 3, abs=1e-4)
    assert sum(v.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    assert v.n_tiles == 3 and v.model_id == "m"


def test_foreign_low_confidence_few_tiles_and_scale() -> None:
    confident = [[0.97, 0.01, 0.01, 0.01]] * 4
    far = verdict(confident, novelty=5.0)
    assert far.status == "unknown" and far.predicted_class is None and "unlike the training" in far.reasons[0]
    unsure = verdict([[0.3, 0.3, 0.2, 0.2]] * 4)
    assert unsure.status == "unknown" and any("low confidence" in r for r in unsure.reasons)
    few = verdict([[0.97, 0.01, 0.01, 0.01]])
    assert few.status == "rejected" and "usable tile" in few.reasons[0]
    none = verdict(np.zeros((0, 4)).tolist())
    assert none.status == "rejected" and none.n_tiles == 0
    empty = TileOutput(np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
    small = aggregate(
        prepared(0, candidates=1),
        empty,
        CLASSES,
        INFO,
        unknown_threshold=1.0,
        min_confidence=0.5,
        min_tiles=2,
        model_id=None,
    )
    assert small.status == "unknown" and "fit at the model's scale" in small.reasons[0]
    odd_scale = verdict(confident, scale_ok=False)
    assert odd_scale.status == "unknown" and "outside the model's range" in odd_scale.reasons[0]


def test_contract_prepare_predict_verdict(tiny_model: Path, ncm_dir: Path, settings: Settings,
                                          tiles_per_ncm_image: int) -> None:
    from semwatch.reading.micrograph import read_micrograph

    clf = Classifier.load(tiny_model, settings)
    image = next(iter(sorted((ncm_dir / "523").glob("*.jpg"))))
    prep = clf.prepare(read_micrograph(image, settings))
    px = clf.manifest["tile_px"]
    assert prep.tiles.dtype == np.float32 and prep.tiles.shape[1:] == (3, px, px)
    n = tiles_per_ncm_image  # the specimen area at the reference scale, covered by an overlapping grid
    assert len(prep.tiles) == n >= 2
    out = clf.predict(prep.tiles)
    assert out.probabilities.shape == (n, 12) and out.novelty.shape == (n,)
    assert np.allclose(out.probabilities.sum(axis=1), 1.0, atol=1e-4)
    v = clf.verdict(prep, out)
    assert v.n_tiles == n and v.model_id == clf.model_id and v.status in ("ok", "unknown")
    empty = clf.predict(np.zeros((0, 3, px, px), np.float32))
    assert empty.probabilities.shape == (0, 12)
    # The same tiles in a bigger batch give the same answer.
    both = clf.predict(np.concatenate([prep.tiles, prep.tiles]))
    assert np.allclose(both.probabilities[:n], out.probabilities, atol=1e-4)


def test_classify_cli_real_vendor_and_broken_files(
    tiny_model: Path, ncm_dir: Path, vendor_dir: Path, tmp_path: Path, tiles_per_ncm_image: int
) -> None:
    ncm = sorted((ncm_dir / "811_cycled").glob("*.jpg"))[0]
    fei = vendor_dir / "fei" / "Untreated_ME_5KV_1200x_ETD_16bit.tif"
    zeiss = vendor_dir / "zeiss" / "FeMoOx_AntiA_04_1k5x_CN.tif"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((960, 1280), 128, np.uint8))
    missing = tmp_path / "missing.tif"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "semwatch",
            "classify",
            str(ncm),
            str(fei),
            str(zeiss),
            str(broken),
            str(blank),
            str(missing),
            "--model",
            str(tiny_model),
            "--json",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    by_path = {Path(line["path"]).name: line for line in lines}
    assert list(by_path) == [p.name for p in (ncm, fei, zeiss, broken, blank, missing)]
    for name in (ncm.name, fei.name, zeiss.name):
        line = by_path[name]
        for key in (
            "status",
            "predicted_class",
            "composition",
            "state",
            "confidence",
            "tile_agreement",
            "n_tiles",
            "probabilities",
            "reasons",
        ):
            assert key in line, key
        assert line["status"] in ("ok", "unknown", "rejected")
    assert by_path[ncm.name]["n_tiles"] == tiles_per_ncm_image
    assert set(by_path[broken.name]) == {"path", "error"} and set(by_path[missing.name]) == {"path", "error"}
    assert by_path[blank.name]["status"] == "rejected"


def test_classify_paths_and_explain(
    tiny_model: Path, ncm_dir: Path, settings: Settings, tmp_path: Path
) -> None:
    from semwatch.model.gradcam import explain_image
    from semwatch.reading.micrograph import read_micrograph

    clf = Classifier.load(tiny_model, settings)
    image = sorted((ncm_dir / "622_formation").glob("*.jpg"))[0]
    results = clf.classify_paths([image, tmp_path / "nope.jpg"])
    assert isinstance(results[0], ImageVerdict) and isinstance(results[1], MicrographError)
    micrograph = read_micrograph(image, settings)
    overlay = explain_image(clf, micrograph)
    assert overlay.dtype == np.uint8 and overlay.shape == (*micrograph.pixels.shape, 3)
    assert float(overlay.std()) > 0
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "semwatch",
            "classify",
            str(image),
            "--model",
            str(tiny_model),
            "--explain",
            str(tmp_path / "cams"),
            "--json",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    written = Path(json.loads(proc.stdout)["explanation"])
    assert written.is_file() and cv2.imread(str(written)).shape[:2] == micrograph.pixels.shape


def _viewing(model: Path, views: int, below: float) -> Classifier:
    """The model on the CPU in float32 (so views can be compared exactly) with these view settings."""
    s = load_settings(None, environ={}, overrides={
        "model": {"device": "cpu", "cpu_precision": "float32", "test_time_views": views,
                  "test_time_below": below}})
    return Classifier.load(model, s)


def _first_tiles(model: Path, folder: Path) -> np.ndarray:
    """The network-ready tiles of the first micrograph in `folder`."""
    from semwatch.reading.micrograph import read_micrograph

    s = load_settings(None, environ={}, overrides={"model": {"device": "cpu"}})
    image = next(iter(sorted(folder.glob("*.jpg"))))
    return Classifier.load(model, s).prepare(read_micrograph(image, s)).tiles


@pytest.mark.parametrize(("views", "turn"), [
    (2, lambda t: t[..., ::-1]),  # mirror image
    (4, lambda t: t[..., ::-1, ::-1]),  # turned 180 degrees
    (8, lambda t: np.rot90(t, 1, axes=(2, 3))),  # turned 90 degrees
])
def test_test_time_views_make_predictions_invariant(tiny_model: Path, ncm_dir: Path, views: int,
                                                    turn: Callable[[np.ndarray], np.ndarray]) -> None:
    """Averaged over a group of flips/rotations, a tile and its turned copy get the same answer
    (a single view does not: the network itself is not rotation-invariant)."""

    def predict(n_views: int, tiles: np.ndarray) -> np.ndarray:
        clf = _viewing(tiny_model, n_views, 1.0)
        return clf.predict(np.ascontiguousarray(tiles)).probabilities

    tiles = _first_tiles(tiny_model, ncm_dir / "622_cycled")[:3]
    assert np.allclose(predict(views, tiles), predict(views, turn(tiles)), atol=1e-4)
    assert not np.allclose(predict(1, tiles), predict(1, turn(tiles)), atol=1e-4)
    assert np.allclose(predict(views, tiles).sum(axis=1), 1.0, atol=1e-4)


def test_only_unsure_tiles_get_more_views(tiny_model: Path, ncm_dir: Path) -> None:
    """Tiles at or above `test_time_below` keep their single-view answer; the others get the 8-view one."""
    tiles = _first_tiles(tiny_model, ncm_dir / "333_formation")

    def predict(views: int, below: float) -> np.ndarray:
        return _viewing(tiny_model, views, below).predict(tiles).probabilities

    one, every = predict(1, 1.0), predict(8, 1.0)
    assert np.allclose(predict(8, 0.0), one, atol=1e-5)  # nobody is unsure of anything below 0
    below = float(np.median(one.max(axis=1)))  # half of the tiles are unsure
    mixed = predict(8, below)
    unsure = one.max(axis=1) < below
    assert 0 < unsure.sum() < len(unsure)
    assert np.allclose(mixed[~unsure], one[~unsure], atol=1e-5)
    assert np.allclose(mixed[unsure], every[unsure], atol=1e-5)
