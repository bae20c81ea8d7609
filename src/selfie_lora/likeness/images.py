"""Probe image statistics (blank, saturated, broken, sharpness) and images for face analysis."""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
from PIL import Image

from selfie_lora.domain.likeness import ImageSanity

logger = logging.getLogger(__name__)

# Faces are looked for at most at this size: dlib's HOG detector finds faces of 80 px and more,
# which a portrait at 512 px has, and detection cost grows with the pixel count.
ANALYSIS_MAX_SIDE = 512
# Sharpness is measured at one size, so images of different sizes compare.
SANITY_SIDE = 256
# Luminance standard deviation under which an image is one flat colour.
BLANK_STD = 2.0
# Share of channel values clipped to 0 or 255 over which an image is saturated.
SATURATED_SHARE = 0.5


def decode_rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


def analysis_array(data: bytes, *, max_side: int = ANALYSIS_MAX_SIDE) -> Any:
    """An RGB uint8 array (height x width x 3) for the face analyzer, scaled down (never up) to
    ``max_side``."""
    rgb = decode_rgb(data)
    rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8)


def laplacian_variance(gray: Any) -> float:
    """Variance of the 4-neighbour Laplacian: low for blurred or flat images."""
    g = np.asarray(gray, dtype=np.float64)
    if g.shape[0] < 3 or g.shape[1] < 3:
        return 0.0
    lap = (g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4.0 * g[1:-1, 1:-1])
    return float(lap.var())


def image_sanity(data: bytes) -> ImageSanity:
    """Statistics of one generated image. ``nan`` covers what a generator's non-finite output
    becomes: an image that does not decode, or one that is entirely 0 (diffusers casts NaN to 0)."""
    try:
        rgb = decode_rgb(data)
    except Exception as exc:  # any decoder failure is a broken image, not a crash
        logger.info("a probe image does not decode: %r", exc)
        return ImageSanity(mean=0.0, std=0.0, saturated_share=0.0, sharpness=0.0, blank=True,
                           saturated=False, nan=True)
    pixels = np.asarray(rgb, dtype=np.uint8)
    clipped = float(np.mean((pixels == 0) | (pixels == 255)))
    small = rgb.copy()
    small.thumbnail((SANITY_SIDE, SANITY_SIDE), Image.Resampling.BILINEAR)
    gray = np.asarray(small.convert("L"), dtype=np.float64)
    luminance = np.asarray(rgb.convert("L"), dtype=np.float64)
    std = float(luminance.std())
    return ImageSanity(
        mean=round(float(luminance.mean()), 3), std=round(std, 3),
        saturated_share=round(clipped, 4), sharpness=round(laplacian_variance(gray), 3),
        blank=std < BLANK_STD, saturated=clipped > SATURATED_SHARE,
        nan=bool(pixels.max() == 0),
    )


def png_text(png: bytes, key: str) -> str | None:
    """The text chunk ``key`` of a PNG (the chart's and the grid's record of what they were
    drawn from): None for a PNG without it, or one that cannot be read. Opening reads the text
    chunks before the image data, without decoding the image."""
    try:
        with Image.open(io.BytesIO(png), formats=("PNG",)) as image:
            value = image.info.get(key)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return value if isinstance(value, str) else None
