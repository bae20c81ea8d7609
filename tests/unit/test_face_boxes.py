"""The face box the intake keeps with each prepared photo: where the main face lies in the stored
crop, as fractions of the crop (what the face-weighted loss weights), and the dataset's record
of it."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from selfie_lora.dataset.checks import PhotoAnalysis
from selfie_lora.dataset.prepare import crop_box, face_box_in_crop
from selfie_lora.domain.entities import Dataset, face_box_from
from selfie_lora.domain.faces import Face


def analysis(box: tuple[int, int, int, int] | None, *, size: tuple[int, int] = (1000, 2000)
             ) -> PhotoAnalysis:
    face = Face(box=box, score=1.0) if box is not None else None
    return PhotoAnalysis(name="x.jpg", image_size=size, scale=1.0,
                         faces=(face,) if face else (), main_face=face, findings=())


def test_a_face_in_the_middle_of_a_known_crop() -> None:
    found = face_box_in_crop(analysis((100, 200, 300, 400)), image_size=(1000, 2000),
                             crop=(0, 100, 500, 600))
    assert found == (0.2, 0.2, 0.6, 0.6)


def test_the_intakes_own_crop_holds_the_face_where_it_cut_it() -> None:
    a = analysis((400, 300, 600, 520))
    crop = crop_box(a, image_size=(1000, 2000))
    left, top, right, _bottom = crop
    side = right - left
    found = face_box_in_crop(a, image_size=(1000, 2000), crop=crop)
    assert found == pytest.approx(((400 - left) / side, (300 - top) / side,
                                   (600 - left) / side, (520 - top) / side), abs=1e-4)
    # Centred across; a little high, since the crop drops below the face for the chin.
    assert found is not None
    assert (found[0] + found[2]) / 2 == pytest.approx(0.5, abs=0.01)
    assert (found[1] + found[3]) / 2 < 0.5


def test_a_crop_shifted_at_the_photos_edge_keeps_the_face_off_centre() -> None:
    # The face touches the top-left corner: the crop cannot centre it, it is shifted inside.
    a = analysis((0, 0, 200, 220))
    crop = crop_box(a, image_size=(1000, 2000))
    assert crop[:2] == (0, 0)
    side = crop[2] - crop[0]
    assert face_box_in_crop(a, image_size=(1000, 2000), crop=crop) == pytest.approx(
        (0.0, 0.0, 200 / side, 220 / side), abs=1e-4)
    # A face reaching past the photo's edge (dlib's boxes may) is clipped to the crop.
    past = analysis((-60, -40, 200, 220))
    found = face_box_in_crop(past, image_size=(1000, 2000), crop=crop_box(past, image_size=(1000, 2000)))
    assert found is not None
    assert found[:2] == (0.0, 0.0)


def test_analysed_at_another_size_the_box_scales_with_the_image() -> None:
    a = analysis((400, 300, 600, 520))
    full = face_box_in_crop(a, image_size=(1000, 2000), crop=crop_box(a, image_size=(1000, 2000)))
    half = face_box_in_crop(a, image_size=(500, 1000), crop=crop_box(a, image_size=(500, 1000)))
    assert half == pytest.approx(full, abs=0.005)


def test_a_non_square_crop_is_measured_on_each_of_its_sides() -> None:
    # Aspect buckets cut portrait crops: fractions of the crop's own width and height.
    found = face_box_in_crop(analysis((150, 300, 350, 600)), image_size=(1000, 2000),
                             crop=(100, 200, 500, 800))
    assert found == (0.125, pytest.approx(1 / 6, abs=1e-4), 0.625, 0.6667)


def test_no_face_or_a_face_outside_the_crop_gives_no_box() -> None:
    assert face_box_in_crop(analysis(None), image_size=(1000, 2000), crop=(0, 0, 500, 500)) is None
    assert face_box_in_crop(analysis((600, 600, 700, 700)), image_size=(1000, 2000),
                            crop=(0, 0, 500, 500)) is None


@given(x=st.integers(-200, 1100), y=st.integers(-200, 2100), w=st.integers(1, 900),
       h=st.integers(1, 900))
def test_every_box_found_is_fractions_inside_the_crop(x: int, y: int, w: int, h: int) -> None:
    a = analysis((x, y, x + w, y + h))
    found = face_box_in_crop(a, image_size=(1000, 2000), crop=crop_box(a, image_size=(1000, 2000)))
    if found is not None:
        assert face_box_from(list(found)) == found  # what the dataset accepts


# --------------------------------------------------------------------------- the dataset


def dataset(**changes: object) -> Dataset:
    base = Dataset(id="d", user_id="u", images_total=2, images_accepted=2,
                   photo_hashes=("a" * 64, "b" * 64), findings=(), accepted=True,
                   sha256="c" * 64, created_at=datetime(2026, 1, 1, tzinfo=UTC))
    return replace(base, **changes)  # type: ignore[arg-type]


def test_a_dataset_keeps_one_box_or_none_per_photo() -> None:
    boxes = ((0.1, 0.2, 0.5, 0.7), None)
    d = dataset(face_boxes=boxes)
    assert [d.face_box(i) for i in range(2)] == [(0.1, 0.2, 0.5, 0.7), None]
    # Stored before the boxes were kept: none, for every photo.
    assert [dataset().face_box(i) for i in range(2)] == [None, None]


@pytest.mark.parametrize("boxes", [
    ((0.1, 0.2, 0.5, 0.7),),  # one box for two photos
    ((0.5, 0.2, 0.1, 0.7), None),  # left after right
    ((0.1, 0.2, 1.5, 0.7), None),  # past the photo
    ((0.1, 0.2, 0.5), None),  # not four numbers
])
def test_boxes_that_do_not_fit_the_photos_are_refused(boxes: tuple[object, ...]) -> None:
    with pytest.raises(ValueError, match="face box"):
        dataset(face_boxes=boxes)
