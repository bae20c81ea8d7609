"""Pixel measurements of one photo: the face's sharpness, exposure, colour, skin texture and
pose, how far it is cut off, and the background's colour, gathered by :func:`measure` into
:class:`PhotoMetrics`. Plain numpy: no OpenCV or SciPy needed.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from selfie_lora.dataset.checks.analysis import FloatArray, PhotoMetrics, Pixels
from selfie_lora.dataset.checks.policy import CheckPolicy
from selfie_lora.domain.buckets import bucket_sizes, nearest_bucket
from selfie_lora.domain.faces import Face


def _luma(rgb: NDArray[np.uint8]) -> FloatArray:
    # Each channel is made float64 by its product (exactly: every uint8 is a float64), not all
    # of them first by astype: the same values without a float copy of the whole crop (0.43
    # against 0.69 ms for 256 x 256 pixels).
    result: FloatArray = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    return result


def _saturation(rgb: NDArray[np.uint8]) -> tuple[FloatArray, FloatArray]:
    """HSV saturation and value (0-1)."""
    # Channel by channel, not ``max(axis=-1)``: numpy reduces a last axis of 3 slowly (1.2
    # against 7.4 ms for 256 x 256 pixels), and the values are the same.
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high = np.maximum(np.maximum(red, green), blue).astype(np.float64)
    low = np.minimum(np.minimum(red, green), blue).astype(np.float64)
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


# dlib's 5-point layout (shape_predictor_5_face_landmarks): the outer and inner corners of the
# eye on the image's right, the same of the eye on its left, the base of the nose. Where the
# 68-point layout has a landmark the checks need and this one has not, it is estimated in the
# eye frame: origin between the eye centres, x along the eye line, unit = the eyes' distance.
# Medians over the 45 real photos of ../shared/photos/people and their mirror images, both
# models on each face (90 faces): jaw ends (+-1.13, 0.02), chin (0, 1.86), brows (0, -0.37),
# cheek centres (+-0.75, 0.41), jaw width 2.27.
_JAW_X, _JAW_Y = 1.13, 0.02
_CHIN_Y = 1.86
_BROW_Y = -0.37
_CHEEK_X, _CHEEK_Y = 0.75, 0.41
_JAW_WIDTH = 2.27
# Pose from the nose's place in the eye frame, fitted on the same faces against the 68-point
# estimate below: yaw = asin(2.5 x) (r = 0.91, rms 3.8 deg), pitch = 64 - 90 y (r = 0.76,
# rms 4.5 deg).
_YAW_GAIN = 2.5
_PITCH_AT_ZERO, _PITCH_GAIN = 64.0, 90.0

FaceFrame = tuple[FloatArray, FloatArray, FloatArray, float]


def _eye_frame(points: FloatArray) -> FaceFrame | None:
    """Origin, x and y unit vectors and unit length of the eye frame (5 or 68 points)."""
    if len(points) == 68:
        left, right = points[36:42].mean(axis=0), points[42:48].mean(axis=0)
    elif len(points) == 5:
        left, right = points[2:4].mean(axis=0), points[0:2].mean(axis=0)
    else:
        return None
    span = right - left
    unit = float(np.linalg.norm(span))
    if unit < 1.0:
        return None
    ux = span / unit
    uy = np.array([-ux[1], ux[0]])
    return (left + right) / 2, ux, uy, unit


def _at(frame: FaceFrame, x: float, y: float) -> FloatArray:
    origin, ux, uy, unit = frame
    result: FloatArray = origin + (ux * x + uy * y) * unit
    return result


def _outline(face: Face) -> FloatArray | None:
    """Points on the face's outline (jaw, chin, brows): the 68 model's own, else estimated."""
    points = np.asarray(face.landmarks, dtype=np.float64)
    if len(points) == 68:
        result: FloatArray = points[:27]
        return result
    frame = _eye_frame(points)
    if frame is None:
        return None
    return np.asarray([_at(frame, -_JAW_X, _JAW_Y), _at(frame, _JAW_X, _JAW_Y),
                       _at(frame, 0.0, _CHIN_Y), _at(frame, 0.0, _BROW_Y)])


def _cut_off(face: Face, width: int, height: int) -> float:
    """How far the face reaches past the frame, as a fraction of its size (0: fully inside)."""
    size = max(face.width, face.height, 1)
    left, top, right, bottom = face.box
    over = float(max(0 - left, 0 - top, right - width, bottom - height, 0))
    outline = _outline(face)
    if outline is not None:
        # The jaw line and the brows outline the face: any of them outside is a cut-off face.
        xs, ys = outline[:, 0], outline[:, 1]
        over = max(over, 0 - float(xs.min()), 0 - float(ys.min()), float(xs.max()) - width,
                   float(ys.max()) - height)
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


def _face_crop(image: Pixels, face: Face, side: int) -> tuple[NDArray[np.uint8], float, float,
                                                                   float, float]:
    """The face box (clipped to the frame) resized to side x side, and the map from image
    coordinates to the crop's: x' = (x - x0) * kx, y' = (y - y0) * ky."""
    left, top, right, bottom = _clip_box(face.box, image.width, image.height)
    crop = image.resize((side, side), Image.Resampling.BILINEAR, box=(left, top, right, bottom),
                        reducing_gap=2.0)
    return (np.asarray(crop), float(left), float(top), side / (right - left),
            side / (bottom - top))


def _cheeks(face: Face) -> tuple[list[FloatArray], float] | None:
    """Both cheek centres and a radius for the skin patches, in the image's pixels: between
    the lower eyelid's outer end, the jaw at nose height and the nose wing (68 points), or where
    those are in the eye frame (5 points); away from eyes, nostrils, mouth and outline."""
    points = np.asarray(face.landmarks, dtype=np.float64)
    if len(points) == 68:
        width = float(np.linalg.norm(points[16] - points[0]))
        centres = [points[list(idx)].mean(axis=0) for idx in ((1, 2, 31, 41), (15, 14, 35, 46))]
        return centres, width * 0.08
    frame = _eye_frame(points)
    if frame is None:
        return None
    return ([_at(frame, -_CHEEK_X, _CHEEK_Y), _at(frame, _CHEEK_X, _CHEEK_Y)],
            frame[3] * _JAW_WIDTH * 0.08)


def _skin_texture(gray: FloatArray, centres: list[FloatArray], radius: float) -> float | None:
    """High-frequency energy on both cheeks divided by that of the whole face (``gray`` is the
    normalised face crop, ``centres`` and ``radius`` the cheeks in its coordinates): beauty
    filters smooth the skin and keep eyes, brows and outlines sharp, so the ratio drops."""
    detail = gray - gaussian_blur(gray, sigma=1.5)
    face_energy = float(np.abs(detail).mean())
    if face_energy <= 1e-6:
        return None
    half = max(2, round(radius))
    energies: list[float] = []
    for cx, cy in centres:
        x0, x1 = round(cx) - half, round(cx) + half
        y0, y1 = round(cy) - half, round(cy) + half
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
    if len(face.landmarks) == 5:
        return _pose5(np.asarray(face.landmarks, dtype=np.float64))
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



def _pose5(points: FloatArray) -> tuple[float | None, float | None, float | None]:
    frame = _eye_frame(points)
    if frame is None:
        return None, None, None
    origin, ux, uy, unit = frame
    roll = math.degrees(math.atan2(ux[1], ux[0]))
    offset = points[4] - origin
    x, y = float(offset @ ux) / unit, float(offset @ uy) / unit
    yaw = math.degrees(math.asin(max(-1.0, min(1.0, _YAW_GAIN * x))))
    return yaw, _PITCH_AT_ZERO - _PITCH_GAIN * y, roll


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


def _sharpness(image: Pixels, face: Face, face_gray: FloatArray, *, side: int) -> float:
    """Sharpness at the face's own resolution, at most ``side`` px: a small face blown up to
    ``side`` would look blurred when it is only small (that is the resolution check's business).
    On the real photos of bench/checks_eval.py, faces of 72-250 px measured 9-60 blown up and
    33-400 at their own size; blurred copies stay under 17 either way."""
    own = round(max(face.width, face.height))
    if own >= side or own < 16:
        return normalized_sharpness(face_gray)
    rgb, *_ = _face_crop(image, face, own)
    return normalized_sharpness(_luma(rgb))


def _crop_short_side(width: int, height: int, policy: CheckPolicy) -> int:
    """The shorter side of the training crop the face is framed in: the square's side, or with
    aspect buckets the side of the photo's bucket (832 of a 2:3 portrait's 832 x 1248 at 1024 px),
    which needs a smaller face for the same framing."""
    if not policy.aspect_buckets:
        return policy.resolution
    bucket = nearest_bucket(width, height, bucket_sizes(policy.resolution))
    return min(bucket.width, bucket.height)


def measure(image: Pixels, small: NDArray[np.uint8], k_small: float, face: Face, *,
            scale: float, policy: CheckPolicy) -> PhotoMetrics:
    """``small``: the pixels of the detection copy, ``k_small`` image pixels per pixel."""
    width, height = image.size
    # The face is measured on its box resized to a fixed size (blur, light, colour, skin: the
    # same numbers whatever the photo's resolution), the frame on the small detection copy
    # (statistics, not detail): a few milliseconds instead of ~80 on the decoded photo.
    side = policy.blur_face_side
    face_rgb, x0, y0, kx, ky = _face_crop(image, face, side)
    face_gray = _luma(face_rgb)
    # Every third pixel of the small copy: ~40k pixels are plenty for shares and means.
    frame = small[::3, ::3]
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
    needed = _crop_short_side(width, height, policy) * policy.crop_face_fraction
    texture = None
    cheeks = _cheeks(face)
    if (cheeks is not None and face_px >= policy.smooth_skin_min_face_px
            and face.height >= policy.smooth_skin_min_face_px):
        centres, radius = cheeks
        # The crop is square and the box nearly so: one scale for the radius is enough.
        texture = _skin_texture(face_gray, [(c - (x0, y0)) * (kx, ky) for c in centres],
                                radius * (kx + ky) / 2)
    yaw, pitch, roll = _pose(face)
    small_box = tuple(v / (k_small * 3) for v in face.box)
    # Both in one call: one partition of the face's 65k values for the two ranks, not one each
    # (1.0 against 1.5 ms for 256 x 256 values); the same numbers.
    luma_low, luma_high = (float(v) for v in np.percentile(face_gray, (10, 90)))
    return PhotoMetrics(
        face_fraction=math.sqrt(area / (width * height)),
        face_px=face_px,
        upscale=max(1.0, needed / max(face_px, 1.0)),
        cut_off=_cut_off(face, width, height),
        sharpness=_sharpness(image, face, face_gray, side=side),
        face_luma=mean_luma,
        face_luma_low=luma_low,
        face_luma_high=luma_high,
        face_clipped=float(((face_gray <= 8) | (face_gray >= 247)).mean()),
        frame_clipped=float(((frame_luma <= 8) | (frame_luma >= 247)).mean()),
        skin_saturation=skin_saturation,
        garish_fraction=float(((frame_sat >= 0.9) & (frame_value >= 0.25)).mean()),
        skin_texture=texture,
        yaw=yaw, pitch=pitch, roll=roll,
        light_asymmetry=asymmetry,
        background=_background(frame, (small_box[0], small_box[1], small_box[2], small_box[3])),
    )
