"""Detecting the instrument's data bar (text, scale bar) at the bottom of a micrograph.

Data bars are drawn, not imaged: their rows are almost only black and white pixels, and the bar starts
with a solid row (a frame line or the bar's flat background) right below specimen rows, which have
few saturated pixels. The detector looks for the highest such boundary in the bottom part of the
image and accepts it only when the whole band below it is mostly black/white, so images without a
bar keep all their rows.
"""

from __future__ import annotations

import numpy as np

# The bar is searched in the bottom fraction of the image, and must be this many rows at least.
MAX_FRACTION = 0.3
MIN_ROWS = 4
# A pixel is "extreme" within this distance of black or white (grey scaled to [0, 1]).
EXTREME = 0.03
# A row is "solid" when this fraction of its pixels lies within FLAT_TOL of the row's median.
SOLID = 0.9
FLAT_TOL = 0.02
# The band below the boundary must be at least this fraction extreme pixels ...
BAND_EXTREME = 0.7
# ... and exceed that of the specimen rows just above it by this much (dark specimens have many
# near-black pixels too; a drawn bar has more).
MARGIN = 0.25
ABOVE_ROWS = 16


def detect_databar(grey: np.ndarray) -> int:
    """Rows of data bar at the bottom of `grey` (float in [0, 1], 2-D); 0 when there is none."""
    height = grey.shape[0]
    top = height - int(height * MAX_FRACTION)
    if height < 4 * MIN_ROWS or top < ABOVE_ROWS:
        return 0
    region = grey[top - ABOVE_ROWS :]
    # Subsample columns: the statistics are fractions over a row, 1 of 2 columns is plenty.
    sample = region[:, ::2] if region.shape[1] >= 64 else region
    extreme = (sample <= EXTREME) | (sample >= 1.0 - EXTREME)
    ext_frac = extreme.mean(axis=1)
    # Mean extreme fraction of the band from each row to the bottom (suffix means).
    suffix = np.cumsum(ext_frac[::-1])[::-1] / np.arange(len(ext_frac), 0, -1)

    def solid(row: int) -> bool:  # computed only for candidate rows: medians are the costly part
        values = sample[row]
        return float((np.abs(values - np.median(values)) <= FLAT_TOL).mean()) >= SOLID

    for i in range(ABOVE_ROWS, len(ext_frac) - MIN_ROWS + 1):
        if suffix[i] < BAND_EXTREME or float(ext_frac[i - ABOVE_ROWS : i].mean()) > suffix[i] - MARGIN:
            continue
        if solid(i) and not solid(i - 1):
            return len(ext_frac) - i
    return 0
