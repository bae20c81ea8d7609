"""The hostile-upload corpus: builders of broken and hostile zips and images, and the cases.

Every input is built from scratch (no binary blobs). ``tests/integration/test_hostile_uploads.py``
runs the corpus through the HTTP API; the unit tests of the readers run it straight against them.
"""

from __future__ import annotations

import io
import stat
import struct
import unicodedata
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageDraw

MB = 1024 * 1024

# --------------------------------------------------------------------------------------------
# Builders: images


def photo(size: tuple[int, int] = (96, 80), *, seed: int = 0) -> Image.Image:
    """A small picture with four differently colored quadrants (so orientation shows)."""
    w, h = size
    img = Image.new("RGB", size, (30 + seed * 17 % 200, 120, 200))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, w // 2 - 1, h // 2 - 1), fill=(220, 30, 30))
    draw.rectangle((w // 2, 0, w - 1, h // 2 - 1), fill=(30, 200, 30))
    draw.rectangle((0, h // 2, w // 2 - 1, h - 1), fill=(30, 30, 220))
    draw.ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(230, 190, 160))
    return img


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def jpeg(size: tuple[int, int] = (96, 80), *, seed: int = 0) -> bytes:
    return encode(photo(size, seed=seed), "JPEG", quality=90)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_declaring(width: int, height: int) -> bytes:
    """A valid-looking greyscale PNG header declaring width x height, with a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1) * 2, 9)  # two rows of a huge picture
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real small JPEG whose frame header is patched to declare width x height."""
    data = bytearray(jpeg((16, 16)))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: int(len(data) * keep)]


def animated(fmt: str) -> bytes:
    frames = [photo(seed=i) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=100)
    return buf.getvalue()


GIF_JS_POLYGLOT = (b"GIF89a/*\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00,\x00\x00\x00\x00"
                   b"\x01\x00\x01\x00\x00\x02\x02D\x01\x00;*/=alert(document.domain);")
SVG = (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100">'
       b'<script>alert(1)</script><circle cx="50" cy="50" r="40"/></svg>')
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
HTML = b"<!DOCTYPE html><html><body><script>fetch('/api/model')</script></body></html>"
ELF = b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 56
TEXT = b"this is not a photo, just a renamed text file\n" * 20


# --------------------------------------------------------------------------------------------
# Builders: archives


def zip_of(members: dict[str, bytes], *, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)
    return buf.getvalue()


def zip_with_info(info: zipfile.ZipInfo, blob: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(info, blob)
    return buf.getvalue()


@dataclass
class Raw:
    """One member of a hand-built zip: everything a tool would normally compute is stated."""

    name: bytes
    payload: bytes  # the bytes stored after the local header
    size: int  # declared uncompressed size
    crc: int
    method: int = 0
    flags: int = 0
    external_attr: int = 0
    extra: bytes = b""  # extra fields, in the local header and the directory alike


def local_header(m: Raw, *, compressed_size: int | None = None) -> bytes:
    csize = len(m.payload) if compressed_size is None else compressed_size
    return struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, m.flags, m.method, 0, 0, m.crc, csize,
                       m.size, len(m.name), len(m.extra)) + m.name + m.extra


def central_entry(m: Raw, offset: int, *, compressed_size: int | None = None) -> bytes:
    csize = len(m.payload) if compressed_size is None else compressed_size
    return struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 0x031E, 20, m.flags, m.method, 0, 0, m.crc,
                       csize, m.size, len(m.name), len(m.extra), 0, 0, 0, m.external_attr,
                       offset) + m.name + m.extra


def unicode_path(raw_name: bytes, path: str, *, crc_of: bytes | None = None) -> bytes:
    """An Info-ZIP Unicode Path extra field (0x7075) giving ``path`` for ``raw_name`` (its
    CRC-32 taken of ``crc_of`` instead, to make one that no longer matches its name)."""
    body = b"\x01" + struct.pack("<I", zlib.crc32(raw_name if crc_of is None else crc_of))
    body += path.encode()
    return struct.pack("<HH", 0x7075, len(body)) + body


def end_record(count: int, cd_size: int, cd_offset: int) -> bytes:
    return struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, count, count, cd_size, cd_offset, 0)


def raw_zip(members: list[Raw], *, declared_count: int | None = None) -> bytes:
    out = bytearray()
    offsets = []
    for m in members:
        offsets.append(len(out))
        out += local_header(m) + m.payload
    cd_offset = len(out)
    for m, offset in zip(members, offsets, strict=True):
        out += central_entry(m, offset)
    count = len(members) if declared_count is None else declared_count
    out += end_record(count, len(out) - cd_offset, cd_offset)
    return bytes(out)


def stored(name: str, blob: bytes, **overrides: int) -> Raw:
    fields: dict[str, int] = {"size": len(blob), "crc": zlib.crc32(blob)}
    fields.update(overrides)
    return Raw(name=name.encode(), payload=blob, **fields)


def deflated_zeros(count: int) -> tuple[bytes, int]:
    """(raw deflate stream, CRC-32) of ``count`` zero bytes, built without holding them."""
    engine = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = bytes(MB)
    out = bytearray()
    crc = 0
    left = count
    while left:
        piece = block[: min(left, MB)]
        out += engine.compress(piece)
        crc = zlib.crc32(piece, crc)
        left -= len(piece)
    out += engine.flush()
    return bytes(out), crc


def zero_bomb(size: int, *, declared: int | None = None, members: int = 1) -> bytes:
    stream, crc = deflated_zeros(size)
    return raw_zip([Raw(name=f"bomb{i}.jpg".encode(), payload=stream,
                        size=size if declared is None else declared, crc=crc, method=8)
                    for i in range(members)])


def quoted_overlap_zip(files: int = 30, kernel_bytes: int = 5 * MB) -> bytes:
    """David Fifield's "quoted overlap" bomb: every member's deflate stream starts with a stored
    block that quotes the next member's local header, then runs on into the next member's data,
    so all members share one compressed kernel (CVE-2024-0450)."""
    kernel, kernel_crc = deflated_zeros(kernel_bytes)
    names = [f"selfie{i:03d}.jpg".encode() for i in range(files)]
    # Built back to front: a member's size and CRC depend on everything after its header.
    headers: list[bytes] = [b""] * files
    size, crc, csize = kernel_bytes, kernel_crc, len(kernel)
    tail_plain_prefix = b""  # the quoted headers that precede the zeros in the current member
    for i in reversed(range(files)):
        member = Raw(name=names[i], payload=b"", size=size, crc=crc, method=8)
        headers[i] = local_header(member, compressed_size=csize)
        if i:
            quoted = headers[i]
            tail_plain_prefix = quoted + tail_plain_prefix
            size = len(tail_plain_prefix) + kernel_bytes
            crc = _crc_of_prefix_and_zeros(tail_plain_prefix, kernel_bytes)
            csize = 5 + len(quoted) + csize
    out = bytearray()
    offsets = []
    for i in range(files):
        offsets.append(len(out))
        out += headers[i]
        if i + 1 < files:
            quoted_len = len(headers[i + 1])
            out += b"\x00" + struct.pack("<HH", quoted_len, quoted_len ^ 0xFFFF)  # stored block
    out += kernel
    cd_offset = len(out)
    for i in range(files):
        # The central entry repeats the local header's fields: parse it back out.
        fields = struct.unpack_from("<4s5H3I2H", headers[i])
        member = Raw(name=names[i], payload=b"", size=fields[8], crc=fields[6], method=8)
        out += central_entry(member, offsets[i], compressed_size=fields[7])
    out += end_record(files, len(out) - cd_offset, cd_offset)
    return bytes(out)


def _crc_of_prefix_and_zeros(prefix: bytes, zeros: int) -> int:
    crc = zlib.crc32(prefix)
    block = bytes(MB)
    while zeros:
        n = min(zeros, MB)
        crc = zlib.crc32(block[:n], crc)
        zeros -= n
    return crc


def full_overlap_zip(files: int = 50, kernel_bytes: int = 10 * MB) -> bytes:
    """Every central directory entry points at the same local header and kernel."""
    kernel, crc = deflated_zeros(kernel_bytes)
    first = Raw(name=b"a.jpg", payload=kernel, size=kernel_bytes, crc=crc, method=8)
    out = bytearray(local_header(first) + kernel)
    cd_offset = len(out)
    for i in range(files):
        member = Raw(name=f"{i}.jpg".encode(), payload=kernel, size=kernel_bytes, crc=crc, method=8)
        out += central_entry(member, 0)
    out += end_record(files, len(out) - cd_offset, cd_offset)
    return bytes(out)


def many_empty_members(count: int = 10_000) -> bytes:
    return raw_zip([stored(f"{i}.jpg", b"") for i in range(count)])


def lying_count_zip(real: int = 1500, declared: int = 3) -> bytes:
    return raw_zip([stored(f"{i}.jpg", b"") for i in range(real)], declared_count=declared)


def slow_to_normalise(marks: int = 15_990) -> str:
    """A name whose Unicode NFC takes time quadratic in ``marks`` (~6 s at 15,990, a 64 KB name):
    two kinds of combining marks out of canonical order, which NFC sorts by insertion."""
    return "\u0301" * marks + "\u0316" * marks


def long_name_zip() -> bytes:
    """0.13 MB: one folder entry (nothing to inflate) with a 64 KB name slow to normalise."""
    return raw_zip([stored(slow_to_normalise() + "000/", b"", flags=0x800)])


def long_unicode_path_zip() -> bytes:
    """A short plain name whose Info-ZIP Unicode Path (what some extractors show) is 64 KB."""
    info = zipfile.ZipInfo("a.jpg")
    body = b"\x01" + struct.pack("<I", zlib.crc32(b"a.jpg")) + slow_to_normalise().encode()
    info.extra = struct.pack("<HH", 0x7075, len(body)) + body
    return zip_with_info(info, jpeg())


def symlink_zip() -> bytes:
    info = zipfile.ZipInfo("me.jpg")
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return zip_with_info(info, b"/etc/passwd")


def fifo_zip() -> bytes:
    info = zipfile.ZipInfo("pipe.jpg")
    info.create_system = 3
    info.external_attr = (stat.S_IFIFO | 0o644) << 16
    return zip_with_info(info, b"")


def encrypted_zip() -> bytes:
    blob = jpeg()
    # The traditional PKWARE encryption flag, set by hand on both headers.
    return raw_zip([stored("secret.jpg", blob, flags=0x1)])


def crc_mismatch_zip() -> bytes:
    blob = jpeg()
    return raw_zip([stored("photo.jpg", blob, crc=zlib.crc32(blob) ^ 0xFFFF)])


def size_lie_zip() -> bytes:
    """A 30 MB deflate stream declared as 1,000 bytes (so size checks up front pass)."""
    return zero_bomb(30 * MB, declared=1000)


def polyglot_jpeg_zip(*, zip64: bool = False, after: bytes = b"") -> bytes:
    """A JPEG with a zip appended, which zip tools open; ``zip64``: with zip64 end records (as
    Java, 7-Zip and Info-ZIP write them); ``after``: bytes after the end record, which zipfile
    and unzip skip."""
    archive = zip_of({"payload.txt": b"#!/bin/sh\necho pwned\n"})
    return jpeg() + (with_zip64_end(archive) if zip64 else archive) + after


def with_zip64_end(archive: bytes) -> bytes:
    """The archive (without a comment) with a zip64 end record and locator before its end
    record, which then sits 76 bytes after the central directory instead of right after it."""
    _sig, disk, cd_disk, here, total, cd_size, cd_offset, _comment = struct.unpack(
        "<4s4H2IH", archive[-22:])
    body = archive[:-22]
    record = struct.pack("<4sQ2H2I4Q", b"PK\x06\x06", 44, 45, 45, disk, cd_disk, here, total,
                         cd_size, cd_offset)
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, len(body), 1)
    return body + record + locator + archive[-22:]


def nested_gzip() -> bytes:
    import gzip

    return gzip.compress(jpeg())


# --------------------------------------------------------------------------------------------
# The corpus


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[], bytes | list[tuple[str, bytes]]]
    code: str
    route: str = "zip"  # "zip": POST upload-zip; "files": POST upload (several ``files``)
    per_photo: bool = False  # True: dataset_rejected carrying a finding with ``code``
    bomb: bool = False  # memory is measured

    def payload(self) -> bytes | list[tuple[str, bytes]]:
        return self.build()


def _zipped(build: Callable[[], bytes]) -> Callable[[], bytes]:
    """A zip holding just this photo (alone, so the set cannot train and the 422 shows it)."""
    return lambda: zip_of({"selfie.jpg": build()})


# The bytes of each per-photo case, for the decode unit tests.
PHOTO_BYTES: dict[str, tuple[Callable[[], bytes], str]] = {
    "text_renamed_jpg": (lambda: TEXT, "not_an_image"),
    "pdf_renamed_jpg": (lambda: PDF, "not_an_image"),
    "html_renamed_jpg": (lambda: HTML, "not_an_image"),
    "elf_renamed_jpg": (lambda: ELF, "not_an_image"),
    "gif_js_polyglot": (lambda: GIF_JS_POLYGLOT, "unsupported_format"),
    "truncated_jpeg": (lambda: truncated(jpeg((400, 300))), "truncated_image"),
    "truncated_png": (lambda: truncated(encode(photo((300, 200)), "PNG")), "truncated_image"),
    "png_50000x50000": (lambda: png_declaring(50_000, 50_000), "decompression_bomb"),
    "png_8000x6000_tiny": (lambda: png_declaring(8000, 6000), "decompression_bomb"),
    "jpeg_header_65000x65000": (lambda: jpeg_declaring(65_000, 65_000), "decompression_bomb"),
    "jpeg_13000_wide": (lambda: jpeg((13_000, 40)), "image_too_large"),
    "zero_bytes": (lambda: b"", "empty_file"),
    "svg": (lambda: SVG, "unsupported_format"),
    "gif": (lambda: encode(photo(), "GIF"), "unsupported_format"),
    "tiff": (lambda: encode(photo(), "TIFF"), "unsupported_format"),
    "bmp": (lambda: encode(photo(), "BMP"), "unsupported_format"),
    "animated_webp": (lambda: animated("WEBP"), "animated_image"),
    "animated_png": (lambda: animated("PNG"), "animated_image"),
    "jpeg_garbage_after_soi": (lambda: b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
                               "corrupt_image"),
}

_BOMB_PHOTOS = {"png_50000x50000", "png_8000x6000_tiny", "jpeg_header_65000x65000"}

# Whole-archive refusals, for the archive unit tests: (builder, code).
ARCHIVE_BYTES: dict[str, tuple[Callable[[], bytes], str]] = {
    "not_a_zip": (lambda: b"this is not a zip archive", "bad_archive"),
    "empty_upload": (lambda: b"", "bad_archive"),
    "jpeg_as_zip": (lambda: jpeg(), "bad_archive"),
    "deflate_bomb_ratio": (lambda: zero_bomb(40 * MB), "compression_ratio"),
    # Over the per-photo limit too, but a bomb first: the ratio refuses the whole upload.
    "deflate_bomb_member_size": (lambda: zero_bomb(60 * MB), "compression_ratio"),
    "deflate_bombs_total_size": (lambda: zero_bomb(49 * MB, members=11), "archive_too_large"),
    "declared_size_lies_small": (size_lie_zip, "size_mismatch"),
    # A stored member's size is its bytes': declaring another one is a lie, whatever its size.
    "declared_size_lies_large": (lambda: raw_zip([stored("x.jpg", jpeg(), size=60 * MB)]),
                                 "size_mismatch"),
    "quoted_overlap_bomb": (quoted_overlap_zip, "overlapping_entries"),
    "full_overlap_bomb": (full_overlap_zip, "overlapping_entries"),
    "ten_thousand_empty_members": (many_empty_members, "too_many_members"),
    "lying_entry_count": (lying_count_zip, "too_many_members"),
    "traversal_dotdot": (lambda: zip_of({"../x.jpg": jpeg()}), "unsafe_path"),
    "traversal_absolute": (lambda: zip_of({"/etc/x.jpg": jpeg()}), "unsafe_path"),
    "traversal_drive_letter": (lambda: zip_of({"C:\\x.jpg": jpeg()}), "unsafe_path"),
    "traversal_inner_dotdot": (lambda: zip_of({"photos/../../x.jpg": jpeg()}), "unsafe_path"),
    "traversal_backslash_dotdot": (lambda: zip_of({"photos\\..\\..\\x.jpg": jpeg()}),
                                   "unsafe_path"),
    "traversal_backslash_absolute": (lambda: zip_of({"\\x.jpg": jpeg()}), "unsafe_path"),
    "long_entry_name": (long_name_zip, "name_too_long"),
    "long_unicode_path_name": (long_unicode_path_zip, "name_too_long"),
    "symlink_member": (symlink_zip, "symlink_in_archive"),
    "fifo_member": (fifo_zip, "special_file"),
    "duplicate_casefold": (lambda: zip_of({"Photo.jpg": jpeg(seed=1), "photo.JPG": jpeg(seed=2)}),
                           "duplicate_member"),
    "duplicate_unicode_forms": (
        lambda: zip_of({unicodedata.normalize("NFC", "café.jpg"): jpeg(seed=1),
                        unicodedata.normalize("NFD", "café.jpg"): jpeg(seed=2)}),
        "duplicate_member"),
    "crc_mismatch": (crc_mismatch_zip, "bad_archive"),
}

# Members refused on their own (the rest of the upload is read): (member's bytes, finding code).
MEMBER_BYTES: dict[str, tuple[Callable[[], bytes], str]] = {
    "nested_zip": (lambda: zip_of({"a.jpg": jpeg()}), "nested_archive"),
    "nested_gzip": (nested_gzip, "nested_archive"),
    "jpeg_zip_polyglot": (polyglot_jpeg_zip, "nested_archive"),
    "jpeg_zip_polyglot_byte_after": (lambda: polyglot_jpeg_zip(after=b"\n"), "nested_archive"),
    "jpeg_zip64_polyglot": (lambda: polyglot_jpeg_zip(zip64=True), "nested_archive"),
}

# Zips whose one member this reader cannot decompress: that member's finding (the rest of such
# a zip is read), so alone they make a set that cannot train.
UNREADABLE_MEMBERS: dict[str, tuple[Callable[[], bytes], str]] = {
    "encrypted_member": (encrypted_zip, "password_protected"),
    "aes_member": (lambda: raw_zip([stored("secret.jpg", jpeg(), method=99)]), "password_protected"),
    "lzma_member": (lambda: zip_of({"a.jpg": jpeg()}, compression=zipfile.ZIP_LZMA),
                    "unsupported_compression"),
}

_BOMB_ARCHIVES = {"deflate_bomb_ratio", "deflate_bomb_member_size", "deflate_bombs_total_size",
                  "declared_size_lies_small", "quoted_overlap_bomb", "full_overlap_bomb",
                  "ten_thousand_empty_members", "lying_entry_count"}

CASES: list[Case] = [
    *(Case(key, build, code, bomb=key in _BOMB_ARCHIVES)
      for key, (build, code) in ARCHIVE_BYTES.items()),
    *(Case(key, _zipped(build), code, per_photo=True, bomb=key in _BOMB_PHOTOS)
      for key, (build, code) in PHOTO_BYTES.items()),
    *(Case(key, _zipped(build), code, per_photo=True) for key, (build, code) in MEMBER_BYTES.items()),
    *(Case(key, build, code, per_photo=True) for key, (build, code) in UNREADABLE_MEMBERS.items()),
    # Several photos sent as multipart ``files``.
    Case("files_duplicate_casefold",
         lambda: [("a.jpg", jpeg(seed=1)), ("A.JPG", jpeg(seed=2))], "duplicate_member",
         route="files"),
    # Alone, so the set cannot train and the 422 shows it (beside photos, they are stored).
    Case("files_zip_as_photo", lambda: [("b.jpg", zip_of({"c.jpg": jpeg()}))],
         "nested_archive", route="files", per_photo=True),
    Case("files_jpeg_zip_polyglot", lambda: [("a.jpg", polyglot_jpeg_zip())], "nested_archive",
         route="files", per_photo=True),
    Case("files_jpeg_zip64_polyglot_byte_after",
         lambda: [("a.jpg", polyglot_jpeg_zip(zip64=True, after=b"\n"))], "nested_archive",
         route="files", per_photo=True),
    # 4 KB: the multipart parser itself answers 400 to a 64 KB file name.
    Case("files_long_name", lambda: [(slow_to_normalise(1000) + ".jpg", jpeg())], "name_too_long",
         route="files"),
    Case("files_too_many", lambda: [(f"{i}.jpg", b"x") for i in range(201)], "too_many_members",
         route="files"),
    Case("files_pdf_renamed", lambda: [("a.jpg", PDF)], "not_an_image", route="files",
         per_photo=True),
    Case("files_truncated_png", lambda: [("a.png", truncated(encode(photo((300, 200)), "PNG")))],
         "truncated_image", route="files", per_photo=True),
]


