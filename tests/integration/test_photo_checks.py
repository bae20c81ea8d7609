"""The photo checks on real photos (tests/fixtures/photos) with the dlib analyzer.

obama*.jpg are one person, biden.jpg another; obama_partial_face*.jpg are crops of obama.jpg,
32bit.png a PNG copy of obama2.jpg; all carry EXIF with Software "Adobe Photoshop".
people/p07-0*.jpg are two different photos of another person (downscaled real photos).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageDraw, ImageEnhance, ImageFilter

from selfie_lora.adapters.faces.dlib_faces import DlibFaceAnalyzer, face_distance
from selfie_lora.adapters.faces.dlib_regions import DlibAnalyzerFactory, DlibRegionFaceAnalyzer
from selfie_lora.dataset.checks import CheckPolicy, PhotoAnalysis, analyze_photo, check_set
from selfie_lora.dataset.checks.duplicates import pair_duplicate, patch_distance, shared_points
from selfie_lora.dataset.decode import DecodedPhoto, decode_photo
from selfie_lora.dataset.limits import UploadedFile, UploadLimits
from selfie_lora.dataset.pipeline import OutcomeCache, PhotoOutcome, run_intake, shutdown_pools
from selfie_lora.dataset.prepare import prepare_photo
from tests.support.photos import FIXTURES

pytest.importorskip("dlib", reason="the photo checks need the 'faces' extra")
pytest.importorskip("imagehash", reason="the photo checks need the 'faces' extra")

POLICY = CheckPolicy(resolution=512, min_photos=3)
LIMITS = UploadLimits()
QUALITY_CODES = {"blurry", "underexposed", "overexposed", "oversaturated", "smooth_skin"}
ALL = ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg", "obama_partial_face.jpg",
       "obama_partial_face2.jpg", "32bit.png")


@pytest.fixture(scope="module")
def analyzer() -> DlibRegionFaceAnalyzer:
    return DlibRegionFaceAnalyzer()


class Photos:
    """Decodes and analyses each photo once for the whole module."""

    def __init__(self, analyzer: DlibRegionFaceAnalyzer) -> None:
        self.analyzer = analyzer
        self._decoded: dict[str, DecodedPhoto] = {}
        self._analyses: dict[str, PhotoAnalysis] = {}
        self.order = 0

    def upload(self, name: str, data: bytes | None = None) -> UploadedFile:
        return UploadedFile(name=name, data=data if data is not None
                            else (FIXTURES / name).read_bytes())

    def decoded(self, name: str, data: bytes | None = None) -> DecodedPhoto:
        if name not in self._decoded:
            result = decode_photo(self.upload(name, data), limits=LIMITS, min_side=1024)
            assert isinstance(result, DecodedPhoto), result
            self._decoded[name] = result
        return self._decoded[name]

    def analysis(self, name: str, data: bytes | None = None) -> PhotoAnalysis:
        if name not in self._analyses:
            self.order += 1
            self._analyses[name] = analyze_photo(self.decoded(name, data), analyzer=self.analyzer,
                                                 policy=POLICY, order=self.order)
        return self._analyses[name]


@pytest.fixture(scope="module")
def photos(analyzer: DlibRegionFaceAnalyzer) -> Photos:
    return Photos(analyzer)


@pytest.fixture(scope="module", autouse=True)
def _stop_worker_processes() -> Iterator[None]:
    yield
    shutdown_pools()


def jpeg(img: Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **save)
    return buf.getvalue()


def fixture_image(name: str) -> Image.Image:
    with Image.open(FIXTURES / name) as img:
        return img.convert("RGB")


def codes(analysis: PhotoAnalysis) -> dict[str, str]:
    return {f.code: f.severity for f in analysis.findings}


# --------------------------------------------------------------------------- one person


def test_three_photos_of_one_person_pass(photos: Photos) -> None:
    analyses = [photos.analysis(n) for n in ("obama.jpg", "obama2.jpg", "obama3.jpg")]
    for a in analyses:
        assert not a.rejected, a.findings
        # Press photos went through Photoshop: a warning, not a rejection.
        assert codes(a) == {"edited_software": "warn"}, a.findings
        assert a.main_face is not None
        assert len(a.main_face.landmarks) == 5  # the 5-point model by default
    report = check_set(analyses, policy=POLICY)
    assert report.trainable
    assert report.accepted == ("obama.jpg", "obama2.jpg", "obama3.jpg")
    set_codes = {f.code: f.severity for f in report.findings if f.photo is None}
    assert set_codes == {"few_photos": "warn"}
    assert report.quality in ("fair", "poor")
    assert report.score < 70
    assert any("15-25" in reason for reason in report.reasons)
    # The same three photos with a hard minimum of 5 cannot train.
    strict = check_set(analyses, policy=replace(POLICY, min_photos=5))
    assert not strict.trainable
    assert strict.quality == "poor"
    assert "too_few_photos" in {f.code for f in strict.findings if f.severity == "reject"}


def test_another_person_is_flagged(photos: Photos) -> None:
    names = ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg")
    report = check_set([photos.analysis(n) for n in names], policy=POLICY)
    flagged = {f.photo: f.severity for f in report.findings if f.code == "different_person"}
    assert flagged == {"biden.jpg": "reject"}
    assert report.accepted == ("obama.jpg", "obama2.jpg", "obama3.jpg")


def test_crops_and_a_png_copy_are_near_duplicates(photos: Photos) -> None:
    report = check_set([photos.analysis(n) for n in ALL], policy=POLICY)
    dups = {f.photo: f.message for f in report.findings if f.code == "near_duplicate"}
    assert set(dups) == {"obama_partial_face.jpg", "obama_partial_face2.jpg", "32bit.png"}
    assert "obama.jpg" in dups["obama_partial_face.jpg"]
    assert "obama.jpg" in dups["obama_partial_face2.jpg"]
    # The copy without EXIF goes, the camera original stays.
    assert "obama2.jpg" in dups["32bit.png"]
    assert {f.photo for f in report.findings if f.code == "different_person"} == {"biden.jpg"}
    assert report.accepted == ("obama.jpg", "obama2.jpg", "obama3.jpg")
    # The crops are also cut off by their frame.
    assert codes(photos.analysis("obama_partial_face.jpg"))["face_cut_off"] == "reject"


# Two different photos of one person (tests/fixtures/photos/SOURCE.md): frontal, a similar
# expression, on different days.
SAME_PERSON = ("people/p07-01.jpg", "people/p07-02.jpg")


def test_two_photos_of_one_person_are_not_near_duplicates(photos: Photos) -> None:
    first, second = (photos.analysis(n) for n in SAME_PERSON)
    assert first.face_patch is not None
    assert second.face_patch is not None
    # The face patches alone match as closely as a crop's do: what the hashes got wrong.
    patch = patch_distance(first.face_patch, second.face_patch, policy=POLICY, cache={})
    assert patch is not None
    assert patch[0] <= POLICY.dup_face_phash
    assert patch[1] <= POLICY.dup_face_dhash
    # The scenes share no pixels: keypoints find no transform that maps one onto the other.
    assert first.keypoints is not None
    assert second.keypoints is not None
    assert shared_points(first.keypoints, second.keypoints, policy=POLICY) < 10
    assert pair_duplicate(first, second, policy=POLICY) is None
    report = check_set([first, second], policy=POLICY)
    assert not [f for f in report.findings if f.code == "near_duplicate"]


@pytest.mark.parametrize("edit", ["crop", "reencode", "mirror", "resize"])
def test_copies_of_a_real_photo_are_near_duplicates(photos: Photos, edit: str) -> None:
    name = SAME_PERSON[1]
    original = photos.analysis(name)
    img = fixture_image(name)
    face = original.main_face
    assert face is not None
    if edit == "crop":
        # Head and shoulders: three face sizes around the face.
        size = 3 * face.width
        cx, cy = (face.box[0] + face.box[2]) // 2, (face.box[1] + face.box[3]) // 2
        copy = img.crop((max(0, cx - size // 2), max(0, cy - size // 2), cx + size // 2,
                         cy + size // 2))
    elif edit == "reencode":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=50)
        copy = Image.open(io.BytesIO(buf.getvalue()))
    elif edit == "mirror":
        copy = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    else:
        copy = img.resize((img.width * 2 // 3, img.height * 2 // 3), Image.Resampling.LANCZOS)
    analysis = photos.analysis(f"{edit}-of-p07-02.jpg", jpeg(copy))
    assert pair_duplicate(original, analysis, policy=POLICY) is not None
    report = check_set([original, analysis], policy=POLICY)
    found = [f for f in report.findings if f.code == "near_duplicate"]
    assert len(found) == 1
    assert found[0].severity == "reject"


def test_a_second_person_in_the_photo(photos: Photos) -> None:
    base = fixture_image("obama3.jpg")
    biden = photos.analysis("biden.jpg")
    main = photos.analysis("obama3.jpg").main_face
    assert biden.main_face is not None
    assert main is not None
    left, top, right, bottom = biden.main_face.box
    pad = (right - left) // 3
    face = fixture_image("biden.jpg").crop((left - pad, top - pad, right + pad, bottom + pad))
    # Pasted at ~80% of the main face's size, beside him at the same height.
    scale = 0.8 * main.width / (right - left)
    face = face.resize((round(face.width * scale), round(face.height * scale)))
    base.paste(face, (main.box[0] - face.width - 60, main.box[1] - pad))
    analysis = photos.analysis("two_people.jpg", jpeg(base))
    found = [f for f in analysis.findings if f.code == "multiple_faces"]
    assert len(found) == 1
    assert found[0].severity == "reject"
    assert "%" in found[0].message
    # The main face is still the subject's.
    assert analysis.embedding is not None
    original = photos.analysis("obama3.jpg").embedding
    assert original is not None
    assert face_distance(analysis.embedding, original) < 0.3


@pytest.mark.parametrize(("edit", "expected"), [
    ("blur", "blurry"), ("dark", "underexposed"), ("saturate", "oversaturated"),
])
def test_edited_copies_are_flagged_for_the_right_reason(photos: Photos, edit: str,
                                                        expected: str) -> None:
    img = fixture_image("obama.jpg")
    if edit == "blur":
        img = img.filter(ImageFilter.GaussianBlur(3))
    elif edit == "dark":
        img = ImageEnhance.Brightness(img).enhance(0.3)
    else:
        img = ImageEnhance.Color(img).enhance(2.5)
    analysis = photos.analysis(f"{edit}.jpg", jpeg(img))
    found = codes(analysis)
    assert found.get(expected) == "reject", analysis.findings
    assert QUALITY_CODES & set(found) == {expected}, analysis.findings
    finding = next(f for f in analysis.findings if f.code == expected)
    assert finding.advice
    assert finding.photo == f"{edit}.jpg"


def test_airbrushed_skin_is_noticed(photos: Photos) -> None:
    img = fixture_image("obama.jpg")
    # The mask of the edit follows the 68-point outline (a test's own use of that model; the
    # check itself runs on the default 5 points).
    outline = DlibRegionFaceAnalyzer(landmarks=68)
    face = outline.detect(np.asarray(img), embed=False)[0]
    pts = face.landmarks
    # A beauty filter's look: the skin blurred, eyes, brows, nose and mouth left sharp.
    mask = Image.new("L", img.size, 0)
    draw = ImageDraw.Draw(mask)
    draw.polygon([pts[i] for i in [*range(17), 26, 25, 24, 23, 22, 21, 20, 19, 18, 17]], fill=255)
    for group in (range(17, 22), range(22, 27), range(36, 42), range(42, 48), range(48, 60),
                  range(27, 36)):
        xs = [pts[i][0] for i in group]
        ys = [pts[i][1] for i in group]
        draw.rectangle((min(xs) - 6, min(ys) - 6, max(xs) + 6, max(ys) + 6), fill=0)
    mask = mask.filter(ImageFilter.GaussianBlur(4))
    smooth = Image.composite(img.filter(ImageFilter.GaussianBlur(4)), img, mask)
    analysis = photos.analysis("airbrushed.jpg", jpeg(smooth))
    found = codes(analysis)
    assert found.get("smooth_skin") == "warn", analysis.findings
    assert "blurry" not in found
    assert photos.analysis("obama.jpg").metrics is not None


def test_beauty_app_photo_is_rejected(photos: Photos) -> None:
    exif = Image.Exif()
    exif[0x0131] = "Facetune2"
    analysis = photos.analysis("facetune.jpg", jpeg(fixture_image("obama2.jpg"), exif=exif))
    assert codes(analysis)["edited_software"] == "reject"


# --------------------------------------------------------------------------- preparation


def test_photo_with_gps_is_prepared_without_any_metadata(photos: Photos) -> None:
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"  # Make
    exif[0x0131] = "Camera 1.0"
    gps = exif.get_ifd(0x8825)
    gps[1] = "N"
    gps[2] = (48.0, 51.0, 29.0)
    gps[3] = "E"
    gps[4] = (2.0, 17.0, 40.0)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = jpeg(fixture_image("obama.jpg"), exif=exif, icc_profile=icc,
                comment=b"taken at home, 12 Main Street")
    with Image.open(io.BytesIO(data)) as source:  # the input really carries all of it
        assert source.getexif().get_ifd(0x8825)
        assert source.info.get("comment")
        assert source.info.get("icc_profile")
    decoded = photos.decoded("gps.jpg", data)
    assert decoded.had_gps
    analysis = photos.analysis("gps.jpg", data)
    prepared = prepare_photo(decoded, analysis, resolution=512)
    with Image.open(io.BytesIO(prepared.data)) as out:
        assert out.format == "JPEG"
        assert out.size == (512, 512)
        assert out.mode == "RGB"
        assert len(out.getexif()) == 0
        assert not out.getexif().get_ifd(0x8825)
        for key in ("exif", "comment", "icc_profile", "xmp", "photoshop"):
            assert key not in out.info, key
    for marker in (b"Exif", b"12 Main Street", b"PhoneMaker", b"ICC_PROFILE", b"GPS"):
        assert marker not in prepared.data


@pytest.mark.parametrize(("name", "resolution"), [("obama3.jpg", 512), ("obama.jpg", 256)])
def test_face_aware_crop_holds_the_face(photos: Photos, analyzer: DlibRegionFaceAnalyzer,
                                        name: str, resolution: int) -> None:
    prepared = prepare_photo(photos.decoded(name), photos.analysis(name), resolution=resolution)
    assert (prepared.width, prepared.height) == (resolution, resolution)
    with Image.open(io.BytesIO(prepared.data)) as img:
        assert img.size == (resolution, resolution)
        faces = analyzer.detect(np.asarray(img.convert("RGB")), landmarks=False, embed=False)
    assert len(faces) == 1
    left, top, right, bottom = faces[0].box
    assert left >= 0
    assert top >= 0
    assert right <= resolution
    assert bottom <= resolution
    # Centred, filling ~42% of the square (the detector's box varies by ~10%).
    assert abs((left + right) / 2 - resolution / 2) < resolution * 0.08
    assert 0.3 < faces[0].height / resolution < 0.55


# --------------------------------------------------------------------------- the pipeline


def _uploads(names: tuple[str, ...]) -> list[UploadedFile]:
    return [UploadedFile(name=n, data=(FIXTURES / n).read_bytes()) for n in names]


def test_run_intake_end_to_end(analyzer: DlibRegionFaceAnalyzer) -> None:
    files = _uploads(("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg", "32bit.png"))
    files.append(UploadedFile(name="notes.txt", data=b"hello"))
    result = run_intake(files, limits=LIMITS, policy=POLICY, analyzer=analyzer, workers=1)
    assert result.images_total == 6
    assert [p.name for p in result.prepared] == ["obama.jpg", "obama2.jpg", "obama3.jpg"]
    assert all((p.width, p.height) == (512, 512) for p in result.prepared)
    found = {(f.photo, f.code) for f in result.findings}
    assert {("notes.txt", "not_an_image"), ("biden.jpg", "different_person"),
            ("32bit.png", "near_duplicate"), (None, "few_photos")} <= found
    assert result.report.trainable


def test_worker_processes_give_the_same_result(analyzer: DlibRegionFaceAnalyzer) -> None:
    files = _uploads(("obama.jpg", "obama3.jpg", "biden.jpg", "32bit.png"))
    inline = run_intake(files, limits=LIMITS, policy=POLICY, analyzer=analyzer, workers=1)
    # With a factory the photos go to worker processes (dlib holds the GIL).
    pooled = run_intake(files, limits=LIMITS, policy=POLICY, analyzer=analyzer,
                        factory=DlibAnalyzerFactory(), workers=2)
    assert pooled.report.accepted == inline.report.accepted
    assert [p.sha256 for p in pooled.prepared] == [p.sha256 for p in inline.prepared]
    assert sorted((f.photo or "", f.code) for f in pooled.findings) == sorted(
        (f.photo or "", f.code) for f in inline.findings)


def test_a_dead_worker_process_is_replaced(caplog: pytest.LogCaptureFixture) -> None:
    import os
    import signal

    from selfie_lora.dataset import pipeline

    analyzer = DlibFaceAnalyzer()
    factory = DlibAnalyzerFactory()
    pipeline.warm_up(factory, workers=2)
    pool = pipeline._pools[(2, factory)]  # this factory's (an earlier test's may still run)
    victim = next(iter(pool._processes))  # killed between two intakes (OOM killer, say)
    os.kill(victim, signal.SIGKILL)
    files = _uploads(("obama.jpg", "obama2.jpg", "obama3.jpg"))
    result = run_intake(files, limits=LIMITS, policy=POLICY, analyzer=analyzer,
                        factory=factory, workers=2)
    assert [p.name for p in result.prepared] == ["obama.jpg", "obama2.jpg", "obama3.jpg"]
    assert "analysis_failed" not in {f.code for f in result.findings}
    assert "face-analysis worker died" in caplog.text


def test_a_wide_gamut_photo_is_converted_only_where_read(
        analyzer: DlibRegionFaceAnalyzer, monkeypatch: pytest.MonkeyPatch) -> None:
    # A photo with a wide-gamut profile (iPhones write Display P3, cameras Adobe RGB): the intake
    # converts the copies it reads, not the whole decoded photo, and finds and stores what it
    # would converting all of it first.
    from selfie_lora.dataset import pipeline
    from selfie_lora.testing import icc
    from tests.support.photos import count_colour_conversions

    wide = icc.rgb_profile(name="Wide gamut", colorants=icc.ADOBE_RGB_COLORANTS,
                           gamma=icc.ADOBE_RGB_GAMMA)
    buf = io.BytesIO()
    Image.open(FIXTURES / "obama3.jpg").save(buf, format="JPEG", quality=92, icc_profile=wide)
    upload = UploadedFile(name="tagged.jpg", data=buf.getvalue())
    real = pipeline.decode_photo

    def eager(file: UploadedFile, **options: Any) -> Any:
        return real(file, **{**options, "defer_colour": False})

    converted = count_colour_conversions(monkeypatch)
    from selfie_lora.dataset import decode

    monkeypatch.setattr(decode, "_transforms", type(decode._transforms)())  # a first look
    policy = replace(POLICY, resolution=512)
    deferred = pipeline.process_photo(upload, order=0, limits=LIMITS, policy=policy,
                                      analyzer=analyzer)
    read = sum(w * h for w, h in converted) - 19 ** 3  # less the profile's first look (the grid)
    converted.clear()
    monkeypatch.setattr(pipeline, "decode_photo", eager)
    whole = pipeline.process_photo(upload, order=0, limits=LIMITS, policy=policy,
                                   analyzer=analyzer)
    whole_read = sum(w * h for w, h in converted)
    assert whole_read >= 1434 * 2333 // 4  # all of the (reduced) decode
    assert read < whole_read / 2
    assert deferred.analysis is not None
    assert whole.analysis is not None
    assert ([(f.code, f.severity) for f in deferred.analysis.findings]
            == [(f.code, f.severity) for f in whole.analysis.findings])
    assert deferred.analysis.main_face is not None
    assert whole.analysis.main_face is not None
    assert deferred.analysis.main_face.box == whole.analysis.main_face.box
    assert deferred.prepared is not None
    assert whole.prepared is not None
    a = np.asarray(Image.open(io.BytesIO(deferred.prepared.data)), dtype=np.float64)
    b = np.asarray(Image.open(io.BytesIO(whole.prepared.data)), dtype=np.float64)
    assert a.shape == b.shape == (512, 512, 3)
    assert np.abs(a - b).mean() < 1.0  # resampled before converting instead of after
    assert abs(a.mean() - b.mean()) < 0.5
    # And the colours are converted: the same photo untagged stores other colours.
    plain = pipeline.process_photo(UploadedFile(name="plain.jpg", data=(
        FIXTURES / "obama3.jpg").read_bytes()), order=0, limits=LIMITS, policy=policy,
        analyzer=analyzer)
    assert plain.prepared is not None
    c = np.asarray(Image.open(io.BytesIO(plain.prepared.data)), dtype=np.float64)
    assert np.abs(c - b).mean() > 5 * np.abs(a - b).mean()


def test_a_photo_that_crashes_its_worker_fails_alone(caplog: pytest.LogCaptureFixture) -> None:
    # One photo kills every process that analyses it (a native crash). The pool fails every
    # unfinished photo when a worker dies, and the pool is shared with other uploads: only that
    # photo may be reported as not analysed, in this upload and in one running beside it.
    import threading

    from tests.support.photos import CrashingAnalyzerFactory, red_photo, synthetic_photo

    factory = CrashingAnalyzerFactory()
    policy = CheckPolicy(resolution=64, min_photos=3)

    def upload(prefix: str, seeds: range, *, poison: bool) -> list[UploadedFile]:
        files = [UploadedFile(name=f"{prefix}{s}.jpg", data=synthetic_photo(s, size=256))
                 for s in seeds]
        if poison:
            files.insert(2, UploadedFile(name="poison.jpg", data=red_photo()))
        return files

    results: dict[str, Any] = {}

    def intake(key: str, files: list[UploadedFile]) -> None:
        results[key] = run_intake(files, limits=LIMITS, policy=policy, analyzer=factory(),
                                  factory=factory, workers=2)

    mine = upload("a", range(6), poison=True)
    theirs = upload("b", range(10, 18), poison=False)
    threads = [threading.Thread(target=intake, args=("mine", mine)),
               threading.Thread(target=intake, args=("theirs", theirs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    failed = {key: sorted(f.photo for f in result.findings if f.code == "analysis_failed")
              for key, result in results.items()}
    assert failed == {"mine": ["poison.jpg"], "theirs": []}
    assert sorted(a.name for a in results["mine"].analyses) == [f"a{s}.jpg" for s in range(6)]
    assert len(results["theirs"].analyses) == 8
    assert "poison.jpg crashed the process analysing it alone" in caplog.text
    # Alone again: the same answer (and the shared pool still works afterwards).
    again = run_intake(mine, limits=LIMITS, policy=policy, analyzer=factory(), factory=factory,
                       workers=2)
    assert [f.photo for f in again.findings if f.code == "analysis_failed"] == ["poison.jpg"]
    assert len(run_intake(theirs, limits=LIMITS, policy=policy, analyzer=factory(),
                          factory=factory, workers=2).analyses) == 8


def test_photos_analysed_before_are_not_analysed_again(analyzer: DlibRegionFaceAnalyzer,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from selfie_lora.dataset import pipeline

    analysed: list[str] = []
    real = pipeline.process_photo

    def counting(upload: UploadedFile, **options: Any) -> PhotoOutcome:
        analysed.append(upload.name)
        return real(upload, **options)

    monkeypatch.setattr(pipeline, "process_photo", counting)
    cache = OutcomeCache()
    run_intake(_uploads(("obama.jpg", "obama2.jpg", "biden.jpg")), limits=LIMITS, policy=POLICY,
               analyzer=analyzer, workers=1, cache=cache)
    assert sorted(analysed) == ["biden.jpg", "obama.jpg", "obama2.jpg"]

    # A retraining: the same photos and one more, in another order.
    analysed.clear()
    files = _uploads(("obama3.jpg", "obama.jpg", "32bit.png", "obama2.jpg", "biden.jpg"))
    again = run_intake(files, limits=LIMITS, policy=POLICY, analyzer=analyzer, workers=1,
                       cache=cache)
    assert sorted(analysed) == ["32bit.png", "obama3.jpg"]
    analysed.clear()
    fresh = run_intake(files, limits=LIMITS, policy=POLICY, analyzer=analyzer, workers=1)
    assert len(analysed) == 5
    # The same answer as analysing every photo: the set checks ran on all of them.
    assert again.report.accepted == fresh.report.accepted
    assert [p.sha256 for p in again.prepared] == [p.sha256 for p in fresh.prepared]
    assert sorted((f.photo or "", f.code, f.message) for f in again.findings) == sorted(
        (f.photo or "", f.code, f.message) for f in fresh.findings)
    assert "near_duplicate" in {f.code for f in again.findings}  # 32bit.png of obama.jpg
    assert [a.order for a in again.analyses] == [0, 1, 2, 3, 4]
    assert [a.name for a in again.analyses] == [f.name for f in files]

    # Another name (findings name the photo) or another resolution: analysed again.
    analysed.clear()
    run_intake([UploadedFile(name="copy.jpg", data=files[1].data)], limits=LIMITS,
               policy=POLICY, analyzer=analyzer, workers=1, cache=cache)
    run_intake(files[:1], limits=LIMITS, policy=replace(POLICY, resolution=256),
               analyzer=analyzer, workers=1, cache=cache)
    assert analysed == ["copy.jpg", "obama3.jpg"]


def test_the_outcome_cache_keeps_the_most_recently_used_within_its_bound() -> None:
    from selfie_lora.dataset.prepare import PreparedPhoto
    from selfie_lora.domain.entities import Finding

    def outcome(name: str) -> PhotoOutcome:
        return PhotoOutcome(order=0, name=name, prepared=PreparedPhoto(
            name=name, sha256="0" * 64, data=b"x" * 10_000, width=8, height=8))

    cache = OutcomeCache(max_bytes=30_000)  # two outcomes of ~14 KB
    for name in ("a", "b"):
        cache.put((name,), outcome(name))
    assert cache.get(("a",), order=3) is not None  # a is now the most recent
    cache.put(("c",), outcome("c"))
    assert cache.get(("b",), order=0) is None  # the least recently used went
    hit = cache.get(("a",), order=7)
    assert hit is not None
    assert (hit.order, hit.cpu_seconds) == (7, 0.0)
    assert cache.get(("c",), order=0) is not None
    # A failure that may not happen again (a worker that died) is not kept.
    cache.put(("d",), PhotoOutcome(order=0, name="d", finding=Finding(
        "reject", "analysis_failed", "d could not be analysed", "try again", photo="d")))
    assert cache.get(("d",), order=0) is None


def test_a_photo_decoded_short_of_memory_is_not_remembered(analyzer: DlibRegionFaceAnalyzer,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A MemoryError while decoding (another upload holding the memory) said "too large,
    resize it" of a normal photo, and the cache kept that for the life of the process: the
    same photo uploaded once the memory was back was refused again without being read."""
    from selfie_lora.dataset import decode

    flatten = decode._flatten

    def short_of_memory(img: Image.Image) -> Image.Image:
        raise MemoryError

    monkeypatch.setattr(decode, "_flatten", short_of_memory)
    cache = OutcomeCache()
    files = _uploads(("obama.jpg",))
    first = run_intake(files, limits=LIMITS, policy=POLICY, analyzer=analyzer, workers=1,
                       cache=cache)
    [finding] = [f for f in first.findings if f.photo == "obama.jpg"]
    assert finding.code == decode.SHORT_OF_MEMORY
    assert "short of memory" in finding.message
    assert "again" in finding.advice
    assert "resize" not in finding.advice
    monkeypatch.setattr(decode, "_flatten", flatten)  # the memory is back
    again = run_intake(files, limits=LIMITS, policy=POLICY, analyzer=analyzer, workers=1,
                       cache=cache)
    assert cache.hits == 0
    assert [a.name for a in again.analyses] == ["obama.jpg"]
    assert decode.SHORT_OF_MEMORY not in {f.code for f in again.findings}
