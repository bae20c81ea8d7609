"""The check of one photo: :func:`analyze_photo` finds its faces, measures it and judges what the
photo alone can tell; :func:`classify_software` names the editing app of its EXIF tag.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from selfie_lora.dataset.checks.analysis import (
    BoxDescriber,
    DecodedInput,
    PhotoAnalysis,
    PhotoMetrics,
    Pixels,
)
from selfie_lora.dataset.checks.duplicates import face_patch, keypoints, whole_hashes
from selfie_lora.dataset.checks.measures import measure
from selfie_lora.dataset.checks.policy import CheckPolicy
from selfie_lora.domain.entities import Finding
from selfie_lora.domain.faces import Face, FaceAnalyzer

logger = logging.getLogger(__name__)


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
    image: Pixels = decoded.image
    if isinstance(image, Image.Image) and image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    scale = max(decoded.original_size) / max(width, height)
    findings: list[Finding] = []
    name = decoded.name
    software = _software_finding(decoded, name)
    if software is not None:
        findings.append(software)

    # One small copy serves detection, the frame's statistics and the whole-image hashes.
    small, k_small = _resized(image, min(policy.detect_side, max(image.size)))
    # Its pixels as an array once, for the detector and the frame's statistics: each
    # np.asarray of a Pillow image copies all of it (~0.5 ms for 667 x 500).
    small_rgb = np.asarray(small)
    faces = _detect(image, small_rgb, k_small, analyzer=analyzer, policy=policy)
    whole_phash, whole_dhash = whole_hashes(small)
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
    # The other faces large enough to be a friend beside the user get an identity too: the set
    # check compares them with the other photos, as the largest face need not be the user's.
    others = [_refine(image, f, analyzer=analyzer, policy=policy)
              if f.height >= policy.background_face_ratio * max(main.height, 1) else f
              for f in faces[1:]]
    findings.extend(_other_faces(name, main, others, policy=policy))
    metrics = measure(image, small_rgb, k_small, main, scale=scale, policy=policy)
    findings.extend(_judge(name, metrics, policy=policy))
    # Only the near-duplicate regions are cut from the detection copy when it is reduced enough:
    # the landmarks, the identity and the measurements (above) keep the photo's own resampling.
    regions = _with_reduced(image, small, k_small)
    patch = face_patch(regions, main, policy=policy)
    points = keypoints(regions, main, policy=policy)
    return PhotoAnalysis(
        name=name, image_size=(width, height), scale=scale, faces=(main, *others),
        main_face=main, findings=tuple(findings), metrics=metrics, whole_phash=whole_phash,
        whole_dhash=whole_dhash, face_patch=patch, keypoints=points, had_exif=decoded.had_exif,
        order=order,
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


def _plain(image: Pixels) -> Image.Image:
    """``image`` as a Pillow image: itself when it is one, else a copy of all of it."""
    return image if isinstance(image, Image.Image) else image.crop((0, 0, *image.size))


def _resized(image: Pixels, long_side: int) -> tuple[Image.Image, float]:
    """A copy whose long side is about ``long_side`` (never upscaled unless asked) and the factor
    from its pixels back to ``image``'s."""
    current = max(image.size)
    if current == long_side:
        return _plain(image), 1.0
    if current > long_side:
        # Integer box reduction first: much faster than one large resampling step.
        factor = current // long_side
        small: Pixels = image.reduce(factor) if factor >= 2 else image
        if max(small.size) > long_side * 1.25:
            ratio = long_side / max(small.size)
            # From a ColourManaged view too: only the resized copy is converted.
            small = small.resize((max(1, round(small.width * ratio)),
                                  max(1, round(small.height * ratio))),
                                 Image.Resampling.BILINEAR)
        return _plain(small), image.width / small.width
    ratio = long_side / current
    big = image.resize((round(image.width * ratio), round(image.height * ratio)),
                       Image.Resampling.BILINEAR)
    return big, image.width / big.width


class _Reduced:
    """``image`` with ``copy``, all of it box-reduced by the integer ``factor`` (the detection
    copy), at hand. A region resampled with a ``reducing_gap`` at which Pillow would itself
    box-reduce it by ``factor`` or more first (a ratio of ``reducing_gap * factor`` or more) is
    resampled from ``copy`` instead: the same or a smaller box reduction, already made, then a
    longer bilinear step (at ``reducing_gap`` 1 and ``factor`` 3, from 3x to 6x Pillow would
    reduce by 3-5 and then resample by at most 1.33, the copy resamples by up to 2; as near the
    exact resize as Pillow's own, tests/unit/test_checks_reduced.py). Without it a 12 MP photo's
    face region was reduced again for the near-duplicate keypoints' window and the face patch
    (~7 ms of ~130 a photo, bench/ingest.py --sources people --profile). Everything else is
    ``image``'s."""

    def __init__(self, image: Pixels, copy: Image.Image, factor: int) -> None:
        self._image = image
        self._copy = copy
        self._factor = factor

    @property
    def size(self) -> tuple[int, int]:
        return self._image.size

    @property
    def width(self) -> int:
        return self._image.width

    @property
    def height(self) -> int:
        return self._image.height

    @property
    def mode(self) -> str:
        return self._image.mode

    def reduce(self, factor: int | tuple[int, int],
               box: tuple[int, int, int, int] | None = None) -> Image.Image:
        return self._image.reduce(factor, box)

    def crop(self, box: tuple[float, float, float, float] | None = None) -> Image.Image:
        return self._image.crop(box)

    def resize(self, size: tuple[int, int], resample: int | None = None,
               box: tuple[float, float, float, float] | None = None,
               reducing_gap: float | None = None) -> Image.Image:
        if (box is not None and reducing_gap is not None and resample is not None
                and resample != Image.Resampling.NEAREST):
            # Pillow's rule: the box is first reduced by int(ratio / reducing_gap) on each axis.
            ratio = min((box[2] - box[0]) / size[0], (box[3] - box[1]) / size[1])
            if ratio >= reducing_gap * self._factor:
                k = self._factor
                return self._copy.resize(size, resample, box=(box[0] / k, box[1] / k,
                                                              box[2] / k, box[3] / k),
                                         reducing_gap=reducing_gap)
        return self._image.resize(size, resample, box, reducing_gap)


def _with_reduced(image: Pixels, small: Image.Image, k_small: float) -> Pixels:
    """``image`` with the detection copy at hand (``_Reduced``) when that copy is ``image``
    box-reduced by an integer factor (``_resized``: Pillow's ``reduce`` rounds the sides up)."""
    factor = round(k_small)
    width, height = image.size
    if factor >= 2 and small.size == (-(-width // factor), -(-height // factor)):
        return _Reduced(image, small, factor)
    return image


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


def _detect(image: Pixels, small: NDArray[np.uint8], k: float, *, analyzer: FaceAnalyzer,
            policy: CheckPolicy) -> list[Face]:
    """Faces in ``image``'s coordinates (found on ``small``, the pixels of a copy with ``k``
    image pixels per pixel), boxes only, largest first."""
    faces = analyzer.detect(small, landmarks=False, embed=False)
    if not faces and policy.detect_retry_side > max(small.shape[:2]):
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


def _refine(image: Pixels, face: Face, *, analyzer: FaceAnalyzer,
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
        # Straight from the region, integer-reduced first: no full-size copy of the crop. By
        # the whole integer part of the ratio (reducing_gap=1), then a short bilinear step:
        # with 2, a 600 px face was box-reduced by 2 and then resampled 2x (~8 ms a photo
        # against ~5, bench/ingest.py --sources people). Not the same pixels: on the 45 people
        # originals the landmarks move by up to a few px (5), so pose by a few degrees and the
        # skin-texture region a little (one photo's smooth_skin warning went), and embeddings by
        # at most 0.087; bench/checks_eval.py's table is unchanged, though verdicts near a
        # threshold moved within it.
        crop = image.resize(size_out, Image.Resampling.BILINEAR, box=region, reducing_gap=1.0)
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
            f"{name} shows {len(big) + 1} faces: the largest one is taken as yours, the "
            f"others are {sizes} of its size",
            "use photos where you are alone, or crop the others out before uploading: if the "
            "largest face is not yours, this photo would train the other person's face",
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
            # upscale = needed / face px (above 1 here): the figure its own crop needs.
            f"the face in {name} is {m.face_px:.0f} px tall; training at {resolution} px needs "
            f"about {m.upscale * m.face_px:.0f} px",
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
    washed_out = False  # overexposed past the reject line
    if bright and not dark:
        washed_out = m.face_luma_low > policy.bright_shadows_reject or badly_clipped
        add("reject" if washed_out else "warn", "overexposed",
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
    # Only a face with visible pixels has a saturation (a black face measures 0): one whose
    # brightest tenth reaches past the 0.15 of value the measure counts. Not on a face refused
    # as washed out either: overexposure drains the colour of a colour photo (0.06 at 2x
    # brightness), and "use the colour original" beside "overexposed" told the user to find one
    # they had; a face only warned as bright is still trained on, so a black-and-white one
    # keeps its warning.
    elif (not washed_out and m.face_luma_high > 0.15 * 255
          and m.skin_saturation < policy.grey_skin_saturation):
        add("warn", "black_and_white",
            f"{name} looks black-and-white (face saturation {m.skin_saturation:.2f})",
            "use the colour original: a model trained on black-and-white photos learns grey "
            "skin")
    # Blur and bad exposure flatten the skin too: the texture only says something about a
    # sharp, well exposed face.
    judged = m.sharpness >= policy.blur_warn and not (dark or bright)
    if judged and m.skin_texture is not None and m.skin_texture < policy.smooth_skin_ratio:
        add("warn", "smooth_skin",
            f"the skin in {name} looks unnaturally smooth (texture {m.skin_texture:.2f})",
            "this photo may have a beauty filter or retouching: use an unedited one")
    return out
