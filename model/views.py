"""Other looks at a product photo (mirrored, cropped): more than one image per train item for the image tower.

`fit-image-tower` fits its towers to 8,908 train pairs, and each over-fits them (train loss about 0.2):
an ensemble of 8 fitted apart gained 3 points (benchmarks/RESULTS.md, "Image tower ensemble"). Reading each item also
mirrored and cropped raised every R@1 of the recipe's model a little more, by 0.2-2.2 points (benchmarks/RESULTS.md,
"Augmented views"). A view is
a transform of the photo before the patch network, so it needs a feature pass of its own (cached like the
plain one, `FeatureCache(..., view=...)`); only the fit reads views, serving never does. Transforms that
change colour are left out on purpose: the colour histograms carry what the towers know of colour.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

VIEWS = ("flip", "crop", "flipcrop")
CROP_FRACTION = 0.85  # of each side: the garment stays in the picture


def view_image(image: Image.Image, view: str, key: str) -> Image.Image:
    """`image` seen through `view`. `key` (the image's content hash) seeds the crop's place, so a view is
    the same picture every time it is computed: its cached features never depend on the run."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; known: {', '.join(VIEWS)}")
    if view.startswith("flip"):
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if view.endswith("crop"):
        rng = np.random.default_rng(int(key[:16], 16))
        width, height = image.size
        crop_width, crop_height = max(1, round(width * CROP_FRACTION)), max(1, round(height * CROP_FRACTION))
        left = int(rng.integers(0, width - crop_width + 1))
        top = int(rng.integers(0, height - crop_height + 1))
        image = image.crop((left, top, left + crop_width, top + crop_height))
    return image
