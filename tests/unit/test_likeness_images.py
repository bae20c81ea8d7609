"""Probe image statistics, the comparison grid and the chart: real images, real PNGs."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from PIL import Image, ImageFilter

from selfie_lora.likeness.chart import (
    CHART_SIZE,
    HELD_NOT_SCORED,
    MAX_X_LABELS,
    ChartPoint,
    chart_figure,
    render_chart,
)
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


def versions(count: int) -> list[ChartPoint]:
    return [ChartPoint(n, 0.5 + 0.01 * (n % 7), 0.6, 1.0, 1.0,
                       "held" if n % 5 == 0 else "passed", n == count)
            for n in range(1, count + 1)]


@pytest.mark.parametrize("count", [1, 15, 16, 50, 300, 1200])
def test_the_chart_s_version_labels_never_run_into_each_other(count: int) -> None:
    """Up to MAX_X_LABELS versions each is labelled; past that the labels are thinned out (at
    50 versions, one label a version made one black band under the axis)."""
    fig = chart_figure(versions(count), title="likeness", tolerance=0.02)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    ax = fig.axes[0]
    low, high = ax.get_xlim()
    shown = [(x, label) for x, label in zip(ax.get_xticks(), ax.get_xticklabels(), strict=True)
             if low <= x <= high and label.get_text()]
    boxes = sorted((label.get_window_extent(renderer) for _, label in shown), key=lambda b: b.x0)
    for left, right in itertools.pairwise(boxes):
        assert left.x1 + 4 <= right.x0, (count, [label.get_text() for _, label in shown])
    assert 1 <= len(shown) <= MAX_X_LABELS
    if count <= MAX_X_LABELS:
        assert [x for x, _ in shown] == list(range(1, count + 1))


def test_a_held_version_without_a_score_is_not_drawn_at_likeness_0() -> None:
    points = [
        ChartPoint(1, 0.8, 0.85, 1.0, 1.0, "passed", False),
        ChartPoint(2, None, None, None, None, "held", False),  # could not be scored
        ChartPoint(3, 0.3, 0.35, 1.0, 1.0, "held", True),
    ]
    ax = chart_figure(points, title="likeness", tolerance=0.02).axes[0]
    in_data = [tuple(xy) for c in ax.collections if c.get_offset_transform() == ax.transData
               for xy in np.asarray(c.get_offsets()).tolist()]
    assert (3.0, 0.3) in in_data  # the held version with a score: ringed at its identity
    assert not [xy for xy in in_data if xy[0] == 2.0]  # nothing at version 2 reads as a score
    marks = [c for c in ax.collections if c.get_label() == HELD_NOT_SCORED]
    assert len(marks) == 1
    assert np.asarray(marks[0].get_offsets()).tolist() == [[2.0, 0.0]]
    assert marks[0].get_offset_transform() == ax.get_xaxis_transform()  # on the axis, not at a score
    legend = ax.get_legend()
    assert legend is not None
    assert HELD_NOT_SCORED in [t.get_text() for t in legend.get_texts()]


def test_the_chart_s_legend_covers_no_point() -> None:
    """The legend sat at lower left in the plot: the points of versions scored 0 were under it
    (nojs review 11). It is outside the plot area."""
    points = [ChartPoint(1, 0.0, 0.0, 0.0, 0.0, "held", False),
              ChartPoint(2, 0.0, 0.0, 0.0, 0.0, "held", False),
              ChartPoint(3, 0.8, 0.85, 1.0, 1.0, "passed", True)]
    fig = chart_figure(points, title="likeness", tolerance=0.02)
    ax = fig.axes[0]
    fig.canvas.draw()
    legend = ax.get_legend()
    assert legend is not None
    box = legend.get_window_extent()
    plot = ax.get_window_extent()
    assert box.y1 <= plot.y0 or box.x0 >= plot.x1, (box, plot)
    assert png_size(render_chart(points, title="likeness", tolerance=0.02)) == CHART_SIZE


@pytest.mark.parametrize("held", [["scored"], ["unscored"], ["scored", "unscored"]])
def test_the_chart_s_legend_fits_the_picture_when_versions_were_held(held: list[str]) -> None:
    """With a held version the legend got one or two long entries ("held by the gate (tolerance
    0.02)", HELD_NOT_SCORED) in three columns: wider than the 800 px picture, it ran off both
    its sides, cut, and the plot was squeezed to 60% of the width (found in review). It fits,
    and the plot keeps its width."""
    points = [ChartPoint(1, 0.8, 0.85, 1.0, 1.0, "passed", False)]
    if "unscored" in held:
        points.append(ChartPoint(2, None, None, None, None, "held", False))
    if "scored" in held:
        points.append(ChartPoint(3, 0.3, 0.35, 1.0, 1.0, "held", False))
    points.append(ChartPoint(4, 0.82, 0.86, 1.0, 1.0, "passed", True))
    fig = chart_figure(points, title="likeness", tolerance=0.02)
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert legend is not None
    box, plot = legend.get_window_extent(), ax.get_window_extent()
    assert box.x0 >= 0, box
    assert box.x1 <= CHART_SIZE[0], box
    assert box.y0 >= 0, box
    assert plot.width >= 0.8 * CHART_SIZE[0], plot


@pytest.mark.parametrize("active", [False, True], ids=["none active", "active"])
@pytest.mark.parametrize("held", [[], ["scored"], ["unscored"], ["scored", "unscored"]],
                         ids=["none held", "held scored", "held unscored", "both held"])
@pytest.mark.parametrize("tolerance", [0.02, 0.125])
@pytest.mark.parametrize("gate", [True, False], ids=["gate on", "gate off"])
def test_the_chart_s_legend_fits_the_picture_whatever_its_entries(
        held: list[str], active: bool, tolerance: float, gate: bool) -> None:
    """The legend's columns were chosen by its number of entries: with no active version and
    one kind of held version it had 5 entries, so 3 columns, and still ran off the 800 px
    picture (x from -5.9 to 805.9; found in review). Every combination of entries fits, and
    the plot keeps its width."""
    points = [ChartPoint(1, 0.8, 0.85, 1.0, 1.0, "passed", False)]
    if "unscored" in held:
        points.append(ChartPoint(2, None, None, None, None, "held", False))
    if "scored" in held:
        points.append(ChartPoint(3, 0.3, 0.35, 1.0, 1.0, "held", False))
    points.append(ChartPoint(4, 0.82, 0.86, 1.0, 1.0, "passed", active))
    fig = chart_figure(points, title="likeness", tolerance=tolerance, gate=gate)
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert legend is not None
    assert len(legend.get_texts()) == 4 + len(held) + active
    box, plot = legend.get_window_extent(), ax.get_window_extent()
    assert box.x0 >= 0, box
    assert box.x1 <= CHART_SIZE[0], box
    assert box.y0 >= 0, box
    assert plot.width >= 0.8 * CHART_SIZE[0], plot


def _contrast_on_white(colour: tuple[float, float, float]) -> float:
    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (linear(c) for c in colour)
    return 1.05 / (0.2126 * r + 0.7152 * g + 0.0722 * b + 0.05)


def test_the_chart_s_lines_are_3_to_1_against_the_plot_and_not_told_apart_by_colour_alone(
        ) -> None:
    """The nearest-photo line (tab:cyan, 2.26:1) and the active version's dashed line
    (tab:orange, 2.53:1) were under the 3:1 a graphic needs against the white plot (a11y review
    4, f07_chart.py). Every line is 3:1 or more, and each series differs from the others by
    its marker or its line style too."""
    from matplotlib.colors import to_rgb

    points = [ChartPoint(1, 0.7, 0.8, 0.9, 1.0, "passed", False),
              ChartPoint(2, 0.75, 0.85, 1.0, 1.0, "passed", True)]
    ax = chart_figure(points, title="likeness", tolerance=0.02).axes[0]
    lines = ax.get_lines()
    assert len(lines) == 5  # four series and the active version's line
    for line in lines:
        ratio = _contrast_on_white(to_rgb(line.get_color()))
        assert ratio >= 3.0, (line.get_label(), line.get_color(), round(ratio, 2))
    looks = {(line.get_marker(), line.get_linestyle()) for line in lines}
    assert len(looks) == 5
