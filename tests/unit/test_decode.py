"""decode_photo: every accepted format upright and RGB; every broken or hostile photo a finding."""

from __future__ import annotations

import errno
import io
import struct
import threading
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import pillow_heif
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageCms, ImageFile

from selfie_lora.dataset import decode
from selfie_lora.dataset.decode import DecodedPhoto, decode_photo, sniff_image
from selfie_lora.dataset.limits import UploadedFile, UploadLimits
from selfie_lora.domain.entities import Finding
from selfie_lora.testing import icc
from tests.support.hostile import (
    PHOTO_BYTES,
    encode,
    jpeg,
    jpeg_declaring,
    photo,
    png_chunk,
    png_declaring,
    truncated,
)
from tests.support.photos import count_colour_conversions

LIMITS = UploadLimits()

# The transpose that turns the upright picture into what a camera stores for each orientation
# (the inverse of what the decoder must apply).
_STORED_AS = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def _decoded(data: bytes, name: str = "p.jpg", *, limits: UploadLimits = LIMITS,
             min_side: int | None = None) -> DecodedPhoto:
    result = decode_photo(UploadedFile(name, data), limits=limits, min_side=min_side)
    assert isinstance(result, DecodedPhoto), result
    return result


def _rejected(data: bytes, name: str = "p.jpg", *, limits: UploadLimits = LIMITS) -> Finding:
    result = decode_photo(UploadedFile(name, data), limits=limits)
    assert isinstance(result, Finding), result
    assert result.severity == "reject"
    assert result.photo == name
    return result


def _heic(img: Image.Image, *, exif: bytes | None = None) -> bytes:
    buf = io.BytesIO()
    params: dict[str, object] = {"quality": 95}
    if exif is not None:
        params["exif"] = exif
    img.save(buf, format="HEIF", **params)
    return buf.getvalue()


def _with_orientation(fmt: str, orientation: int) -> bytes:
    stored = photo((96, 64))
    transpose = _STORED_AS[orientation]
    if transpose is not None:
        stored = stored.transpose(transpose)
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x0131] = "Camera 1.0"  # so the EXIF block survives encoders that move the orientation
    if fmt == "HEIF":
        pillow_heif.register_heif_opener()
        return _heic(stored, exif=exif.tobytes())
    params: dict[str, object] = {"exif": exif.tobytes()}
    if fmt in ("JPEG", "WEBP", "AVIF"):
        params["quality"] = 95
    return encode(stored, fmt, **params)


def _quadrant_colors(img: Image.Image) -> list[tuple[int, int, int]]:
    w, h = img.size
    points = [(w // 8, h // 8), (w - 1 - w // 8, h // 8), (w // 8, h - 1 - h // 8),
              (w - 1 - w // 8, h - 1 - h // 8)]
    colors = []
    for p in points:
        px = img.getpixel(p)
        assert isinstance(px, tuple)
        colors.append((int(px[0]), int(px[1]), int(px[2])))
    return colors


def _close(a: tuple[int, ...], b: tuple[int, ...], tolerance: int = 40) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "HEIF", "AVIF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_format_decodes_upright_for_every_orientation(fmt: str, orientation: int) -> None:
    decoded = _decoded(_with_orientation(fmt, orientation))
    assert decoded.format == fmt
    assert decoded.image.mode == "RGB"
    assert decoded.image.size == (96, 64)
    assert decoded.original_size == (96, 64)
    assert decoded.had_exif
    expected = _quadrant_colors(photo((96, 64)))
    got = _quadrant_colors(decoded.image)
    assert all(_close(g, e) for g, e in zip(got, expected, strict=True)), (got, expected)


@pytest.mark.parametrize(("key", "code"), [(k, c) for k, (_b, c) in PHOTO_BYTES.items()],
                         ids=list(PHOTO_BYTES))
def test_corpus_photos_are_refused_with_their_code(key: str, code: str) -> None:
    build: Callable[[], bytes] = PHOTO_BYTES[key][0]
    finding = _rejected(build(), name="selfie.jpg")
    assert finding.code == code
    assert finding.message
    assert finding.advice


def test_a_name_never_decides_the_format() -> None:
    assert _decoded(encode(photo(), "PNG"), name="photo.jpg").format == "PNG"
    assert _rejected(encode(photo(), "GIF"), name="photo.png").code == "unsupported_format"


def test_adobe_cmyk_jpeg_becomes_correct_rgb() -> None:
    # Pillow writes CMYK JPEGs with an Adobe marker and inverted values, as Photoshop does.
    cmyk = Image.new("CMYK", (40, 30), (0, 255, 255, 0))  # pure red in CMYK
    data = encode(cmyk, "JPEG", quality=95)
    assert b"Adobe" in data
    decoded = _decoded(data)
    assert decoded.image.mode == "RGB"
    px = decoded.image.getpixel((20, 15))
    assert isinstance(px, tuple)
    assert _close(px, (255, 0, 0))


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    decoded = _decoded(encode(Image.new("I;16", (20, 20), 32768), "PNG"))
    assert decoded.image.mode == "RGB"
    assert _close(decoded.image.getpixel((5, 5)), (128, 128, 128), 2)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_alpha_is_composited_on_white(mode: str) -> None:
    img = Image.new(mode, (20, 20), (0, 0) if mode == "LA" else (0, 0, 0, 0))
    img.paste((0, 255) if mode == "LA" else (0, 0, 0, 255), (0, 0, 10, 20))
    decoded = _decoded(encode(img, "PNG"))
    assert decoded.image.mode == "RGB"
    assert decoded.image.getpixel((15, 5)) == (255, 255, 255)
    assert decoded.image.getpixel((5, 5)) == (0, 0, 0)


def test_palette_with_transparency_is_composited_on_white() -> None:
    img = Image.new("P", (20, 20), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (0, 0, 10, 20))
    decoded = _decoded(encode(img, "PNG", transparency=0))
    assert decoded.image.getpixel((15, 5)) == (255, 255, 255)
    assert decoded.image.getpixel((5, 5)) == (0, 0, 255)


@pytest.mark.parametrize("mode", ["1", "L", "P"])
def test_other_modes_become_rgb(mode: str) -> None:
    img = photo().convert(mode)
    assert _decoded(encode(img, "PNG")).image.mode == "RGB"


def test_transparent_webp_and_grey_jpeg_become_rgb() -> None:
    rgba = photo().convert("RGBA")
    rgba.putalpha(0)
    decoded = _decoded(encode(rgba, "WEBP", lossless=True))
    assert decoded.image.getpixel((1, 1)) == (255, 255, 255)
    assert _decoded(encode(photo().convert("L"), "JPEG")).image.mode == "RGB"


def test_jpeg_is_decoded_reduced_keeping_the_short_side() -> None:
    data = jpeg((800, 600))
    decoded = _decoded(data, min_side=100)
    assert decoded.original_size == (800, 600)
    assert decoded.image.size == (200, 150)  # DCT scaling by 4: the largest keeping >= 100
    assert _decoded(data, min_side=600).image.size == (800, 600)
    assert _decoded(data, min_side=2000).image.size == (800, 600)


def test_reduced_jpeg_with_orientation_reports_the_upright_size() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(photo((800, 600)), "JPEG", exif=exif.tobytes())
    decoded = _decoded(data, min_side=100)
    assert decoded.original_size == (600, 800)
    assert decoded.image.size == (150, 200)


def test_other_formats_are_reduced_after_decoding() -> None:
    decoded = _decoded(encode(photo((800, 600)), "PNG"), min_side=100)
    assert decoded.original_size == (800, 600)
    assert min(decoded.image.size) >= 100
    assert decoded.image.size == (134, 100)


def test_exif_facts_are_reported_and_no_metadata_travels() -> None:
    exif = Image.Exif()
    exif[0x0131] = "Adobe Photoshop 25.0"
    gps = exif.get_ifd(0x8825)
    gps[1] = "N"
    gps[2] = (48.0, 51.0, 24.0)
    data = encode(photo(), "JPEG", exif=exif.tobytes(), comment=b"secret")
    decoded = _decoded(data)
    assert decoded.exif_software == "Adobe Photoshop 25.0"
    assert decoded.had_exif
    assert decoded.had_gps
    assert decoded.image.info == {}
    plain = _decoded(jpeg())
    assert (plain.had_exif, plain.had_gps, plain.exif_software) == (False, False, None)


def test_processing_software_is_used_when_software_is_absent() -> None:
    exif = Image.Exif()
    exif[0x000B] = "Lightroom"
    assert _decoded(encode(photo(), "JPEG", exif=exif.tobytes())).exif_software == "Lightroom"


def test_icc_profiles_convert_or_fall_back_silently() -> None:
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    for profile in (srgb, lab, b"not an ICC profile at all" * 4):
        decoded = _decoded(encode(photo(), "PNG", icc_profile=profile))
        assert decoded.image.mode == "RGB"
        assert _close(decoded.image.getpixel((2, 2)), (220, 30, 30), 12)  # type: ignore[arg-type]


def _tagged_png(profile: bytes, colour: tuple[int, int, int] = (200, 100, 50)) -> bytes:
    return encode(Image.new("RGB", (48, 40), colour), "PNG", icc_profile=profile)


def test_a_wide_gamut_photo_gets_srgb_colours(monkeypatch: pytest.MonkeyPatch) -> None:
    wide = icc.rgb_profile(name="Wide gamut", colorants=icc.ADOBE_RGB_COLORANTS,
                           gamma=icc.ADOBE_RGB_GAMMA)
    expected = ImageCms.profileToProfile(
        Image.new("RGB", (1, 1), (200, 100, 50)), ImageCms.ImageCmsProfile(io.BytesIO(wide)),
        ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))).getpixel((0, 0))
    assert expected == (227, 100, 42)  # the same colour in sRGB's numbers: redder, less blue
    calls = count_colour_conversions(monkeypatch)
    for _ in range(3):
        assert _decoded(_tagged_png(wide)).image.getpixel((5, 5)) == expected
    assert [c for c in calls if c == (48, 40)] == [(48, 40)] * 3


def test_srgb_under_another_name_is_not_converted(monkeypatch: pytest.MonkeyPatch) -> None:
    # "c2" is how image optimisers name the compact sRGB profile they embed: converting from it
    # changes no pixel and cost ~45 ms a 3 MP photo when only a name with "sRGB" was trusted.
    compact = icc.rgb_profile(name="c2", colorants=icc.SRGB_COLORANTS, curve=icc.SRGB_CURVE)
    standard = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    calls = count_colour_conversions(monkeypatch)
    for profile in (compact, standard):
        assert _decoded(_tagged_png(profile)).image.getpixel((5, 5)) == (200, 100, 50)
    assert (48, 40) not in calls
    # A grey photo's profile still makes it RGB through the transform.
    grey = encode(Image.new("L", (48, 40), 90), "PNG", icc_profile=standard)
    assert _decoded(grey).image.mode == "RGB"


def test_transforms_are_kept_per_profile_within_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[object] = []
    build = ImageCms.buildTransform

    def counted(*args: object, **kwargs: object) -> ImageCms.ImageCmsTransform:
        built.append(args[0])
        return build(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(decode.ImageCms, "buildTransform", counted)
    monkeypatch.setattr(decode, "_transforms", type(decode._transforms)())
    profiles = [icc.rgb_profile(name=f"gamma {g}", colorants=icc.ADOBE_RGB_COLORANTS,
                                gamma=1.8 + g / 50) for g in range(20)]
    for _ in range(2):
        _decoded(_tagged_png(profiles[0]))
    assert len(built) == 1  # one photo after another from the same phone: built once
    for profile in profiles:
        _decoded(_tagged_png(profile))
    assert len(decode._transforms) == decode._TRANSFORMS_KEPT
    assert len(built) == 20
    _decoded(_tagged_png(profiles[-1]))  # recent: still kept
    assert len(built) == 20
    _decoded(_tagged_png(profiles[0]))  # pushed out by the 16 after it: built again
    assert len(built) == 21


def test_deferred_colours_convert_each_copy_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    # What the intake reads of a wide-gamut photo: copies (a region, a reduced or resized copy),
    # each converted once made; never all the pixels at once.
    wide = icc.rgb_profile(name="Wide gamut", colorants=icc.ADOBE_RGB_COLORANTS,
                           gamma=icc.ADOBE_RGB_GAMMA)
    data = _tagged_png(wide)
    eager = _decoded(data).image
    calls = count_colour_conversions(monkeypatch)
    view = decode_photo(UploadedFile(name="p.png", data=data), limits=LIMITS, defer_colour=True)
    assert isinstance(view, DecodedPhoto)
    assert isinstance(view.image, decode.ColourManaged)
    assert (view.image.size, view.image.mode) == ((48, 40), "RGB")
    assert calls == []  # nothing converted by decoding
    copies = [view.image.crop((4, 4, 20, 20)), view.image.reduce(2),
              view.image.resize((12, 10), Image.Resampling.BILINEAR, box=(0, 0, 24, 20))]
    assert calls == [(16, 16), (24, 20), (12, 10)]  # only the copies' pixels
    for copy in copies:
        assert copy.mode == "RGB"
        assert copy.info == {}
        assert copy.getpixel((2, 2)) == eager.getpixel((2, 2)) == (227, 100, 42)
    assert view.image.srgb().tobytes() == eager.tobytes()  # type: ignore[union-attr]


def test_deferred_colours_only_where_there_is_something_to_convert() -> None:
    compact = icc.rgb_profile(name="c2", colorants=icc.SRGB_COLORANTS, curve=icc.SRGB_CURVE)
    for data in (_tagged_png(compact), encode(photo(), "PNG"),
                 _tagged_png(b"not an ICC profile at all" * 4)):
        decoded = decode_photo(UploadedFile(name="p.png", data=data), limits=LIMITS,
                               defer_colour=True)
        assert isinstance(decoded, DecodedPhoto)
        assert isinstance(decoded.image, Image.Image)
        assert decoded.image.mode == "RGB"


def test_mpo_opens_on_its_first_picture() -> None:
    buf = io.BytesIO()
    photo(seed=1).save(buf, format="MPO", save_all=True, append_images=[Image.new("RGB", (96, 80))])
    decoded = _decoded(buf.getvalue())
    assert decoded.format == "JPEG"
    assert _close(decoded.image.getpixel((2, 2)), (220, 30, 30))  # type: ignore[arg-type]


def test_limits_are_the_callers() -> None:
    data = jpeg((96, 80))
    assert _rejected(data, limits=UploadLimits(max_pixels=1000)).code == "image_too_large"
    assert _rejected(data, limits=UploadLimits(max_side=90)).code == "image_too_large"
    assert _rejected(data, limits=UploadLimits(max_member_bytes=100)).code == "file_too_large"


def test_pillow_bomb_warning_is_a_refusal_whatever_the_warning_filters(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # 96 x 80 = 7,680 pixels: over 5,000 (a warning) and under 10,000 (Pillow's error).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    assert _rejected(jpeg((96, 80))).code == "decompression_bomb"


def test_a_big_camera_photo_is_too_large_not_a_bomb() -> None:
    # 11648 x 8736 (a 100 MP camera) in 6 MB: over Pillow's own limit (~89 MP), whose warning
    # used to make it "a far larger picture than its bytes can hold", with advice to upload the
    # camera's original, which it is. It is too large, and resizing it is what helps.
    data = jpeg_declaring(11648, 8736)
    data += b"\x00" * (6_000_000 - len(data))
    refused = _rejected(data)
    assert refused.code == "image_too_large"
    assert "resize" in refused.advice
    assert _rejected(jpeg_declaring(11648, 8736)).code == "decompression_bomb"  # in 300 bytes


@pytest.mark.parametrize(("build", "fmt"), [(jpeg_declaring, "JPEG"), (png_declaring, "PNG")])
def test_a_200_mp_photo_is_too_large_not_a_bomb(build: Callable[[int, int], bytes],
                                                fmt: str) -> None:
    """16320x12240 (a 200 MP phone sensor) in 12 MB: past ~179 MP Pillow refuses in
    Image.open itself, which was called a bomb before its size could be weighed against its
    bytes. Weighed now by the same rule as a 100 MP photo."""
    data = build(16320, 12240)
    assert sniff_image(data).format == fmt
    honest = data + b"\x00" * (12_000_000 - len(data))
    refused = _rejected(honest)
    assert refused.code == "image_too_large"
    assert "16320x12240 pixels" in refused.message
    assert "resize" in refused.advice
    bomb = _rejected(data)  # the same declaration in a few hundred bytes
    assert bomb.code == "decompression_bomb"
    assert "16320x12240" in bomb.message


def test_past_pillow_s_limit_the_pixel_count_decides_when_the_header_cannot_be_read_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(decode, "_declared_size", lambda data, fmt: None)
    data = jpeg_declaring(16320, 12240)
    refused = _rejected(data + b"\x00" * (12_000_000 - len(data)))
    assert refused.code == "image_too_large"
    assert "199 megapixels" in refused.message
    assert _rejected(data).code == "decompression_bomb"


def _with_scans(data: bytes, copies: int) -> bytes:
    """A progressive JPEG with its last scan repeated ``copies`` more times (each repeat costs
    its bytes to store and a pass over every block to decode)."""
    eoi = data.rindex(b"\xff\xd9")
    last_scan = data[data.rindex(b"\xff\xda"):eoi]
    return data[:eoi] + last_scan * copies + data[eoi:]


def test_a_jpeg_made_of_too_many_scans_is_refused_before_it_is_decoded() -> None:
    progressive = encode(photo(), "JPEG", quality=90, progressive=True)
    assert 1 < progressive.count(b"\xff\xda") <= decode.MAX_JPEG_SCANS
    assert isinstance(decode_photo(UploadedFile("p.jpg", progressive), limits=LIMITS),
                      DecodedPhoto)
    bomb = _with_scans(progressive, decode.MAX_JPEG_SCANS)
    refused = _rejected(bomb)
    assert refused.code == "decompression_bomb"
    assert "scans" in refused.message


@pytest.mark.parametrize("length", [0, 1])
def test_scans_behind_a_segment_too_short_to_be_one_are_counted(length: int) -> None:
    """libjpeg skips a segment whose length is 0 or 1 (no room for its own two bytes) and
    reads on; the walk stopped there, so ``FF FE 00 00`` after the first scan hid every scan
    behind it: a 57 KB upload of 2,000 repeated scans held a worker ~5 s."""
    progressive = encode(photo(), "JPEG", quality=90, progressive=True)
    eoi = progressive.rindex(b"\xff\xd9")
    short = b"\xff\xfe" + length.to_bytes(2, "big")
    # Not a bomb: the decoder reads past the short segment and the photo opens as before.
    honest = progressive[:eoi] + short + progressive[eoi:]
    assert decode.jpeg_scans(honest) == (
        progressive.count(b"\xff\xda"), decode.jpeg_scans(progressive)[1] + 1)
    assert isinstance(decode_photo(UploadedFile("p.jpg", honest), limits=LIMITS), DecodedPhoto)
    bomb = _with_scans(progressive, decode.MAX_JPEG_SCANS)
    first_scan_end = bomb.index(b"\xff\xda", bomb.index(b"\xff\xda") + 2)
    hidden = bomb[:first_scan_end] + short + bomb[first_scan_end:]
    assert decode.jpeg_scans(hidden)[0] > decode.MAX_JPEG_SCANS
    refused = _rejected(hidden)
    assert refused.code == "decompression_bomb"
    assert "scans" in refused.message


# The start of an MP4 (what a Pixel or Samsung motion photo appends after the picture), then
# bytes as a video's: 0xFF 0xDA turns up in compressed video once in ~64 KiB.
_MP4_START = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom"


def _segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body


def test_a_motion_photo_s_video_is_not_counted_as_scans_of_the_picture() -> None:
    """A phone's motion photo is a JPEG followed by a few MB of MP4: every 0xFF 0xDA in the
    video was counted as a scan, so one with over ~6.5 MB of video was refused as a bomb."""
    picture = encode(photo(), "JPEG", quality=90, progressive=True)
    video = (b"\xff\xda" + bytes(range(40))) * (decode.MAX_JPEG_SCANS + 20)
    motion = picture + _MP4_START + video
    assert decode.jpeg_scans(motion) == decode.jpeg_scans(picture)
    decoded = _decoded(motion, "PXL_20250101_120000000.MP.jpg")
    assert decoded.original_size == (96, 80)


def test_segments_holding_scan_markers_are_skipped_by_their_length() -> None:
    """An EXIF thumbnail is a JPEG inside the APP1 segment, with its own scan and end marker;
    any APP or comment segment may hold those bytes. Only the picture's own scans count."""
    thumbnail = jpeg((16, 16))
    app1 = _segment(0xE1, b"Exif\x00\x00" + thumbnail * 60)  # 60 scans and end markers
    comment = _segment(0xFE, b"\xff\xda\xff\xd9" * 200)
    picture = jpeg()
    data = picture[:2] + app1 + comment + picture[2:]
    assert decode.jpeg_scans(data)[0] == 1
    assert _decoded(data).original_size == (96, 80)


def test_a_jpeg_made_of_thousands_of_segments_is_refused_before_it_is_opened() -> None:
    """Pillow reads each segment before the picture in Python and keeps every comment: a
    million empty ones (4 MB) took a second; the 50 MB a file may have, ~12 s."""
    picture = jpeg()
    padded = picture[:2] + _segment(0xFE, b"") * (decode.MAX_JPEG_MARKERS + 1) + picture[2:]
    refused = _rejected(padded)
    assert refused.code == "decompression_bomb"
    assert "segments" in refused.message
    ordinary = picture[:2] + _segment(0xFE, b"made with a phone") * 50 + picture[2:]
    assert isinstance(decode_photo(UploadedFile("p.jpg", ordinary), limits=LIMITS), DecodedPhoto)


@settings(max_examples=40, deadline=None)
@given(
    size=st.tuples(st.integers(8, 120), st.integers(8, 120)),
    progressive=st.booleans(),
    restarts=st.sampled_from([0, 1, 3]),
    grey=st.booleans(),
    trailer=st.binary(max_size=400),
    scan_markers_after=st.integers(0, decode.MAX_JPEG_SCANS + 5),
)
def test_scans_are_those_of_the_picture_whatever_follows_it(
    size: tuple[int, int], progressive: bool, restarts: int, grey: bool, trailer: bytes,
    scan_markers_after: int,
) -> None:
    """A JPEG Pillow writes holds nothing but its own segments, so every 0xFF 0xDA in it is a
    scan: the count equals that whatever bytes follow the end-of-image, and restart markers
    (0xFF 0xD0-D7 inside a scan's data) end no scan."""
    img = photo(size).convert("L") if grey else photo(size)
    picture = encode(img, "JPEG", quality=85, progressive=progressive,
                     restart_marker_blocks=restarts)
    scans, markers = decode.jpeg_scans(picture + trailer + b"\xff\xda\x00\x08" * scan_markers_after)
    assert scans == picture.count(b"\xff\xda")
    assert markers == decode.jpeg_scans(picture)[1]


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of each chunk of a PNG, in order."""
    chunks, pos = [], 8
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        chunks.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]))
        pos += length + 12
    return chunks


def _png_of(chunks: list[tuple[bytes, bytes]], *, idat_size: int | None = None,
            extra: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    """The PNG of ``chunks``, its image data re-cut in ``idat_size`` pieces (as encoders do:
    libpng 8 KB, Pillow 64 KB), with ``extra`` chunks after its header."""
    pixels = b"".join(body for kind, body in chunks if kind == b"IDAT")
    size = idat_size or len(pixels)
    idats = [(b"IDAT", pixels[i:i + size]) for i in range(0, len(pixels), size)]
    ordered = [chunks[0], *extra, *(c for c in chunks[1:] if c[0] not in (b"IDAT", b"IEND")),
               *idats, (b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(png_chunk(kind, body) for kind, body in ordered)


@pytest.mark.parametrize("kind", [b"raNd", b"tEXt", b"IDAT"])
def test_a_png_flooded_with_chunks_is_refused_before_pillow_reads_them(kind: bytes) -> None:
    """Millions of empty chunks (legal PNG) cost Pillow 0.6-2 s of CPU a million and, for
    chunks besides the image data, ~120 MB a million: 48 MB of them took 8 s and 470 MB.
    A walk over the chunk headers refuses them before Pillow reads one."""
    chunks = _png_chunks(encode(photo(), "PNG"))
    flooded = _png_of(chunks, extra=[(kind, b"")] * (decode.MAX_PNG_CHUNKS + 1))
    refused = _rejected(flooded, "p.png")
    assert refused.code == "decompression_bomb"
    assert "chunks" in refused.message or "pieces" in refused.message
    ordinary = _png_of(chunks, extra=[(b"tEXt", b"Comment\x00a phone")] * 20)
    assert isinstance(decode_photo(UploadedFile("p.png", ordinary), limits=LIMITS), DecodedPhoto)


def test_a_png_whose_pixels_come_in_thousands_of_small_pieces_is_read() -> None:
    noise = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    chunks = _png_chunks(encode(Image.fromarray(noise), "PNG"))
    pieces = _png_of(chunks, idat_size=256)
    assert pieces.count(b"IDAT") > decode.MAX_PNG_CHUNKS
    assert np.array_equal(np.asarray(_decoded(pieces, "p.png").image), noise)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    mode=st.sampled_from(["RGB", "RGBA", "L", "P"]),
    idat_size=st.integers(256, 9000),
    texts=st.integers(0, 40),
)
def test_a_png_in_many_pieces_as_encoders_write_them_is_read(seed: int, mode: str,
                                                           idat_size: int, texts: int) -> None:
    """Image data cut in pieces of any size an encoder uses, with some text chunks: the same
    picture as in one piece (noise, so 200x150 is ~90 KB: up to ~350 pieces)."""
    noise = np.random.default_rng(seed).integers(0, 256, (150, 200, 3), dtype=np.uint8)
    img = Image.fromarray(noise).convert(mode)
    chunks = _png_chunks(encode(img, "PNG"))
    whole = _decoded(_png_of(chunks), "p.png")
    cut = _png_of(chunks, idat_size=idat_size, extra=[(b"tEXt", b"k\x00v")] * texts)
    assert np.array_equal(np.asarray(_decoded(cut, "p.png").image), np.asarray(whole.image))


@pytest.mark.parametrize("failure", [
    MemoryError(), OSError(errno.EMFILE, "Too many open files"),
    RuntimeError("Memory allocation error: Cannot allocate memory"),  # libheif's words
])
def test_a_decode_short_of_memory_is_the_server_s_failure_not_the_photo_s(
    failure: Exception, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 96x80 photo was "too large to decode: resize it" when the server ran short of memory."""
    def fail(img: Image.Image) -> Image.Image:
        raise failure

    monkeypatch.setattr(decode, "_flatten", fail)
    refused = _rejected(jpeg())
    assert refused.code == decode.SHORT_OF_MEMORY
    assert "the server was short of memory" in refused.message
    assert "again" in refused.advice
    assert "resize" not in refused.advice
    # A decoder's own error (no errno) is still about the photo.
    failure = OSError("broken data stream when reading image file")
    assert _rejected(jpeg()).code == "truncated_image"


def _with_peak_memory(decode_it: Callable[[], DecodedPhoto]) -> tuple[DecodedPhoto, int]:
    """What ``decode_it`` returns and the peak of Python's allocations while it ran (numpy's and
    Python objects', counted by tracemalloc: deterministic, unlike RSS)."""
    import tracemalloc

    tracemalloc.start()
    try:
        decoded = decode_it()
        return decoded, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_16_bit_grey_png_is_scaled_a_band_at_a_time() -> None:
    """An 8 KB 16-bit PNG of 12 MP: scaling it to 8 bits took float copies of the whole picture
    (~0.3 GB here, ~1.3 GB at 40 MP)."""
    grey = np.zeros((3000, 4000), dtype=np.uint16)
    grey[:, :2000] = 40000
    data = encode(Image.fromarray(grey), "PNG")
    del grey
    decoded, peak = _with_peak_memory(lambda: _decoded(data, "grey.png"))
    assert peak < 60_000_000, peak  # the picture itself is 24 MB, its 8-bit copy 12 MB
    assert decoded.image.getpixel((0, 0))[0] == round(40000 / 65535 * 255)  # type: ignore[index]
    assert decoded.image.getpixel((3999, 0))[0] == 0  # type: ignore[index]


@pytest.mark.parametrize("min_side", [None, 128])
def test_a_jpeg_cut_off_and_closed_with_an_end_marker_is_truncated(min_side: int | None) -> None:
    """libjpeg fills the missing blocks with mid-grey and says nothing (Pillow raises only when
    the bytes run out): the grey band would be trained into the LoRA."""
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    whole = encode(noisy, "JPEG", quality=90)
    cut = whole[:len(whole) * 6 // 10] + b"\xff\xd9"
    refused = decode_photo(UploadedFile("cut.jpg", cut), limits=LIMITS, min_side=min_side)
    assert isinstance(refused, Finding), refused
    assert refused.code == "truncated_image"
    assert isinstance(decode_photo(UploadedFile("whole.jpg", whole), limits=LIMITS,
                                   min_side=min_side), DecodedPhoto)
    # A photo that really ends in a flat colour is no cut-off one.
    flat = np.asarray(noisy).copy()
    flat[-40:] = (120, 120, 120)
    assert isinstance(decode_photo(UploadedFile("f.jpg", encode(Image.fromarray(flat), "JPEG")),
                                   limits=LIMITS, min_side=min_side), DecodedPhoto)


def test_heic_without_pillow_heif_is_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    pillow_heif.register_heif_opener()
    data = _heic(photo())
    monkeypatch.setattr(decode, "_heif_available", lambda: False)
    assert _rejected(data, name="p.heic").code == "unsupported_format"


@pytest.mark.parametrize(("head", "fmt"), [
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "HEIF"),
    (b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00mif1heic", "HEIF"),
    (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf", "AVIF"),
    (b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00mif1avif", "AVIF"),
    (b"\x00\x00\x00\x18ftypisom\x00\x00\x00\x00isommp41", None),
])
def test_heif_and_avif_are_told_apart_by_brand(head: bytes, fmt: str | None) -> None:
    assert sniff_image(head + b"\x00" * 32).format == fmt


def test_decoding_from_many_threads_at_once() -> None:
    blobs = [jpeg((200, 150), seed=i) for i in range(4)] + [encode(photo(), "PNG")]
    errors: list[object] = []

    def work() -> None:
        for _ in range(10):
            for blob in blobs:
                result = decode_photo(UploadedFile("p", blob), limits=LIMITS, min_side=50)
                if not isinstance(result, DecodedPhoto):
                    errors.append(result)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def _png_damaged_mid_data(*, fix_crc: bool) -> bytes:
    """A noisy 600x800 PNG with 64 bytes of its middle IDAT overwritten (a bad copy, a bit
    flip): zlib fails there, whether or not the chunk's CRC still matches (Pillow checks no
    IDAT CRC)."""
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(np.clip(rng.normal(150, 30, (800, 600, 3)), 0, 255).astype(np.uint8))
    png = bytearray(encode(noisy, "PNG"))
    pos, idats = 8, []
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        if kind == b"IDAT":
            idats.append((pos, length))
        pos += 12 + length
    at, length = idats[len(idats) // 2]
    middle = at + 8 + length // 2
    png[middle:middle + 64] = b"\xff" * 64
    if fix_crc:
        struct.pack_into(">I", png, at + 8 + length, zlib.crc32(bytes(png[at + 4:at + 8 + length])))
    return bytes(png)


@pytest.mark.parametrize("fix_crc", [True, False])
@pytest.mark.parametrize("min_side", [None, 128])
def test_a_png_damaged_part_way_is_refused_not_half_black(fix_crc: bool,
                                                           min_side: int | None) -> None:
    """PngImageFile.getexif() loads the pixels when no eXIf chunk precedes them; its decoder
    error was swallowed as "broken EXIF", and the load after it found nothing left to decode,
    so the half that decoded was kept and the rest trained on as black."""
    refused = decode_photo(UploadedFile("damaged.png", _png_damaged_mid_data(fix_crc=fix_crc)),
                           limits=LIMITS, min_side=min_side)
    assert isinstance(refused, Finding), refused
    assert refused.code in ("corrupt_image", "truncated_image")


@pytest.mark.parametrize(("mode", "fmt", "params"), [
    ("RGBA", "WEBP", {"lossless": True}), ("RGB", "WEBP", {"lossless": True}),
    ("L", "PNG", {"bits": 1}),
])
def test_a_tiny_file_of_many_megapixels_is_a_bomb_within_the_pixel_limit(
        monkeypatch: pytest.MonkeyPatch, mode: str, fmt: str, params: dict[str, object]) -> None:
    """The "more pixels than its bytes can hold" rule held only past max_pixels: a 1,592-byte
    40 MP flat WebP decoded in full (+805 MB), and under a memory limit was "the server was short
    of memory, upload it again". Refused from the header now, before any pixel is decoded."""
    data = encode(Image.new(mode, (3000, 2000), 120), fmt, **params)
    assert len(data) * 1000 < 3000 * 2000

    def no_decoding(self: Image.Image) -> None:
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    refused = decode_photo(UploadedFile("flat.img", data), limits=LIMITS, min_side=1024)
    assert isinstance(refused, Finding), refused
    assert refused.code == "decompression_bomb"
    assert "3000x2000 pixels in" in refused.message


def test_a_photo_of_a_few_bytes_a_pixel_is_no_bomb() -> None:
    # Just under the floor and past it: the rule weighs bytes, never the picture.
    flat_small = encode(Image.new("RGB", (1500, 1500), 120), "WEBP", lossless=True)
    assert len(flat_small) * 1000 < 1500 * 1500  # under 4 MP: decoded small anyway
    assert _decoded(flat_small, "small.webp", min_side=1024).original_size == (1500, 1500)
    flat_png = encode(Image.new("RGB", (3000, 2000), 120), "PNG")  # ~300 pixels a byte
    assert _decoded(flat_png, "flat.png", min_side=1024).original_size == (3000, 2000)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_an_image_with_alpha_is_reduced_before_it_is_composited(
        monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """Compositing on white took an RGB copy, a white base and the alpha channel, all full size,
    before the reduction (+497 MB for a 40 MP RGBA PNG). Reduced first now, premultiplied, a band
    of rows at a time, to the same picture."""
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (600, 500, 4), dtype=np.uint8)
    small[..., 3] = rng.choice(np.array([0, 60, 200, 255], dtype=np.uint8), (600, 500))
    picture = Image.fromarray(small).convert(mode)
    expected = decode._reduce(decode._flatten(picture), min_side=250)
    composited: list[tuple[int, int]] = []
    flatten = decode._flatten

    def recording_flatten(img: Image.Image) -> Image.Image:
        composited.append(img.size)
        return flatten(img)

    monkeypatch.setattr(decode, "_flatten", recording_flatten)
    got = _decoded(encode(picture, "PNG"), "alpha.png", min_side=250).image
    assert composited == [(250, 300)]  # old code: the full 500x600
    assert got.size == expected.size
    difference = np.abs(np.asarray(got, dtype=int) - np.asarray(expected.convert("RGB"), dtype=int))
    assert difference.max() <= 2
    # Sides that the factor does not divide, over several bands: the boxes are the same.
    odd = Image.fromarray(small).convert(mode).resize((517, 1031))
    assert decode._reduce_premultiplied(odd, min_side=100).size == (104, 207)
    expected = decode._reduce(flatten(odd), min_side=100)
    got = flatten(decode._reduce_premultiplied(odd, min_side=100))
    assert np.abs(np.asarray(got, dtype=int) - np.asarray(expected, dtype=int)).max() <= 2


def test_a_huge_exif_software_tag_is_read_no_further_than_what_is_kept() -> None:
    """A PNG eXIf (WebP, HEIF EXIF too) can be as large as the file: a 45 MB Software tag was
    cleaned a character at a time, a list of one-character strings (~0.5 GB, seconds), for the
    200 characters kept. Python's own allocations, counted by tracemalloc: Pillow reading the tag
    costs ~5 times its size, the old cleaning ~12 times."""
    size = 5 * 1024 * 1024
    text = b"Adobe Photoshop " + b"A" * size + b"\0"
    ifd = (b"MM\x00*\x00\x00\x00\x08" + struct.pack(">H", 1)
           + struct.pack(">HHII", 0x0131, 2, len(text), 8 + 2 + 12 + 4) + struct.pack(">I", 0))
    plain = encode(photo(), "PNG")
    data = plain[:33] + png_chunk(b"eXIf", ifd + text) + plain[33:]  # after the header chunk
    decoded, peak = _with_peak_memory(lambda: _decoded(data, "p.png"))
    assert decoded.exif_software == ("Adobe Photoshop " + "A" * 200)[:200]
    assert peak < 8 * size, peak
    assert decode._text(b"\xe2\x82\xac" * 2000) == "\u20ac" * 200  # multi-byte UTF-8 is cut whole
    assert decode._text("\x00\x01 Lightroom\x7f ") == "Lightroom"


@pytest.mark.parametrize("fmt", ["WEBP", "HEIF"])
def test_a_webp_or_heic_cut_off_is_truncated_not_damaged(fmt: str) -> None:
    """libwebp and libheif say only "invalid" of a file that ends early: a WebP cut in half was
    "damaged and cannot be decoded", a HEIC "starts like a HEIC image but is not a valid one",
    where a JPEG or PNG is "cut off". The container's declared sizes tell."""
    pillow_heif.register_heif_opener()  # idempotent; the decoder registers it too
    whole = _heic(photo((300, 200))) if fmt == "HEIF" else encode(photo((300, 200)), fmt)
    refused = _rejected(truncated(whole), "cut.img")
    assert refused.code == "truncated_image"
    assert "cut off" in refused.message
    # Whole but for a lie in its header: "damaged", not "cut off".
    if fmt == "WEBP":
        damaged = whole[:12] + b"VP8?" + whole[16:]
        assert _rejected(damaged, "bad.webp").code == "corrupt_image"
