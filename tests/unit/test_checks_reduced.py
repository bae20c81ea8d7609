"""The face's regions cut from the detection copy (``checks.photo._Reduced``): only where Pillow
would make the same box reduction itself, and then with the same pixels, near enough."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from selfie_lora.dataset.checks.photo import _Reduced, _with_reduced

pytest.importorskip("imagehash", reason="the photo checks need the 'faces' extra")


def _photo(width: int = 1200, height: int = 900) -> Image.Image:
    rng = np.random.default_rng(3)
    # Smooth shapes and fine noise: a resampling that skipped the anti-aliasing would show.
    y, x = np.mgrid[0:height, 0:width]
    base = 128 + 60 * np.sin(x / 37.0) * np.cos(y / 23.0)
    noise = rng.normal(0.0, 12.0, (height, width))
    grey = np.clip(base + noise, 0, 255)
    return Image.fromarray(np.stack([grey, grey * 0.8, 255 - grey], axis=-1).astype(np.uint8))


def test_only_an_integer_box_reduction_of_the_whole_photo_is_used() -> None:
    photo = _photo(1201, 899)  # odd sides: reduce() rounds them up
    small = photo.reduce(3)
    assert isinstance(_with_reduced(photo, small, photo.width / small.width), _Reduced)
    resized = photo.resize((640, 479), Image.Resampling.BILINEAR)
    assert _with_reduced(photo, resized, photo.width / resized.width) is photo
    assert _with_reduced(photo, photo, 1.0) is photo


def test_a_region_pillow_would_reduce_as_much_comes_from_the_copy() -> None:
    photo = _photo()
    # A tinted copy tells which image a region came from.
    tinted = Image.eval(photo.reduce(3), lambda v: min(255, v + 40))
    view = _Reduced(photo, tinted, 3)
    box = (120.0, 90.0, 720.0, 690.0)  # 600 px
    far = view.resize((96, 96), Image.Resampling.BILINEAR, box=box, reducing_gap=2.0)  # 6.25x
    near = view.resize((150, 150), Image.Resampling.BILINEAR, box=box, reducing_gap=2.0)  # 4x
    plain = view.resize((96, 96), Image.Resampling.BILINEAR, box=box)  # no reducing_gap
    direct_far = photo.resize((96, 96), Image.Resampling.BILINEAR, box=box, reducing_gap=2.0)
    direct_near = photo.resize((150, 150), Image.Resampling.BILINEAR, box=box, reducing_gap=2.0)

    def mean_gap(a: Image.Image, b: Image.Image) -> float:
        return float(np.mean(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)))

    assert mean_gap(far, direct_far) > 20  # from the copy
    assert mean_gap(near, direct_near) == 0  # Pillow reduces by 2 only: from the photo
    assert np.array_equal(np.asarray(plain), np.asarray(photo.resize(
        (96, 96), Image.Resampling.BILINEAR, box=box)))
    assert view.size == photo.size
    assert view.mode == "RGB"


def test_the_region_from_the_copy_has_the_photos_pixels() -> None:
    photo = _photo()
    view = _with_reduced(photo, photo.reduce(3), 3.0)
    for box, size in (((120.0, 90.0, 720.0, 690.0), (96, 96)),
                      ((0.0, 0.0, 1200.0, 900.0), (64, 48)),
                      ((301.5, 17.25, 1001.5, 717.25), (100, 100))):
        ours = np.asarray(view.resize(size, Image.Resampling.BILINEAR, box=box,
                                      reducing_gap=2.0), dtype=np.float64)
        pillow = np.asarray(photo.resize(size, Image.Resampling.BILINEAR, box=box,
                                         reducing_gap=2.0), dtype=np.float64)
        # The same box reduction, on a grid a pixel or two apart: the same picture.
        assert np.abs(ours - pillow).mean() < 1.0  # skipping the anti-aliasing: ~9
        assert np.abs(ours.mean() - pillow.mean()) < 0.5
