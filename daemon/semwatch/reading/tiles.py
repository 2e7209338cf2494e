"""Physical-scale tiling: resample a micrograph to the model's pixel size, cut a grid of tiles.

Pure numpy/OpenCV on arrays (no torch), so reader threads can run it while the network runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from semwatch.values import Metadata

# ImageNet statistics of the pretrained backbone; the grey tile is repeated on its 3 channels.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Scale:
    """How much to resize an image so its pixels match the model's reference pixel size."""

    factor: float  # new size = old size * factor
    basis: str  # "pixel_size", "magnification" or "none"


def scale_for(metadata: Metadata, ref_pixel_nm: float | None, ref_magnification: float | None) -> Scale:
    """Pixel sizes when both are known, else the ratio of magnifications, else as is."""
    if metadata.pixel_size_nm and ref_pixel_nm and metadata.pixel_size_nm > 0 and ref_pixel_nm > 0:
        return Scale(metadata.pixel_size_nm / ref_pixel_nm, "pixel_size")
    if metadata.magnification and ref_magnification and metadata.magnification > 0 and ref_magnification > 0:
        # Higher magnification = smaller pixels = shrink the image to reach the reference scale.
        return Scale(ref_magnification / metadata.magnification, "magnification")
    return Scale(1.0, "none")


def resample(pixels: np.ndarray, factor: float) -> np.ndarray:
    """Resize by `factor` (area interpolation when shrinking, so no aliasing)."""
    if abs(factor - 1.0) < 1e-3:
        return pixels
    h, w = pixels.shape
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    interp = cv2.INTER_AREA if factor < 1.0 else cv2.INTER_LINEAR
    return np.asarray(cv2.resize(pixels, size, interpolation=interp), dtype=np.float32)


def normalise_intensity(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Grey levels to [0, 1] in a way that does not depend on the session's brightness/contrast.

    "equalize": mid-rank of each pixel's grey level (16-bit quantised) in the tile — invariant
    to any monotonic grey-level change (brightness, contrast, gamma) up to clipping.
    """
    if mode == "none":
        return pixels
    if mode == "standardize":
        std = float(pixels.std())
        return np.clip((pixels - float(pixels.mean())) / max(std, 1e-6) * 0.2 + 0.5, 0.0, 1.0).astype(
            np.float32
        )
    return _equalize(pixels)


def grid_positions(
    height: int, width: int, size: int, overlap: float, max_tiles: int
) -> list[tuple[int, int]]:
    """Top-left corners of a grid of `size` tiles overlapping by `overlap`, covering the image.

    Tiles are spread evenly so the last row/column ends at the border; at most `max_tiles`,
    evenly subsampled.
    """
    if height < size or width < size:
        return []
    stride = max(1, int(size * (1.0 - overlap)))

    def axis(n: int) -> list[int]:
        count = max(1, math.ceil((n - size) / stride) + 1)
        if count == 1:
            return [(n - size) // 2]
        return [round(i * (n - size) / (count - 1)) for i in range(count)]

    cells = [(y, x) for y in axis(height) for x in axis(width)]
    if len(cells) > max_tiles:
        keep = np.linspace(0, len(cells) - 1, max_tiles).round().astype(int)
        cells = [cells[i] for i in keep]
    return cells


def tile_usable(tile: np.ndarray, std_min: float, saturated_max: float) -> bool:
    """False for blank (flat) or mostly saturated tiles (raw grey levels in [0, 1])."""
    if float(tile.std()) < std_min:
        return False
    saturated = float(np.mean((tile <= 1.0 / 255.0) | (tile >= 254.0 / 255.0)))
    return saturated <= saturated_max


def fit(tile: np.ndarray, out_px: int) -> np.ndarray:
    """A square tile resized to out_px (area interpolation)."""
    if tile.shape[0] == out_px and tile.shape[1] == out_px:
        return tile
    return np.asarray(cv2.resize(tile, (out_px, out_px), interpolation=cv2.INTER_AREA), np.float32)


def _equalize(tile: np.ndarray) -> np.ndarray:
    """Mid-rank in [0, 1] of each pixel's 16-bit quantised grey level within the tile (float32)."""
    q = (np.clip(tile, 0.0, 1.0) * 65535.0 + 0.5).astype(np.uint16)
    hist = np.bincount(q.ravel(), minlength=65536)
    cdf = np.cumsum(hist)  # integers: a float64 cumsum over 65536 levels costs 8x more
    lut = ((2 * cdf - hist) * (0.5 / max(q.size, 1))).astype(np.float32)
    return np.take(lut, q)


def to_network(tiles: list[np.ndarray], out_px: int, intensity: str) -> np.ndarray:
    """Grey tiles in [0, 1] → (N, 3, out_px, out_px) float32: resize, normalise intensity per tile
    (the same in training and inference), ImageNet mean/std on 3 identical channels."""
    out = np.empty((len(tiles), 3, out_px, out_px), np.float32)
    for i, tile in enumerate(tiles):
        # Resize first (fewer pixels to rank); area averaging commutes with brightness and
        # contrast changes, so only gamma is approximately rather than exactly undone.
        grey = normalise_intensity(fit(tile, out_px), intensity)
        for c in range(3):
            np.subtract(grey, np.float32(IMAGENET_MEAN[c]), out=out[i, c])
            out[i, c] *= np.float32(1.0 / IMAGENET_STD[c])
    return out


@dataclass(frozen=True)
class TileSet:
    tiles: np.ndarray  # (N, 3, tile_px, tile_px) float32, network-ready
    positions: list[tuple[int, int]]  # top-left corners in the image resampled to the network's scale
    n_candidates: int  # grid cells before blank/saturated tiles were skipped
    resampled_shape: tuple[int, int]  # that image's shape; its tiles are tile_px square


def cut_tiles(
    pixels: np.ndarray,
    *,
    factor: float,
    tile_physical_px: int,
    tile_px: int,
    overlap: float,
    max_tiles: int,
    std_min: float,
    saturated_max: float,
    intensity: str,
) -> TileSet:
    """Resample, choose grid tiles, skip unusable ones (judged on raw grey levels), normalise each.

    The image is resized once, straight to the network's scale (a `tile_physical_px` tile at the
    model's reference scale becomes `tile_px`): one area resize of the whole image costs half of one
    per tile. Training crops tiles at the reference scale and fits each (tiles.fit); both are area
    averages of the same pixels, so they differ only by sub-pixel placement.
    """
    image = resample(pixels.astype(np.float32, copy=False), factor * tile_px / tile_physical_px)
    positions = grid_positions(image.shape[0], image.shape[1], tile_px, overlap, max_tiles)
    keep: list[tuple[int, int]] = []
    small: list[np.ndarray] = []
    for y, x in positions:
        tile = image[y : y + tile_px, x : x + tile_px]
        if tile_usable(tile, std_min, saturated_max):  # judged at network resolution, raw grey levels
            keep.append((y, x))
            small.append(tile)
    tiles = to_network(small, tile_px, intensity)
    return TileSet(tiles, keep, len(positions), (image.shape[0], image.shape[1]))
