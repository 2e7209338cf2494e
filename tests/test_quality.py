"""The quality gate's JPEG block check (issue 18 item 6): images enlarged by pixel replication
(digital zoom, an upscaled export) are not "heavy JPEG compression"; heavily re-compressed ones
still are, also when enlarged before or after. Real shared images, every 30th of the 737 (all 737
were checked once by hand: see `reading/quality.py`)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from semwatch.config import Settings, load_settings
from semwatch.reading import quality
from semwatch.reading.micrograph import read_micrograph


@pytest.fixture(scope="module")
def cfg() -> Settings:
    return load_settings(None, environ={})


@pytest.fixture(scope="module")
def sample(ncm_dir: Path, cfg: Settings) -> list[np.ndarray]:
    files = sorted(ncm_dir.rglob("*.jpg"))[::30]
    assert len(files) >= 24
    return [read_micrograph(f, cfg).pixels for f in files]


def enlarged(pixels: np.ndarray, k: int) -> np.ndarray:
    return cv2.resize(pixels, None, fx=k, fy=k, interpolation=cv2.INTER_NEAREST)


def zoomed(pixels: np.ndarray, k: int) -> np.ndarray:
    """Digital zoom: the central 1/k of the image enlarged k times (the original's size again)."""
    h, w = pixels.shape
    return enlarged(pixels[(h - h // k) // 2:][: h // k, (w - w // k) // 2:][:, : w // k], k)


def resaved(pixels: np.ndarray, jpeg_quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", (pixels * 255).round().astype(np.uint8),
                           [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    assert ok
    return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255


def jpeg_reason(pixels: np.ndarray, cfg: Settings) -> bool:
    return any(r.startswith("heavy JPEG compression") for r in quality.assess(pixels, cfg.quality).reasons)


def test_shared_images_are_not_heavy_jpeg(sample: list[np.ndarray], cfg: Settings) -> None:
    scores = [quality.blockiness(p) for p in sample]
    assert max(scores) < cfg.quality.blockiness_max, scores
    assert not any(jpeg_reason(p, cfg) for p in sample)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_nearest_neighbour_enlargements_are_not_heavy_jpeg(sample: list[np.ndarray], cfg: Settings,
                                                            k: int) -> None:
    limit = cfg.quality.blockiness_max
    for i, pixels in enumerate(sample):
        big = zoomed(pixels, k)
        assert quality.replication(quality.step_profiles(big))[0] == k
        assert quality.blockiness(big) < limit, (i, k, quality.blockiness(big))
        assert quality.blockiness(big[1:, 3:]) < limit  # cropped: the runs start anywhere
        # a mild JPEG after the enlargement (no exact runs any more) is still no block pattern
        assert quality.blockiness(resaved(big, 90)) < limit
    whole = enlarged(sample[0], k)  # the whole image enlarged, through the whole gate
    assert quality.blockiness(whole) < limit and not jpeg_reason(whole, cfg)


@pytest.mark.parametrize("jpeg_quality", [3, 5])
def test_heavy_recompression_is_still_caught(sample: list[np.ndarray], cfg: Settings,
                                             jpeg_quality: int) -> None:
    limit = cfg.quality.blockiness_max
    for i, pixels in enumerate(sample):
        blocky = resaved(pixels, jpeg_quality)
        assert quality.blockiness(blocky) > limit, (i, jpeg_quality)
        assert quality.blockiness(zoomed(blocky, 2)) > limit  # compressed, then enlarged
        assert quality.blockiness(resaved(zoomed(pixels, 2), jpeg_quality)) > limit  # the other way
    assert jpeg_reason(resaved(sample[0], jpeg_quality), cfg)


def test_replication_is_not_found_where_there_is_none(sample: list[np.ndarray]) -> None:
    assert quality.replication(quality.step_profiles(sample[0])) == (1, 0, 0)
    assert quality.replication(quality.step_profiles(resaved(sample[0], 3))) == (1, 0, 0)
    flat = np.full((64, 64), 0.5, np.float32)
    assert quality.replication(quality.step_profiles(flat)) == (1, 0, 0)
    assert quality.blockiness(flat) == 1.0


def test_tears_are_counted_where_rows_jump_sideways_and_nowhere_else(sample: list[np.ndarray],
                                                                       cfg: Settings) -> None:
    """Stage drift: bands of rows shifted sideways are the torn boundaries, and only they (an untouched
    real image has none); past `[quality] tear_rows_max` the image is refused as stage drift."""
    rng = np.random.default_rng(0)
    for pixels in sample[:8]:
        assert quality.tear_share(pixels) == 0.0
        torn = pixels.copy()
        h = len(torn)
        bands = range(h // 10, h - 60, h // 16)  # about 14 bands: 3 % of the boundaries torn
        for start in bands:
            torn[start:start + 30] = np.roll(torn[start:start + 30], int(rng.integers(5, 25)), axis=1)
        boundaries = 2 * len(bands) / (h - 1)  # each band: the boundary into it and out of it
        assert quality.tear_share(torn) == pytest.approx(boundaries, abs=1.5 / (h - 1))
        verdict = quality.assess(torn, cfg.quality)
        assert not verdict.ok and any("stage drift" in r for r in verdict.reasons), verdict.reasons
