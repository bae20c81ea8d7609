"""Photo sets for tests: small, real JPEGs made on the fly, and zips of them."""

from __future__ import annotations

import functools
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from selfie_lora.testing.fakes import FakeFaceAnalyzer

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "photos"


# Kept for the worker's run (the same bytes each time: the drawing is seeded, the JPEG encoder
# deterministic): the photos of 1400 px that test_repin_photos uploads again and again took a
# quarter of a second of CPU each to draw and encode.
@functools.lru_cache(maxsize=256)
def synthetic_photo(seed: int, *, size: int = 128) -> bytes:
    """A drawing that differs by seed in its low frequencies (so near-duplicate checks tell
    them apart), with mid-tone, textured "skin" at the centre, where the fake face analyzer of
    ``tests.conftest.one_person_analyzer`` puts the face."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(40, 200, size=(6, 6, 3)).astype(np.uint8)
    img = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    c, r = size // 2, size // 4
    draw.ellipse((c - r, c - r, c + r, c + r), fill=(150, 110, 90))
    blobs = rng.integers(c - r + 4, c + r - 4, size=(6, 2))
    for x, y in blobs:
        tone = int(rng.integers(60, 140))
        draw.ellipse((x - 5, y - 4, x + 5, y + 4), fill=(tone, tone // 2, tone // 3))
    noise = rng.normal(0, 6, size=(size, size, 3))
    arr = np.clip(np.asarray(img).astype(float) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@functools.lru_cache(maxsize=64)
def photo_zip(count: int = 4, *, offset: int = 0, size: int = 128) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(count):
            zf.writestr(f"photo{i + offset}.jpg", synthetic_photo(i + offset, size=size))
    return buf.getvalue()


def copy_person_photos(target: Path, *, extra: tuple[str, ...] = ()) -> Path:
    """A folder with the three real photos of one person (and ``extra`` fixtures)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("obama.jpg", "obama2.jpg", "obama3.jpg", *extra):
        (target / name).write_bytes((FIXTURES / name).read_bytes())
    return target


def real_photo_zip(names: tuple[str, ...] = ("obama.jpg", "obama2.jpg", "obama3.jpg")) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in names:
            zf.write(FIXTURES / name, arcname=name)
    return buf.getvalue()


def _embed_or_crash(image: Any) -> tuple[float, ...]:
    # A native crash (a segfault in a decoder or in dlib, say) on one kind of photo: mostly red.
    if image.shape[0] > 16 and image[..., 0].mean() > 180 and image[..., 1].mean() < 80:
        os._exit(139)
    return tuple([0.1] * 128)


@dataclass(frozen=True)
class CrashingAnalyzerFactory:
    """Builds, in each worker process, a fake analyzer that finds one face in any photo but
    kills its process, as a native crash would, on a mostly red one (``red_photo``)."""

    def __call__(self) -> FakeFaceAnalyzer:
        return FakeFaceAnalyzer(embed=_embed_or_crash, box_fraction=0.5)


def red_photo() -> bytes:
    """The photo ``CrashingAnalyzerFactory``'s analyzers crash on."""
    rng = np.random.default_rng(7)
    pixels = np.clip(rng.normal((230, 20, 20), 15.0, (240, 320, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def count_colour_conversions(monkeypatch: Any) -> list[tuple[int, int]]:
    """The sizes of the images colour-converted from now on: every conversion, whichever
    ImageCms function asks for it, runs a transform's ``apply``."""
    from PIL import ImageCms

    calls: list[tuple[int, int]] = []
    apply = ImageCms.ImageCmsTransform.apply

    def counted(self: ImageCms.ImageCmsTransform, im: Image.Image,
                imOut: Image.Image | None = None) -> Image.Image:  # noqa: N803
        calls.append(im.size)
        return apply(self, im, imOut)

    monkeypatch.setattr(ImageCms.ImageCmsTransform, "apply", counted)
    return calls
