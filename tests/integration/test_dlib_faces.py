"""The dlib FaceAnalyzer on real photos (tests/fixtures/photos)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfie_lora.adapters.faces.dlib_faces import EMBEDDING_MODEL, DlibFaceAnalyzer, face_distance
from selfie_lora.errors import ConfigError
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
        assert len(found[0].landmarks) == 5  # the public-domain model by default
    a, b, c = (faces[n][0].embedding for n in ("obama.jpg", "obama3.jpg", "biden.jpg"))
    assert a is not None
    assert b is not None
    assert c is not None
    assert face_distance(a, b) < 0.6 < face_distance(a, c)
    assert analyzer.model_name == f"{EMBEDDING_MODEL}+5pt"


def test_the_68_point_model_only_when_asked_and_filed_under_its_own_name(
        analyzer: DlibFaceAnalyzer) -> None:
    noncommercial = DlibFaceAnalyzer(landmarks=68)
    assert noncommercial.model_name == EMBEDDING_MODEL
    image = load("obama.jpg")
    (face68,) = noncommercial.detect(image)
    (face5,) = analyzer.detect(image)
    assert len(face68.landmarks) == 68
    assert face68.embedding is not None
    assert face5.embedding is not None
    # The same face aligned two ways: near, but not the same vector (never compared across).
    assert 0.0 < face_distance(face68.embedding, face5.embedding) < 0.2
    with pytest.raises(ConfigError, match="5- and 68-point"):
        DlibFaceAnalyzer(landmarks=17)


def test_the_setting_picks_the_landmark_model(tmp_path: Path) -> None:
    from selfie_lora.config import Settings
    from selfie_lora.wiring import default_analyzer_factory, default_face_analyzer

    default = Settings(home=tmp_path)
    chosen = Settings(home=tmp_path, face_landmarks_68_noncommercial=True)
    assert default_analyzer_factory(default)().model_name.endswith("+5pt")
    assert default_analyzer_factory(chosen)().model_name == EMBEDDING_MODEL
    assert default_face_analyzer(chosen).model_name == EMBEDDING_MODEL
    assert default_face_analyzer(chosen) is default_face_analyzer(chosen)


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
