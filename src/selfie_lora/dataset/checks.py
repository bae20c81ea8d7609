"""The checks that predict a good LoRA: one photo at a time, then the set as a whole.

``analyze_photo`` looks at one decoded photo: its faces (found at low resolution, then landmarks
and the identity embedding from a sharper crop around the main face), and measurements of the
face and the frame (sharpness, exposure, colour, pose, background). It judges what one photo
alone can tell (no face, several faces, a small, cut-off or low-resolution face, blur, bad
exposure, edits, filters).

``check_set`` judges what only the set can tell: near-duplicates, a different person, how many
photos there are, how varied they are (pose, framing, lighting, background), and gives one verdict
(trainable, a quality word, a 0-100 score and its main reasons).

Every threshold lives in :class:`CheckPolicy`, with what it means and why it has its value. All
measurements are taken on the decoded image (maybe reduced by JPEG draft mode); sizes that
depend on the source's pixel count (the face's resolution) are scaled back to the original.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from selfie_lora.domain.entities import Finding
from selfie_lora.services.ports import Face, FaceAnalyzer

logger = logging.getLogger(__name__)

Quality = Literal["excellent", "good", "fair", "poor"]

# The face box (dlib's: brows to chin) as a share of the training crop's side: 0.42 keeps the
# hair, the neck and the top of the shoulders in the square (``prepare`` crops with it).
CROP_FACE_FRACTION = 0.42
FloatArray = NDArray[np.float64]


class DecodedInput(Protocol):
    """What the checks and the preparation read from a decoded photo
    (``selfie_lora.dataset.decode.DecodedPhoto`` has all of it)."""

    @property
    def name(self) -> str: ...

    @property
    def image(self) -> Image.Image: ...  # RGB, orientation applied, maybe reduced

    @property
    def original_size(self) -> tuple[int, int]: ...

    @property
    def exif_software(self) -> str | None: ...

    @property
    def had_exif(self) -> bool: ...


@runtime_checkable
class BoxDescriber(Protocol):
    """An analyzer that can give landmarks and the embedding of a face from a known box, without
    detecting it again (``DlibRegionFaceAnalyzer``). Others are asked to ``detect`` on a crop."""

    def describe(self, image: Any, box: tuple[int, int, int, int], *,
                 embed: bool = True) -> Face: ...


@dataclass(frozen=True)
class CheckPolicy:
    """Every threshold of the checks. The figures quoted were measured on the fixture photos
    (tests/fixtures/photos: press photos, 600-2300 px, faces 220-340 px) and edited copies of
    them (blurred, darkened, brightened, saturated, airbrushed, cropped, re-saved)."""

    # ---- the set
    # The trainer's square resolution (Replicate 1024, local FLUX 512, tiny 64): the face must
    # have enough pixels for a crop of this size.
    resolution: int = 1024
    # Hard limits on photos kept after the checks: outside them the set cannot train.
    min_photos: int = 5
    max_photos: int = 50
    # What works best for a FLUX person LoRA: fewer lacks variety, more adds little.
    recommended_min: int = 15
    recommended_max: int = 25

    # ---- decoding: photos are decoded with at least this short side (and at least
    # ``resolution``): JPEG draft mode then decodes a 12 MP photo at half size, ~2x faster than
    # in full, while the face keeps enough pixels for the blur and skin measurements.
    decode_min_side: int = 1024

    # ---- detection
    # Faces are found on a copy with this long side (~30 ms a photo); landmarks and the
    # embedding of the main face then come from a crop around it (straight from the box with a
    # ``BoxDescriber``, else by detecting again on the crop).
    detect_side: int = 640
    # When nothing is found, one retry at this long side (small faces in large photos).
    detect_retry_side: int = 1280
    # The face's size in the crop used for landmarks and the embedding (dlib's embedding works
    # on a 150 px chip: more pixels add nothing, and the crop's detection costs ~6 ms at 150).
    refine_face_side: int = 150

    # ---- several faces (sizes relative to the main face's height)
    # Smaller faces are far in the background: only an ``info``.
    background_face_ratio: float = 0.3
    # From here on the other face competes with the main one (whose photo is it?): ``reject``.
    # Between the two: ``warn``.
    competing_face_ratio: float = 0.6

    # ---- face size in the frame: sqrt(face box area / image area). Fixtures: 0.15 (obama3,
    # standing) to 0.35 (obama2, podium). Below: a full-body or group shot; the face-aware crop
    # still works when the face has enough pixels, so only ``warn``. Below the reject value
    # detection and identity are unsure.
    min_face_fraction: float = 0.08
    reject_face_fraction: float = 0.035

    # ---- cut off by the frame: how far the face box (or the jaw/brow landmarks) reaches past an
    # edge, as a fraction of the face's size. dlib's box is tight (brows to chin), so a few
    # percent past the edge means a part of the face is missing. The fixture crops of obama.jpg
    # (an ear and a cheek missing) measure 0.21-0.23; whole faces 0.
    cut_off_warn: float = 0.04
    cut_off_reject: float = 0.15

    # ---- resolution: the face fills ``crop_face_fraction`` of the training crop, so it needs
    # resolution * crop_face_fraction pixels in the original; upscaling more than these factors
    # shows as mush in training.
    crop_face_fraction: float = CROP_FACE_FRACTION
    upscale_warn: float = 1.5
    upscale_reject: float = 3.0

    # ---- blur: variance of the Laplacian of the face box resized to blur_face_side, after the
    # face's grey levels are scaled to a standard deviation of 50 (so a dark or low-contrast face
    # is not taken for a blurred one). The other face measurements use the same crop. Fixture
    # faces 114-585; Gaussian blur of radius 1 px: 54, 2 px: 11, 3 px: 3-5; darkened to 30%:
    # unchanged (585).
    blur_face_side: int = 256
    blur_warn: float = 60.0
    blur_reject: float = 25.0

    # ---- exposure (luminance 0-255 on the face box; clipped = <= 8 or >= 247). Judged on the
    # face's highlights (90th percentile) for darkness and on its shadows (10th percentile) for
    # brightness, not on its mean: a well-lit dark-skinned face has a low mean but bright
    # highlights, a well-lit pale face a high mean but real shadows. Fixture faces: highlights
    # 145-209, shadows 35-95; obama.jpg darkened to 45% -> highlights 84, to 30% -> 56;
    # brightened x1.6 -> shadows 146 and 31% clipped, x2 -> 176 and 62%.
    dark_highlights_warn: float = 100.0
    dark_highlights_reject: float = 65.0
    bright_shadows_warn: float = 150.0
    bright_shadows_reject: float = 185.0
    clipped_face_warn: float = 0.15
    clipped_face_reject: float = 0.35

    # ---- colour: mean HSV saturation of the face (fixture faces 0.39-0.48; darker skin and warm
    # light raise it) and the share of the frame that is garish (saturation >= 0.9 at a visible
    # brightness; fixtures 0.00-0.04). A saturation boost raises both (x2: 0.63 / 0.15, x2.5:
    # 0.72-0.81 / 0.15-0.35), warm light mostly the first: either warns, both reject.
    skin_saturation_warn: float = 0.62
    skin_saturation_reject: float = 0.7
    garish_fraction_warn: float = 0.2
    garish_fraction_reject: float = 0.12

    # ---- skin texture: high-frequency energy on the cheeks / on the whole face, judged only
    # when the face is sharp, well exposed and has enough pixels (below it every face looks
    # smooth). Fixture faces 0.64-0.93; the skin alone airbrushed (Gaussian blur through a mask
    # that keeps eyes, brows, nose and mouth) radius 2: 0.13-0.35, radius 4-8: 0.07-0.22.
    smooth_skin_min_face_px: int = 160
    smooth_skin_ratio: float = 0.35

    # ---- near-duplicates: Hamming distances of 64-bit perceptual hashes (both must be under).
    # Whole frame: copies (PNG of a JPEG, resized) 0 apart; different fixture photos >= 20.
    # Face patch: copies and crops 0-12 apart (a resized copy moves the detector's box a little);
    # different photos, the same person's included, >= 20 (phash >= 26).
    dup_whole_phash: int = 8
    dup_whole_dhash: int = 12
    dup_face_phash: int = 16
    dup_face_dhash: int = 16
    # The face patch spans this many face sizes; two patches are only compared on what both
    # photos show, and only when that is at least this share of the patch.
    dup_patch_face_sizes: float = 2.0
    dup_min_overlap: float = 0.35

    # ---- identity (dlib embeddings: same person ~0.2-0.45 apart, others > 0.6)
    # Distance to the median of the other photos' embeddings (sets of centre_min_photos or more).
    # Fixtures: the same person 0.22-0.32 from the others' centre, another person 0.79. Over the
    # warn value the photo is kept but flagged (a sibling, or the user at a hard angle).
    identity_centre_warn: float = 0.45
    identity_centre_distance: float = 0.52
    # Pairwise distance for small sets (majority vote).
    identity_pair_distance: float = 0.6
    centre_min_photos: int = 5

    # ---- variety of the set (each a spread across the kept photos)
    min_yaw_spread_deg: float = 8.0  # standard deviation of the estimated left/right turn
    min_pitch_spread_deg: float = 5.0
    min_framing_spread: float = 0.18  # std of log(face fraction): close-ups and half-body
    min_lighting_spread: float = 12.0  # std of the face's mean luminance (0-255)
    # std of the left/right brightness balance of the face (side light vs front light): light
    # from different directions is variety too, even at the same brightness.
    min_side_light_spread: float = 0.06
    min_background_spread: float = 12.0  # median distance between background colours (0-255)
    variety_min_photos: int = 4  # fewer photos: spreads mean nothing, not judged


# --------------------------------------------------------------------------- analysis types


@dataclass(frozen=True)
class PhotoMetrics:
    """Measurements of one photo. Angles in degrees (estimated from landmarks: approximate)."""

    face_fraction: float  # sqrt(face box area / image area)
    face_px: float  # face box height in the original photo's pixels
    upscale: float  # how much the training crop would be blown up (1 = none needed)
    cut_off: float  # how far the face reaches past the frame, as a fraction of its size
    sharpness: float  # Laplacian variance on the contrast-normalised face
    face_luma: float  # mean luminance of the face (0-255)
    face_luma_low: float  # its 10th percentile: how bright the face's shadows are
    face_luma_high: float  # its 90th percentile: how bright the face's highlights are
    face_clipped: float  # share of the face's pixels at black or white
    frame_clipped: float  # the same for the whole frame
    skin_saturation: float  # mean HSV saturation of the face (0-1)
    garish_fraction: float  # share of the frame at saturation >= 0.9
    skin_texture: float | None  # cheeks' high frequencies / the face's; None: not judged
    yaw: float | None
    pitch: float | None
    roll: float | None
    light_asymmetry: float  # (left - right) face half luminance / mean: side lighting
    background: tuple[float, float, float]  # mean Y, Cb, Cr outside the person


@dataclass(frozen=True)
class FacePatch:
    """A grey 64x64 patch centred on the face for near-duplicate tests, with the rectangle of it
    that lies inside the photo (x0, y0, x1, y1 in patch pixels)."""

    pixels: bytes
    inside: tuple[int, int, int, int]
    # Hashes of the inside part, computed once in analysis: most pairs compare whole patches.
    phash: str = ""
    dhash: str = ""

    SIDE = 64


@dataclass(frozen=True)
class PhotoAnalysis:
    """What ``analyze_photo`` found. Coordinates are in ``image_size`` pixels (the decoded image);
    ``scale`` turns them into the original photo's pixels. Plain values only, so analyses travel
    between processes."""

    name: str
    image_size: tuple[int, int]
    scale: float
    faces: tuple[Face, ...]  # every face found, largest first
    main_face: Face | None  # the photo's subject, with landmarks and embedding when found
    findings: tuple[Finding, ...]
    metrics: PhotoMetrics | None = None
    whole_phash: str | None = None
    whole_dhash: str | None = None
    face_patch: FacePatch | None = None
    had_exif: bool = False
    order: int = 0  # position in the upload: breaks ties the same way every time

    @property
    def embedding(self) -> tuple[float, ...] | None:
        return self.main_face.embedding if self.main_face else None

    @property
    def rejected(self) -> bool:
        return any(f.severity == "reject" for f in self.findings)


@dataclass(frozen=True)
class SetStats:
    """The spreads behind the variety findings (None: not measured)."""

    photos: int
    yaw_spread: float | None = None
    pitch_spread: float | None = None
    framing_spread: float | None = None
    lighting_spread: float | None = None
    side_light_spread: float | None = None
    background_spread: float | None = None


@dataclass(frozen=True)
class SetReport:
    """The whole set's verdict. ``findings`` holds every finding of the analyses and of the set
    (per photo ones carry ``photo``); ``accepted`` names the photos to train on, in upload order."""

    trainable: bool
    quality: Quality
    score: int
    reasons: tuple[str, ...]
    findings: tuple[Finding, ...]
    accepted: tuple[str, ...]
    rejected: tuple[str, ...]
    stats: SetStats = field(default_factory=lambda: SetStats(photos=0))


# --------------------------------------------------------------------------- editing apps

# Apps whose purpose is changing faces (skin smoothing, reshaping, "AI enhance"), including selfie
# cameras whose beauty mode is on by default. The LoRA would learn the altered face, so such a
# photo is rejected: the software tag is only written when the app exported the picture.
_BEAUTY_APPS = (
    "facetune", "faceapp", "meitu", "beautyplus", "beautycam", "youcam", "airbrush",
    "perfect365", "remini", "snow", "b612", "soda", "ulike", "faceu", "wink", "retouchme",
    "fotorus", "bestie", "lensa", "beauty", "美图", "美颜",
)
# General editors and filter apps: usually colour and tone only (press photos pass through
# Photoshop), but they can carry heavy filters or retouching: a warning, not a rejection.
_EDITOR_APPS = (
    "photoshop", "lightroom", "snapseed", "vsco", "picsart", "afterlight", "instagram",
    "gimp", "affinity", "pixelmator", "darkroom", "prisma", "polarr", "canva",
    "photoroom", "picmonkey", "fotor", "photodirector", "lightleap", "photolab",
)


def _app_pattern(names: Sequence[str]) -> re.Pattern[str]:
    # Whole words for Latin names, a version number may follow ("snow" must not match
    # "Snowboard", "facetune" must match "Facetune2"); plain text for the rest.
    parts = [rf"\b{re.escape(n)}(?![a-z])" if n.isascii() else re.escape(n) for n in names]
    return re.compile("|".join(parts), re.IGNORECASE)


_BEAUTY_RE = _app_pattern(_BEAUTY_APPS)
_EDITOR_RE = _app_pattern(_EDITOR_APPS)


def classify_software(software: str | None) -> Literal["beauty", "editor"] | None:
    """Whether the EXIF Software tag names a face-retouching app, a general editor, or neither."""
    if not software:
        return None
    if _BEAUTY_RE.search(software):
        return "beauty"
    if _EDITOR_RE.search(software):
        return "editor"
    return None


# --------------------------------------------------------------------------- per photo


def analyze_photo(
    decoded: DecodedInput, *, analyzer: FaceAnalyzer, policy: CheckPolicy, order: int = 0
) -> PhotoAnalysis:
    """Find the faces of one photo, measure it and judge what the photo alone can tell."""
    image = decoded.image if decoded.image.mode == "RGB" else decoded.image.convert("RGB")
    width, height = image.size
    scale = max(decoded.original_size) / max(width, height)
    findings: list[Finding] = []
    name = decoded.name
    software = _software_finding(decoded, name)
    if software is not None:
        findings.append(software)

    # One small copy serves detection, the frame's statistics and the whole-image hashes.
    small, k_small = _resized(image, min(policy.detect_side, max(image.size)))
    faces = _detect(image, small, k_small, analyzer=analyzer, policy=policy)
    whole_phash, whole_dhash = _whole_hashes(small)
    if not faces:
        findings.append(Finding(
            "reject", "no_face", f"no face was found in {name}",
            "use a photo where your face is clearly visible, facing the camera or turned a little",
            photo=name,
        ))
        return PhotoAnalysis(name=name, image_size=(width, height), scale=scale, faces=(),
                             main_face=None, findings=tuple(findings), whole_phash=whole_phash,
                             whole_dhash=whole_dhash, had_exif=decoded.had_exif, order=order)

    main = _refine(image, faces[0], analyzer=analyzer, policy=policy)
    findings.extend(_other_faces(name, main, faces[1:], policy=policy))
    metrics = _measure(image, small, k_small, main, scale=scale, policy=policy)
    findings.extend(_judge(name, metrics, policy=policy))
    patch = _face_patch(image, main, policy=policy)
    return PhotoAnalysis(
        name=name, image_size=(width, height), scale=scale, faces=(main, *faces[1:]),
        main_face=main, findings=tuple(findings), metrics=metrics, whole_phash=whole_phash,
        whole_dhash=whole_dhash, face_patch=patch, had_exif=decoded.had_exif, order=order,
    )


def _software_finding(decoded: DecodedInput, name: str) -> Finding | None:
    kind = classify_software(decoded.exif_software)
    if kind == "beauty":
        return Finding(
            "reject", "edited_software",
            f"{name} was saved by {decoded.exif_software!r}, an app that retouches faces",
            "this photo has a beauty filter: use the unedited original from your camera",
            photo=name,
        )
    if kind == "editor":
        return Finding(
            "warn", "edited_software",
            f"{name} was edited with {decoded.exif_software!r}",
            "if you changed your face or added a filter, use the unedited original instead",
            photo=name,
        )
    return None


def _resized(image: Image.Image, long_side: int) -> tuple[Image.Image, float]:
    """A copy whose long side is about ``long_side`` (never upscaled unless asked) and the factor
    from its pixels back to ``image``'s."""
    current = max(image.size)
    if current == long_side:
        return image, 1.0
    if current > long_side:
        # Integer box reduction first: much faster than one large resampling step.
        factor = current // long_side
        small = image.reduce(factor) if factor >= 2 else image
        if max(small.size) > long_side * 1.25:
            ratio = long_side / max(small.size)
            small = small.resize((max(1, round(small.width * ratio)),
                                  max(1, round(small.height * ratio))),
                                 Image.Resampling.BILINEAR)
        return small, image.width / small.width
    ratio = long_side / current
    big = image.resize((round(image.width * ratio), round(image.height * ratio)),
                       Image.Resampling.BILINEAR)
    return big, image.width / big.width


def _scale_face(face: Face, k: float, dx: float = 0.0, dy: float = 0.0) -> Face:
    def tx(x: float) -> int:
        return round(x * k + dx)

    def ty(y: float) -> int:
        return round(y * k + dy)

    left, top, right, bottom = face.box
    return Face(
        box=(tx(left), ty(top), tx(right), ty(bottom)), score=face.score,
        landmarks=tuple((tx(x), ty(y)) for x, y in face.landmarks), embedding=face.embedding,
    )


def _detect(image: Image.Image, small: Image.Image, k: float, *, analyzer: FaceAnalyzer,
            policy: CheckPolicy) -> list[Face]:
    """Faces in ``image``'s coordinates (found on ``small``, ``k`` of image pixels per small
    pixel), boxes only, largest first."""
    faces = analyzer.detect(np.asarray(small), landmarks=False, embed=False)
    if not faces and policy.detect_retry_side > max(small.size):
        # Small faces (full-body shots) are below the detector's ~80 px minimum at low
        # resolution: one more try with more pixels before saying there is no face.
        retry, k = _resized(image, policy.detect_retry_side)
        faces = analyzer.detect(np.asarray(retry), landmarks=False, embed=False)
    scaled = [_scale_face(f, k) for f in faces]
    scaled.sort(key=lambda f: f.width * f.height, reverse=True)
    return scaled


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _refine(image: Image.Image, face: Face, *, analyzer: FaceAnalyzer,
            policy: CheckPolicy) -> Face:
    """Landmarks and the embedding of ``face``, from a crop around it where the face is about
    ``refine_face_side`` pixels: detection at low resolution stays cheap, while landmarks and the
    identity come from a sharper face."""
    size = max(face.width, face.height, 1)
    # The embedding's chip takes 25% padding around the landmarks, and the detector needs some
    # context around the face to find it again.
    margin = size * 0.45
    left = max(0, math.floor(face.box[0] - margin))
    top = max(0, math.floor(face.box[1] - margin))
    right = min(image.width, math.ceil(face.box[2] + margin))
    bottom = min(image.height, math.ceil(face.box[3] + margin))
    if right - left < 8 or bottom - top < 8:
        return face
    region = (left, top, right, bottom)
    ratio = policy.refine_face_side / size
    if abs(ratio - 1.0) > 0.15:
        size_out = (max(1, round((right - left) * ratio)), max(1, round((bottom - top) * ratio)))
        # Straight from the region, integer-reduced first: no full-size copy of the crop.
        crop = image.resize(size_out, Image.Resampling.BILINEAR, box=region, reducing_gap=2.0)
    else:
        crop = image.crop(region)
    k = (right - left) / crop.width
    if isinstance(analyzer, BoxDescriber):
        inner = (round((face.box[0] - left) / k), round((face.box[1] - top) / k),
                 round((face.box[2] - left) / k), round((face.box[3] - top) / k))
        described = _scale_face(analyzer.describe(np.asarray(crop), inner), k, left, top)
        # Keep the detector's box and score: only landmarks and the embedding are new.
        return Face(box=face.box, score=face.score, landmarks=described.landmarks,
                    embedding=described.embedding)
    found = [_scale_face(f, k, left, top)
             for f in analyzer.detect(np.asarray(crop), landmarks=True, embed=True)]
    best = max(found, key=lambda f: _iou(f.box, face.box), default=None)
    if best is not None and _iou(best.box, face.box) >= 0.3:
        return best
    logger.debug("face not found again in its crop; landmarks from the whole image")
    small, k = _resized(image, min(policy.detect_retry_side, max(image.size)))
    found = [_scale_face(f, k) for f in analyzer.detect(np.asarray(small))]
    best = max(found, key=lambda f: _iou(f.box, face.box), default=None)
    if best is not None and _iou(best.box, face.box) >= 0.3:
        return best
    return face


def _other_faces(name: str, main: Face, others: Sequence[Face], *,
                 policy: CheckPolicy) -> list[Finding]:
    if not others:
        return []
    ratios = [other.height / max(main.height, 1) for other in others]
    big = [r for r in ratios if r >= policy.background_face_ratio]
    small = [r for r in ratios if r < policy.background_face_ratio]
    findings: list[Finding] = []
    if big:
        sizes = ", ".join(f"{r:.0%}" for r in big)
        competing = max(big) >= policy.competing_face_ratio
        findings.append(Finding(
            "reject" if competing else "warn", "multiple_faces",
            f"{name} shows {len(big) + 1} faces: the others are {sizes} of the main face's size",
            "use photos where you are alone, or crop the others out before uploading",
            photo=name,
        ))
    if small:
        findings.append(Finding(
            "info", "background_faces",
            f"{name} has {len(small)} small face(s) in the background "
            f"({', '.join(f'{r:.0%}' for r in small)} of the main face's size)",
            "nothing to do: faces this small do not disturb training", photo=name,
        ))
    return findings


def _luma(rgb: NDArray[np.uint8]) -> FloatArray:
    pixels = rgb.astype(np.float64)
    result: FloatArray = pixels[..., 0] * 0.299 + pixels[..., 1] * 0.587 + pixels[..., 2] * 0.114
    return result


def _saturation(rgb: NDArray[np.uint8]) -> tuple[FloatArray, FloatArray]:
    """HSV saturation and value (0-1)."""
    high = rgb.max(axis=-1).astype(np.float64)
    low = rgb.min(axis=-1).astype(np.float64)
    sat: FloatArray = np.where(high > 0, (high - low) / np.maximum(high, 1.0), 0.0)
    value: FloatArray = high / 255.0
    return sat, value


def _clip_box(box: tuple[float, float, float, float], width: int,
              height: int) -> tuple[int, int, int, int]:
    left = int(max(0, min(width - 1, math.floor(box[0]))))
    top = int(max(0, min(height - 1, math.floor(box[1]))))
    right = int(max(left + 1, min(width, math.ceil(box[2]))))
    bottom = int(max(top + 1, min(height, math.ceil(box[3]))))
    return left, top, right, bottom


def _cut_off(face: Face, width: int, height: int) -> float:
    """How far the face reaches past the frame, as a fraction of its size (0: fully inside)."""
    size = max(face.width, face.height, 1)
    left, top, right, bottom = face.box
    over = max(0 - left, 0 - top, right - width, bottom - height, 0)
    if face.landmarks:
        # The jaw line and the brows outline the face: any of them outside is a cut-off face.
        outline = [face.landmarks[i] for i in range(27)]
        xs = [p[0] for p in outline]
        ys = [p[1] for p in outline]
        over = max(over, 0 - min(xs), 0 - min(ys), max(xs) - width, max(ys) - height)
    return over / size


def laplacian_variance(gray: FloatArray) -> float:
    """Variance of the 4-neighbour Laplacian (what OpenCV's ``Laplacian`` + ``var`` measure)."""
    p = np.pad(gray, 1, mode="edge")
    lap = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4.0 * gray
    return float(lap.var())


def gaussian_blur(gray: FloatArray, *, sigma: float) -> FloatArray:
    """A separable Gaussian blur (edges repeated), in numpy: no OpenCV or SciPy needed."""
    radius = max(1, round(3 * sigma))
    taps = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-(taps**2) / (2 * sigma * sigma))
    kernel /= kernel.sum()
    p = np.pad(gray, radius, mode="edge")
    height, width = gray.shape
    # Sums of shifted copies rather than a matrix product: no BLAS threads in worker processes.
    rows = sum(w * p[:, i:i + width] for i, w in enumerate(kernel))
    result: FloatArray = sum(w * rows[i:i + height, :] for i, w in enumerate(kernel))
    return result


def normalized_sharpness(gray: FloatArray) -> float:
    """Laplacian variance after scaling the grey levels to a standard deviation of 50: a dark or
    flat-lit face has less contrast, which the Laplacian alone would read as blur."""
    spread = float(gray.std())
    if spread < 1.0:
        return 0.0
    return laplacian_variance((gray - gray.mean()) * (50.0 / spread))


def _face_crop(image: Image.Image, face: Face, side: int) -> tuple[NDArray[np.uint8], float, float,
                                                                   float, float]:
    """The face box (clipped to the frame) resized to side x side, and the map from image
    coordinates to the crop's: x' = (x - x0) * kx, y' = (y - y0) * ky."""
    left, top, right, bottom = _clip_box(face.box, image.width, image.height)
    crop = image.resize((side, side), Image.Resampling.BILINEAR, box=(left, top, right, bottom),
                        reducing_gap=2.0)
    return (np.asarray(crop), float(left), float(top), side / (right - left),
            side / (bottom - top))


def _skin_texture(gray: FloatArray, points: FloatArray) -> float | None:
    """High-frequency energy on both cheeks divided by that of the whole face (``gray`` is the
    normalised face crop, ``points`` the 68 landmarks in its coordinates): beauty filters smooth
    the skin and keep eyes, brows and outlines sharp, so the ratio drops."""
    detail = gray - gaussian_blur(gray, sigma=1.5)
    face_energy = float(np.abs(detail).mean())
    if face_energy <= 1e-6:
        return None
    width = float(np.linalg.norm(points[16] - points[0]))
    radius = max(2, round(width * 0.08))
    energies: list[float] = []
    # Cheek centres: between the lower eyelid's outer end, the jaw at nose height and the nose
    # wing; away from the eyes, nostrils, mouth and the face's outline.
    for idx in ((1, 2, 31, 41), (15, 14, 35, 46)):
        cx, cy = points[list(idx)].mean(axis=0)
        x0, x1 = round(cx) - radius, round(cx) + radius
        y0, y1 = round(cy) - radius, round(cy) + radius
        if x0 < 0 or y0 < 0 or x1 > detail.shape[1] or y1 > detail.shape[0]:
            continue
        energies.append(float(np.abs(detail[y0:y1, x0:x1]).mean()))
    if not energies:
        return None
    # The better-textured cheek: one cheek in shadow or turned away should not decide.
    return max(energies) / face_energy


def _pose(face: Face) -> tuple[float | None, float | None, float | None]:
    """Yaw, pitch and roll in degrees, estimated from 2D landmarks (good to ~10 degrees: enough to
    tell straight-on from three-quarter views)."""
    if len(face.landmarks) != 68:
        return None, None, None
    pts = np.asarray(face.landmarks, dtype=np.float64)
    left_eye = pts[36:42].mean(axis=0)
    right_eye = pts[42:48].mean(axis=0)
    dx, dy = right_eye - left_eye
    roll = math.degrees(math.atan2(dy, dx))
    # Undo the roll so the remaining ratios are about turning and nodding only.
    cos, sin = math.cos(-math.radians(roll)), math.sin(-math.radians(roll))
    rot = pts @ np.array([[cos, sin], [-sin, cos]])
    jaw_left, jaw_right, nose = rot[0], rot[16], rot[30]
    span = jaw_right[0] - jaw_left[0]
    if span <= 1:
        return None, None, roll
    # The nose tip moves towards the jaw's edge as the head turns: 0.5 is straight on.
    turn = (nose[0] - jaw_left[0]) / span
    yaw = math.degrees(math.asin(max(-1.0, min(1.0, 2.0 * turn - 1.0))))
    eyes_y = (rot[36:48, 1]).mean()
    chin_y = rot[8, 1]
    height = chin_y - eyes_y
    if height <= 1:
        return yaw, None, roll
    # The nose tip sits ~27% of the way from the eye line to the chin when looking straight
    # (fixture portraits); nodding moves it (a rough linear map: 0.1 of the ratio ~ 15 degrees).
    nod = (nose[1] - eyes_y) / height
    pitch = (0.27 - nod) * 150.0
    return yaw, pitch, roll


def _background(frame: NDArray[np.uint8], box: tuple[float, float, float, float]
                ) -> tuple[float, float, float]:
    """Mean Y, Cb, Cr of the frame outside the person (the face box, in ``frame``'s pixels,
    widened and extended down to the bottom stands for head and body)."""
    height, width = frame.shape[:2]
    face_w, face_h = box[2] - box[0], box[3] - box[1]
    cx = (box[0] + box[2]) / 2
    half = face_w * 1.6
    top = box[1] - face_h * 0.6
    mask = np.ones((height, width), dtype=bool)
    x0, y0, x1, _ = _clip_box((cx - half, top, cx + half, height), width, height)
    mask[y0:, x0:x1] = False
    if mask.mean() < 0.1:
        # A close-up: only the frame's border strips are left as background.
        strip = max(1, min(width, height) // 10)
        mask[:] = False
        mask[:strip, :] = mask[:, :strip] = mask[:, -strip:] = True
    r, g, b = (float(c) for c in frame[mask].astype(np.float64).mean(axis=0))
    # YCbCr is linear in RGB: the mean colour converted is the mean of the converted pixels.
    return (0.299 * r + 0.587 * g + 0.114 * b,
            128 - 0.168736 * r - 0.331264 * g + 0.5 * b,
            128 + 0.5 * r - 0.418688 * g - 0.081312 * b)


def _measure(image: Image.Image, small: Image.Image, k_small: float, face: Face, *,
             scale: float, policy: CheckPolicy) -> PhotoMetrics:
    width, height = image.size
    # The face is measured on its box resized to a fixed size (blur, light, colour, skin: the
    # same numbers whatever the photo's resolution), the frame on the small detection copy
    # (statistics, not detail): a few milliseconds instead of ~80 on the decoded photo.
    side = policy.blur_face_side
    face_rgb, x0, y0, kx, ky = _face_crop(image, face, side)
    face_gray = _luma(face_rgb)
    # Every third pixel of the small copy: ~40k pixels are plenty for shares and means.
    frame = np.asarray(small)[::3, ::3]
    frame_luma = _luma(frame)
    sat, value = _saturation(face_rgb)
    frame_sat, frame_value = _saturation(frame)
    visible = value > 0.15
    skin_saturation = float(sat[visible].mean()) if visible.any() else 0.0
    mean_luma = float(face_gray.mean())
    half = side // 2
    asymmetry = (float(face_gray[:, :half].mean()) - float(face_gray[:, half:].mean())) / max(
        mean_luma, 1.0)
    area = max(face.width, 1) * max(face.height, 1)
    face_px = face.height * scale
    needed = policy.resolution * policy.crop_face_fraction
    texture = None
    if (len(face.landmarks) == 68 and face_px >= policy.smooth_skin_min_face_px
            and face.height >= policy.smooth_skin_min_face_px):
        points = (np.asarray(face.landmarks, dtype=np.float64) - (x0, y0)) * (kx, ky)
        texture = _skin_texture(face_gray, points)
    yaw, pitch, roll = _pose(face)
    small_box = tuple(v / (k_small * 3) for v in face.box)
    return PhotoMetrics(
        face_fraction=math.sqrt(area / (width * height)),
        face_px=face_px,
        upscale=max(1.0, needed / max(face_px, 1.0)),
        cut_off=_cut_off(face, width, height),
        sharpness=normalized_sharpness(face_gray),
        face_luma=mean_luma,
        face_luma_low=float(np.percentile(face_gray, 10)),
        face_luma_high=float(np.percentile(face_gray, 90)),
        face_clipped=float(((face_gray <= 8) | (face_gray >= 247)).mean()),
        frame_clipped=float(((frame_luma <= 8) | (frame_luma >= 247)).mean()),
        skin_saturation=skin_saturation,
        garish_fraction=float(((frame_sat >= 0.9) & (frame_value >= 0.25)).mean()),
        skin_texture=texture,
        yaw=yaw, pitch=pitch, roll=roll,
        light_asymmetry=asymmetry,
        background=_background(frame, (small_box[0], small_box[1], small_box[2], small_box[3])),
    )


def _judge(name: str, m: PhotoMetrics, *, policy: CheckPolicy) -> list[Finding]:
    out: list[Finding] = []
    resolution = policy.resolution

    def add(severity: str, code: str, message: str, advice: str) -> None:
        out.append(Finding(severity, code, message, advice, photo=name))

    if m.face_fraction < policy.min_face_fraction:
        add("reject" if m.face_fraction < policy.reject_face_fraction else "warn",
            "face_too_small",
            f"the face fills only {m.face_fraction:.0%} of {name}'s frame",
            "use a photo taken closer: your face should fill at least a tenth of the picture")
    if m.cut_off >= policy.cut_off_warn:
        add("reject" if m.cut_off >= policy.cut_off_reject else "warn", "face_cut_off",
            f"the face in {name} is cut off by the edge of the photo",
            "use a photo where your whole face, chin and forehead included, is in the frame")
    if m.upscale >= policy.upscale_warn:
        add("reject" if m.upscale >= policy.upscale_reject else "warn", "face_resolution_low",
            f"the face in {name} is {m.face_px:.0f} px tall; training at {resolution} px needs "
            f"about {resolution * policy.crop_face_fraction:.0f} px",
            "use the original photo from your camera, not a screenshot, a download or a crop "
            "of a group photo")
    if m.sharpness < policy.blur_warn:
        add("reject" if m.sharpness < policy.blur_reject else "warn", "blurry",
            f"the face in {name} is blurry (sharpness {m.sharpness:.0f})",
            "use a sharp photo: hold the phone still, in good light, and tap your face to focus")
    # Clipped pixels are blown highlights on a bright face, crushed shadows on a dark one.
    clipped = m.face_clipped >= policy.clipped_face_warn
    badly_clipped = m.face_clipped >= policy.clipped_face_reject
    dark = m.face_luma_high < policy.dark_highlights_warn or (clipped and m.face_luma < 128)
    bright = m.face_luma_low > policy.bright_shadows_warn or (clipped and m.face_luma >= 128)
    if dark:
        severe = m.face_luma_high < policy.dark_highlights_reject or badly_clipped
        add("reject" if severe else "warn", "underexposed",
            f"the face in {name} is too dark (its brightest parts reach {m.face_luma_high:.0f} "
            f"of 255, {m.face_clipped:.0%} is pure black)",
            "use a photo taken in more light, facing a window or outdoors in the shade")
    elif bright:
        severe = m.face_luma_low > policy.bright_shadows_reject or badly_clipped
        add("reject" if severe else "warn", "overexposed",
            f"the face in {name} is washed out (even its shadows are at {m.face_luma_low:.0f} "
            f"of 255, {m.face_clipped:.0%} is pure white)",
            "use a photo without harsh sun or flash on your face")
    garish = m.garish_fraction >= policy.garish_fraction_warn
    if m.skin_saturation >= policy.skin_saturation_warn or garish:
        severe = (m.skin_saturation >= policy.skin_saturation_reject
                  and m.garish_fraction >= policy.garish_fraction_reject)
        add("reject" if severe else "warn", "oversaturated",
            f"the colours of {name} are unnaturally strong (face saturation "
            f"{m.skin_saturation:.2f}, {m.garish_fraction:.0%} of the photo at extreme colours)",
            "use the photo without a colour filter or saturation boost")
    # Blur and bad exposure flatten the skin too: the texture only says something about a
    # sharp, well exposed face.
    judged = m.sharpness >= policy.blur_warn and not (dark or bright)
    if judged and m.skin_texture is not None and m.skin_texture < policy.smooth_skin_ratio:
        add("warn", "smooth_skin",
            f"the skin in {name} looks unnaturally smooth (texture {m.skin_texture:.2f})",
            "this photo may have a beauty filter or retouching: use an unedited one")
    return out


# --------------------------------------------------------------------------- hashes


def _hash_hex(image: Image.Image, *, kind: Literal["phash", "dhash"]) -> str:
    import imagehash

    value = imagehash.phash(image) if kind == "phash" else imagehash.dhash(image)
    return str(value)


def _whole_hashes(small: Image.Image) -> tuple[str, str]:
    # The hashes work on 32x32 (phash) and 9x8 (dhash) pixels: a 128 px grey copy is plenty and
    # spares imagehash resampling the detection copy twice.
    tiny = small.convert("L")
    tiny.thumbnail((128, 128), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return _hash_hex(tiny, kind="phash"), _hash_hex(tiny, kind="dhash")


def _face_patch(image: Image.Image, face: Face, *, policy: CheckPolicy) -> FacePatch | None:
    """A grey patch centred on the face box, ``dup_patch_face_sizes`` box sizes wide: the same
    part of the scene in every copy or crop of a photo, whatever the framing. The detector's box
    is used rather than landmarks: on a face cut by the frame the landmarks of the missing side
    are guesses (10-20 px off on the fixtures), the box is stable to a few pixels."""
    cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
    span = max(face.width, face.height) * policy.dup_patch_face_sizes
    if span < 8:
        return None
    side = FacePatch.SIDE
    x0, y0 = cx - span / 2, cy - span / 2
    k = side / span
    # The part of the patch inside the photo, in patch pixels.
    px0 = max(0, math.ceil(-x0 * k))
    py0 = max(0, math.ceil(-y0 * k))
    px1 = min(side, math.floor((image.width - x0) * k))
    py1 = min(side, math.floor((image.height - y0) * k))
    if px1 - px0 < 8 or py1 - py0 < 8:
        return None
    src = (x0 + px0 / k, y0 + py0 / k, x0 + px1 / k, y0 + py1 / k)
    part = image.resize((px1 - px0, py1 - py0), Image.Resampling.BILINEAR, box=src,
                        reducing_gap=2.0).convert("L")
    canvas = np.zeros((side, side), dtype=np.uint8)
    canvas[py0:py1, px0:px1] = np.asarray(part)
    return FacePatch(pixels=canvas.tobytes(), inside=(px0, py0, px1, py1),
                     phash=_hash_hex(part, kind="phash"), dhash=_hash_hex(part, kind="dhash"))


def _hamming(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


_PatchHashes = dict[tuple[int, tuple[int, int, int, int]], tuple[str, str]]


def _patch_hashes(patch: FacePatch, rect: tuple[int, int, int, int],
                  cache: _PatchHashes) -> tuple[str, str]:
    if rect == patch.inside and patch.phash:
        return patch.phash, patch.dhash
    key = (id(patch), rect)
    if key not in cache:
        x0, y0, x1, y1 = rect
        side = FacePatch.SIDE
        pixels = np.frombuffer(patch.pixels, dtype=np.uint8).reshape(side, side)
        part = Image.fromarray(np.ascontiguousarray(pixels[y0:y1, x0:x1]))
        cache[key] = (_hash_hex(part, kind="phash"), _hash_hex(part, kind="dhash"))
    return cache[key]


def _patch_distance(a: FacePatch, b: FacePatch, *, policy: CheckPolicy,
                    cache: _PatchHashes) -> tuple[int, int] | None:
    """phash and dhash distances of two face patches on the part both photos show (hashes of
    partial patches are cached: a cut-off photo meets every other photo on the same part)."""
    rect = (max(a.inside[0], b.inside[0]), max(a.inside[1], b.inside[1]),
            min(a.inside[2], b.inside[2]), min(a.inside[3], b.inside[3]))
    width, height = rect[2] - rect[0], rect[3] - rect[1]
    side = FacePatch.SIDE
    if width < 8 or height < 8 or width * height < policy.dup_min_overlap * side * side:
        return None
    ha = _patch_hashes(a, rect, cache)
    hb = _patch_hashes(b, rect, cache)
    return _hamming(ha[0], hb[0]), _hamming(ha[1], hb[1])


# --------------------------------------------------------------------------- the set


def _keeper_rank(a: PhotoAnalysis) -> tuple[int, float, int, int, int]:
    # Which copy of a photo to keep: one that passes its own checks, with the most face pixels,
    # the largest frame, then an original (copies lose their EXIF), then the first uploaded.
    face_px = a.metrics.face_px if a.metrics else 0.0
    area = round(a.image_size[0] * a.image_size[1] * a.scale * a.scale)
    return (0 if a.rejected else 1, round(face_px), area, 1 if a.had_exif else 0, -a.order)


def _near_duplicates(photos: Sequence[PhotoAnalysis], *, policy: CheckPolicy) -> list[Finding]:
    n = len(photos)
    # Union-find over "is a near-duplicate of": one photo of each group stays.
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    how: dict[tuple[int, int], str] = {}
    cache: _PatchHashes = {}
    for i in range(n):
        for j in range(i + 1, n):
            a, b = photos[i], photos[j]
            reason = None
            if a.whole_phash and b.whole_phash and a.whole_dhash and b.whole_dhash and (
                _hamming(a.whole_phash, b.whole_phash) <= policy.dup_whole_phash
                and _hamming(a.whole_dhash, b.whole_dhash) <= policy.dup_whole_dhash
            ):
                reason = "a copy"
            elif a.face_patch and b.face_patch:
                dist = _patch_distance(a.face_patch, b.face_patch, policy=policy, cache=cache)
                if dist and dist[0] <= policy.dup_face_phash and dist[1] <= policy.dup_face_dhash:
                    reason = "a crop or a copy"
            if reason:
                how[(i, j)] = how[(j, i)] = reason
                parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    findings: list[Finding] = []
    for members in groups.values():
        if len(members) < 2:
            continue
        keep = max(members, key=lambda i: _keeper_rank(photos[i]))
        for i in sorted(members):
            if i == keep:
                continue
            reason = how.get((i, keep), "a crop or a copy")
            findings.append(Finding(
                "reject", "near_duplicate",
                f"{photos[i].name} is {reason} of {photos[keep].name}",
                f"keep only {photos[keep].name} and add a different photo instead",
                photo=photos[i].name,
            ))
    return findings


def _distances(vectors: FloatArray) -> FloatArray:
    diff = vectors[:, None, :] - vectors[None, :, :]
    result: FloatArray = np.sqrt((diff**2).sum(axis=-1))
    return result


def _identity(photos: Sequence[PhotoAnalysis], *, policy: CheckPolicy) -> list[Finding]:
    with_id = [p for p in photos if p.embedding is not None]
    n = len(with_id)
    if n < 2:
        return []
    vectors = np.asarray([p.embedding for p in with_id], dtype=np.float64)
    pair = _distances(vectors)
    findings: list[Finding] = []
    advice = "use only photos of the one person the model is for"
    if n >= policy.centre_min_photos:
        for i, photo in enumerate(with_id):
            # The centre of the OTHER photos: the photo judged does not pull it towards itself.
            others = np.delete(vectors, i, axis=0)
            centre = np.median(others, axis=0)
            distance = float(np.linalg.norm(vectors[i] - centre))
            if distance > policy.identity_centre_distance:
                findings.append(Finding(
                    "reject", "different_person",
                    f"{photo.name} seems to show someone else than the other photos "
                    f"(distance {distance:.2f})", advice, photo=photo.name,
                ))
            elif distance > policy.identity_centre_warn:
                findings.append(Finding(
                    "warn", "different_person",
                    f"the face in {photo.name} looks less like the other photos "
                    f"(distance {distance:.2f})",
                    "check that this is the same person; if it is, keep it", photo=photo.name,
                ))
        return findings
    if n == 2:
        if pair[0, 1] > policy.identity_pair_distance:
            # Two photos, two faces: there is no telling which one is the user.
            findings.extend(Finding(
                "warn", "different_person",
                f"{with_id[0].name} and {with_id[1].name} seem to show different people "
                f"(distance {pair[0, 1]:.2f})", advice, photo=p.name,
            ) for p in with_id)
        return findings
    for i, photo in enumerate(with_id):
        far = [j for j in range(n) if j != i and pair[i, j] > policy.identity_pair_distance]
        # Far from most others, while those others agree among themselves.
        rest = [j for j in range(n) if j != i]
        rest_agree = all(pair[a, b] <= policy.identity_pair_distance
                         for a in rest for b in rest if a < b)
        if len(far) * 2 > n - 1 and rest_agree:
            findings.append(Finding(
                "reject", "different_person",
                f"{photo.name} seems to show someone else than the other photos "
                f"(distance {min(pair[i, j] for j in far):.2f} or more)", advice, photo=photo.name,
            ))
    return findings


def _spread(values: Sequence[float]) -> float:
    return float(np.std(np.asarray(values, dtype=np.float64)))


def _variety(kept: Sequence[PhotoAnalysis], *, policy: CheckPolicy) -> tuple[list[Finding],
                                                                               SetStats]:
    metrics = [p.metrics for p in kept if p.metrics is not None]
    stats = SetStats(photos=len(kept))
    if len(metrics) < policy.variety_min_photos:
        return [], stats
    yaws = [m.yaw for m in metrics if m.yaw is not None]
    pitches = [m.pitch for m in metrics if m.pitch is not None]
    stats = SetStats(
        photos=len(kept),
        yaw_spread=_spread(yaws) if len(yaws) >= 2 else None,
        pitch_spread=_spread(pitches) if len(pitches) >= 2 else None,
        framing_spread=_spread([math.log(max(m.face_fraction, 1e-3)) for m in metrics]),
        lighting_spread=_spread([m.face_luma for m in metrics]),
        side_light_spread=_spread([m.light_asymmetry for m in metrics]),
        background_spread=float(np.median(
            [d for i, row in enumerate(_distances(np.asarray([m.background for m in metrics])))
             for d in row[i + 1:]])),
    )
    out: list[Finding] = []
    if stats.yaw_spread is not None and stats.yaw_spread < policy.min_yaw_spread_deg:
        out.append(Finding(
            "warn", "little_pose_variety",
            f"your face is turned the same way in every photo (spread {stats.yaw_spread:.0f} deg)",
            "add photos with your head turned a little left and right, and a few in profile"))
    if stats.pitch_spread is not None and stats.pitch_spread < policy.min_pitch_spread_deg:
        out.append(Finding(
            "info", "little_pitch_variety",
            "you look at the camera from the same height in every photo",
            "add a few photos looking slightly up or down"))
    if stats.framing_spread is not None and stats.framing_spread < policy.min_framing_spread:
        close = float(np.median([m.face_fraction for m in metrics])) >= 0.25
        out.append(Finding(
            "warn", "little_framing_variety",
            f"all photos are {'close-ups' if close else 'framed alike'}",
            "mix close-ups with some head-and-shoulders and half-body photos" if close else
            "mix half-body photos with some close-ups of your face"))
    if (stats.lighting_spread is not None and stats.lighting_spread < policy.min_lighting_spread
            and stats.side_light_spread is not None
            and stats.side_light_spread < policy.min_side_light_spread):
        out.append(Finding(
            "info", "little_lighting_variety",
            "the light on your face is alike in every photo",
            "add photos in other light: daylight outdoors, indoors, evening"))
    if (stats.background_spread is not None
            and stats.background_spread < policy.min_background_spread):
        out.append(Finding(
            "warn", "little_background_variety",
            "the background looks the same in every photo",
            "take photos in different places: the model would otherwise learn the background "
            "as part of you"))
    return out, stats


_COUNT_CODES = frozenset({"too_few_photos", "few_photos", "many_photos", "too_many_photos"})


def _verdict(*, kept: int, total: int, photo_warned: int, set_findings: Sequence[Finding],
             trainable: bool, policy: CheckPolicy) -> tuple[Quality, int, tuple[str, ...]]:
    """A 0-100 score from the deductions below, its quality word and the main reasons."""
    deductions: list[tuple[float, str]] = []
    if kept < policy.recommended_min:
        deductions.append((45.0 * (policy.recommended_min - kept) / policy.recommended_min,
                           f"{kept} usable photo(s): {policy.recommended_min}-"
                           f"{policy.recommended_max} work best"))
    elif kept > policy.recommended_max:
        deductions.append((min(10.0, float(kept - policy.recommended_max)),
                           f"{kept} photos: more than {policy.recommended_max} adds little"))
    left_out = total - kept
    if left_out:
        deductions.append((min(15.0, 3.0 * left_out), f"{left_out} photo(s) left out"))
    if kept and photo_warned:
        deductions.append((25.0 * photo_warned / kept,
                           f"{photo_warned} of {kept} kept photo(s) have warnings"))
    for finding in set_findings:
        # The count has its own deduction above; the variety findings weigh here.
        if finding.code in _COUNT_CODES:
            continue
        if finding.photo is None and finding.severity in ("warn", "info"):
            weight = 8.0 if finding.severity == "warn" else 2.0
            deductions.append((weight, finding.message))
    score = max(0.0, 100.0 - sum(d for d, _ in deductions))
    if not trainable:
        score = min(score, 25.0)
    deductions.sort(key=lambda d: -d[0])
    reasons = tuple(text for _, text in deductions[:4])
    if not trainable:
        reasons = ("the set cannot be trained on as it is", *reasons)
    quality: Quality
    if not trainable or score < 50:
        quality = "poor"
    elif score >= 85 and kept >= policy.recommended_min:
        quality = "excellent"  # never with fewer photos than recommended, however clean
    elif score >= 70:
        quality = "good"
    else:
        quality = "fair"
    return quality, round(score), reasons


def check_set(analyses: Sequence[PhotoAnalysis], *, policy: CheckPolicy,
              unreadable: int = 0) -> SetReport:
    """Judge the set: near-duplicates and strangers first (they leave the set), then count,
    variety and the verdict on what is left. ``unreadable``: photos of the upload that could not
    be decoded (they count as left out in the score)."""
    photos = sorted(analyses, key=lambda a: a.order)
    findings: list[Finding] = [f for a in photos for f in a.findings]
    cross = _near_duplicates(photos, policy=policy)
    copies = {f.photo for f in cross}
    cross += _identity([p for p in photos if p.name not in copies], policy=policy)
    findings.extend(cross)
    rejected_names = {f.photo for f in findings if f.severity == "reject" and f.photo}
    kept = [p for p in photos if p.name not in rejected_names]
    set_findings: list[Finding] = []
    count = len(kept)
    if count < policy.min_photos:
        set_findings.append(Finding(
            "reject", "too_few_photos",
            f"{count} usable photo(s); at least {policy.min_photos} are needed",
            f"add more clear photos of your face ({policy.recommended_min}-"
            f"{policy.recommended_max} work best)"))
    elif count < policy.recommended_min:
        set_findings.append(Finding(
            "warn", "few_photos",
            f"{count} usable photo(s); {policy.recommended_min}-{policy.recommended_max} work best",
            f"add {policy.recommended_min - count} or more photos in different places, "
            "light and poses"))
    if count > policy.max_photos:
        set_findings.append(Finding(
            "reject", "too_many_photos",
            f"{count} usable photos; at most {policy.max_photos} are accepted",
            f"keep your best {policy.recommended_max}"))
    elif count > policy.recommended_max:
        set_findings.append(Finding(
            "info", "many_photos",
            f"{count} usable photos; more than {policy.recommended_max} rarely helps",
            f"keep your {policy.recommended_max} best and most varied photos"))
    variety, stats = _variety(kept, policy=policy)
    set_findings.extend(variety)
    findings.extend(set_findings)
    trainable = not any(f.severity == "reject" for f in set_findings)
    warned = sum(1 for p in kept if any(f.severity == "warn" and f.photo == p.name
                                        for f in findings))
    quality, score, reasons = _verdict(kept=count, total=len(photos) + unreadable,
                                       photo_warned=warned,
                                       set_findings=set_findings, trainable=trainable,
                                       policy=policy)
    logger.info("set of %d photo(s): %d kept, %s (%d)", len(photos), count, quality, score)
    return SetReport(
        trainable=trainable, quality=quality, score=score, reasons=reasons,
        findings=tuple(findings), accepted=tuple(p.name for p in kept),
        rejected=tuple(p.name for p in photos if p.name in rejected_names), stats=stats,
    )


def describe(report: SetReport) -> str:
    """A few lines for logs and the command line."""
    lines = [f"{report.quality} ({report.score}/100), "
             f"{'trainable' if report.trainable else 'not trainable'}: "
             f"{len(report.accepted)} kept, {len(report.rejected)} left out"]
    lines.extend(f"  - {reason}" for reason in report.reasons)
    return "\n".join(lines)


__all__ = [
    "CROP_FACE_FRACTION", "BoxDescriber", "CheckPolicy", "DecodedInput", "FacePatch", "PhotoAnalysis",
    "PhotoMetrics", "Quality", "SetReport", "SetStats", "analyze_photo", "check_set",
    "classify_software", "describe", "gaussian_blur", "laplacian_variance",
    "normalized_sharpness",
]
