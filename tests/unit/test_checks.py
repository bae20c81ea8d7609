"""Photo checks, preparation and the intake pipeline with a fake FaceAnalyzer (no dlib).

The fake finds "faces" drawn as skin-coloured rectangles; the colour of the two "eyes" drawn in
them is the person's identity (it becomes the embedding), so every rule can be driven exactly.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from selfie_lora.dataset.checks import (
    CheckPolicy,
    FacePatch,
    PhotoAnalysis,
    PhotoMetrics,
    analyze_photo,
    check_set,
    classify_software,
    gaussian_blur,
    laplacian_variance,
    normalized_sharpness,
)
from selfie_lora.dataset.decode import DecodedPhoto
from selfie_lora.dataset.limits import UploadedFile, UploadLimits
from selfie_lora.dataset.pipeline import run_intake
from selfie_lora.dataset.prepare import (
    PreparedPhoto,
    crop_box,
    dataset_sha256,
    encode_clean_jpeg,
    prepare_photo,
    source_min_side,
)
from selfie_lora.domain.faces import Face
from selfie_lora.errors import ConfigError

pytest.importorskip("imagehash", reason="the photo checks need the 'faces' extra")

SKIN = (180, 132, 104)
# dlib's 68 landmarks of a frontal face, as fractions of its detection box.
TEMPLATE = [
    (0.02, 0.33), (0.03, 0.46), (0.05, 0.59), (0.08, 0.71), (0.12, 0.83), (0.19, 0.94),
    (0.28, 1.03), (0.38, 1.11), (0.5, 1.13), (0.62, 1.1), (0.71, 1.02), (0.81, 0.92),
    (0.88, 0.81), (0.92, 0.69), (0.94, 0.57), (0.95, 0.45), (0.96, 0.32), (0.12, 0.28),
    (0.17, 0.22), (0.26, 0.19), (0.34, 0.19), (0.43, 0.21), (0.57, 0.21), (0.65, 0.18),
    (0.74, 0.17), (0.82, 0.2), (0.88, 0.26), (0.5, 0.29), (0.5, 0.37), (0.51, 0.45),
    (0.51, 0.53), (0.39, 0.58), (0.45, 0.59), (0.5, 0.61), (0.56, 0.59), (0.62, 0.57),
    (0.22, 0.32), (0.28, 0.29), (0.33, 0.29), (0.38, 0.32), (0.33, 0.32), (0.28, 0.33),
    (0.63, 0.31), (0.68, 0.28), (0.73, 0.28), (0.78, 0.31), (0.73, 0.32), (0.68, 0.31),
    (0.26, 0.72), (0.34, 0.69), (0.43, 0.68), (0.5, 0.69), (0.57, 0.68), (0.66, 0.69),
    (0.73, 0.71), (0.66, 0.81), (0.57, 0.85), (0.5, 0.86), (0.43, 0.86), (0.34, 0.81),
    (0.28, 0.72), (0.43, 0.71), (0.5, 0.72), (0.57, 0.71), (0.71, 0.72), (0.57, 0.79),
    (0.5, 0.81), (0.43, 0.8),
]


class FakeAnalyzer:
    """Faces are skin-coloured blobs; the mean colour of what is not skin inside a blob (the
    eyes) is the identity."""

    model_name = "fake"

    def __init__(self) -> None:
        self.calls = 0

    def ready(self) -> None:
        """Nothing to install."""

    def detect(self, image: Any, *, landmarks: bool = True, embed: bool = True) -> list[Face]:
        from scipy import ndimage

        self.calls += 1
        rgb = np.asarray(image, dtype=np.int16)
        skin = (np.abs(rgb - np.array(SKIN)).max(axis=-1) < 30)
        labels, _count = ndimage.label(skin)
        faces = []
        for index, found in enumerate(ndimage.find_objects(labels), start=1):
            if found is None:
                continue
            ys, xs = found
            left, top, right, bottom = xs.start, ys.start, xs.stop, ys.stop
            if right - left < 8 or bottom - top < 8:
                continue
            points: tuple[tuple[int, int], ...] = ()
            if landmarks:
                w, h = right - left, bottom - top
                points = tuple((round(left + x * w), round(top + y * h))
                               for x, y in TEMPLATE)
            embedding = None
            if embed:
                inside = rgb[top:bottom, left:right]
                eyes = inside[labels[top:bottom, left:right] != index]
                colour = eyes.mean(axis=0) / 255.0 if len(eyes) else np.zeros(3)
                vector = np.zeros(128)
                vector[:3] = colour
                embedding = tuple(float(v) for v in vector)
            faces.append(Face(box=(left, top, right, bottom), score=1.0, landmarks=points,
                              embedding=embedding))
        faces.sort(key=lambda f: f.width * f.height, reverse=True)
        return faces


def portrait(*, size: tuple[int, int] = (600, 800), face: tuple[int, int, int, int] | None =
             (200, 200, 400, 420), eyes: tuple[int, int, int] = (30, 30, 200),
             background: tuple[int, int, int] = (90, 120, 100), extra: list[
                 tuple[tuple[int, int, int, int], tuple[int, int, int]]] | None = None,
             seed: int = 0) -> Image.Image:
    """A textured background with skin-coloured faces holding two eyes of the identity colour."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 18, (size[1], size[0], 3))
    pixels = np.clip(np.array(background) + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    # Large shapes: each seed's scene differs (perceptual hashes see shapes, not noise).
    for _ in range(14):
        x0, y0 = int(rng.integers(0, size[0])), int(rng.integers(0, size[1]))
        w, h = int(rng.integers(40, size[0] // 2)), int(rng.integers(40, size[1] // 2))
        tone = tuple(int(v) for v in rng.integers(0, 120, 3))
        draw.rectangle((x0, y0, x0 + w, y0 + h), fill=tone)
    for box, colour in ([(face, eyes)] if face else []) + (extra or []):
        left, top, right, bottom = box
        draw.rectangle((left, top, right - 1, bottom - 1), fill=SKIN)
        w, h = right - left, bottom - top
        for cx in (0.3, 0.7):
            draw.ellipse((left + w * cx - w * 0.06, top + h * 0.3, left + w * cx + w * 0.06,
                          top + h * 0.38), fill=colour)
        # Fine texture on the skin (pores, shading): a real, sharp face.
        for _ in range(w * h // 6):
            x = int(rng.integers(left + 2, right - 2))
            y = int(rng.integers(top + 2, bottom - 2))
            draw.point((x, y), fill=(SKIN[0] - 22, SKIN[1] - 22, SKIN[2] - 22))
    return img


def decoded(img: Image.Image, *, name: str = "a.jpg", original: tuple[int, int] | None = None,
            software: str | None = None, had_exif: bool = True) -> DecodedPhoto:
    return DecodedPhoto(name=name, image=img, format="JPEG",
                        original_size=original or img.size, exif_software=software,
                        had_exif=had_exif, had_gps=False)


POLICY = CheckPolicy(resolution=256, min_photos=3, decode_min_side=256)


def codes(analysis: PhotoAnalysis) -> set[str]:
    return {f.code for f in analysis.findings}


# --------------------------------------------------------------------------- per photo


@pytest.mark.parametrize(("software", "kind"), [
    ("Facetune2 2.31", "beauty"), ("Meitu 9.1", "beauty"), ("BeautyPlus", "beauty"),
    ("SNOW", "beauty"), ("B612 11.2", "beauty"), ("美图秀秀", "beauty"), ("FaceApp", "beauty"),
    ("Adobe Photoshop CC 2017 (Macintosh)", "editor"), ("Snapseed 2.0", "editor"),
    ("VSCO", "editor"), ("Adobe Lightroom 7.1", "editor"), ("PicsArt", "editor"),
    ("iOS 17.1", None), ("HDR+ 1.0.5", None), ("Snowboard Cam", None), (None, None), ("", None),
])
def test_editing_software_is_classified(software: str | None, kind: str | None) -> None:
    assert classify_software(software) == kind


def test_beauty_app_rejects_and_editor_warns() -> None:
    analyzer = FakeAnalyzer()
    beauty = analyze_photo(decoded(portrait(), software="Facetune2"), analyzer=analyzer,
                           policy=POLICY)
    editor = analyze_photo(decoded(portrait(), software="Adobe Photoshop CC"),
                           analyzer=analyzer, policy=POLICY)
    (b,) = [f for f in beauty.findings if f.code == "edited_software"]
    (e,) = [f for f in editor.findings if f.code == "edited_software"]
    assert (b.severity, e.severity) == ("reject", "warn")
    assert "beauty filter" in b.advice
    assert "unedited" in b.advice


def test_a_clean_portrait_has_no_findings() -> None:
    analysis = analyze_photo(decoded(portrait()), analyzer=FakeAnalyzer(), policy=POLICY)
    assert analysis.findings == ()
    assert analysis.main_face is not None
    assert analysis.embedding is not None
    assert analysis.metrics is not None
    assert analysis.metrics.yaw == pytest.approx(0, abs=3)


def test_no_face() -> None:
    analysis = analyze_photo(decoded(portrait(face=None)), analyzer=FakeAnalyzer(), policy=POLICY)
    assert [(f.severity, f.code) for f in analysis.findings] == [("reject", "no_face")]
    assert analysis.main_face is None
    assert analysis.rejected


def test_second_face_reported_with_its_relative_size() -> None:
    img = portrait(size=(800, 800), face=(100, 200, 300, 420),
                   extra=[((500, 250, 650, 415), (200, 30, 30))])
    analysis = analyze_photo(decoded(img), analyzer=FakeAnalyzer(), policy=POLICY)
    (finding,) = [f for f in analysis.findings if f.code == "multiple_faces"]
    assert finding.severity == "reject"  # 75% of the main face: whose photo is it?
    assert "75%" in finding.message
    assert analysis.embedding is not None
    assert analysis.embedding[0] < 0.5
    # The friend's face has an identity too: the set check compares it with the other photos.
    assert analysis.faces[1].embedding is not None


def test_small_background_face_is_only_info() -> None:
    img = portrait(size=(800, 800), face=(100, 200, 350, 480),
                   extra=[((600, 100, 640, 146), (200, 30, 30))])
    analysis = analyze_photo(decoded(img), analyzer=FakeAnalyzer(), policy=POLICY)
    assert "multiple_faces" not in codes(analysis)
    (info,) = [f for f in analysis.findings if f.code == "background_faces"]
    assert info.severity == "info"


def test_face_cut_off_by_the_frame() -> None:
    inside = analyze_photo(decoded(portrait(size=(600, 600), face=(200, 150, 400, 350))),
                           analyzer=FakeAnalyzer(), policy=POLICY)
    assert "face_cut_off" not in codes(inside)
    # The fake only sees the visible part of a face, like a detector; its chin landmark (below
    # the box, as dlib's) falls outside the frame when the face touches the bottom edge.
    low = analyze_photo(decoded(portrait(size=(600, 600), face=(200, 400, 400, 600))),
                        analyzer=FakeAnalyzer(), policy=POLICY)
    (cut,) = [f for f in low.findings if f.code == "face_cut_off"]
    assert "chin" in cut.advice
    assert low.metrics is not None
    assert low.metrics.cut_off > 0.04


def test_face_too_small_and_low_resolution() -> None:
    tiny = portrait(size=(1600, 1600), face=(700, 700, 750, 755))
    small = analyze_photo(decoded(tiny), analyzer=FakeAnalyzer(),
                          policy=replace(POLICY, detect_side=1600))
    assert {f.code: f.severity for f in small.findings}["face_too_small"] == "reject"
    # The decoded image was reduced 4x from the original: the face had 4x the pixels there.
    img = portrait(size=(300, 400), face=(100, 100, 200, 210))
    policy = replace(POLICY, resolution=1024)
    reduced = analyze_photo(decoded(img, original=(1200, 1600)), analyzer=FakeAnalyzer(),
                            policy=policy)
    assert reduced.metrics is not None
    assert reduced.metrics.face_px == pytest.approx(440, abs=8)
    assert "face_resolution_low" not in codes(reduced)
    native = analyze_photo(decoded(img), analyzer=FakeAnalyzer(), policy=policy)
    (low,) = [f for f in native.findings if f.code == "face_resolution_low"]
    assert low.severity == "reject"  # 110 px face, ~430 needed: a 3.9x blow-up
    assert "1024" in low.message


def test_with_aspect_buckets_a_portrait_needs_the_face_its_bucket_frames() -> None:
    """A 2:3 portrait trains at its bucket's 832 x 1248 (at 1024 px), framed on the 832 px side:
    its face needs 832 / 1024 of what a square crop's does, and the check says so."""
    img = portrait(size=(400, 600), face=(150, 150, 250, 280))
    square = replace(POLICY, resolution=1024)
    bucketed = replace(square, aspect_buckets=True)
    as_square = analyze_photo(decoded(img), analyzer=FakeAnalyzer(), policy=square)
    as_bucket = analyze_photo(decoded(img), analyzer=FakeAnalyzer(), policy=bucketed)
    assert as_square.metrics is not None
    assert as_bucket.metrics is not None
    assert as_bucket.metrics.upscale == pytest.approx(as_square.metrics.upscale * 832 / 1024)
    (low,) = [f for f in as_bucket.findings if f.code == "face_resolution_low"]
    needed = 832 * POLICY.crop_face_fraction
    assert f"about {needed:.0f} px" in low.message
    # A square photo's bucket is the square: the same need either way.
    square_img = portrait(size=(600, 600), face=(250, 250, 350, 380))
    a = analyze_photo(decoded(square_img), analyzer=FakeAnalyzer(), policy=square)
    b = analyze_photo(decoded(square_img), analyzer=FakeAnalyzer(), policy=bucketed)
    assert a.metrics is not None
    assert b.metrics is not None
    assert b.metrics.upscale == pytest.approx(a.metrics.upscale)


def test_sharpness_ignores_contrast_and_sees_blur() -> None:
    rng = np.random.default_rng(1)
    gray = rng.normal(128, 30, (128, 128))
    sharp = normalized_sharpness(gray)
    assert normalized_sharpness(gray * 0.3) == pytest.approx(sharp, rel=1e-6)
    assert normalized_sharpness(gaussian_blur(gray, sigma=2.0)) < sharp / 20
    # The numpy Laplacian matches the textbook kernel.
    tiny = np.zeros((5, 5))
    tiny[2, 2] = 1.0
    assert laplacian_variance(tiny) == pytest.approx(np.var(
        [-4.0, 1.0, 1.0, 1.0, 1.0] + [0.0] * 20))


def test_blur_darkness_and_saturation_on_synthetic_faces() -> None:
    from PIL import ImageEnhance, ImageFilter

    analyzer = FakeAnalyzer()
    base = portrait()
    blurred = analyze_photo(decoded(base.filter(ImageFilter.GaussianBlur(4))),
                            analyzer=analyzer, policy=POLICY)
    assert "blurry" in codes(blurred)
    dark = analyze_photo(decoded(ImageEnhance.Brightness(base).enhance(0.3)),
                         analyzer=FakeAnalyzer(), policy=POLICY)
    assert dark.main_face is None or "underexposed" in codes(dark) or "no_face" in codes(dark)


class FacesOf:
    """The faces the fake analyzer finds in another image (the colour original of a grey copy,
    whose skin the fake would not know)."""

    model_name = "fake"

    def __init__(self, image: Image.Image) -> None:
        self._faces = FakeAnalyzer().detect(image)

    def ready(self) -> None:
        """Nothing to install."""

    def detect(self, image: Any, *, landmarks: bool = True, embed: bool = True) -> list[Face]:
        return list(self._faces)


def test_a_black_and_white_photo_is_warned_about() -> None:
    """A greyscale photo, or one whose colour a filter all but drained, passed silently, and a
    LoRA trained on such photos learns grey skin."""
    from PIL import ImageEnhance

    base = portrait()
    for img in (base.convert("L").convert("RGB"), ImageEnhance.Color(base).enhance(0.15)):
        analysis = analyze_photo(decoded(img), analyzer=FacesOf(base), policy=POLICY)
        (finding,) = [f for f in analysis.findings if f.code == "black_and_white"]
        assert finding.severity == "warn"
        assert "colour original" in finding.advice
        assert "grey skin" in finding.advice
        assert not analysis.rejected
    # The colour photo, and one with muted colours, are not.
    for img in (base, ImageEnhance.Color(base).enhance(0.6)):
        analysis = analyze_photo(decoded(img), analyzer=FacesOf(base), policy=POLICY)
        assert "black_and_white" not in codes(analysis)


# --------------------------------------------------------------------------- the set


def _analysis(name: str, *, order: int, identity: float = 0.0, yaw: float = 0.0,
              pitch: float = 0.0, asymmetry: float = 0.0, fraction: float = 0.3, luma: float = 120.0,
              background: tuple[float, float, float] = (100.0, 128.0, 128.0),
              phash: str = "0", face_hash: str | None = None, had_exif: bool = True,
              face_px: float = 800.0, findings: tuple[Any, ...] = ()) -> PhotoAnalysis:
    vector = [0.0] * 128
    vector[0] = identity
    vector[1 + order % 7] = 0.05  # the same person's photos are never identical
    face = Face(box=(0, 0, 100, 100), score=1.0, embedding=tuple(vector))
    metrics = PhotoMetrics(
        face_fraction=fraction, face_px=face_px, upscale=1.0, cut_off=0.0, sharpness=300.0,
        face_luma=luma, face_luma_low=luma - 40, face_luma_high=luma + 40, face_clipped=0.0,
        frame_clipped=0.0, skin_saturation=0.4, garish_fraction=0.0, skin_texture=0.8, yaw=yaw,
        pitch=pitch, roll=0.0, light_asymmetry=asymmetry, background=background)
    patch = None
    if face_hash is not None:
        patch = FacePatch(pixels=bytes(64 * 64), inside=(0, 0, 64, 64), phash=face_hash,
                          dhash=face_hash)
    return PhotoAnalysis(name=name, image_size=(1000, 1000), scale=1.0, faces=(face,),
                         main_face=face, findings=findings, metrics=metrics,
                         whole_phash=phash, whole_dhash=phash, face_patch=patch,
                         had_exif=had_exif, order=order)


def _varied(n: int, **overrides: Any) -> list[PhotoAnalysis]:
    out = []
    for i in range(n):
        values: dict[str, Any] = {
            "yaw": (-30, -10, 0, 15, 35)[i % 5], "pitch": (-10.0, 0.0, 12.0)[i % 3],
            "fraction": (0.15, 0.3, 0.5)[i % 3],
            "luma": (80.0, 120.0, 170.0)[i % 3],
            "background": ((40.0, 120.0, 140.0), (200.0, 128.0, 128.0), (120.0, 90.0, 170.0),
                           (90.0, 160.0, 110.0))[i % 4],
            "phash": f"{(1 << (i * 2 % 64)) * 0xFF:016x}"[-16:],
        }
        values.update(overrides)
        out.append(_analysis(f"p{i}.jpg", order=i, **values))
    return out


def _hashes_far_apart(photos: list[PhotoAnalysis]) -> list[PhotoAnalysis]:
    # Distinct random 64-bit hashes (>= 20 bits apart with overwhelming probability).
    rng = np.random.default_rng(7)
    return [replace(p, whole_phash=f"{int(rng.integers(0, 2**63)):016x}",
                    whole_dhash=f"{int(rng.integers(0, 2**63)):016x}") for p in photos]


def test_count_findings_and_verdict() -> None:
    policy = replace(POLICY, min_photos=3, max_photos=30)
    three = check_set(_hashes_far_apart(_varied(3)), policy=policy)
    assert three.trainable
    assert {(f.severity, f.code) for f in three.findings if f.photo is None} == {
        ("warn", "few_photos")}
    assert three.quality in ("fair", "poor")
    assert three.score < 80
    assert any("15-25" in r for r in three.reasons)

    best = check_set(_hashes_far_apart(_varied(20)), policy=policy)
    assert best.trainable
    assert best.quality == "excellent"
    assert best.score >= 85
    assert not [f for f in best.findings if f.photo is None]

    many = check_set(_hashes_far_apart(_varied(28)), policy=policy)
    assert {f.code for f in many.findings if f.photo is None} == {"many_photos"}
    assert many.trainable

    too_many = check_set(_hashes_far_apart(_varied(31)), policy=policy)
    assert not too_many.trainable
    assert too_many.quality == "poor"
    assert "too_many_photos" in {f.code for f in too_many.findings}

    too_few = check_set(_hashes_far_apart(_varied(2)), policy=policy)
    assert not too_few.trainable
    assert {f.code for f in too_few.findings if f.severity == "reject"} == {"too_few_photos"}
    assert too_few.reasons[0].startswith("the set cannot be trained")


def test_an_empty_set_cannot_train() -> None:
    report = check_set([], policy=POLICY)
    assert not report.trainable
    assert report.quality == "poor"
    assert report.accepted == ()
    assert [f.code for f in report.findings] == ["too_few_photos"]


@pytest.mark.parametrize(("kept", "minimum", "message"), [
    (0, 1, "0 usable photos; at least 1 is needed"),
    (1, 3, "1 usable photo; at least 3 are needed"),
    (2, 3, "2 usable photos; at least 3 are needed"),
])
def test_too_few_photos_is_said_in_plain_english(kept: int, minimum: int, message: str) -> None:
    """"0 usable photo(s); at least 1 are needed" was what a user read."""
    report = check_set(_hashes_far_apart(_varied(kept)),
                       policy=replace(POLICY, min_photos=minimum))
    assert [f.message for f in report.findings if f.code == "too_few_photos"] == [message]
    # The advice says how many to add, as few_photos' does ("add more" gave no number).
    assert [f.advice for f in report.findings if f.code == "too_few_photos"] == [
        f"add {minimum - kept} or more clear photos of your face "
        f"({POLICY.recommended_min}-{POLICY.recommended_max} work best)"]
    assert not any("(s)" in reason for reason in report.reasons)
    few = check_set(_hashes_far_apart(_varied(minimum)), policy=replace(POLICY, min_photos=1))
    assert [f.message for f in few.findings if f.code == "few_photos"] == [
        f"{minimum} usable photo{'' if minimum == 1 else 's'}; "
        f"{POLICY.recommended_min}-{POLICY.recommended_max} work best"]


def test_a_set_refused_for_too_few_photos_says_the_minimum_in_its_summary() -> None:
    """The summary of a refused 3-photo set read "3 usable photos: 15-25 work best", while what
    refused it, "at least 5 are needed", was only in the table; and "1 photo(s) left out"."""
    from selfie_lora.domain.entities import Finding

    photos = _hashes_far_apart(_varied(4))
    warned = Finding("warn", "blurry", "a bit blurry", "use a sharp photo", photo="p1.jpg")
    refused = Finding("reject", "blurry", "blurry", "use a sharp photo", photo="p0.jpg")
    photos[0] = replace(photos[0], findings=(refused,))
    photos[1] = replace(photos[1], findings=(warned,))
    report = check_set(photos, policy=replace(POLICY, min_photos=5))
    assert not report.trainable
    assert report.reasons[:2] == ("the set cannot be trained on as it is",
                                  "3 usable photos; at least 5 are needed")
    assert not any("work best" in r or "(s)" in r for r in report.reasons)
    assert "1 of 3 kept photos has a warning" in report.reasons
    assert "1 photo left out" in report.reasons


def test_rejected_photos_leave_the_set() -> None:
    photos = _hashes_far_apart(_varied(16))
    from selfie_lora.domain.entities import Finding

    bad = Finding("reject", "blurry", "blurry", "use a sharp photo", photo="p0.jpg")
    photos[0] = replace(photos[0], findings=(bad,))
    report = check_set(photos, policy=POLICY)
    assert "p0.jpg" in report.rejected
    assert "p0.jpg" not in report.accepted
    assert len(report.accepted) == 15
    assert bad in report.findings


def test_uniform_sets_get_variety_findings() -> None:
    same = _hashes_far_apart(_varied(16, yaw=2.0, pitch=3.0, fraction=0.5, luma=130.0,
                                     background=(200.0, 128.0, 128.0)))
    report = check_set(same, policy=POLICY)
    found = {f.code: f.severity for f in report.findings if f.photo is None}
    assert found == {"little_pose_variety": "warn", "little_pitch_variety": "info",
                     "little_framing_variety": "warn", "little_lighting_variety": "info",
                     "little_background_variety": "warn"}
    assert all(f.advice for f in report.findings)
    assert report.stats.yaw_spread == pytest.approx(0.0, abs=1e-9)
    varied = check_set(_hashes_far_apart(_varied(16)), policy=POLICY)
    assert report.score < varied.score
    # The same brightness but light from the left, the front and the right: varied enough.
    sides = [replace(p, metrics=replace(p.metrics, light_asymmetry=(-0.2, 0.0, 0.2)[i % 3]))
             for i, p in enumerate(same) if p.metrics is not None]
    assert "little_lighting_variety" not in {f.code for f in check_set(sides, policy=POLICY).findings}


def test_different_person_by_centre_in_larger_sets() -> None:
    photos = _hashes_far_apart(_varied(8))
    photos[3] = replace(photos[3], main_face=Face(
        box=(0, 0, 100, 100), score=1.0, embedding=tuple([0.9] + [0.0] * 127)))
    report = check_set(photos, policy=POLICY)
    flagged = [f for f in report.findings if f.code == "different_person"]
    assert [(f.photo, f.severity) for f in flagged] == [("p3.jpg", "reject")]


def test_a_friend_with_a_larger_face_is_not_trained_on() -> None:
    """A photo of the user beside a friend whose face is larger: the larger face was taken as
    the user's, only warned about ("if it is, keep it") and the friend's face was trained on."""
    photos = _hashes_far_apart(_varied(6))
    friend = Face(box=(0, 0, 100, 100), score=1.0, embedding=tuple([0.48] + [0.0] * 127))
    you = Face(box=(200, 0, 270, 70), score=1.0, embedding=tuple([0.0] * 128))
    photos[5] = replace(photos[5], main_face=friend, faces=(friend, you))
    report = check_set(photos, policy=POLICY)
    (finding,) = [f for f in report.findings if f.code == "different_person"]
    assert (finding.photo, finding.severity) == ("p5.jpg", "reject")
    assert "train the other person's face" in finding.message
    assert "p5.jpg" not in report.accepted
    # The friend's face alone, no face of the user beside it: still no "keep it".
    alone = replace(photos[5], faces=(friend, replace(you, embedding=tuple([0.48] + [0.1] * 127))))
    photos[5] = alone
    (finding,) = [f for f in check_set(photos, policy=POLICY).findings
                  if f.code == "different_person"]
    assert "keep it" not in finding.advice
    assert "other person's face" in finding.advice


@pytest.mark.parametrize("split", [(3, 3), (2, 2), (4, 3)])
def test_a_set_of_two_people_says_which_photos_go_together(split: tuple[int, int]) -> None:
    """3 photos of one person and 3 of another: each photo was rejected with the same "seems to
    show someone else than the other photos", and nothing said which photos were whose."""
    first, second = split
    photos = _hashes_far_apart(_varied(first + second))
    photos = [replace(p, main_face=Face(box=(0, 0, 100, 100), score=1.0,
                                        embedding=tuple([0.9, *list(p.embedding or ())[1:]])))
              if i >= first else p for i, p in enumerate(photos)]
    report = check_set(photos, policy=replace(POLICY, min_photos=1))
    assert not report.trainable
    assert not [f for f in report.findings if f.code == "different_person"]
    (finding,) = [f for f in report.findings if f.code == "several_people"]
    names = [p.name for p in photos]
    assert finding.message == ("these photos show 2 different people: "
                               f"{', '.join(names[:first])} / {', '.join(names[first:])}")
    assert "only the photos of the one person" in finding.advice
    assert finding.message in report.reasons


def test_two_photos_of_one_stranger_are_both_refused() -> None:
    """5 photos of the user and 2 of one stranger: the centre was the median of all other photos,
    the other stranger's included, so the second stranger came out nearer (0.46: kept with a
    warning) than alone (0.51)."""
    photos = _hashes_far_apart(_varied(7))

    def face(**components: float) -> Face:
        vector = [0.0] * 128
        for index, value in components.items():
            vector[int(index[1:])] = value
        return Face(box=(0, 0, 100, 100), score=1.0, embedding=tuple(vector))

    # The user's photos 0.28 apart; the stranger's two 0.2 apart, 0.50 from the user's centre
    # and 0.61 from one of the user's photos.
    faces = [face(**{f"e{k + 1}": 0.2}) for k in range(5)]
    faces += [face(e0=0.45, e1=-0.2, e100=x) for x in (0.1, -0.1)]
    photos = [replace(p, main_face=f, faces=(f,)) for p, f in zip(photos, faces, strict=True)]
    report = check_set(photos, policy=POLICY)
    flagged = {f.photo: f.severity for f in report.findings if f.code == "different_person"}
    assert flagged == {"p5.jpg": "reject", "p6.jpg": "reject"}
    assert report.accepted == tuple(f"p{i}.jpg" for i in range(5))


def test_different_person_by_majority_in_small_sets() -> None:
    three = _hashes_far_apart(_varied(3))
    three[1] = replace(three[1], main_face=Face(
        box=(0, 0, 100, 100), score=1.0, embedding=tuple([0.9] + [0.0] * 127)))
    report = check_set(three, policy=POLICY)
    assert [f.photo for f in report.findings if f.code == "different_person"] == ["p1.jpg"]
    # Two photos of two people: no telling which one is the user, both are warned about.
    two = check_set(three[:2], policy=POLICY)
    pair = [f for f in two.findings if f.code == "different_person"]
    assert {(f.photo, f.severity) for f in pair} == {("p0.jpg", "warn"), ("p1.jpg", "warn")}


def test_near_duplicates_keep_the_original() -> None:
    photos = _hashes_far_apart(_varied(5))
    # p4 is a copy of p1 without EXIF (a re-saved PNG, say): same pixels, same hashes.
    photos[4] = replace(photos[4], whole_phash=photos[1].whole_phash,
                        whole_dhash=photos[1].whole_dhash, had_exif=False,
                        metrics=photos[1].metrics)
    # p2 is a crop of p0: the frames differ, the face patches match.
    photos[0] = replace(photos[0], face_patch=FacePatch(bytes(4096), (0, 0, 64, 64),
                                                         "ffff0000ffff0000", "0f0f0f0f0f0f0f0f"))
    photos[2] = replace(photos[2], face_patch=FacePatch(bytes(4096), (0, 0, 64, 64),
                                                         "ffff0000ffff0001", "0f0f0f0f0f0f0f0e"))
    report = check_set(photos, policy=POLICY)
    dups = {f.photo: f.message for f in report.findings if f.code == "near_duplicate"}
    assert set(dups) == {"p4.jpg", "p2.jpg"}
    assert "p1.jpg" in dups["p4.jpg"]
    assert "copy" in dups["p4.jpg"]
    assert "p0.jpg" in dups["p2.jpg"]


def test_a_copy_of_a_refused_photo_is_not_told_to_keep_it() -> None:
    """02.jpg refused for its low resolution and its mirror copy: the copy was told "keep only
    02.jpg and add a different photo instead" while 02.jpg was left out too."""
    from selfie_lora.domain.entities import Finding

    photos = _hashes_far_apart(_varied(6))
    small = Finding("reject", "face_resolution_low", "too small", "use the original", photo="p1.jpg")
    photos[1] = replace(photos[1], findings=(small,))
    photos[5] = replace(photos[5], whole_phash=photos[1].whole_phash,
                        whole_dhash=photos[1].whole_dhash, metrics=photos[1].metrics,
                        findings=(replace(small, photo="p5.jpg"),))
    report = check_set(photos, policy=POLICY)
    (dup,) = [f for f in report.findings if f.code == "near_duplicate"]
    assert dup.message == "p5.jpg is a copy of p1.jpg (which cannot be used either)"
    assert "keep" not in dup.advice
    assert {"p1.jpg", "p5.jpg"} <= set(report.rejected)


# --------------------------------------------------------------------------- preparation


def test_crop_is_centred_on_the_face_and_clamped() -> None:
    face = Face(box=(400, 300, 600, 520), score=1.0)
    analysis = PhotoAnalysis(name="x", image_size=(1000, 2000), scale=1.0, faces=(face,),
                             main_face=face, findings=())
    left, top, right, bottom = crop_box(analysis, image_size=(1000, 2000))
    side = right - left
    assert side == bottom - top == round(220 / 0.42)
    assert left < 400
    assert right > 600
    assert top < 300
    assert bottom > 520
    assert abs((left + right) / 2 - 500) <= 1
    # Analysed at another size: the box scales with the image.
    assert crop_box(analysis, image_size=(500, 1000)) == pytest.approx(
        tuple(v / 2 for v in (left, top, right, bottom)), abs=1)
    # Near the edge: shifted inside, not shrunk.
    edge = replace(analysis, main_face=Face(box=(0, 0, 200, 220), score=1.0))
    assert crop_box(edge, image_size=(1000, 2000))[:2] == (0, 0)
    # A photo smaller than the crop: the largest square that fits.
    big = replace(analysis, main_face=Face(box=(100, 100, 700, 760), score=1.0))
    assert crop_box(big, image_size=(1000, 2000)) [2] - crop_box(
        big, image_size=(1000, 2000))[0] == 1000


def test_prepared_photo_has_the_size_and_no_metadata() -> None:
    img = portrait(size=(600, 800))
    img.info["comment"] = b"secret camera comment"
    img.info["icc_profile"] = b"not really a profile"
    analysis = analyze_photo(decoded(img), analyzer=FakeAnalyzer(), policy=POLICY)
    photo = prepare_photo(decoded(img), analysis, resolution=256)
    assert (photo.width, photo.height) == (256, 256)
    assert photo.sha256 == hashlib.sha256(photo.data).hexdigest()
    with Image.open(io.BytesIO(photo.data)) as out:
        assert out.format == "JPEG"
        assert out.size == (256, 256)
        assert out.mode == "RGB"
        assert "comment" not in out.info
        assert "icc_profile" not in out.info
        assert "exif" not in out.info
        assert len(out.getexif()) == 0
    assert b"secret camera comment" not in photo.data
    # Deterministic: the same photo prepares to the same bytes (content-addressed storage).
    assert prepare_photo(decoded(img), analysis, resolution=256).data == photo.data


def test_clean_jpeg_drops_a_comment_that_pillow_would_keep() -> None:
    img = Image.new("RGB", (32, 32), (10, 200, 30))
    img.info["comment"] = b"kept by a plain save"
    plain = io.BytesIO()
    img.save(plain, format="JPEG")
    assert b"kept by a plain save" in plain.getvalue()  # why encode_clean_jpeg exists
    assert b"kept by a plain save" not in encode_clean_jpeg(img)


def test_clean_jpeg_of_an_image_not_loaded_yet() -> None:
    """An image straight from ``Image.open`` has no pixels until it is loaded: they are read
    first, as the copy made with new() and paste() read them (it raised AssertionError)."""
    source = io.BytesIO()
    portrait(size=(300, 400), face=(100, 100, 200, 210)).save(
        source, format="JPEG", comment=b"a camera comment")
    with Image.open(source) as loaded:
        loaded.load()
        expected = encode_clean_jpeg(loaded)
    with Image.open(source) as opened:
        assert opened.mode == "RGB"
        data = encode_clean_jpeg(opened)
    assert data == expected
    assert b"a camera comment" not in data


def test_source_min_side_asks_for_more_pixels_only_when_they_exist() -> None:
    img = portrait(size=(500, 500), face=(200, 200, 300, 300))
    analysis = analyze_photo(decoded(img), analyzer=FakeAnalyzer(), policy=POLICY)
    # Crop ~238 px at this size; the original is 4x larger: decode at 4x... capped so the
    # crop reaches the resolution.
    wanted = source_min_side(decoded(img, original=(2000, 2000)), analysis, resolution=512)
    assert wanted is not None
    assert 1000 <= wanted <= 1100
    assert source_min_side(decoded(img), analysis, resolution=512) is None  # nothing more
    assert source_min_side(decoded(img, original=(2000, 2000)), analysis, resolution=200) is None


def test_dataset_hash_ignores_order() -> None:
    a = PreparedPhoto("a", "1" * 64, b"", 1, 1)
    b = PreparedPhoto("b", "2" * 64, b"", 1, 1)
    assert dataset_sha256([a, b]) == dataset_sha256([b, a]) != dataset_sha256([a])
    expected = hashlib.sha256(("1" * 64 + "\n" + "2" * 64).encode()).hexdigest()
    assert dataset_sha256([b, a]) == expected


# --------------------------------------------------------------------------- the pipeline


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@pytest.mark.parametrize("workers", [1, 2])
def test_run_intake_with_a_fake_analyzer(workers: int) -> None:
    files = [UploadedFile(f"p{i}.jpg", _jpeg(portrait(
        size=(600, 800), face=(150 + 20 * i, 150 + 10 * i, 350 + 20 * i, 370 + 10 * i),
        background=(40 + 30 * i, 120, 200 - 30 * i), seed=i))) for i in range(4)]
    files.append(UploadedFile("notes.jpg", b"not a photo at all"))
    files.append(UploadedFile("empty.jpg", _jpeg(portrait(face=None, seed=9))))
    files.append(UploadedFile("copy.jpg", files[0].data))
    result = run_intake(files, limits=UploadLimits(), policy=POLICY, analyzer=FakeAnalyzer(),
                        workers=workers)
    assert result.images_total == 7
    by_code = {(f.photo, f.code) for f in result.findings}
    assert ("notes.jpg", "not_an_image") in by_code
    assert ("empty.jpg", "no_face") in by_code
    assert ("copy.jpg", "near_duplicate") in by_code
    assert [p.name for p in result.prepared] == ["p0.jpg", "p1.jpg", "p2.jpg", "p3.jpg"]
    assert list(result.report.accepted) == [p.name for p in result.prepared]
    assert all((p.width, p.height) == (256, 256) for p in result.prepared)
    assert result.report.trainable  # 4 >= min_photos 3
    assert "few_photos" in {f.code for f in result.findings}
    assert result.seconds > 0
    assert result.cpu_seconds > 0
    assert math.isfinite(result.report.score)


def test_files_refused_while_reading_are_left_out_as_unreadable_photos_are() -> None:
    """A file the reader refused on its own (too large, an archive) is a photo left out with its
    finding: counted in the upload and against the set, never analysed nor remembered."""
    from selfie_lora.dataset.pipeline import OutcomeCache
    from selfie_lora.domain.entities import Finding

    good = [UploadedFile(f"p{i}.jpg", _jpeg(portrait(
        size=(600, 800), face=(150 + 20 * i, 150 + 10 * i, 350 + 20 * i, 370 + 10 * i),
        background=(40 + 30 * i, 120, 200 - 30 * i), seed=i))) for i in range(2)]

    def refused(size: str) -> UploadedFile:
        return UploadedFile("IMG_0042.DNG", b"", refused=Finding(
            "reject", "file_too_large", f"IMG_0042.DNG is {size}, over the 50 MB a photo may be",
            "export it as JPEG", photo="IMG_0042.DNG"))

    cache = OutcomeCache()
    for size in ("51 MB", "60 MB"):  # the same name again: its own finding, not a remembered one
        result = run_intake([good[0], refused(size), good[1]], limits=UploadLimits(),
                            policy=POLICY, analyzer=FakeAnalyzer(), workers=1, cache=cache)
        assert result.images_total == 3
        assert [p.name for p in result.prepared] == ["p0.jpg", "p1.jpg"]
        assert result.findings[0].message == f"IMG_0042.DNG is {size}, over the 50 MB a photo may be"
        # Too few good photos left: the count rule says so (3 at least here).
        assert not result.report.trainable
        assert "too_few_photos" in {f.code for f in result.findings}


class BrokenAnalyzer(FakeAnalyzer):
    def detect(self, image: Any, *, landmarks: bool = True, embed: bool = True) -> list[Face]:
        raise RuntimeError("a native failure")


class NotInstalledAnalyzer(FakeAnalyzer):
    def ready(self) -> None:
        raise ConfigError("face checks need dlib: pip install 'selfie-lora[faces]'")

    def detect(self, image: Any, *, landmarks: bool = True, embed: bool = True) -> list[Face]:
        raise ConfigError("face checks need dlib: pip install 'selfie-lora[faces]'")


class LosesItsModels(FakeAnalyzer):
    """Ready, then its model files go missing under it: still the set-up, not the photos."""

    def detect(self, image: Any, *, landmarks: bool = True, embed: bool = True) -> list[Face]:
        raise ConfigError("the face model shape_predictor_68_face_landmarks.dat is missing")


@pytest.mark.parametrize("analyzer", [NotInstalledAnalyzer(), LosesItsModels()])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_setup_error_stops_the_intake_with_one_clear_error(workers: int,
                                                             analyzer: FakeAnalyzer) -> None:
    files = [UploadedFile(f"p{i}.jpg", _jpeg(portrait(seed=i))) for i in range(3)]
    with pytest.raises(ConfigError):
        run_intake(files, limits=UploadLimits(), policy=POLICY, analyzer=analyzer,
                   workers=workers)


@pytest.mark.parametrize("workers", [1, 2])
def test_an_analysis_failure_is_a_finding_not_a_crash(workers: int,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    files = [UploadedFile(f"p{i}.jpg", _jpeg(portrait(seed=i))) for i in range(2)]
    result = run_intake(files, limits=UploadLimits(), policy=POLICY, analyzer=BrokenAnalyzer(),
                        workers=workers)
    failed = {(f.photo, f.code, f.severity) for f in result.findings if f.photo}
    assert failed == {("p0.jpg", "analysis_failed", "reject"),
                      ("p1.jpg", "analysis_failed", "reject")}
    assert result.prepared == ()
    assert not result.report.trainable
    assert "analysing p0.jpg failed" in caplog.text


def test_the_camera_original_is_kept_over_an_upscaled_copy_or_a_screenshot() -> None:
    """An "enhanced" 2x copy (no EXIF, twice the face pixels) and a PNG screenshot of the photo
    were kept and the camera original told to go: copies were ranked by face pixels first."""
    photos = _hashes_far_apart(_varied(6))
    photos[1] = replace(photos[1], had_exif=True)
    big = replace(photos[1].metrics, face_px=photos[1].metrics.face_px * 2)  # type: ignore[union-attr]
    photos[4] = replace(photos[4], name="p1_enhanced.jpg", whole_phash=photos[1].whole_phash,
                        whole_dhash=photos[1].whole_dhash, had_exif=False, metrics=big,
                        image_size=(2000, 2000))
    photos[5] = replace(photos[5], name="Screenshot.png", whole_phash=photos[1].whole_phash,
                        whole_dhash=photos[1].whole_dhash, had_exif=False, metrics=big,
                        image_size=(2000, 2000))
    report = check_set(photos, policy=POLICY)
    dups = {f.photo: f for f in report.findings if f.code == "near_duplicate"}
    assert set(dups) == {"p1_enhanced.jpg", "Screenshot.png"}
    assert all(f.advice.startswith("keep only p1.jpg") for f in dups.values())
    # Without EXIF on either side, a JPEG is still kept over the PNG screenshot.
    photos[1] = replace(photos[1], had_exif=False)
    report = check_set([photos[i] for i in (0, 1, 2, 3, 5)], policy=POLICY)
    (dup,) = [f for f in report.findings if f.code == "near_duplicate"]
    assert dup.photo == "Screenshot.png"


@pytest.mark.parametrize("severity", ["reject", "warn"])
def test_a_photo_refused_by_its_own_checks_is_not_called_someone_else(severity: str) -> None:
    """The user's own blurred photo (embedding 0.54-0.6 away) was rejected as blurry AND as
    "someone else", or warned "check that this is the same person; if it is, keep it"."""
    from selfie_lora.domain.entities import Finding

    photos = _hashes_far_apart(_varied(6))
    blurry = Finding("reject", "blurry", "blurry", "use a sharp photo", photo="p5.jpg")
    far = 0.9 if severity == "reject" else 0.49
    photos[5] = replace(photos[5], findings=(blurry,), main_face=Face(
        box=(0, 0, 100, 100), score=1.0, embedding=tuple([far] + [0.0] * 127)))
    report = check_set(photos, policy=POLICY)
    assert [f.code for f in report.findings if f.photo == "p5.jpg"] == ["blurry"]
    # Passing its own checks, the same face is still compared.
    report = check_set([*photos[:5], replace(photos[5], findings=())], policy=POLICY)
    assert [(f.code, f.severity) for f in report.findings if f.photo == "p5.jpg"] == [
        ("different_person", severity)]
    # Refused for a reason that leaves the face comparable (cut off): compared, but never told
    # "if it is, keep it".
    cut = Finding("reject", "face_cut_off", "cut off", "use an uncut photo", photo="p5.jpg")
    report = check_set([*photos[:5], replace(photos[5], findings=(cut,))], policy=POLICY)
    (found,) = [f for f in report.findings if f.code == "different_person"]
    assert found.severity == severity
    assert "keep it" not in found.advice


def test_keep_only_never_names_a_photo_of_someone_else() -> None:
    """A stranger's photo sent twice (the original and a half-size copy): the copy was told
    "keep only IMG_0100.jpg", which the identity check then rejected as someone else."""
    photos = _hashes_far_apart(_varied(7))
    stranger = Face(box=(0, 0, 100, 100), score=1.0, embedding=tuple([0.9] + [0.0] * 127))
    photos[5] = replace(photos[5], main_face=stranger)
    photos[6] = replace(photos[6], main_face=stranger, whole_phash=photos[5].whole_phash,
                        whole_dhash=photos[5].whole_dhash, had_exif=False)
    report = check_set(photos, policy=POLICY)
    (dup,) = [f for f in report.findings if f.code == "near_duplicate"]
    assert dup.photo == "p6.jpg"
    assert dup.message == "p6.jpg is a copy of p5.jpg (which cannot be used either)"
    assert dup.advice == "use a different photo instead of both"
    assert {(f.photo, f.severity) for f in report.findings if f.code == "different_person"} == {
        ("p5.jpg", "reject")}


def test_a_set_of_two_people_gets_no_count_or_variety_advice() -> None:
    """A couple's folder, 8 photos of one and 6 of the other: beside "these photos show 2
    different people" it was told "14 usable photos; 15-25 work best | add 1 or more" (7 are
    missing once the partner's go) and a pose spread measured over two people's faces."""
    photos = _hashes_far_apart(_varied(14, yaw=0.0, pitch=0.0))
    photos = [replace(p, main_face=Face(box=(0, 0, 100, 100), score=1.0,
                                        embedding=tuple([0.9, *list(p.embedding or ())[1:]])))
              if i >= 8 else p for i, p in enumerate(photos)]
    report = check_set(photos, policy=POLICY)
    assert not report.trainable
    assert [f.code for f in report.findings if f.photo is None] == ["several_people"]
    assert not any("usable" in r for r in report.reasons)
    # One person's 8 alike photos are still told the count and the pose.
    alone = {f.code for f in check_set(photos[:8], policy=POLICY).findings if f.photo is None}
    assert {"few_photos", "little_pose_variety"} <= alone


def test_a_washed_out_colour_photo_is_not_called_black_and_white() -> None:
    """A colour photo brightened 2x measures a face saturation of 0.06: it was rejected as
    overexposed and also warned "looks black-and-white ... use the colour original"."""
    from selfie_lora.dataset.checks.photo import _judge

    def metrics(*, luma: float, low: float, high: float) -> PhotoMetrics:
        return PhotoMetrics(
            face_fraction=0.3, face_px=800.0, upscale=1.0, cut_off=0.0, sharpness=300.0,
            face_luma=luma, face_luma_low=low, face_luma_high=high, face_clipped=0.0,
            frame_clipped=0.0, skin_saturation=0.06, garish_fraction=0.0, skin_texture=0.8,
            yaw=0.0, pitch=0.0, roll=0.0, light_asymmetry=0.0, background=(100.0, 128.0, 128.0))

    washed = {f.code for f in _judge("a.jpg", metrics(luma=230.0, low=200.0, high=250.0),
                                     policy=POLICY)}
    assert "overexposed" in washed
    assert "black_and_white" not in washed
    # A well exposed face with as little colour is still warned about.
    grey = {f.code for f in _judge("a.jpg", metrics(luma=120.0, low=80.0, high=160.0),
                                   policy=POLICY)}
    assert grey == {"black_and_white"}
    # So is one only warned as bright (it is still trained on): a high-key black-and-white
    # portrait lost its warning when every bright face was skipped (premerge review).
    high_key = [f for f in _judge("a.jpg", metrics(luma=200.0, low=160.0, high=240.0),
                                  policy=POLICY)]
    assert {(f.severity, f.code) for f in high_key} == {("warn", "overexposed"),
                                                        ("warn", "black_and_white")}
