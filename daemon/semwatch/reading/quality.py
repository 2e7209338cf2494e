"""Image quality: focus, saturation, dynamic range, blank — cheap checks before classification.

All measures are computed on the specimen area (data bar removed), grey in [0, 1]:
- focus: the share of the image's total variation (sum of neighbour differences) that a Gaussian
  blur of 1 px removes. Detail at the pixel scale (edges, texture, even noise) is removed, while
  smooth ramps — all a defocused image has left — keep their variation. It does not depend on
  brightness or contrast, and unlike the variance of the Laplacian it is not fooled by the
  staircase that 8-bit quantisation makes of a blurred, low-contrast image.
- saturated_fraction: pixels at the black or white limit of the file's range.
- dynamic_range: 1st to 99th percentile of grey levels.
"""

from __future__ import annotations

import cv2
import numpy as np

from semwatch.config import QualitySettings
from semwatch.values import Quality

# Grey levels within this distance of 0 or 1 count as saturated (< half an 8-bit step).
SATURATION_EPS = 0.5 / 255
# Deviation, percentiles and saturation are computed on a strided subsample of about this many
# pixels (25 000 samples put the 1st/99th percentiles and fractions within a few tenths of a percent
# and cost a fifth of 100 000); focus needs neighbouring pixels, so it uses all of them.
STAT_PIXELS = 25_000


def _subsample(pixels: np.ndarray) -> np.ndarray:
    step = max(1, int(np.sqrt(pixels.size / STAT_PIXELS)))
    return pixels[::step, ::step]


def _total_variation(img: np.ndarray) -> float:
    """Mean absolute difference between vertical plus horizontal neighbours."""
    vertical = cv2.mean(cv2.absdiff(img[1:], img[:-1]))[0]
    horizontal = cv2.mean(cv2.absdiff(img[:, 1:], img[:, :-1]))[0]
    return float(vertical + horizontal)


def assess(pixels: np.ndarray, settings: QualitySettings) -> Quality:
    """Measure `pixels` (2-D float32 in [0, 1]) and judge them against `settings`."""
    if pixels.ndim != 2 or pixels.size == 0 or min(pixels.shape) < 3:
        return Quality(0.0, 0.0, 0.0, False, ("image too small",))
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    sample = _subsample(pixels).ravel()
    std = float(sample.std())
    saturated = float(np.count_nonzero((sample <= SATURATION_EPS) | (sample >= 1.0 - SATURATION_EPS)))
    saturated /= sample.size
    k_lo, k_hi = int(0.01 * (sample.size - 1)), int(0.99 * (sample.size - 1))
    part = np.partition(sample, (k_lo, k_hi))
    dynamic_range = float(part[k_hi] - part[k_lo])
    variation = _total_variation(pixels)
    if variation > 0:
        focus = max(0.0, 1.0 - _total_variation(cv2.GaussianBlur(pixels, (5, 5), 1.0)) / variation)
    else:
        focus = 0.0
    reasons: list[str] = []
    if std < settings.blank_std_min:
        reasons.append(f"blank image (grey-level std {std:.4f} < {settings.blank_std_min})")
    else:
        if focus < settings.focus_min:
            reasons.append(f"out of focus (focus {focus:.4f} < {settings.focus_min})")
        if dynamic_range < settings.dynamic_range_min:
            reasons.append(f"low dynamic range ({dynamic_range:.3f} < {settings.dynamic_range_min})")
    if saturated > settings.saturated_max:
        reasons.append(f"saturated ({saturated:.1%} of pixels at black/white > {settings.saturated_max:.1%})")
    return Quality(
        focus=round(focus, 6),
        saturated_fraction=round(saturated, 6),
        dynamic_range=round(dynamic_range, 6),
        ok=not reasons,
        reasons=tuple(reasons),
    )
