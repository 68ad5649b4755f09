"""Augmented views of a photo: what each one is, and that it is the same picture every time."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from model.views import CROP_FRACTION, VIEWS, view_image

KEY = "ab" * 32  # a sha256 hex digest's shape


def _photo() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (80, 60, 3), dtype=np.uint8)  # 60 wide, 80 high
    return Image.fromarray(pixels)


def test_flip_mirrors_left_and_right() -> None:
    photo = _photo()
    np.testing.assert_array_equal(np.asarray(view_image(photo, "flip", KEY)), np.asarray(photo)[:, ::-1])


def test_crop_keeps_a_fixed_share_of_each_side_in_a_place_the_key_decides() -> None:
    photo, pixels = _photo(), np.asarray(_photo())
    crop = np.asarray(view_image(photo, "crop", KEY))
    assert crop.shape == (round(80 * CROP_FRACTION), round(60 * CROP_FRACTION), 3)
    # The crop is a window of the photo: find where it sits.
    places = [
        (top, left)
        for top in range(80 - crop.shape[0] + 1)
        for left in range(60 - crop.shape[1] + 1)
        if np.array_equal(pixels[top : top + crop.shape[0], left : left + crop.shape[1]], crop)
    ]
    assert len(places) == 1
    np.testing.assert_array_equal(np.asarray(view_image(photo, "crop", KEY)), crop)  # same key, same picture
    others = {
        tuple(np.asarray(view_image(photo, "crop", f"{k:016x}" + "0" * 48)).ravel()[:64]) for k in range(8)
    }
    assert len(others) > 1, "other photos' crops sit elsewhere"


def test_flipcrop_is_a_crop_of_the_mirrored_photo() -> None:
    photo = _photo()
    mirrored = view_image(photo, "flip", KEY)
    np.testing.assert_array_equal(
        np.asarray(view_image(photo, "flipcrop", KEY)), np.asarray(view_image(mirrored, "crop", KEY))
    )


def test_an_unknown_view_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown view 'blur'; known: " + ", ".join(VIEWS)):
        view_image(_photo(), "blur", KEY)
