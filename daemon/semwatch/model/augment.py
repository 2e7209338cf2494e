"""Training augmentation for what changes between sessions and instruments.

Applied to raw grey tiles in [0, 1] at the model's physical scale, before intensity
normalisation, so brightness/contrast/gamma changes act as they do on a real instrument
(including clipping at black and white).
"""

from __future__ import annotations

import cv2
import numpy as np


def intensity_jitter(tile: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Random brightness, contrast and gamma, clipped to [0, 1] like a detector would."""
    gamma = float(np.exp(rng.uniform(-0.5, 0.5) * strength))
    contrast = float(np.exp(rng.uniform(-0.5, 0.4) * strength))
    brightness = float(rng.uniform(-0.15, 0.15) * strength)
    out = np.clip(tile, 0.0, 1.0) ** gamma
    mean = float(out.mean())
    out = (out - mean) * contrast + mean + brightness
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def uneven_illumination(tile: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A smooth fall-off of brightness across the tile (vignetting, a tilted specimen, detector
    shadowing), down to 30-70 % at its far side: per-tile equalisation cannot undo it, and without
    it a vignetted 811_cycled image was read as 811_formation at 0.92."""
    h, w = tile.shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = rng.uniform(-0.5, 1.5) * h, rng.uniform(-0.5, 1.5) * w
    dist = ((y - cy) / h) ** 2 + ((x - cx) / w) ** 2
    field = 1.0 - float(rng.uniform(0.3, 0.7)) * dist / max(float(dist.max()), 1e-6)
    return np.clip(tile * field, 0.0, 1.0).astype(np.float32)


def augment_tile(tile: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Intensity jitter, uneven illumination, slight blur, noise, flips and 90° rotations of one
    square tile."""
    out = intensity_jitter(tile, rng)
    if rng.random() < 0.5:
        out = uneven_illumination(out, rng)
    if rng.random() < 0.5:
        sigma = float(rng.uniform(0.3, 1.2))
        out = cv2.GaussianBlur(out, (0, 0), sigmaX=sigma)
    if rng.random() < 0.5:
        out = out + rng.normal(0.0, rng.uniform(0.005, 0.04), out.shape).astype(np.float32)
        out = np.clip(out, 0.0, 1.0)
    return geometric(out, rng)


def geometric(tile: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random element of the dihedral group (flips and 90° rotations)."""
    out = np.rot90(tile, int(rng.integers(4)))
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out, dtype=np.float32)
