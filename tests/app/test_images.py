"""Upload decoding: every mode a phone or a web page produces turns into RGB, every bad file into a 4xx."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from app.errors import ApiError
from app.images import decode_image

LIMIT = 1_000_000


def encode(image: Image.Image, fmt: str = "PNG", **save: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("rgb jpeg", encode(Image.new("RGB", (40, 30), (200, 10, 10)), "JPEG")),
        ("cmyk jpeg", encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG")),
        ("16-bit gray", encode(Image.fromarray(np.full((30, 40), 60000, np.uint16)))),
        ("palette", encode(Image.new("P", (40, 30)))),
        ("1-bit", encode(Image.new("1", (40, 30)))),
        ("gray + alpha", encode(Image.new("LA", (40, 30)))),
        ("webp", encode(Image.new("RGB", (40, 30)), "WEBP")),
        (
            "float tiff",
            encode(Image.fromarray(np.random.default_rng(0).random((30, 40)).astype(np.float32)), "TIFF"),
        ),
        ("bmp", encode(Image.new("RGB", (40, 30)), "BMP")),
    ],
)
def test_modes_become_rgb(name: str, data: bytes) -> None:
    image = decode_image(data, LIMIT)
    assert image.mode == "RGB" and image.size == (40, 30), name


def test_transparent_pixels_become_white() -> None:
    image = decode_image(encode(Image.new("RGBA", (4, 4), (255, 0, 0, 0))), LIMIT)
    assert image.getpixel((0, 0)) == (255, 255, 255)


def test_animations_are_searched_by_their_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(data, LIMIT).getpixel((0, 0))[0] > 200  # red, the first frame


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"GIF89a but not really", 415, "not_an_image"),
        (b"plain text, not an image", 415, "not_an_image"),
        (encode(Image.new("RGB", (8, 8)), "PDF"), 415, "not_an_image"),
        (encode(Image.new("RGB", (200, 200)), "JPEG")[:200], 422, "corrupt_image"),
        (encode(Image.new("1", (2000, 1000))), 413, "image_too_large"),  # 2 Mpx > LIMIT
        (encode(Image.new("1", (20000, 20000))), 413, "image_too_large"),  # past Pillow's own bomb check
    ],
)
def test_bad_files_are_refused(data: bytes, status: int, code: str) -> None:
    with pytest.raises(ApiError) as raised:
        decode_image(data, LIMIT)
    assert (raised.value.status_code, raised.value.code) == (status, code)


def test_pixels_are_checked_before_decoding() -> None:
    # 20000x20000 in a few hundred KB: refused from the header, in far less time than decoding would take.
    data = encode(Image.new("1", (20000, 20000)))
    assert len(data) < 1_000_000
    with pytest.raises(ApiError):
        decode_image(data, 10**12)  # even with our limit off, Pillow's bomb check turns into a 413
