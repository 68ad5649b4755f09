"""Uploaded query images: bytes -> an upright RGB picture, with every bad file a clear 4xx.

The pixel count is checked from the header before any pixel is decoded, so a small file that would
inflate to gigabytes (a decompression bomb) costs nothing.
"""

from __future__ import annotations

import io
import warnings

from fastapi import UploadFile
from PIL import Image, UnidentifiedImageError

from app.errors import ApiError
from model.patches import to_rgb

# Formats a product photo arrives in; the other Pillow decoders are attack surface with no use here.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


async def read_upload(file: UploadFile, max_bytes: int) -> bytes:
    """The uploaded file's bytes, reading at most one byte past the limit."""
    data = await file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ApiError(413, "image_too_large", f"the image file exceeds the limit of {max_bytes} bytes")
    if not data:
        raise ApiError(422, "empty_file", "the uploaded file is empty")
    return data


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Encoded bytes -> RGB image (first frame of an animation, alpha composited onto white)."""
    with warnings.catch_warnings():
        # Pillow warns, rather than fails, between MAX_IMAGE_PIXELS and twice that: refuse those too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise _too_many_pixels(max_pixels) from error
        except UnidentifiedImageError as error:
            raise ApiError(
                415,
                "not_an_image",
                f"the file is not an image in a supported format ({', '.join(ALLOWED_FORMATS)})",
            ) from error
        except (OSError, SyntaxError, ValueError) as error:
            raise _corrupt(error) from error

        width, height = image.size
        if width < 1 or height < 1:
            raise ApiError(422, "corrupt_image", "the image has no pixels")
        if width * height > max_pixels:
            raise _too_many_pixels(max_pixels, f" ({width}x{height})")
        try:
            image.seek(0)  # an animation (GIF, WebP, multi-page TIFF) is searched by its first frame
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise _too_many_pixels(max_pixels) from error
        except (OSError, SyntaxError, ValueError, EOFError, IndexError) as error:
            raise _corrupt(error) from error

    try:
        return to_rgb(image)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ApiError(
            415,
            "unsupported_image_mode",
            f"cannot convert a {image.format} image in mode {image.mode} to RGB",
        ) from error


def _too_many_pixels(max_pixels: int, size: str = "") -> ApiError:
    return ApiError(413, "image_too_large", f"the image has more than {max_pixels} pixels{size}")


def _corrupt(error: BaseException) -> ApiError:
    return ApiError(422, "corrupt_image", f"the image file is corrupt or truncated: {error}")
