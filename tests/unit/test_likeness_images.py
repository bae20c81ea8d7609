"""Probe image statistics, the comparison grid and the chart: real images, real PNGs."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from selfie_lora.likeness.chart import CHART_SIZE, ChartPoint, render_chart
from selfie_lora.likeness.grid import CELL, HEADER_H, LABEL_W, PAD, GridRow, grid_size, render_grid
from selfie_lora.likeness.images import analysis_array, image_sanity
from tests.support.likeness import png_size, rgb
from tests.support.photos import FIXTURES


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def photo(side: int = 256) -> Image.Image:
    with Image.open(FIXTURES / "obama.jpg") as img:
        out = img.convert("RGB")
    out.thumbnail((side, side))
    return out


def test_a_photo_is_sane_and_sharper_than_its_blurred_copy() -> None:
    sharp = image_sanity(png(photo()))
    blurred = image_sanity(png(photo().filter(ImageFilter.GaussianBlur(4))))
    assert sharp.ok
    assert blurred.ok
    assert sharp.sharpness > 5 * blurred.sharpness


@pytest.mark.parametrize(("image", "flag"), [
    (Image.new("RGB", (64, 64), (128, 128, 128)), "blank"),
    (Image.new("RGB", (64, 64), (0, 0, 0)), "nan"),  # what NaN latents decode to
    (Image.fromarray(np.where(np.indices((64, 64)).sum(0)[..., None] % 2 == 0, 255, 0)
                     .repeat(3, axis=2).astype(np.uint8)), "saturated"),
])
def test_blank_black_and_saturated_images_are_flagged(image: Image.Image, flag: str) -> None:
    sanity = image_sanity(png(image))
    assert getattr(sanity, flag) is True
    assert not sanity.ok


def test_an_image_that_does_not_decode_is_broken_not_a_crash() -> None:
    sanity = image_sanity(b"\x89PNG\r\n\x1a\n not really")
    assert sanity.nan
    assert not sanity.ok


def test_analysis_images_are_scaled_down_never_up() -> None:
    assert max(analysis_array(png(photo(1000)), max_side=512).shape[:2]) == 512
    small = analysis_array(png(photo(64)))
    assert max(small.shape[:2]) == 64
    assert small.dtype == np.uint8
    assert small.shape[2] == 3


def test_the_grid_has_its_layout_size_and_the_images_in_place() -> None:
    red = png(Image.new("RGB", (64, 64), (255, 0, 0)))
    blue = png(Image.new("RGB", (512, 384), (0, 0, 255)))
    rows = [GridRow(label=["probe 1, seed 3", "a long prompt " * 5, "A: no face"], left=red,
                    right=blue),
            GridRow(label=["probe 2"], left=None, right=b"broken")]
    data = render_grid(left_title="A: version 1", right_title="B: version 2", rows=rows)
    assert png_size(data) == grid_size(2)
    assert grid_size(2) == (PAD + LABEL_W + PAD + CELL + PAD + CELL + PAD,
                            HEADER_H + 2 * (CELL + PAD) + PAD)
    pixels = rgb(data)
    left_x = PAD + LABEL_W + PAD
    right_x = left_x + CELL + PAD
    middle = HEADER_H + CELL // 2
    assert tuple(pixels[middle, left_x + CELL // 2]) == (255, 0, 0)  # scaled up to the cell
    assert tuple(pixels[middle, right_x + CELL // 2]) == (0, 0, 255)
    with pytest.raises(ValueError, match="at least one probe"):
        render_grid(left_title="a", right_title="b", rows=[])


def test_the_chart_has_its_fixed_size_with_gaps_and_held_versions() -> None:
    points = [
        ChartPoint(1, 0.8, 0.85, 1.0, 1.0, "passed", False),
        ChartPoint(2, None, None, None, None, "passed", False),  # not scored: a gap
        ChartPoint(3, 0.3, 0.35, 1.0, 1.0, "held", False),
        ChartPoint(4, 0.82, 0.86, 1.0, 1.0, "passed", True),
    ]
    data = render_chart(points, title="likeness", tolerance=0.02)
    assert png_size(data) == CHART_SIZE == (800, 450)
    assert png_size(render_chart(points[:1], title="one", tolerance=0.0)) == CHART_SIZE
