"""Per-patch colour histograms on hand-made images whose answer is known."""

from __future__ import annotations

import numpy as np

from model.colour import CHROMATIC_BINS, COLOUR_DIM, colour_bins, colour_histograms


def image(colour: tuple[int, int, int], size: int = 32) -> np.ndarray:
    return np.broadcast_to(np.array(colour, dtype=np.uint8), (size, size, 3)).copy()


def test_background_counts_nowhere_and_a_solid_colour_fills_one_bin() -> None:
    white, red = image((255, 255, 255)), image((200, 20, 20))
    assert (colour_bins(white) == -1).all()
    assert np.unique(colour_bins(red)).size == 1
    histograms = colour_histograms(np.stack([white, red]), grid=2)  # (2, 4, COLOUR_DIM)
    assert histograms.shape == (2, 4, COLOUR_DIM) and histograms.dtype == np.float32
    assert (histograms[0] == 0).all()
    assert np.allclose(np.sort(histograms[1], axis=-1)[:, -1], 1.0)  # all of each patch in one bin
    assert np.count_nonzero(histograms[1]) == 4


def test_squared_histogram_sums_to_the_patch_share_of_garment() -> None:
    pixels = image((255, 255, 255))
    pixels[:, :4] = (30, 30, 30)  # a quarter of the left 16-pixel patches is dark grey garment
    histograms = colour_histograms(pixels[None], grid=2)[0]
    shares = (histograms**2).sum(-1)
    np.testing.assert_allclose(shares, [0.25, 0.0, 0.25, 0.0], atol=1e-6)
    assert histograms[0, :CHROMATIC_BINS].sum() == 0  # grey has no hue: it counts in the grey bins


def test_patches_follow_the_patch_grid_order() -> None:
    # Left half red, right half blue: patches 0 and 2 (left column) red, 1 and 3 blue.
    pixels = image((200, 20, 20))
    pixels[:, 16:] = (20, 20, 200)
    histograms = colour_histograms(pixels[None], grid=2)[0]
    red, blue = histograms[0].argmax(), histograms[1].argmax()
    assert red != blue
    assert histograms[:, red].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert histograms[:, blue].tolist() == [0.0, 1.0, 0.0, 1.0]


def test_colours_shoppers_name_apart_land_in_different_bins() -> None:
    colours = {
        "black": (15, 15, 15),
        "white garment": (225, 225, 225),
        "beige": (215, 190, 160),
        "red": (200, 20, 20),
        "dark blue": (20, 30, 90),
        "light blue": (150, 180, 225),
        "green": (30, 140, 50),
        "yellow": (230, 210, 40),
    }
    bins = {name: int(colour_bins(image(rgb, 4))[0, 0]) for name, rgb in colours.items()}
    assert len(set(bins.values())) == len(colours), bins
