"""Aspect-ratio buckets: their geometry (``domain.buckets``) and the intake's crop to a bucket
(``dataset.prepare``), as properties over random resolutions, photos and faces."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from selfie_lora.dataset.checks import PhotoAnalysis
from selfie_lora.dataset.prepare import DROP, FACE_FRACTION, crop_box, crop_bucket, crop_plan
from selfie_lora.domain.buckets import (
    ASPECT_RATIOS,
    FLUX_MULTIPLE,
    Bucket,
    bucket_for,
    bucket_sizes,
    nearest_bucket,
)
from selfie_lora.domain.faces import Face
from selfie_lora.errors import InvalidInputError

multiples = st.sampled_from([8, 16, 32])
sides = st.integers(min_value=16, max_value=6000)


def _distance(bucket: Bucket, width: float, height: float) -> float:
    return abs(math.log(bucket.aspect) - math.log(width / height))


# --------------------------------------------------------------------------- geometry


@given(multiple=multiples, data=st.data())
def test_buckets_keep_the_pixel_count_and_pack(multiple: int, data: st.DataObject) -> None:
    # From 32 multiples up (FLUX: 512 px and more), rounding each side moves the area by < 4%.
    resolution = data.draw(st.integers(min_value=32 * multiple, max_value=4096))
    sizes = bucket_sizes(resolution, multiple=multiple)
    assert len(sizes) == len(ASPECT_RATIOS) == len(set(sizes))
    for bucket in sizes:
        assert bucket.width % multiple == 0
        assert bucket.height % multiple == 0
        assert abs(bucket.width * bucket.height / resolution**2 - 1) < 0.04, bucket
    # Each ratio's bucket is its shape, to the rounding of its sides.
    for (w, h), bucket in zip(ASPECT_RATIOS, sizes, strict=True):
        assert abs(math.log(bucket.aspect) - math.log(w / h)) < 0.07, (w, h, bucket)


@given(resolution=st.integers(min_value=1, max_value=4096), multiple=multiples)
def test_small_resolutions_still_give_packable_distinct_buckets(resolution: int,
                                                                multiple: int) -> None:
    sizes = bucket_sizes(resolution, multiple=multiple)
    assert sizes[0].width == sizes[0].height  # the square is always there, first
    assert len(set(sizes)) == len(sizes)
    assert all(b.width % multiple == 0 and b.height % multiple == 0 for b in sizes)
    assert all(b.width >= multiple and b.height >= multiple for b in sizes)
    # Transposed shapes come in pairs.
    assert {Bucket(b.height, b.width) for b in sizes} == set(sizes)


def test_the_tiny_model_has_three_buckets_and_flux_seven() -> None:
    assert bucket_sizes(64) == (Bucket(64, 64), Bucket(48, 80), Bucket(80, 48))
    assert bucket_sizes(1024)[:3] == (Bucket(1024, 1024), Bucket(912, 1152), Bucket(1152, 912))
    assert len(bucket_sizes(512)) == 7
    assert FLUX_MULTIPLE == 16


@given(width=sides, height=sides, resolution=st.sampled_from([64, 256, 512, 1024]))
def test_the_nearest_bucket_is_nearest_in_log_aspect(width: int, height: int,
                                                     resolution: int) -> None:
    sizes = bucket_sizes(resolution)
    chosen = bucket_for(width, height, resolution=resolution)
    assert chosen in sizes
    assert all(_distance(chosen, width, height) <= _distance(b, width, height) for b in sizes)
    # A bucket's own size picks itself: a photo stored at its bucket trains at that bucket.
    assert nearest_bucket(chosen.width, chosen.height, sizes) == chosen
    # Turning the photo turns the bucket (unless it sits exactly between two).
    turned = bucket_for(height, width, resolution=resolution)
    others = [b for b in sizes if b != chosen]
    if min(_distance(b, width, height) for b in others) > _distance(chosen, width, height) + 1e-9:
        assert turned == Bucket(chosen.height, chosen.width)


def test_examples_of_the_choice() -> None:
    assert bucket_for(3024, 4032, resolution=1024) == Bucket(880, 1184)  # a phone's 3:4
    assert bucket_for(1080, 1920, resolution=1024) == Bucket(832, 1248)  # 9:16 -> 2:3
    assert bucket_for(1000, 1000, resolution=512) == Bucket(512, 512)
    assert bucket_for(1200, 1000, resolution=512) == Bucket(576, 464)  # 6:5 -> 5:4


@pytest.mark.parametrize(("width", "height"), [(0, 10), (10, -1)])
def test_no_bucket_for_an_empty_image(width: int, height: int) -> None:
    with pytest.raises(InvalidInputError):
        bucket_for(width, height, resolution=512)
    with pytest.raises(InvalidInputError):
        bucket_sizes(0)


# --------------------------------------------------------------------------- the intake's crop


def _analysis(size: tuple[int, int], box: tuple[int, int, int, int]) -> PhotoAnalysis:
    face = Face(box=box, score=1.0)
    return PhotoAnalysis(name="p.jpg", image_size=size, scale=1.0, faces=(face,),
                         main_face=face, findings=())


@st.composite
def photos_with_faces(draw: st.DrawFn) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    width = draw(st.integers(min_value=64, max_value=3000))
    height = draw(st.integers(min_value=64, max_value=3000))
    assume(1 / 3 <= width / height <= 3)
    face_w = draw(st.integers(min_value=8, max_value=width))
    face_h = draw(st.integers(min_value=8, max_value=height))
    left = draw(st.integers(min_value=0, max_value=width - face_w))
    top = draw(st.integers(min_value=0, max_value=height - face_h))
    return (width, height), (left, top, left + face_w, top + face_h)


@given(photo=photos_with_faces(), resolution=st.sampled_from([64, 512, 1024]))
def test_the_bucket_crop_holds_the_whole_face_inside_the_photo(
        photo: tuple[tuple[int, int], tuple[int, int, int, int]], resolution: int) -> None:
    size, face = photo
    analysis = _analysis(size, face)
    (left, top, right, bottom), stored = crop_plan(analysis, image_size=size,
                                                   resolution=resolution, aspect_buckets=True)
    bucket = crop_bucket(analysis, image_size=size, resolution=resolution)
    assert stored == (bucket.width, bucket.height)
    assert 0 <= left < right <= size[0]
    assert 0 <= top < bottom <= size[1]
    crop_w, crop_h = right - left, bottom - top
    # The bucket's shape, to the rounding of whole pixels.
    assert abs(crop_w / crop_h - bucket.aspect) <= 1 / crop_h + 1 / crop_w + 1e-9
    fits = face[2] - face[0] <= crop_w and face[3] - face[1] <= crop_h
    if fits:
        assert left <= face[0]
        assert top <= face[1]
        assert face[2] <= right
        assert face[3] <= bottom
    # The face fits the nearest bucket's largest crop: that bucket is the one.
    nearest = bucket_for(*size, resolution=resolution)
    largest_w, largest_h = min(size[0], size[1] * nearest.aspect), min(size[1],
                                                                      size[0] / nearest.aspect)
    if face[2] - face[0] <= largest_w and face[3] - face[1] <= largest_h:
        assert bucket == nearest
        assert fits


@given(photo=photos_with_faces())
def test_the_bucket_crop_frames_the_face_as_the_square_does(
        photo: tuple[tuple[int, int], tuple[int, int, int, int]]) -> None:
    size, face = photo
    face_size = max(face[2] - face[0], face[3] - face[1])
    wanted = face_size / FACE_FRACTION
    analysis = _analysis(size, face)
    bucket = crop_bucket(analysis, image_size=size, resolution=1024)
    left, top, right, bottom = crop_box(analysis, image_size=size, aspect=bucket.aspect)
    short = min(right - left, bottom - top)
    most = min(min(size[0], size[1] * bucket.aspect), min(size[1], size[0] / bucket.aspect))
    if wanted <= most - 2:
        # Not shrunk: the face is FACE_FRACTION of the shorter side.
        assert abs(short - wanted) <= 1.5
    else:
        # Shrunk only because the photo is too small: the largest crop of the shape.
        assert short >= min(wanted, most) - 1.5


def test_a_portrait_photo_gets_a_portrait_crop_centred_as_the_square() -> None:
    size, face = (1200, 1800), (500, 500, 700, 740)  # 2:3, a 240 px face
    analysis = _analysis(size, face)
    box, stored = crop_plan(analysis, image_size=size, resolution=512, aspect_buckets=True)
    assert stored == (416, 624)  # 2:3
    left, top, right, bottom = box
    assert (right - left, bottom - top) == (571, 857)  # 240 / 0.42 wide
    assert abs((left + right) / 2 - 600) <= 1
    assert abs((top + bottom) / 2 - (620 + DROP * 571)) <= 1
    # Off: the square of today, at the resolution.
    square, stored = crop_plan(analysis, image_size=size, resolution=512)
    assert stored == (512, 512)
    assert square == crop_box(analysis, image_size=size)
    assert square[2] - square[0] == square[3] - square[1] == 571


def test_a_tight_crop_never_cuts_the_face_for_the_drop() -> None:
    # A face filling most of a 5:8 photo: its 2:3 crop is shrunk to the photo's width (1000 x
    # 1500 of 1600 rows), and centring it 40 px below the face would cut the brows off.
    size, face = (1000, 1600), (50, 20, 950, 1470)
    analysis = _analysis(size, face)
    assert crop_bucket(analysis, image_size=size, resolution=512).aspect == pytest.approx(2 / 3)
    left, top, right, bottom = crop_box(analysis, image_size=size, aspect=2 / 3)
    assert (right - left, bottom - top) == (1000, 1500)
    assert top <= 20
    assert bottom >= 1470
    # The face fills the photo's width: a taller-than-wide crop cannot hold it, so the nearest
    # bucket it fits in is taken (the square), not a crop that cuts it.
    size, face = (1000, 1200), (0, 100, 1000, 900)
    analysis = _analysis(size, face)
    assert bucket_for(*size, resolution=512).aspect == pytest.approx(464 / 576)
    bucket = crop_bucket(analysis, image_size=size, resolution=512)
    assert bucket == Bucket(512, 512)
    left, top, right, bottom = crop_box(analysis, image_size=size, aspect=bucket.aspect)
    assert (left, right) == (0, 1000)
    assert top <= 100
    assert bottom >= 900
