"""Decoding one uploaded photo, safely, into a plain RGB image.

Everything about a photo's bytes is hostile until decoded: the format is recognized from the
content (never the name), the declared size is checked before a single pixel is decoded, and
every decoder failure becomes a ``reject`` :class:`Finding` about that photo, never an exception.

Decisions worth knowing:

* Accepted: JPEG (MPO too: its first picture), PNG, WebP, HEIC/HEIF (``pillow-heif``) and AVIF
  (Pillow's own plugin). GIF, BMP, TIFF, SVG... are refused as ``unsupported_format``.
* Animated images (APNG, animated WebP, AVIF sequences) are refused as ``animated_image``: a
  selfie is one still picture and we cannot know which frame the user meant. A HEIF holding
  several pictures is not an animation; its primary picture (the one phones show) is used.
* Truncated files are refused (``LOAD_TRUNCATED_IMAGES`` stays off): a half-grey photo would
  train into the LoRA.
* The returned image carries no metadata (``info`` is emptied): what the service needs from EXIF
  is in :class:`DecodedPhoto` fields, and nothing else (GPS above all) can leak into storage.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import logging
import re
import struct
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, NoReturn

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageCms, ImageFile, UnidentifiedImageError, features

from selfie_lora.dataset.limits import UploadedFile, UploadLimits
from selfie_lora.domain.entities import Finding

logger = logging.getLogger(__name__)

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "HEIF", "AVIF")
_ACCEPTED_TEXT = "JPEG, PNG, WebP, HEIC or AVIF"

# EXIF tags read here (IFD0), by number so no dictionary lookup can fail.
_TAG_ORIENTATION = 0x0112
_TAG_SOFTWARE = 0x0131
_TAG_PROCESSING_SOFTWARE = 0x000B
_TAG_GPS_IFD = 0x8825

# EXIF orientation -> the transpose that shows the picture upright (what exif_transpose does,
# applied from the tag we already parsed instead of re-reading and rewriting the EXIF block).
_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# A file declaring more pixels than the limit while holding less than one byte per this many
# pixels is a decompression bomb, not a big photo (real encoders need far more bytes).
_BOMB_PIXELS_PER_BYTE = 1000
# The same rule holds within the limit past this many pixels: a 40 MP flat lossless WebP of
# 1,592 bytes took +805 MB to decode, and under a memory limit was told "the server was short of
# memory, upload it again". Below it a tiny file decodes small anyway.
_BOMB_CHECKED_FROM_PIXELS = 4_000_000
# Scans of a progressive JPEG: cameras, phones and encoders write 1 to ~12. A crafted file
# repeats a scan thousands of times at ~44 bytes each, and each costs a pass over every block
# of the picture: an 880 KB file held a worker 51 s.
MAX_JPEG_SCANS = 100
# Markers of a JPEG up to its end-of-image: a photo has ~10-30 (tables, EXIF, ICC, XMP; a
# depth map in extended XMP adds one per 64 KB). Pillow reads every segment before the first
# scan in Python and keeps each APP and COM one: a million 4-byte comments (4 MB) took 1 s.
MAX_JPEG_MARKERS = 1000
# Chunks of a PNG besides its image data: a photo has ~5-15 (header, colour profile, EXIF,
# text, end). Pillow reads each in Python and keeps what it reads: 4 million empty ones (48 MB)
# took 8 s of CPU and 470 MB.
MAX_PNG_CHUNKS = 1000
# Image data split into more than MAX_PNG_CHUNKS chunks averaging under this many bytes is a
# flood of chunks too (encoders write 8-64 KB chunks: libpng 8 KB, Pillow 64 KB).
_MIN_PNG_DATA_CHUNK = 256

# The finding of a photo this server failed to decode for want of memory (or of another
# resource: file handles): the photo's size is checked before, so this says nothing about it,
# and the same bytes may decode a minute later. Never remembered as the photo's outcome.
SHORT_OF_MEMORY = "server_short_of_memory"
# OSError numbers of a resource the process lacked (a decoder's own errors carry none).
_RESOURCE_ERRNOS = frozenset({errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.EAGAIN})
# What libheif ("Memory allocation error"), libavif ("Out of memory") and libjpeg
# ("Insufficient memory") say when an allocation fails.
_MEMORY_TEXTS = ("memory allocation", "out of memory", "insufficient memory")


class ColourManaged:
    """A photo kept in its own colours (an ICC profile other than sRGB's: Display P3 from an
    iPhone, Adobe RGB from a camera), read as sRGB: every copy taken from it, a region or a
    reduced or resized copy, is converted once made. The checks and the training crop read a few
    small copies of a photo (~1.5 MP of a 3 MP half-size decode), so a tagged photo costs the
    conversion of those (~20 ms) instead of all its pixels (~45 ms); resampling before
    converting instead of after moves a colour by about a level. ``srgb()`` converts all of it."""

    def __init__(self, source: Image.Image, transform: ImageCms.ImageCmsTransform) -> None:
        self._source = source
        self._transform = transform

    @property
    def size(self) -> tuple[int, int]:
        return self._source.size

    @property
    def width(self) -> int:
        return self._source.width

    @property
    def height(self) -> int:
        return self._source.height

    @property
    def mode(self) -> str:
        return "RGB"  # what every copy is

    def _converted(self, image: Image.Image) -> Image.Image:
        out = ImageCms.applyTransform(image, self._transform)
        if out is None:  # pragma: no cover - only in-place transforms return None
            raise RuntimeError("colour transform gave no image")
        out.info = {}
        return out

    def reduce(self, factor: int | tuple[int, int],
               box: tuple[int, int, int, int] | None = None) -> Image.Image:
        return self._converted(self._source.reduce(factor, box))

    def resize(self, size: tuple[int, int], resample: int | None = None,
               box: tuple[float, float, float, float] | None = None,
               reducing_gap: float | None = None) -> Image.Image:
        return self._converted(self._source.resize(size, resample, box, reducing_gap))

    def crop(self, box: tuple[float, float, float, float] | None = None) -> Image.Image:
        return self._converted(self._source.crop(box))

    def srgb(self) -> Image.Image:
        return self._converted(self._source)


@dataclass(frozen=True)
class DecodedPhoto:
    name: str  # the user's name for it (for findings only)
    # Mode "RGB", EXIF orientation applied, ICC profile converted to sRGB; with
    # ``defer_colour``, a photo whose profile is not sRGB's comes as a ``ColourManaged`` view.
    image: Image.Image | ColourManaged
    format: str  # "JPEG" | "PNG" | "WEBP" | "HEIF" | "AVIF"
    original_size: tuple[int, int]  # (w, h) after orientation, before any reduction
    exif_software: str | None  # EXIF Software / ProcessingSoftware tag text, if any
    had_exif: bool
    had_gps: bool


class Sniffed(NamedTuple):
    """What the first bytes of a file say it is."""

    format: str | None  # one of ACCEPTED_FORMATS, or None when it is not one we decode
    label: str  # for messages: "a GIF image", "a PDF document", ...
    is_image: bool  # an image format we do not accept (-> unsupported_format, not not_an_image)


class _RejectedError(Exception):
    def __init__(self, finding: Finding) -> None:
        super().__init__(finding.message)
        self.finding = finding


# --------------------------------------------------------------------------------------------
# Format recognition


_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs",
                          b"mif1", b"msf1", b"mif2", b"MiHE"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})

# (prefix, label, is an image format) for files we recognize but do not decode. Order matters
# only where prefixes nest.
_OTHER_SIGNATURES: tuple[tuple[bytes, str, bool], ...] = (
    (b"GIF87a", "a GIF image", True),
    (b"GIF89a", "a GIF image", True),
    (b"II*\x00", "a TIFF (or camera raw) image", True),
    (b"MM\x00*", "a TIFF (or camera raw) image", True),
    (b"II+\x00", "a BigTIFF image", True),
    (b"MM\x00+", "a BigTIFF image", True),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "a JPEG 2000 image", True),
    (b"\xff\x4f\xff\x51", "a JPEG 2000 image", True),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "a JPEG XL image", True),
    (b"\xff\x0a", "a JPEG XL image", True),
    (b"8BPS", "a Photoshop document", True),
    (b"qoif", "a QOI image", True),
    (b"\x76\x2f\x31\x01", "an OpenEXR image", True),
    (b"#?RADIANCE", "a Radiance HDR image", True),
    (b"%PDF", "a PDF document", False),
    (b"PK\x03\x04", "a zip archive", False),
    (b"PK\x05\x06", "a zip archive", False),
    (b"\x1f\x8b", "a gzip archive", False),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive", False),
    (b"Rar!\x1a\x07", "a RAR archive", False),
    (b"\x7fELF", "a program", False),
    (b"MZ", "a Windows program", False),
)


def sniff_image(data: bytes) -> Sniffed:
    """Recognize a file by its first bytes (the name and extension are never consulted)."""
    head = data[:64]
    if head.startswith(b"\xff\xd8\xff"):
        return Sniffed("JPEG", "a JPEG image", True)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return Sniffed("PNG", "a PNG image", True)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return Sniffed("WEBP", "a WebP image", True)
    if head[4:8] == b"ftyp":
        return _sniff_isobmff(data)
    # BMP's "BM" alone is too weak a signature; its 4 reserved header bytes are zero.
    if head[:2] == b"BM" and len(head) >= 14 and head[6:10] == b"\x00\x00\x00\x00":
        return Sniffed(None, "a BMP image", True)
    if head[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00") and len(head) >= 6 and head[4:6] != b"\0\0":
        return Sniffed(None, "an icon file", True)
    for prefix, label, is_image in _OTHER_SIGNATURES:
        if head.startswith(prefix):
            return Sniffed(None, label, is_image)
    if len(data) >= 262 and data[257:262] == b"ustar":
        return Sniffed(None, "a tar archive", False)
    text = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<svg", b"<?xml")) and b"<svg" in text:
        return Sniffed(None, "an SVG drawing", True)
    if text.startswith((b"<!doctype html", b"<html")):
        return Sniffed(None, "a web page", False)
    return Sniffed(None, "not an image", False)


def _sniff_isobmff(data: bytes) -> Sniffed:
    # The ftyp box: size, "ftyp", major brand, minor version, compatible brands. HEIF and AVIF
    # share the container (and the "mif1" brand); the AV1 brands decide.
    box_size = int.from_bytes(data[0:4], "big")
    end = min(max(box_size, 16), len(data), 4096)
    major = data[8:12]
    compatible = {data[i:i + 4] for i in range(16, end - 3, 4)}
    brands = {major} | compatible
    if major in _AVIF_BRANDS or (major not in _HEIF_BRANDS - {b"mif1", b"msf1"}
                                 and brands & _AVIF_BRANDS):
        return Sniffed("AVIF", "an AVIF image", True)
    if brands & _HEIF_BRANDS:
        return Sniffed("HEIF", "a HEIC image", True)
    if brands & {b"crx "}:
        return Sniffed(None, "a camera raw image", True)
    return Sniffed(None, "a video", False)


_heif_lock = threading.Lock()
_heif_state: list[bool] = []  # [] before the first try, then [registered?]


def _heif_available() -> bool:
    # Registered lazily and once: importing pillow-heif costs ~50 ms and it is an optional extra.
    with _heif_lock:
        if not _heif_state:
            try:
                import pillow_heif

                pillow_heif.register_heif_opener()
                _heif_state.append(True)
            except Exception as exc:
                logger.warning("HEIC photos cannot be read: pillow-heif is unavailable (%r)", exc)
                _heif_state.append(False)
        return _heif_state[0]


@functools.cache
def _avif_available() -> bool:
    return bool(features.check("avif"))


def _format_available(fmt: str) -> bool:
    if fmt == "HEIF":
        return _heif_available()
    if fmt == "AVIF":
        return _avif_available()
    return True


# --------------------------------------------------------------------------------------------
# Decoding


# ``warnings.catch_warnings`` swaps process-wide state; this lock keeps two decodes in different
# threads from restoring each other's filters. Only ``Image.open`` (header parsing) runs under it.
_open_lock = threading.Lock()


def decode_photo(
    upload: UploadedFile, *, limits: UploadLimits, min_side: int | None = None,
    defer_colour: bool = False,
) -> DecodedPhoto | Finding:
    """Decode ``upload`` into an upright sRGB image, or say (as a ``reject`` finding) why not.

    ``min_side``: the caller needs no more than this many pixels on the short side, so the
    decode may be reduced (JPEG: DCT scaling while decoding; others: ``reduce()`` afterwards)
    as long as the short side stays >= ``min_side``. ``defer_colour``: a photo whose ICC
    profile is not sRGB's comes as a :class:`ColourManaged` view, for a caller that reads only
    copies of it (the checks, the training crop) and so converts only those.
    """
    name = upload.name
    if upload.refused is not None:  # refused while reading the upload: none of its bytes here
        return upload.refused
    data = upload.data
    min_side = min_side if min_side is not None and min_side > 0 else None
    if not data:
        return _finding(name, "empty_file", f"{name} is empty (0 bytes)",
                        "the file did not copy completely; export the photo again")
    if len(data) > limits.max_member_bytes:
        return _finding(name, "file_too_large",
                        f"{name} is larger than {limits.mib(limits.max_member_bytes)}",
                        "export the photo as a JPEG at normal quality")
    sniffed = sniff_image(data)
    if sniffed.format is None:
        if sniffed.is_image:
            return _finding(name, "unsupported_format",
                            f"{name} is {sniffed.label}; only {_ACCEPTED_TEXT} photos are accepted",
                            "export or convert it to JPEG")
        return _finding(name, "not_an_image",
                        f"{name} is not a photo ({sniffed.label})" if sniffed.label != "not an image"
                        else f"{name} is not a photo",
                        f"upload {_ACCEPTED_TEXT} photos straight from your camera or phone")
    if not _format_available(sniffed.format):
        return _finding(name, "unsupported_format",
                        f"{name} is {sniffed.label}, which this server cannot read",
                        "convert it to JPEG (on an iPhone: Settings > Camera > Formats > Most "
                        "Compatible)")
    try:
        return _decode(upload, fmt=sniffed.format, limits=limits, min_side=min_side,
                       defer_colour=defer_colour)
    except _RejectedError as rejected:
        return rejected.finding
    except Exception as exc:  # any decoder failure is a finding about this photo, never a 500
        failure = _classify_failure(name, sniffed.label, exc)
        if failure.code == "corrupt_image" and _container_cut_short(data, sniffed.format):
            # libwebp and libheif say only "invalid" of a file that ends early.
            return _cut_off(name)
        return failure


def _decode(
    upload: UploadedFile, *, fmt: str, limits: UploadLimits, min_side: int | None,
    defer_colour: bool = False,
) -> DecodedPhoto:
    name = upload.name
    if fmt == "JPEG":
        _check_jpeg_structure(name, upload.data)
    elif fmt == "PNG":
        _check_png_structure(name, upload.data)
    with _open_lock, warnings.catch_warnings(record=True) as caught:
        # Record every warning instead of letting a filter (pytest's "error", or none at all in
        # production) decide: the outcome must not depend on the process's warning settings.
        warnings.simplefilter("always")
        try:
            img = Image.open(io.BytesIO(upload.data), formats=[fmt])
        except Image.DecompressionBombError as exc:
            _refuse_over_pillow_limit(name, upload.data, fmt, exc, limits=limits)
    with img:
        width, height = img.size
        for warning in caught:
            if issubclass(warning.category, Image.DecompressionBombWarning):
                # Pillow's own limit (~89 MP) says nothing of the bytes: an honest 100 MP
                # camera photo is "too large, resize it", a bomb only when its bytes cannot
                # hold its pixels (_check_dimensions tells the two apart).
                _check_dimensions(name, width, height, len(upload.data), limits=limits)
                raise _RejectedError(_bomb(name))
            logger.debug("decoding %s: %s", name, warning.message)
        if width < 1 or height < 1:
            raise _RejectedError(_finding(name, "corrupt_image", f"{name} declares no pixels",
                                     "export the photo again"))
        _check_dimensions(name, width, height, len(upload.data), limits=limits)
        frames = int(getattr(img, "n_frames", 1) or 1)
        # MPO (several pictures in one JPEG: a preview, a stereo pair) and multi-picture HEIF
        # open on their primary picture, which is the photo; elsewhere frames are an animation.
        if frames > 1 and img.format not in ("MPO", "HEIF"):
            raise _RejectedError(_finding(
                name, "animated_image", f"{name} is an animation ({frames} frames), not a photo",
                "upload a still photo (for a Live Photo, export it as a still JPEG)"))
        if fmt == "JPEG" and min_side:
            # DCT scaling (1/2, 1/4, 1/8) while decoding; Pillow picks the largest factor that
            # keeps both sides >= min_side, i.e. the short side >= min_side.
            img.draft("RGB", (min_side, min_side))
        if fmt == "JPEG":
            # The whole file to the decoder in one read: by default Pillow hands libjpeg 64 KiB
            # at a time (~37 suspensions and resumptions for a 2.4 MB photo, each with a copy
            # of the bytes left over). The same pixels, ~1 ms less of ~36 a 12 MP photo at
            # half size (CPU of one thread, bench/ingest.py's people photos).
            img.decodermaxblock = max(img.decodermaxblock, len(upload.data))
        # The pixels load before EXIF is read: a PNG's getexif() loads them itself when no eXIf
        # chunk precedes them, and _read_exif (rightly) swallows its errors, so a damaged PNG's
        # decoder error was lost there and the half that decoded kept, the rest black.
        img.load()
        orientation, software, had_exif, had_gps = _read_exif(img)
        original_size = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
        if fmt == "JPEG" and _grey_filled_bottom(img):
            raise _RejectedError(_finding(
                name, "truncated_image",
                f"{name} is cut off: the bottom of the picture is missing (filled with grey)",
                "the upload or copy was incomplete; export the photo again"))
        icc = img.info.get("icc_profile")
        out: Image.Image = img
        if min_side and fmt != "JPEG" and img.mode in ("RGBA", "LA"):
            # Before compositing, which takes three more full-size copies (~0.5 GB at 40 MP).
            out = _reduce_premultiplied(img, min_side=min_side)
        out = _flatten(out)
        if min_side and fmt != "JPEG":
            out = _reduce(out, min_side=min_side)
        profile = icc if isinstance(icc, bytes) else None
        transform = _colour_transform(out, profile, name=name)
        if transform is None or not defer_colour:
            out = _to_srgb(out, transform, name=name)
            transform = None  # converted (or nothing to convert): no view
        transpose = _TRANSPOSE.get(orientation)
        if transpose is not None:
            out = out.transpose(transpose)
        if isinstance(out, ImageFile.ImageFile):
            # Detached from the decoder (its file object, its frames) by a new image on the same
            # decoded pixels: a copy of them cost ~7 ms a 12 MP photo.
            out = out._new(out.im)
    out.info = {}  # no metadata travels with the pixels (see module docstring)
    return DecodedPhoto(
        name=name, image=out if transform is None else ColourManaged(out, transform),
        format=fmt, original_size=original_size, exif_software=software,
        had_exif=had_exif, had_gps=had_gps,
    )


# A marker in a JPEG's entropy-coded data: 0xFF followed by a byte that is not a stuffed zero,
# a restart marker (part of the scan) or a fill byte (0xFF before a marker).
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_EOI, _SOS, _TEM, _SOI = 0xD9, 0xDA, 0x01, 0xD8


def jpeg_scans(data: bytes, *, max_markers: int = MAX_JPEG_MARKERS) -> tuple[int, int]:
    """(start-of-scan markers, markers) of the JPEG that ``data`` starts with, up to its first
    end-of-image, counted as a decoder meets them; stops once ``max_markers`` are exceeded.

    Segments are skipped by their lengths, so an EXIF thumbnail (a JPEG inside APP1, with its
    own scan and end) is not counted, and the search stops at the end-of-image, so what follows
    it is not either: a phone's motion photo appends a few MB of MP4, where 0xFF 0xDA occurs
    once in ~64 KiB (counting it over the whole file called an 8 MB trailer 115 scans). Between
    segments the search is a C regex over the entropy-coded data (~1 ms for a 12 MP photo)."""
    scans = markers = 0
    search = _JPEG_MARKER.search
    pos = 2  # after start-of-image
    while (found := search(data, pos)) is not None:
        at = found.start()
        code = data[at + 1]
        markers += 1
        if code == _EOI or markers > max_markers:
            break
        if code in (_SOI, _TEM):  # no length follows these
            pos = at + 2
            continue
        length = int.from_bytes(data[at + 2:at + 4], "big")
        scans += code == _SOS
        # A length under 2 (it counts its own two bytes) is no segment, but libjpeg does not
        # stop there: it skips nothing and reads on from after the length. So does the walk;
        # stopping would hide what follows (FF FE 00 00 before thousands of repeated scans).
        pos = at + 2 + max(length, 2)  # past the header; for a scan, its entropy data follows
    return scans, markers


def _check_jpeg_structure(name: str, data: bytes) -> None:
    scans, markers = jpeg_scans(data)
    if scans > MAX_JPEG_SCANS:
        raise _RejectedError(_finding(
            name, "decompression_bomb",
            f"{name} is made of {scans} scans (a photo has at most a few dozen): it is built "
            "to take minutes to open", "upload the original photo from your camera or phone"))
    if markers > MAX_JPEG_MARKERS:
        raise _RejectedError(_finding(
            name, "decompression_bomb",
            f"{name} is made of more than {MAX_JPEG_MARKERS} segments (a photo has a few "
            "dozen): it is built to slow the server down",
            "upload the original photo from your camera or phone"))


_PNG_CHUNK_HEADER = struct.Struct(">I4s")  # length, type; the data and a CRC follow
_PNG_DATA = (b"IDAT", b"fdAT")  # the picture's pixels, an animation frame's


def _check_png_structure(name: str, data: bytes) -> None:
    """Refuse a flood of chunks before Pillow reads them: a walk from header to header (8 bytes
    read a chunk, the data skipped by its length), stopped at the end chunk, at the first one
    past the limits, or where the file runs out (Pillow then says what is wrong)."""
    others = pixels = 0
    pos = 8  # after the signature
    read = _PNG_CHUNK_HEADER.unpack_from
    while pos + _PNG_CHUNK_HEADER.size <= len(data):
        length, kind = read(data, pos)
        pos += length + 12
        if kind in _PNG_DATA:
            pixels += 1
            if pixels <= MAX_PNG_CHUNKS or pixels * _MIN_PNG_DATA_CHUNK <= pos:
                continue
            what = f"its pixels in more than {MAX_PNG_CHUNKS} tiny pieces"
        else:
            others += 1
            if kind == b"IEND":
                return
            if others <= MAX_PNG_CHUNKS:
                continue
            what = f"more than {MAX_PNG_CHUNKS} chunks besides its pixels"
        raise _RejectedError(_finding(
            name, "decompression_bomb",
            f"{name} holds {what} (a photo has a few dozen): it is built to slow the server "
            "down", "upload the original photo from your camera or phone"))


def _refuse_over_pillow_limit(name: str, data: bytes, fmt: str,
                              exc: Image.DecompressionBombError, *,
                              limits: UploadLimits) -> NoReturn:
    """Past twice its own limit (~179 MP) Pillow refuses in ``Image.open``, before
    ``_check_dimensions`` could tell a big photo from a bomb: an honest 200 MP phone photo
    (16320x12240 in ~12 MB) was "a far larger picture than its bytes can hold". The same rule
    decides here, on the size the header declares."""
    size = _declared_size(data, fmt)
    # Anything past Pillow's limit is over ours too, whatever an operator set ours to.
    pillow_limit = 2 * (Image.MAX_IMAGE_PIXELS or limits.max_pixels)
    strict = replace(limits, max_pixels=min(limits.max_pixels, pillow_limit))
    if size is not None:
        _check_dimensions(name, size[0], size[1], len(data), limits=strict)
    elif (found := re.search(r"\((\d+) pixels\)", str(exc))) is not None:
        # Only the pixel count, from Pillow's message.
        pixels = int(found.group(1))
        if len(data) * _BOMB_PIXELS_PER_BYTE >= pixels:
            raise _RejectedError(_too_large(
                name, f"{name} has {pixels // 1_000_000} megapixels", limits=strict)) from None
    raise _RejectedError(_bomb(name)) from None


def _declared_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) as the header of ``data`` declares them, read by the format's own reader,
    which checks no size (header parsing only: ``Image.open`` loaded the plugin and read this
    header already, then refused its size); None when it cannot be read so."""
    try:
        factory = Image.OPEN[fmt][0]
        with factory(io.BytesIO(data), "") as img:
            return img.size
    except Exception as exc:
        logger.debug("re-reading a %s header: %r", fmt, exc)
        return None


def _check_dimensions(name: str, width: int, height: int, size: int, *,
                      limits: UploadLimits) -> None:
    pixels = width * height
    if (size * _BOMB_PIXELS_PER_BYTE < pixels
            and (pixels > limits.max_pixels or pixels > _BOMB_CHECKED_FROM_PIXELS)):
        raise _RejectedError(_bomb(name, f" (it declares {width}x{height} pixels in {size} bytes)"))
    if pixels <= limits.max_pixels and max(width, height) <= limits.max_side:
        return
    if pixels > limits.max_pixels and size * _BOMB_PIXELS_PER_BYTE < pixels:
        raise _RejectedError(_bomb(name, f" (it declares {width}x{height} pixels in {size} bytes)"))
    raise _RejectedError(_too_large(name, f"{name} is {width}x{height} pixels", limits=limits))


def _too_large(name: str, what: str, *, limits: UploadLimits) -> Finding:
    return _finding(
        name, "image_too_large",
        f"{what}; at most {limits.max_pixels // 1_000_000} megapixels and {limits.max_side} "
        "pixels a side are accepted",
        "resize it (a 2000-4000 pixel photo is plenty) and upload it again")


def _read_exif(img: Image.Image) -> tuple[int, str | None, bool, bool]:
    """(orientation 1-8, software text, had EXIF, had GPS). Broken EXIF is no EXIF: it must not
    cost the user a good photo."""
    try:
        exif = img.getexif()
    except Exception as exc:
        logger.debug("unreadable EXIF: %r", exc)
        return 1, None, bool(img.info.get("exif")), False
    had_exif = len(exif) > 0 or bool(img.info.get("exif"))
    raw_orientation = exif.get(_TAG_ORIENTATION, 1)
    orientation = raw_orientation if isinstance(raw_orientation, int) and 1 <= raw_orientation <= 8 else 1
    software = _text(exif.get(_TAG_SOFTWARE)) or _text(exif.get(_TAG_PROCESSING_SOFTWARE))
    had_gps = False
    if _TAG_GPS_IFD in exif:
        try:
            had_gps = len(exif.get_ifd(_TAG_GPS_IFD)) > 0
        except Exception:
            had_gps = True  # a GPS block we cannot parse is still location data
    return orientation, software, had_exif, had_gps


# Characters of an EXIF text looked at: PNG eXIf, WebP and HEIF EXIF can be as large as the
# file, and cleaning a 45 MB Software tag a character at a time took ~0.5 GB and seconds, for
# the 200 characters kept.
_TEXT_READ = 1000


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value[:4 * _TEXT_READ].decode("utf-8", "replace")  # up to 4 bytes a character
    if not isinstance(value, str):
        return None
    cleaned = "".join(ch for ch in value[:_TEXT_READ] if ch.isprintable()).strip()
    return cleaned[:200] or None


def _flatten(img: Image.Image) -> Image.Image:
    """To "RGB", "L" or "CMYK" (left for the ICC step), alpha composited on white."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        img = _scale_to_l(img, 65535.0 if mode.startswith("I;16") else None)
    elif mode == "F":
        img = _scale_to_l(img, None)
    elif mode == "1":
        img = img.convert("L")
    elif mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "PA":
        img = img.convert("RGBA")
    elif mode in ("RGBa", "La"):
        img = img.convert("RGBA" if mode == "RGBa" else "LA")
    if img.mode in ("RGBA", "LA"):
        base_mode = "RGB" if img.mode == "RGBA" else "L"
        white = (255, 255, 255) if base_mode == "RGB" else 255
        base = Image.new(base_mode, img.size, white)
        base.paste(img.convert(base_mode), mask=img.getchannel("A"))
        return base
    if img.mode in ("RGB", "L", "CMYK"):
        return img
    return img.convert("RGB")


_SCALE_BAND_ROWS = 256
# Rows at the bottom of a decoded JPEG that must all be exactly mid-grey for it to count as cut
# off: one block row at 1/2 scale (8 px blocks), so a half-size decode sees it too.
_GREY_FILL_ROWS = 4


def _grey_filled_bottom(img: Image.Image) -> bool:
    """Whether a JPEG's last rows are the exact mid-grey libjpeg fills missing blocks with: a
    file cut off and closed with an end-of-image marker (repair tools, some transfers) decodes
    without an error, and its grey band would be trained into the LoRA. A camera photo's noise
    never leaves whole rows at exactly 128 in every channel."""
    if img.mode not in ("RGB", "L") or img.height <= _GREY_FILL_ROWS:
        return False
    bottom = np.asarray(img.crop((0, img.height - _GREY_FILL_ROWS, img.width, img.height)))
    return bool((bottom == 128).all())


def _scale_to_l(img: Image.Image, full_scale: float | None) -> Image.Image:
    # 16-bit and float greys: Pillow's convert("L") clips instead of scaling, which turns a
    # 16-bit photo white. Scale to the format's full range (or the data's, when it has none).
    # A band of rows at a time: float copies of a whole 40 MP picture took ~1.3 GB for an 88 KB
    # 16-bit PNG.
    values = np.asarray(img)
    if full_scale is None:
        top = float(np.nanmax(values)) if values.size else 0.0
        full_scale = 1.0 if top <= 1.0 else (255.0 if top <= 255.0 else 65535.0)
    out = np.empty(values.shape, dtype=np.uint8)
    for top_row in range(0, values.shape[0], _SCALE_BAND_ROWS):
        band = values[top_row:top_row + _SCALE_BAND_ROWS].astype(np.float32)
        band *= np.float32(255.0 / full_scale)
        np.nan_to_num(band, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
        np.rint(band, out=band)
        np.clip(band, 0, 255, out=band)
        out[top_row:top_row + _SCALE_BAND_ROWS] = band
    return Image.fromarray(out)


def _reduce(img: Image.Image, *, min_side: int) -> Image.Image:
    factor = min(img.size) // min_side
    if factor < 2:
        return img
    return img.reduce(factor)  # box average: good quality, ceil(side / factor) >= min_side


def _reduce_premultiplied(img: Image.Image, *, min_side: int) -> Image.Image:
    """An "RGBA" or "LA" picture reduced as ``_reduce`` would its composite on white: box
    averages of premultiplied colours are linear, so compositing them equals compositing first
    (up to rounding). A band of rows at a time (a multiple of the factor, so the boxes are the
    whole picture's), so no full-size premultiplied copy is made."""
    factor = min(img.size) // min_side
    if factor < 2:
        return img
    premultiplied = "RGBa" if img.mode == "RGBA" else "La"
    width, height = img.size
    out = Image.new(premultiplied, (-(-width // factor), -(-height // factor)))
    rows = factor * max(1, _SCALE_BAND_ROWS // factor)
    for top in range(0, height, rows):
        band = img.crop((0, top, width, min(top + rows, height))).convert(premultiplied)
        out.paste(band.reduce(factor), (0, top // factor))
    return out


@functools.cache
def _srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@functools.cache
def _colour_grid() -> tuple[Image.Image, NDArray[np.int16]]:
    """19 levels a channel (0, 15, ..., 255), every combination: 6859 colours, as an image and
    as the array of its pixels."""
    levels = np.append(np.arange(0, 256, 15), 255).astype(np.uint8)
    r, g, b = np.meshgrid(levels, levels, levels, indexing="ij")
    pixels = np.stack([r, g, b], axis=-1).reshape(1, -1, 3)
    return Image.fromarray(pixels, "RGB"), pixels.astype(np.int16)


# A transform that moves no colour of the grid by more than this many levels changes nothing
# visible: sRGB under another name.
_SAME_COLOURS = 1
_TRANSFORMS_KEPT = 16
_transforms: OrderedDict[tuple[bytes, str], ImageCms.ImageCmsTransform | None] = OrderedDict()
_transforms_lock = threading.Lock()


def _transform_to_srgb(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """The transform of ``mode`` pixels described by ``icc`` to sRGB, or None when it would
    change no colour (sRGB under any name: "sRGB IEC61966-2.1", "c2" (a compact sRGB profile
    that image optimisers embed), "sRGB built-in"...): converting a 1500x2000 photo costs ~45 ms,
    more than decoding it. Kept by the profile's hash: building one parses the profile and
    precalculates lcms's tables (~2 ms), and every photo from one phone carries the same."""
    key = (hashlib.sha256(icc).digest(), mode)
    with _transforms_lock:
        if key in _transforms:
            _transforms.move_to_end(key)
            return _transforms[key]
    source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    # NOCACHE: lcms's one-pixel cache is written by every call, and threads share a transform.
    transform: ImageCms.ImageCmsTransform | None = ImageCms.buildTransform(
        source, _srgb_profile(), mode, "RGB", flags=ImageCms.Flags.NOCACHE)
    if mode == "RGB" and transform is not None:
        grid, before = _colour_grid()
        after = np.asarray(ImageCms.applyTransform(grid, transform)).astype(np.int16)
        if int(np.abs(after - before).max()) <= _SAME_COLOURS:
            transform = None
    with _transforms_lock:
        _transforms[key] = transform
        while len(_transforms) > _TRANSFORMS_KEPT:
            _transforms.popitem(last=False)
    return transform


def _colour_transform(img: Image.Image, icc: bytes | None, *,
                      name: str) -> ImageCms.ImageCmsTransform | None:
    """The transform of ``img``'s pixels to sRGB, or None when there is nothing to convert: no
    profile, sRGB's under any name, or one that cannot be read (a broken or mismatched profile
    is common, from editing apps, and not the user's problem: the pixels are used as they
    are)."""
    if not icc:
        return None
    try:
        return _transform_to_srgb(icc, img.mode)
    except Exception as exc:
        logger.debug("ICC profile of %s unusable, using the pixels as they are: %r", name, exc)
        return None


def _to_srgb(img: Image.Image, transform: ImageCms.ImageCmsTransform | None, *,
             name: str) -> Image.Image:
    if transform is not None:
        try:
            converted = ImageCms.applyTransform(img, transform)
            if converted is not None:
                return converted
        except Exception as exc:
            logger.debug("ICC conversion of %s failed, using the pixels as they are: %r",
                         name, exc)
    return img if img.mode == "RGB" else img.convert("RGB")


# --------------------------------------------------------------------------------------------
# Findings


def _finding(name: str, code: str, message: str, advice: str) -> Finding:
    return Finding("reject", code, message, advice, photo=name)


def _bomb(name: str, detail: str = "") -> Finding:
    return _finding(name, "decompression_bomb",
                    f"{name} claims a far larger picture than its bytes can hold{detail}",
                    "upload the original photo from your camera or phone")


def _cut_off(name: str) -> Finding:
    return _finding(name, "truncated_image",
                    f"{name} is cut off: the file ends before the picture does",
                    "the upload or copy was incomplete; export the photo again")


_BOX_HEADER = struct.Struct(">I4s")  # an ISO-BMFF box: size (with its header), type


def _container_cut_short(data: bytes, fmt: str) -> bool:
    """Whether a WebP's RIFF size, or a HEIF/AVIF top-level box's size, runs past the end of
    ``data``: the file was cut off, whatever the decoder said."""
    if fmt == "WEBP":
        return len(data) >= 8 and 8 + int.from_bytes(data[4:8], "little") > len(data)
    if fmt not in ("HEIF", "AVIF"):
        return False
    pos = 0
    while pos + _BOX_HEADER.size <= len(data):
        size, _kind = _BOX_HEADER.unpack_from(data, pos)
        if size == 1:  # a 64-bit size follows the type
            if pos + 16 > len(data):
                return True
            size = int.from_bytes(data[pos + 8:pos + 16], "big")
        if size == 0:  # the box runs to the end of the file
            return False
        if size < _BOX_HEADER.size:
            return False  # no box: damaged, not cut off
        pos += size
    return pos > len(data)


def _classify_failure(name: str, label: str, exc: Exception) -> Finding:
    logger.debug("cannot decode %s: %r", name, exc)
    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return _bomb(name)
    text = str(exc).lower()
    if (isinstance(exc, MemoryError)
            or (isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS)
            or any(words in text for words in _MEMORY_TEXTS)):
        # Its pixels are within the limits (checked before decoding): the server, busy with
        # other uploads, was short of memory, not the photo too large.
        logger.warning("decoding %s: the server was short of memory (%r)", name, exc)
        return _finding(name, SHORT_OF_MEMORY,
                        f"{name} could not be read: the server was short of memory",
                        "nothing is wrong with the photo: upload it again in a few minutes")
    if isinstance(exc, EOFError) or "truncated" in text or "broken data stream" in text:
        return _cut_off(name)
    if isinstance(exc, UnidentifiedImageError):
        return _finding(name, "corrupt_image",
                        f"{name} starts like {label} but is not a valid one",
                        "export the photo again from your camera or phone")
    return _finding(name, "corrupt_image", f"{name} is damaged and cannot be decoded",
                    "export the photo again from your camera or phone")
