"""Letterboxing, patch grids and normalisation against hand-made images."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from model.patches import IMAGENET_MEAN, IMAGENET_STD, letterbox, normalize, to_patches, to_rgb

RED, GREEN, BLUE, YELLOW, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 255, 255)


def _quadrants(size: int) -> Image.Image:
    """Top-left red, top-right green, bottom-left blue, bottom-right yellow."""
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    half = size // 2
    pixels[:half, :half], pixels[:half, half:] = RED, GREEN
    pixels[half:, :half], pixels[half:, half:] = BLUE, YELLOW
    return Image.fromarray(pixels)


def test_letterbox_is_square_uint8() -> None:
    pixels = letterbox(Image.new("RGB", (37, 91), RED), 64)
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8


def test_wide_image_gets_white_bands_top_and_bottom_and_keeps_its_aspect() -> None:
    # 80x40, left half blue, right half red -> 32x16 content centred in a 32x32 square.
    source = np.zeros((40, 80, 3), dtype=np.uint8)
    source[:, :40], source[:, 40:] = BLUE, RED
    pixels = letterbox(Image.fromarray(source), 32)

    assert (pixels[:8] == 255).all() and (pixels[24:] == 255).all(), "white bands above and below"
    content = pixels[8:24]
    assert content.shape == (16, 32, 3)
    # Not stretched: the blue/red boundary stays in the middle and the content fills the width.
    assert (content[2:-2, 2:14] == BLUE).all(axis=-1).all()
    assert (content[2:-2, 18:30] == RED).all(axis=-1).all()


def test_tall_image_gets_bands_left_and_right() -> None:
    pixels = letterbox(Image.new("RGB", (20, 40), GREEN), 32)
    assert (pixels[:, :8] == 255).all() and (pixels[:, 24:] == 255).all()
    assert (pixels[:, 8:24] == GREEN).all()


def test_small_image_is_enlarged_to_the_longest_side() -> None:
    pixels = letterbox(Image.new("RGB", (4, 8), BLUE), 32)
    assert (pixels[:, 8:24] == BLUE).all() and (pixels[:, :8] == 255).all()


def test_fill_colour_is_used_for_padding() -> None:
    pixels = letterbox(Image.new("RGB", (40, 20), RED), 20, fill=(0, 0, 0))
    assert (pixels[:5] == 0).all()


@pytest.mark.parametrize("grid", [1, 2, 4, 8])
def test_patches_have_grid_squared_row_major_tiles(grid: int) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    patches = to_patches(pixels, grid)
    side = 32 // grid
    assert patches.shape == (grid * grid, side, side, 3)
    for k in range(grid * grid):
        row, col = divmod(k, grid)
        np.testing.assert_array_equal(
            patches[k], pixels[row * side : (row + 1) * side, col * side : (col + 1) * side]
        )


def test_patch_order_on_coloured_quadrants() -> None:
    patches = to_patches(letterbox(_quadrants(64), 64), 2)
    colours = [tuple(int(c) for c in patch[8, 8]) for patch in patches]
    assert colours == [RED, GREEN, BLUE, YELLOW]


def test_patches_keep_leading_batch_dimensions() -> None:
    batch = np.stack([letterbox(_quadrants(16), 16)] * 3)
    assert to_patches(batch, 4).shape == (3, 16, 4, 4, 3)


def test_grid_must_divide_the_image_size() -> None:
    with pytest.raises(AssertionError, match="must divide"):
        to_patches(np.zeros((30, 30, 3), dtype=np.uint8), 8)


def test_rgba_transparency_is_composited_on_white() -> None:
    image = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    image.paste((255, 0, 0, 255), (0, 0, 5, 10))
    pixels = letterbox(image, 10)
    assert (pixels[:, :5] == RED).all() and (pixels[:, 5:] == WHITE).all()


def test_palette_image_with_transparency() -> None:
    image = Image.new("P", (10, 10), 0)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (0, 0, 10, 5))
    image.info["transparency"] = 0
    pixels = letterbox(image, 10)
    assert (pixels[:5] == BLUE).all() and (pixels[5:] == WHITE).all()


def test_palette_image_without_transparency() -> None:
    image = Image.new("RGB", (10, 10), GREEN).convert("P")
    assert (letterbox(image, 10) == GREEN).all()


def test_grayscale_is_replicated_to_three_channels() -> None:
    pixels = letterbox(Image.new("L", (10, 10), 77), 10)
    assert (pixels == 77).all()


def test_grayscale_with_alpha() -> None:
    image = Image.new("LA", (10, 10), (0, 0))
    assert (letterbox(image, 10) == 255).all()


def test_cmyk_is_converted() -> None:
    pixels = letterbox(Image.new("CMYK", (10, 10), (0, 255, 255, 0)), 10)  # pure red in CMYK
    np.testing.assert_allclose(pixels[5, 5], RED, atol=2)


def test_sixteen_bit_grayscale_is_scaled_to_eight_bits() -> None:
    def sixteen_bit(value: int) -> Image.Image:
        return Image.frombytes("I;16", (10, 10), np.full((10, 10), value, dtype="<u2").tobytes())

    assert (letterbox(sixteen_bit(65535), 10) == 255).all()
    assert (letterbox(sixteen_bit(32896), 10) == 128).all()


def test_exif_orientation_is_applied() -> None:
    # Stored 40x20 with "rotate 90" orientation: shown upright as 20x40.
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), RED).save(buffer, format="JPEG", exif=exif)
    image = Image.open(io.BytesIO(buffer.getvalue()))
    assert to_rgb(image).size == (20, 40)


def test_normalize_maps_to_channels_first_around_zero() -> None:
    pixels = np.stack([np.full((4, 4, 3), value, dtype=np.uint8) for value in (0, 127, 255)])
    x = normalize(pixels)
    assert x.shape == (3, 3, 4, 4) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0, 0, 0], [-127 / 128, 0.0, 1.0], atol=1e-6)  # EfficientNet-Lite: [-1, 1]


def test_normalize_with_imagenet_statistics() -> None:
    x = normalize(np.full((2, 2, 3), 255, dtype=np.uint8), IMAGENET_MEAN, IMAGENET_STD)
    expected = (1.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(x[:, 0, 0], expected, rtol=1e-6)
