"""The near-duplicate check's perceptual hash is imagehash's ``phash`` computed without SciPy:
the same hash for every picture, flat ones included."""

from __future__ import annotations

from pathlib import Path

import imagehash
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, ImageFilter, ImageOps

from selfie_lora.dataset.checks.duplicates import phash

PHOTOS = Path(__file__).resolve().parent.parent / "fixtures" / "photos"


def _expected(image: Image.Image) -> str:
    return str(imagehash.phash(image))


@pytest.mark.parametrize("name", sorted(p.name for p in PHOTOS.glob("*.jpg")))
def test_same_hash_as_imagehash_on_photos_and_their_edits(name: str) -> None:
    with Image.open(PHOTOS / name) as opened:
        photo = opened.convert("RGB")
    w, h = photo.size
    for image in (photo, ImageOps.mirror(photo), photo.filter(ImageFilter.GaussianBlur(4)),
                  photo.crop((w // 4, h // 5, w // 2, h // 2)), photo.resize((37, 29)),
                  photo.convert("L")):
        assert phash(image) == _expected(image)


@pytest.mark.parametrize(("image", "value"), [
    (Image.new("L", (32, 32)), "0000000000000000"),
    (Image.new("RGB", (50, 50), (128, 128, 128)), "8000000000000000"),
    (Image.new("RGB", (300, 37), (255, 255, 255)), "8000000000000000"),
], ids=["black", "grey", "white strip"])
def test_flat_pictures_hash_as_imagehash_does(image: Image.Image, value: str) -> None:
    # Their frequencies are all 0 but the first: noise in the last digits must not decide.
    assert phash(image) == _expected(image) == value


@given(seed=st.integers(0, 2**32 - 1), width=st.integers(8, 120), height=st.integers(8, 120),
       levels=st.sampled_from([2, 4, 256]))
def test_same_hash_as_imagehash_on_random_pictures(seed: int, width: int, height: int,
                                                   levels: int) -> None:
    rng = np.random.default_rng(seed)
    # Few grey levels make ties among the frequencies, where the two could part ways.
    pixels = (rng.integers(0, levels, (height, width)) * (255 // (levels - 1))).astype(np.uint8)
    image = Image.fromarray(pixels, mode="L")
    assert phash(image) == _expected(image)
