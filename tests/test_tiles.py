"""Physical-scale tiling on arrays: scale choice, grid coverage, skipping, intensity invariance."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from semwatch.config import Settings
from semwatch.model.augment import augment_tile, intensity_jitter, uneven_illumination
from semwatch.reading.micrograph import read_micrograph
from semwatch.reading.tiles import (
    cut_tiles,
    grid_positions,
    normalise_intensity,
    resample,
    scale_for,
    tile_usable,
    to_network,
)
from semwatch.values import Metadata


def texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((h, w), dtype=np.float32) * 0.8 + 0.1


def test_scale_prefers_pixel_size_then_magnification_then_none() -> None:
    both = Metadata(pixel_size_nm=200.0, magnification=1000.0)
    assert scale_for(both, 100.0, 500.0).factor == pytest.approx(2.0)
    assert scale_for(both, 100.0, 500.0).basis == "pixel_size"
    mag_only = Metadata(magnification=1000.0)
    assert scale_for(mag_only, 100.0, 500.0).factor == pytest.approx(0.5)
    assert scale_for(mag_only, 100.0, 500.0).basis == "magnification"
    assert scale_for(Metadata(), 100.0, 500.0).factor == 1.0
    assert scale_for(Metadata(pixel_size_nm=50.0), None, None).basis == "none"


def test_resample_changes_size_by_factor() -> None:
    img = texture(100, 200)
    assert resample(img, 0.5).shape == (50, 100)
    assert resample(img, 2.0).shape == (200, 400)
    assert resample(img, 1.0) is img


def test_grid_covers_the_image_edge_to_edge() -> None:
    cells = grid_positions(895, 1280, 448, 0.25, 48)
    ys = sorted({y for y, _ in cells})
    xs = sorted({x for _, x in cells})
    assert ys[0] == 0 and ys[-1] == 895 - 448
    assert xs[0] == 0 and xs[-1] == 1280 - 448
    assert max(b - a for a, b in itertools.pairwise(xs)) <= 448 * 0.75 + 1
    assert len(cells) == len(ys) * len(xs) == 12


def test_grid_limits_and_small_images() -> None:
    assert len(grid_positions(4000, 4000, 448, 0.25, 10)) == 10
    assert grid_positions(100, 1000, 448, 0.25, 48) == []
    assert grid_positions(448, 448, 448, 0.25, 48) == [(0, 0)]


def test_blank_and_saturated_tiles_are_unusable() -> None:
    assert not tile_usable(np.full((64, 64), 0.5, np.float32), 0.02, 0.3)
    white = texture(64, 64)
    white[:40] = 1.0
    assert not tile_usable(white, 0.02, 0.3)
    assert tile_usable(texture(64, 64), 0.02, 0.3)


def test_cut_tiles_skips_blank_area_and_returns_network_input() -> None:
    img = texture(600, 1200)
    img[:, :600] = 0.5  # left half blank
    ts = cut_tiles(
        img,
        factor=1.0,
        tile_physical_px=300,
        tile_px=64,
        overlap=0.0,
        max_tiles=48,
        std_min=0.02,
        saturated_max=0.3,
        intensity="equalize",
    )
    assert ts.n_candidates == 8 and ts.resampled_shape == (128, 256)  # resized 64/300 in one step
    assert len(ts.positions) == 4 and all(x >= 128 for _, x in ts.positions)
    assert ts.tiles.shape == (4, 3, 64, 64) and ts.tiles.dtype == np.float32


def test_equalisation_ignores_brightness_contrast_gamma() -> None:
    img = texture(128, 128)
    base = normalise_intensity(img, "equalize")
    changed = normalise_intensity(np.clip((img**1.6) * 0.5 + 0.2, 0, 1), "equalize")
    assert np.abs(base - changed).max() < 1e-3
    assert float(base.min()) >= 0.0 and float(base.max()) <= 1.0


def test_network_input_unchanged_by_session_grey_levels() -> None:
    import cv2

    img = cv2.GaussianBlur(texture(448, 448, seed=3), (0, 0), 2.0)
    img = (img - img.min()) / (img.max() - img.min()) * 0.8 + 0.1
    a = to_network([img], 224, "equalize")
    linear = to_network([img * 0.6 + 0.3], 224, "equalize")  # brightness + contrast: exact
    assert np.abs(a - linear).mean() < 0.01
    gamma = to_network([np.clip(img * 0.6 + 0.3, 0, 1) ** 0.7], 224, "equalize")  # gamma: close
    assert np.abs(a - gamma).mean() < 0.05


def test_augmentation_keeps_shape_and_range() -> None:
    rng = np.random.default_rng(0)
    tile = texture(96, 96)
    for _ in range(20):
        out = augment_tile(tile, rng)
        assert out.shape == tile.shape and out.dtype == np.float32
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    jittered = intensity_jitter(tile, rng)
    assert not np.allclose(jittered, tile)


def test_uneven_illumination_darkens_one_side_smoothly() -> None:
    rng = np.random.default_rng(1)
    flat = np.full((96, 96), 0.8, np.float32)
    for _ in range(10):
        lit = uneven_illumination(flat, rng)
        ratio = lit / flat
        assert 0.3 - 1e-5 <= float(ratio.min()) <= 0.7 + 1e-5 and float(ratio.max()) <= 1.0
        assert float(np.abs(np.diff(ratio, axis=0)).max()) < 0.05  # a fall-off, not an edge


def test_dark_real_micrograph_keeps_its_tiles(ncm_dir: Path, settings: Settings) -> None:
    """A real 811 image with about half its pixels clipped to black is still specimen: the default
    tile limits keep most of its grid (a 0.3 limit once rejected the whole image)."""
    image = read_micrograph(ncm_dir / "811" / "ETRI_ 20 kV_SE_HighVac_x500 __190.jpg", settings)
    assert float(np.mean(image.pixels <= 1 / 255)) > 0.4
    t = settings.tiling
    ts = cut_tiles(image.pixels, factor=1.0, tile_physical_px=t.tile_physical_px, tile_px=t.tile_px,
                   overlap=t.overlap, max_tiles=t.max_tiles, std_min=t.tile_std_min,
                   saturated_max=t.tile_saturated_max, intensity=t.intensity)
    assert ts.n_candidates >= 6 and len(ts.positions) == ts.n_candidates
