"""bench/checks_eval.py's beauty edit filters only where its mask shows the blur: its pixels
there must be those of filtering the whole region, or the evaluation would measure other
edits than its README table was made from."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2", reason="the beauty edit needs the 'faces' extra")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench() -> ModuleType:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import checks_eval
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return checks_eval


def _image(height: int = 90, width: int = 120) -> np.ndarray[Any, Any]:
    """Edges and noise everywhere, so a pixel filtered with another border or neighbourhood
    comes out different."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:height, 0:width]
    base = 128 + 90 * np.sign(np.sin(x / 9.0 + y / 13.0))
    noise = rng.normal(0.0, 25.0, (height, width, 3))
    return np.clip(base[..., None] + noise, 0, 255).astype(np.uint8)


@pytest.fixture(autouse=True)
def _opencv_loop_only() -> Iterator[None]:
    """OpenCV's own filtering loop alone: with Intel's IPP (in the wheels) it filters a whole
    image and some ROIs with IPP, which rounds a pixel of these images differently (whole image
    or band alike, a few in a million at sharp, noisy edges). This checks the bands' borders,
    not IPP's rounding."""
    ipp = cv2.ipp.useIPP()
    cv2.ipp.setUseIPP(False)
    yield
    cv2.ipp.setUseIPP(ipp)


def _whole(image: np.ndarray[Any, Any], diameter: int, passes: int) -> np.ndarray[Any, Any]:
    out = image
    for _ in range(passes):
        out = cv2.bilateralFilter(out, diameter, 40, diameter)
    return out


def _masks(height: int = 90, width: int = 120) -> dict[str, np.ndarray[Any, Any]]:
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(3)
    corner = np.zeros((height, width), bool)
    corner[height - 1, 0] = True
    return {
        # A beauty edit's: an ellipse, here running past the image's edges.
        "ellipse": ((x - 70) / 55.0) ** 2 + ((y - 40) / 48.0) ** 2 <= 1,
        "scattered": rng.random((height, width)) < 0.02,
        "corner": corner,
        "all": np.ones((height, width), bool),
        "none": np.zeros((height, width), bool),
    }


@pytest.mark.parametrize("mask", sorted(_masks()))
@pytest.mark.parametrize(("diameter", "passes", "band"), [(9, 2, 8), (5, 1, 3), (13, 2, 1)])
def test_filtering_where_needed_gives_the_whole_images_pixels(
        bench: ModuleType, mask: str, diameter: int, passes: int, band: int) -> None:
    image = _image()
    needed = _masks()[mask]
    got = bench._bilateral_where(image, needed, diameter, passes=passes, band=band)
    assert got.shape == image.shape
    assert got.dtype == np.uint8
    assert np.array_equal(got[needed], _whole(image, diameter, passes)[needed])


def test_a_band_filtered_alone_would_differ(bench: ModuleType) -> None:
    """What the ROIs are for: a slice filtered as an image of its own reflects its own edges,
    so the test above would notice bands cut out of the image."""
    image = _image()
    needed = np.zeros(image.shape[:2], bool)
    needed[40:48, 30:90] = True
    whole = _whole(image, 9, 2)
    alone = _whole(np.ascontiguousarray(image[40:48, 30:90]), 9, 2)
    assert not np.array_equal(alone, whole[40:48, 30:90])
    got = bench._bilateral_where(image, needed, 9, passes=2)
    assert np.array_equal(got[needed], whole[needed])
