"""bench/checks_eval.py's shared face detection (``--models 5,68``): the boxes of an image are
found once for all the landmark models, each model describing the faces itself. The integration
test runs one model only, where nothing is shared, so this is the shared path's test."""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from PIL import Image

from selfie_lora.domain.faces import Face

pytest.importorskip("imagehash", reason="the photo checks need the 'faces' extra")
pytest.importorskip("cv2", reason="the bench's workers set OpenCV's threads")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench() -> Iterator[ModuleType]:
    import cv2

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import checks_eval
    finally:
        sys.path.remove(str(ROOT / "bench"))
    threads = cv2.getNumThreads()
    yield checks_eval
    # What _init set for a worker, undone for the tests that run after in this process.
    cv2.setNumThreads(threads)
    checks_eval._analyzers.clear()
    checks_eval._found.clear()


class _Detector:
    """The detector the models share: counts the boxes-only detections it is asked for."""

    def __init__(self) -> None:
        self.boxes_only = 0


class _Fake:
    """A region analyzer of one landmark model. Its detector finds one face in the image's centre,
    shifted by the model's number of points: the same box for every model can only come from one
    detection."""

    model_name = "fake"

    def __init__(self, landmarks: int, detector: _Detector) -> None:
        self.landmarks = landmarks
        self.detector = detector

    def ready(self) -> None:
        """Nothing to install."""

    def detect(self, image: Any, *, landmarks: bool = True, embed: bool = True) -> list[Face]:
        if not landmarks and not embed:
            self.detector.boxes_only += 1
        height, width = np.asarray(image).shape[:2]
        shift = self.landmarks // 5
        return [Face(box=(width // 4 + shift, height // 4, 3 * width // 4 + shift,
                          3 * height // 4), score=1.0)]

    def describe(self, image: Any, box: tuple[int, int, int, int], *,
                 embed: bool = True) -> Face:
        left, top, right, bottom = box
        w, h = right - left, bottom - top
        points = ((0.3, 0.4), (0.7, 0.4), (0.5, 0.6), (0.35, 0.8), (0.65, 0.8))
        return Face(box=box, score=0.0,
                    landmarks=tuple((round(left + x * w), round(top + y * h)) for x, y in points),
                    embedding=(float(self.landmarks),) * 4 if embed else None)


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:600, 0:800]
    grey = np.clip(128 + 60 * np.sin(x / 37.0) * np.cos(y / 23.0)
                   + rng.normal(0.0, 12.0, (600, 800)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(np.stack([grey, grey * 0.8, 255 - grey], axis=-1).astype(np.uint8)).save(
        buf, format="JPEG", quality=92)
    return buf.getvalue()


def test_two_models_share_one_detection_per_image(bench: ModuleType) -> None:
    detector = _Detector()
    bench._init((5, 68), lambda m: _Fake(m, detector))
    photos = [_jpeg(1), _jpeg(2)]
    out = [bench._analyse(f"p{i}.jpg", data, i) for i, data in enumerate(photos)]
    # Once per image, not per model.
    assert detector.boxes_only == len(photos)
    for analyses in out:
        five, sixty_eight = analyses[5], analyses[68]
        assert five is not None
        assert sixty_eight is not None
        assert five.main_face is not None
        assert sixty_eight.main_face is not None
        # The first model's detection, for both (68's own would be shifted)...
        assert sixty_eight.main_face.box == five.main_face.box
        assert [f.box for f in sixty_eight.faces] == [f.box for f in five.faces]
        # ... but each model's own description.
        assert five.main_face.embedding == (5.0,) * 4
        assert sixty_eight.main_face.embedding == (68.0,) * 4
    # Nothing is kept from one image to the next: the same image again is detected again.
    bench._analyse("p0-again.jpg", photos[0], 2)
    assert detector.boxes_only == len(photos) + 1
    assert not bench._found


def test_one_model_detects_with_its_own_analyzer(bench: ModuleType) -> None:
    detector = _Detector()
    bench._init((68,), lambda m: _Fake(m, detector))
    assert isinstance(bench._analyzers[68], _Fake)  # no wrapper, no hashing
    analyses = bench._analyse("p.jpg", _jpeg(1), 0)
    assert detector.boxes_only == 1
    assert analyses[68] is not None
    assert analyses[68].main_face is not None
    assert not bench._found
