"""Preparing a checked photo for training: a face-centred crop at the trainer's resolution,
saved as a JPEG that carries no metadata at all.

The crop puts the face at about ``FACE_FRACTION`` of the crop's shorter side (FLUX person LoRAs
learn the face best from head-and-shoulders framing), centred on it, with a little more room below
the chin than above the hair. It is shifted to stay inside the photo, and shrunk to the largest
crop of its shape that fits when the photo is too small for it.

Its shape is a square, or, for a recipe with ``aspect_buckets``, the aspect of the photo's
nearest bucket (``domain.buckets``), stored at that bucket's size: a portrait photo keeps its
shoulders and hair instead of losing them to a square. The face is then always whole inside the
crop when the photo can hold it (the drop below the face never pushes the brows out).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

from PIL import Image

from selfie_lora.dataset.checks import CROP_FACE_FRACTION, DecodedInput, PhotoAnalysis
from selfie_lora.domain.buckets import Bucket, bucket_sizes
from selfie_lora.domain.entities import FaceBox

logger = logging.getLogger(__name__)

FACE_FRACTION = CROP_FACE_FRACTION
# The crop's centre sits this share of its side below the face box's centre: dlib's box starts at
# the brows, so the hair above already fits, and the chin gets room.
DROP = 0.04


@dataclass(frozen=True)
class PreparedPhoto:
    name: str
    sha256: str  # of ``data``
    data: bytes  # JPEG, RGB, square or a bucket's size, no metadata (no EXIF, ICC profile, comment)
    width: int
    height: int
    # The main face's box in this photo, as fractions of its width and height (see
    # ``face_box_in_crop``); None when no face was found.
    face_box: FaceBox | None = None


def crop_box(analysis: PhotoAnalysis, *, image_size: tuple[int, int],
             face_fraction: float = FACE_FRACTION,
             aspect: float | None = None) -> tuple[int, int, int, int]:
    """The square (or, with ``aspect``, the crop of that width / height) to cut from an image of
    ``image_size`` (left, top, right, bottom), from the analysis's main face (its coordinates are
    scaled when the image was decoded at another size). Without a face: the centred largest
    square (crop of that aspect)."""
    if aspect is not None:
        return _aspect_box(analysis, image_size=image_size, face_fraction=face_fraction,
                           aspect=aspect)
    width, height = image_size
    fit = min(width, height)
    face = analysis.main_face
    if face is None:
        side = fit
        cx, cy = width / 2, height / 2
    else:
        k = width / analysis.image_size[0]
        box = [v * k for v in face.box]
        face_size = max(box[2] - box[0], box[3] - box[1], 1.0)
        side = min(fit, max(1, round(face_size / face_fraction)))
        cx = (box[0] + box[2]) / 2
        cy = (box[1] + box[3]) / 2 + DROP * side
    left = round(cx - side / 2)
    top = round(cy - side / 2)
    # Shift (never shrink further) to stay inside the photo.
    left = min(max(0, left), width - side)
    top = min(max(0, top), height - side)
    return left, top, left + side, top + side


def _face_in(analysis: PhotoAnalysis, image_size: tuple[int, int]
             ) -> tuple[float, float, float, float] | None:
    """The main face's box scaled to ``image_size`` and clipped to the image."""
    face = analysis.main_face
    if face is None:
        return None
    width, height = image_size
    k = width / analysis.image_size[0]
    left, top, right, bottom = (v * k for v in face.box)
    return (min(max(0.0, left), width), min(max(0.0, top), height),
            min(max(0.0, right), width), min(max(0.0, bottom), height))


def _largest(image_size: tuple[int, int], aspect: float) -> tuple[float, float]:
    """The largest crop of ``aspect`` an image of ``image_size`` holds (width, height)."""
    width, height = image_size
    return min(width, height * aspect), min(height, width / aspect)


def _aspect_box(analysis: PhotoAnalysis, *, image_size: tuple[int, int], face_fraction: float,
                aspect: float) -> tuple[int, int, int, int]:
    width, height = image_size
    most_w, most_h = _largest(image_size, aspect)
    face = _face_in(analysis, image_size)
    if face is None:
        crop_w, crop_h = most_w, most_h
        cx, cy = width / 2, height / 2
    else:
        face_size = max(face[2] - face[0], face[3] - face[1], 1.0)
        short = face_size / face_fraction  # the crop's shorter side, as a square's side today
        crop_w, crop_h = (short * aspect, short) if aspect >= 1 else (short, short / aspect)
        # Shrunk (keeping the aspect) only when the photo is too small.
        crop_w, crop_h = min(crop_w, most_w), min(crop_h, most_h)
        cx = (face[0] + face[2]) / 2
        cy = (face[1] + face[3]) / 2 + DROP * min(crop_w, crop_h)
    side_w = min(width, max(1, round(crop_w)))
    side_h = min(height, max(1, round(crop_h)))
    left = round(cx - side_w / 2)
    top = round(cy - side_h / 2)
    if face is not None:
        # The face whole whenever the crop can hold it: a tight crop (small photo) centred a
        # little below the face could otherwise cut the brows.
        f_left, f_top = math.floor(face[0]), math.floor(face[1])
        f_right, f_bottom = math.ceil(face[2]), math.ceil(face[3])
        if f_right - f_left <= side_w:
            left = min(max(left, f_right - side_w), f_left)
        if f_bottom - f_top <= side_h:
            top = min(max(top, f_bottom - side_h), f_top)
    left = min(max(0, left), width - side_w)
    top = min(max(0, top), height - side_h)
    return left, top, left + side_w, top + side_h


def crop_bucket(analysis: PhotoAnalysis, *, image_size: tuple[int, int],
                resolution: int) -> Bucket:
    """The bucket (at ``resolution``) a photo of ``image_size`` is cropped to: the one nearest
    its aspect (``domain.buckets.nearest_bucket``), unless its face does not fit in that shape's
    largest crop (a face filling the photo's width): then the nearest one it fits in."""
    sizes = bucket_sizes(resolution)
    target = math.log(image_size[0] / image_size[1])
    # sorted() is stable: ties go to the squarer bucket, as in nearest_bucket.
    ranked = sorted(sizes, key=lambda b: abs(math.log(b.aspect) - target))
    face = _face_in(analysis, image_size)
    if face is not None:
        for bucket in ranked:
            most_w, most_h = _largest(image_size, bucket.aspect)
            if face[2] - face[0] <= most_w and face[3] - face[1] <= most_h:
                return bucket
    return ranked[0]


def crop_plan(analysis: PhotoAnalysis, *, image_size: tuple[int, int], resolution: int,
              aspect_buckets: bool = False) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """The crop to cut (left, top, right, bottom) and the size it is stored at (width, height):
    the square at ``resolution``, or with ``aspect_buckets`` the photo's bucket."""
    if not aspect_buckets:
        return crop_box(analysis, image_size=image_size), (resolution, resolution)
    bucket = crop_bucket(analysis, image_size=image_size, resolution=resolution)
    box = crop_box(analysis, image_size=image_size, aspect=bucket.aspect)
    return box, (bucket.width, bucket.height)


def face_box_in_crop(analysis: PhotoAnalysis, *, image_size: tuple[int, int],
                     crop: tuple[int, int, int, int]) -> FaceBox | None:
    """The main face's box in the crop ``crop`` (left, top, right, bottom) cut from an image of
    ``image_size``, as fractions of the crop's width and height, clipped to [0, 1] (a face may
    reach past the crop, or the photo). None without a face, or when none of it is in the crop.

    Written from the rectangle alone, so it holds for a crop of any shape: the training loss
    weights the face by this box, whatever the crop's aspect."""
    face = analysis.main_face
    if face is None:
        return None
    # The analysis's coordinates are scaled when the image was decoded at another size.
    k = image_size[0] / analysis.image_size[0]
    left, top, right, bottom = crop
    width, height = max(1, right - left), max(1, bottom - top)

    def clip(v: float) -> float:
        # Four decimals: a ten-thousandth of the side is under a pixel at any training size.
        return round(min(1.0, max(0.0, v)), 4)

    x0, x1 = (clip((face.box[i] * k - left) / width) for i in (0, 2))
    y0, y1 = (clip((face.box[i] * k - top) / height) for i in (1, 3))
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def source_min_side(decoded: DecodedInput, analysis: PhotoAnalysis, *,
                    resolution: int, aspect_buckets: bool = False) -> int | None:
    """The short side the photo should be decoded at so the crop has the pixels it is stored at
    (``resolution``, or its bucket's size), when the decoded image is too small for that and the
    original has more pixels to give; None when the decoded image is enough (or nothing better
    exists)."""
    image_size = decoded.image.size
    (left, _top, right, _bottom), (target, _h) = crop_plan(
        analysis, image_size=image_size, resolution=resolution, aspect_buckets=aspect_buckets)
    side = right - left
    if side >= target:
        return None
    scale = max(decoded.original_size) / max(image_size)
    if scale <= 1.01:
        return None
    wanted = min(float(target), side * scale)
    return math.ceil(min(image_size) * wanted / side)


def encode_clean_jpeg(image: Image.Image, *, quality: int = 95) -> bytes:
    """JPEG bytes of ``image``'s pixels only. A fresh image is built first: Pillow writes the
    ``comment`` of an image's ``info`` on save (and resized copies inherit ``info``), so saving the
    image itself could leak a camera or app comment."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    # A new image on the same pixels, with no ``info`` and no EXIF: a copy of them (new() and
    # paste(), which was here) cost ~1 ms of ~120 a photo, for the same bytes. load() first: an
    # image from Image.open has no pixels until then (paste() loaded it; ``im`` does not).
    rgb.load()
    clean = rgb._new(rgb.im)
    clean.info = {}
    buf = io.BytesIO()
    # No exif=, icc_profile= or comment=; 4:4:4 chroma keeps colour edges the trainer sees.
    clean.save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def prepare_photo(decoded: DecodedInput, analysis: PhotoAnalysis, *, resolution: int,
                  aspect_buckets: bool = False, quality: int = 95) -> PreparedPhoto:
    """The training image of one photo: the face-aware square at ``resolution`` px, or with
    ``aspect_buckets`` the face-aware crop of its bucket's shape at the bucket's size."""
    image = decoded.image
    box, size = crop_plan(analysis, image_size=image.size, resolution=resolution,
                          aspect_buckets=aspect_buckets)
    crop_size = (box[2] - box[0], box[3] - box[1])
    if crop_size == size:
        cropped = image.crop(box)
    else:
        # Straight from the region, no copy of the crop first: area averaging to shrink (each
        # output pixel the mean of the source pixels it covers: no aliasing, the way photo
        # software downsizes), bicubic to enlarge. For a 1400 px region of a 12 MP photo to
        # 1024 (CPU of one thread, 2-core AMD EPYC host, 2026-12-07): Pillow's box filter
        # ~7-10 ms; OpenCV's INTER_AREA, which was here, ~8 ms at such non-integer ratios
        # plus the copies into and out of numpy; a Lanczos resize, before that, ~21 ms.
        shrink = crop_size[0] > size[0]
        cropped = image.resize(size, Image.Resampling.BOX if shrink else Image.Resampling.BICUBIC,
                               box=box)
    if crop_size[0] < size[0]:
        logger.debug("%s: crop of %dx%d px upscaled to %dx%d", decoded.name, *crop_size, *size)
    data = encode_clean_jpeg(cropped, quality=quality)
    return PreparedPhoto(name=decoded.name, sha256=hashlib.sha256(data).hexdigest(), data=data,
                         width=size[0], height=size[1],
                         face_box=face_box_in_crop(analysis, image_size=image.size, crop=box))


def prepared_square_side(data: bytes) -> int | None:
    """The side of a stored training photo that is a square, read from its header; None for
    another shape or bytes that are not an image. Every photo stored before uploads recorded
    their resolution (``Dataset.prepared_resolution``) was such a square, at that resolution."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return width if width == height else None


def dataset_sha256(photos: Iterable[PreparedPhoto]) -> str:
    """One hash for a set of prepared photos, whatever their order (the same formula as the
    stored datasets': the sorted photo hashes, one per line)."""
    return hashlib.sha256("\n".join(sorted(p.sha256 for p in photos)).encode()).hexdigest()


__all__ = [
    "DROP", "FACE_FRACTION", "PreparedPhoto", "crop_box", "crop_bucket", "crop_plan",
    "dataset_sha256", "encode_clean_jpeg", "face_box_in_crop", "prepare_photo",
    "prepared_square_side", "source_min_side",
]
