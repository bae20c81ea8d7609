"""Aspect-ratio buckets: the few image sizes a recipe with ``aspect_buckets`` trains at.

A square crop throws away the top and bottom of every portrait photo (a selfie's shoulders, the
hair) or squeezes the face toward an edge to keep them. Trainers of FLUX LoRAs (ai-toolkit,
SimpleTuner, kohya) instead train each photo at the size of a fixed set whose aspect is nearest
its own, at about the same pixel count, so every step costs about the same. Ours:

* 1:1, 4:5 and 5:4 (Instagram's portrait and landscape), 3:4 and 4:3 (a phone camera's sensor),
  2:3 and 3:2 (35 mm and most phones' portrait crops): the shapes selfies come in. Nothing
  wider than 3:2: a 9:16 screen-shaped photo of a person is mostly background or body, and its
  nearest bucket (2:3) keeps the face larger in the frame.
* each at about ``resolution**2`` pixels, both sides a multiple of what FLUX can pack: its VAE
  downsamples 8x and the transformer reads 2x2 patches of latents, so 16 pixels
  (:data:`FLUX_MULTIPLE`; the trainer passes its own VAE's factor times 2).
* a photo's bucket is the one nearest its aspect on a log scale (4:5 is as far from 1:1 as 5:4),
  ties to the squarer bucket.

At small resolutions two ratios can round to the same size (the tiny model's 64 px: 4:5 rounds to
64x64); the set then holds that size once. Pure arithmetic: the intake and the trainer both use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from selfie_lora.errors import InvalidInputError

# (width, height), squarest first: ties in nearest_bucket go to the earlier one.
ASPECT_RATIOS: tuple[tuple[int, int], ...] = (
    (1, 1), (4, 5), (5, 4), (3, 4), (4, 3), (2, 3), (3, 2),
)
# FLUX's VAE factor (8) times the transformer's 2x2 latent patch.
FLUX_MULTIPLE = 16


@dataclass(frozen=True, order=True)
class Bucket:
    """A training image size in pixels."""

    width: int
    height: int

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height}"


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


def bucket_sizes(resolution: int, *, multiple: int = FLUX_MULTIPLE) -> tuple[Bucket, ...]:
    """The buckets at about ``resolution**2`` pixels, each side a multiple of ``multiple``, in
    :data:`ASPECT_RATIOS`' order, each size once."""
    if resolution < 1 or multiple < 1:
        raise InvalidInputError(
            f"bucket sizes need a positive resolution and multiple, not {resolution}, {multiple}")
    sizes: list[Bucket] = []
    for w, h in ASPECT_RATIOS:
        root = math.sqrt(w / h)
        bucket = Bucket(_round_to(resolution * root, multiple),
                        _round_to(resolution / root, multiple))
        if bucket not in sizes:
            sizes.append(bucket)
    return tuple(sizes)


def nearest_bucket(width: float, height: float, buckets: tuple[Bucket, ...]) -> Bucket:
    """The bucket whose aspect is nearest ``width / height`` on a log scale (the earlier, so
    squarer, one on a tie)."""
    if width <= 0 or height <= 0 or not buckets:
        raise InvalidInputError(f"no bucket for a {width}x{height} image")
    target = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b.aspect) - target))


def bucket_for(width: float, height: float, *, resolution: int,
               multiple: int = FLUX_MULTIPLE) -> Bucket:
    """The bucket a ``width`` x ``height`` image trains at, at ``resolution``."""
    return nearest_bucket(width, height, bucket_sizes(resolution, multiple=multiple))


__all__ = ["ASPECT_RATIOS", "FLUX_MULTIPLE", "Bucket", "bucket_for", "bucket_sizes",
           "nearest_bucket"]
