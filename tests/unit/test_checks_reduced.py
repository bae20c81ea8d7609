"""The face's regions cut from the detection copy (``checks.photo._Reduced``): only where Pillow
would box-reduce by the copy's factor or more itself, and then with the same pixels, near enough
(at reducing_gap 2 Pillow's own; at 1 the exact resize's, as near as Pillow's own); and only the
near-duplicate regions, never the landmarks', the identity's or the measurements' crops."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image

from selfie_lora.dataset.checks import CheckPolicy, FacePatch, analyze_photo
from selfie_lora.dataset.checks import photo as photo_module
from selfie_lora.dataset.checks.photo import _Reduced, _with_reduced
from selfie_lora.dataset.decode import DecodedPhoto
from selfie_lora.domain.faces import Face

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
    # At reducing_gap 1 (the keypoints' window, _refine) Pillow reduces by 3 from a ratio of 3:
    # the 4x region comes from the copy, a 2.9x one still from the photo.
    near_gap1 = view.resize((150, 150), Image.Resampling.BILINEAR, box=box, reducing_gap=1.0)
    assert mean_gap(near_gap1, photo.resize((150, 150), Image.Resampling.BILINEAR, box=box,
                                            reducing_gap=1.0)) > 20
    under = view.resize((207, 207), Image.Resampling.BILINEAR, box=box, reducing_gap=1.0)
    assert mean_gap(under, photo.resize((207, 207), Image.Resampling.BILINEAR, box=box,
                                        reducing_gap=1.0)) == 0
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


@pytest.mark.parametrize(("box", "size"), [
    ((0.0, 0.0, 1200.0, 900.0), (400, 300)),  # 3x: the first ratio served from the copy
    ((120.0, 90.0, 720.0, 690.0), (194, 194)),  # 3.09x
    ((301.5, 17.25, 1001.5, 717.25), (156, 156)),  # 4.49x
    ((120.0, 90.0, 720.0, 690.0), (102, 102)),  # 5.88x
])
def test_the_region_from_the_copy_at_reducing_gap_1_has_the_photos_pixels(
        box: tuple[float, float, float, float], size: tuple[int, int]) -> None:
    """At reducing_gap 1 the copy's reduction is not Pillow's own: from 3x to 6x Pillow would
    box-reduce the photo by 3, 4 or 5 and then resample by at most 1.33; the copy is reduced by
    3 and then resampled by up to 2. So the region is held to the exact resize (no reducing_gap,
    every photo pixel weighed), as Pillow's own gap-1 resize would be."""
    photo = _photo()
    view = _with_reduced(photo, photo.reduce(3), 3.0)
    ours = np.asarray(view.resize(size, Image.Resampling.BILINEAR, box=box, reducing_gap=1.0),
                      dtype=np.float64)
    pillow = np.asarray(photo.resize(size, Image.Resampling.BILINEAR, box=box,
                                     reducing_gap=1.0), dtype=np.float64)
    exact = np.asarray(photo.resize(size, Image.Resampling.BILINEAR, box=box), dtype=np.float64)
    # Measured on this photo, mean absolute difference from the exact resize (in the order
    # above): the copy 1.59, 1.14, 0.60, 0.38; Pillow's own gap-1 resize of the photo 1.59 (the
    # same pixels at 3x), 1.15, 0.78, 0.64; a resize skipping the anti-aliasing (NEAREST)
    # 8.1-8.9. So 2.0 passes a copy as close as Pillow's own gap-1 result and fails one that is
    # not anti-aliased, and the copy may be only a little (0.25) further from exact than that.
    assert np.abs(ours - exact).mean() < 2.0
    assert np.abs(ours - exact).mean() < np.abs(pillow - exact).mean() + 0.25
    assert np.abs(ours.mean() - exact.mean()) < 0.5


class _BoxFace:
    """One face at a fixed box of the detection copy; ``describe`` (``BoxDescriber``, as dlib's
    region analyzer) keeps the crop it was given and makes its mean colour the identity."""

    model_name = "fake"

    def __init__(self, box: tuple[int, int, int, int]) -> None:
        self.box = box
        self.described: list[np.ndarray] = []

    def ready(self) -> None:
        """Nothing to install."""

    def detect(self, image: Any, *, landmarks: bool = True, embed: bool = True) -> list[Face]:
        return [Face(box=self.box, score=1.0)]

    def describe(self, image: Any, box: tuple[int, int, int, int], *,
                 embed: bool = True) -> Face:
        self.described.append(np.array(image))
        left, top, right, bottom = box
        w, h = right - left, bottom - top
        eyes_nose_mouth = ((0.3, 0.4), (0.7, 0.4), (0.5, 0.6), (0.35, 0.8), (0.65, 0.8))
        return Face(box=box, score=1.0,
                    landmarks=tuple((round(left + x * w), round(top + y * h))
                                    for x, y in eyes_nose_mouth),
                    embedding=tuple(float(c) for c in np.asarray(image).mean(axis=(0, 1))))


def test_landmarks_identity_and_measurements_of_a_large_face_come_from_the_photo(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A close-up: 2400 x 2100 reduced by 3 to detect, the face 1650 px, so that Pillow would
    # box-reduce the landmarks' crop (to a 150 px face) and the measured box (to 256 px) by 3 or
    # more: the ratios at which the view would cut them from the copy.
    photo = Image.fromarray(np.tile(np.asarray(_photo(800, 700)), (3, 3, 1)))  # cheaper to make
    policy = CheckPolicy(resolution=256, min_photos=3, decode_min_side=256)
    assert policy.detect_side * 3 <= max(photo.size) < policy.detect_side * 4
    decoded = DecodedPhoto(name="a.jpg", image=photo, format="JPEG", original_size=photo.size,
                           exif_software=None, had_exif=True, had_gps=False)

    def analyse(copy: Callable[[Image.Image], Image.Image]) -> tuple[Any, _BoxFace]:
        def with_copy(image: Any, small: Image.Image, k_small: float) -> Any:
            assert round(k_small) == 3
            return _Reduced(image, copy(small), 3)

        monkeypatch.setattr(photo_module, "_with_reduced", with_copy)
        analyzer = _BoxFace((100, 50, 650, 600))
        return analyze_photo(decoded, analyzer=analyzer, policy=policy), analyzer

    # A tinted copy tells which image a region came from.
    plain, plain_analyzer = analyse(lambda small: small)
    tinted, tinted_analyzer = analyse(lambda small: Image.eval(small, lambda v: min(255, v + 40)))
    assert plain.main_face.height == 1650
    assert len(plain_analyzer.described) == len(tinted_analyzer.described) == 1
    assert np.array_equal(tinted_analyzer.described[0], plain_analyzer.described[0])
    assert tinted.main_face == plain.main_face  # landmarks and embedding
    assert tinted.metrics == plain.metrics  # blur, light, colour, skin
    # The near-duplicate regions are the ones cut from the copy.
    assert plain.face_patch is not None
    assert tinted.face_patch is not None
    assert tinted.face_patch.inside == plain.face_patch.inside

    def inside(patch: FacePatch) -> np.ndarray:
        x0, y0, x1, y1 = patch.inside
        grey = np.frombuffer(patch.pixels, np.uint8).reshape(FacePatch.SIDE, FacePatch.SIDE)
        return grey[y0:y1, x0:x1].astype(np.float64)

    assert (inside(tinted.face_patch) - inside(plain.face_patch)).mean() > 20
