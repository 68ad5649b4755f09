"""Per-patch colour histograms: what an ImageNet CNN's last features keep poorly, and shoppers type first.

An ImageNet classifier learns to recognise a shirt whatever its colour, so its final features say little
about "beige" versus "black"; yet half the recall towers' top-1 mistakes on H&M were the wrong colour,
and these histograms add about 5 points of gallery R@1 (benchmarks/RESULTS.md, "Colour histograms"). Each patch gets an HSV
histogram of its garment pixels: hue x saturation x value bins for coloured pixels, value bins for greys
(white, grey, black), counted as a share of the patch's pixels (so the histogram's sum is how much of the
patch is garment) and square-rooted (the Hellinger map: a dot product of two such vectors is the
Bhattacharyya similarity of the histograms, and averaging over patches stays meaningful).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from model.patches import to_patches

HUES, SATURATIONS, VALUES, GREYS = 15, 4, 4, 16
CHROMATIC_BINS = HUES * SATURATIONS * VALUES
COLOUR_DIM = CHROMATIC_BINS + GREYS  # 256: the patch feature stays a multiple of 64 wide (faiss PQ64)
# Letterbox padding and studio backgrounds are near-white: not the garment's colour.
BACKGROUND_MIN = 235  # a pixel whose darkest channel is at least this is background
GREY_SATURATION = 40  # below this saturation (0-255) a pixel's hue is noise: it counts as a grey


def colour_bins(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB (S, S, 3) -> each pixel's histogram bin (S, S) int, -1 for background."""
    hsv = np.asarray(Image.fromarray(pixels).convert("HSV"), dtype=np.int32)
    hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    chromatic = ((hue * HUES >> 8) * SATURATIONS + (saturation * SATURATIONS >> 8)) * VALUES + (
        value * VALUES >> 8
    )
    grey = CHROMATIC_BINS + (value * GREYS >> 8)
    bins = np.where(saturation >= GREY_SATURATION, chromatic, grey)
    return np.where(pixels.min(-1) < BACKGROUND_MIN, bins, -1)


def colour_histograms(pixels: np.ndarray, grid: int) -> np.ndarray:
    """Letterboxed uint8 (B, S, S, 3) -> (B, grid * grid, COLOUR_DIM) float32 square-rooted histograms,
    patches in the row-major order of `to_patches` (the patch network's)."""
    out = np.zeros((len(pixels), grid * grid, COLOUR_DIM), dtype=np.float32)
    for image, histograms in zip(pixels, out, strict=True):
        bins = to_patches(colour_bins(image)[..., None], grid).reshape(grid * grid, -1)  # (N, pixels)
        flat = (bins + np.arange(grid * grid)[:, None] * COLOUR_DIM)[bins >= 0]  # (garment pixels,)
        counts = np.bincount(flat, minlength=grid * grid * COLOUR_DIM).reshape(grid * grid, COLOUR_DIM)
        histograms[:] = np.sqrt(counts / bins.shape[1])
    return out
