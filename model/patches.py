"""Product photo -> square pixel grid -> patches: the image side of FashionBERT before any network.

Pure numpy and Pillow. Photos are letterboxed, never cropped or stretched: a crop can cut off the
detail a description names (a collar, a hem) and a stretch changes the garment's shape.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageOps

RGB = tuple[int, int, int]
WHITE: RGB = (255, 255, 255)

# The usual torchvision ImageNet statistics, kept for backbones trained with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained in TensorFlow on (x - 127) / 128, i.e. pixels in [-1, 1]
# (efficientnet/lite/efficientnet_lite_builder.py: MEAN_RGB = [127.0] * 3, STDDEV_RGB = [128.0] * 3).
# The PyTorch port's weights are a conversion of those checkpoints, and its stem BatchNorm statistics
# agree: on product photos ImageNet statistics give the stem inputs 4x the variance the running
# statistics expect, these give 0.8x.
EFFICIENTNET_LITE_MEAN = (127.0 / 255.0,) * 3
EFFICIENTNET_LITE_STD = (128.0 / 255.0,) * 3

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}


def to_rgb(image: Image.Image, fill: RGB = WHITE) -> Image.Image:
    """Any Pillow mode -> upright 8-bit RGB; transparency is composited onto `fill`."""
    image = ImageOps.exif_transpose(image)  # phone photos (search queries) are often stored sideways
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float32)
        if image.mode in _SIXTEEN_BIT_MODES or values.max(initial=0.0) > 255.0:
            values = values / 257.0  # 16-bit range -> 8-bit
        elif image.mode == "F" and values.max(initial=0.0) <= 1.0:
            values = values * 255.0
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1))
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
    if has_alpha:
        background = Image.new("RGBA", image.size, (*fill, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def letterbox(image: Image.Image, size: int, fill: RGB = WHITE) -> np.ndarray:
    """Resize so the longest side is `size`, centre on a `fill` square: (size, size, 3) uint8."""
    image = to_rgb(image, fill)
    width, height = image.size
    scale = size / max(width, height)
    resized_size = (max(1, min(size, round(width * scale))), max(1, min(size, round(height * scale))))
    if resized_size != image.size:
        image = image.resize(resized_size, Image.Resampling.BICUBIC)  # antialiased when shrinking
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(image, ((size - resized_size[0]) // 2, (size - resized_size[1]) // 2))
    return np.array(canvas, dtype=np.uint8)


def to_patches(pixels: np.ndarray, grid: int) -> np.ndarray:
    """(..., S, S, C) -> (..., grid * grid, S // grid, S // grid, C); patch k is row k // grid, column k % grid."""
    height, width, channels = pixels.shape[-3:]
    assert height % grid == 0 and width % grid == 0, (
        f"grid {grid} must divide the image size {height}x{width}"
    )
    patch_h, patch_w = height // grid, width // grid
    lead = pixels.shape[:-3]
    x = pixels.reshape(*lead, grid, patch_h, grid, patch_w, channels)  # (..., row, y, col, x, C)
    x = np.swapaxes(x, -4, -3)  # (..., row, col, y, x, C)
    return np.ascontiguousarray(x.reshape(*lead, grid * grid, patch_h, patch_w, channels))


def normalize(
    pixels: np.ndarray,
    mean: tuple[float, float, float] = EFFICIENTNET_LITE_MEAN,
    std: tuple[float, float, float] = EFFICIENTNET_LITE_STD,
) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W), standardised with per-channel mean and std in [0, 1] units."""
    mean_255 = np.asarray(mean, dtype=np.float32) * 255.0
    scale = 1.0 / (np.asarray(std, dtype=np.float32) * 255.0)
    x = (pixels.astype(np.float32) - mean_255) * scale
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def pool_grid(patch_features: np.ndarray, pool: int) -> np.ndarray:
    """Average `pool` x `pool` neighbouring patches of square, row-major grids: (n, N, D) -> (n, N / pool^2, D),
    in the input's dtype. The numpy twin of `model.fashionbert.pool_patches`, for jobs that store the grid
    the encoder reads (index bundles) without importing torch."""
    if pool == 1:
        return patch_features
    n, count, dim = patch_features.shape
    grid = math.isqrt(count)
    assert grid * grid == count and grid % pool == 0, f"{count} patches do not pool {pool} x {pool}"
    cells = patch_features.reshape(n, grid // pool, pool, grid // pool, pool, dim)
    # Accumulate in float32 without a float32 copy of the whole grid (a chunk of features is 100s of MB).
    return cells.mean(axis=(2, 4), dtype=np.float32).reshape(n, -1, dim).astype(patch_features.dtype)
