"""The dlib FaceAnalyzer on real photos (tests/fixtures/photos)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from selfie_lora.adapters.faces.dlib_faces import EMBEDDING_MODEL, DlibFaceAnalyzer, face_distance
from tests.support.photos import FIXTURES


@pytest.fixture(scope="module")
def analyzer() -> DlibFaceAnalyzer:
    return DlibFaceAnalyzer()


def load(name: str, side: int = 512) -> np.ndarray:
    with Image.open(FIXTURES / name) as img:
        rgb = img.convert("RGB")
        rgb.thumbnail((side, side))
        return np.asarray(rgb)


def test_same_person_is_near_and_another_is_far(analyzer: DlibFaceAnalyzer) -> None:
    faces = {n: analyzer.detect(load(n)) for n in ("obama.jpg", "obama3.jpg", "biden.jpg")}
    for found in faces.values():
        assert len(found) == 1
        assert found[0].embedding is not None
        assert len(found[0].embedding) == 128
        assert len(found[0].landmarks) == 68
    a, b, c = (faces[n][0].embedding for n in ("obama.jpg", "obama3.jpg", "biden.jpg"))
    assert a is not None
    assert b is not None
    assert c is not None
    assert face_distance(a, b) < 0.6 < face_distance(a, c)
    assert analyzer.model_name == EMBEDDING_MODEL


def test_no_face_in_a_flat_image(analyzer: DlibFaceAnalyzer) -> None:
    assert analyzer.detect(np.full((200, 200, 3), 128, dtype=np.uint8)) == []


def test_detect_without_embedding_is_cheaper_and_rejects_bad_shapes(
    analyzer: DlibFaceAnalyzer,
) -> None:
    faces = analyzer.detect(load("obama.jpg"), landmarks=False, embed=False)
    assert len(faces) == 1
    assert faces[0].embedding is None
    assert faces[0].landmarks == ()
    with pytest.raises(ValueError, match="RGB"):
        analyzer.detect(np.zeros((10, 10), dtype=np.uint8))
