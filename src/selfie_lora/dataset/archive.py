"""Reading an upload (a zip, several files, or a folder) into files, refusing hostile ones.

The zip reader is our own, not :mod:`zipfile`: this Python (3.11.7) lacks the CVE-2024-0450 fix,
and a check made on one parser's view of an archive while another parser reads it is how
"quoted overlap" bombs get through. So one parse of the bytes decides everything:

1. the end record, then the entry count, before any entry is parsed (10,000 empty members are
   refused after reading 22 bytes; a lying count stops the walk at the limit);
2. every central directory entry and its local header, which must agree, with member data that
   never overlaps another member's (overlap = a bomb that reuses bytes);
3. names (their length first, while parsing the directory: Unicode normalisation, which the
   checks below need, is quadratic in a run of combining marks), links, duplicates;
4. the declared sizes and compression ratios, against the limits;
5. then members are decompressed, each capped at its declared size (a member producing more
   than it declared is refused the moment it does), with the CRC checked;
6. nested archives are found by content (magic bytes, or a zip appended to another file).

Whole-upload problems raise :class:`InvalidInputError` (HTTP 422, nothing stored); the server
running out of memory while reading raises :class:`ServerShortOfMemoryError` (HTTP 503), which
blames no file. Three problems of one file are that file's alone, and the rest of the upload is
read: a file larger than a photo may be (a 51 MB ProRAW DNG beside good JPEGs; known from the
declared size, so never decompressed; a folder's file is read no further than the limit), a
zip member this reader cannot decompress (password-protected, or an unknown compression
method: known from its header) and an archive inside the upload (known from its first bytes, so
decompressed no further; a zip appended to a photo only from its end). Each comes back as an
:class:`UploadedFile` with no data and its ``refused`` finding, which the intake reports as it
reports a photo it cannot decode. Every limit that protects the machine (sizes in all, counts,
ratios, sizes that lie) still refuses the whole upload. System files (``__MACOSX/``, ``._*``,
``.DS_Store``...), folder entries, a phone export's side files and documents (``.txt``,
``.md``, ``.pdf``...) are skipped with an ``info`` finding.
Archive names are only ever shown to the user (sanitized); nothing is written under them.
"""

from __future__ import annotations

import bz2
import itertools
import logging
import os
import re
import stat
import struct
import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from selfie_lora.dataset.decode import sniff_image
from selfie_lora.dataset.limits import SentFile, UploadedFile, UploadLimits, byte_size
from selfie_lora.domain.entities import Finding
from selfie_lora.errors import ErrorCode, InvalidInputError, ServerShortOfMemoryError

logger = logging.getLogger(__name__)

__all__ = [
    "UploadLimits",
    "UploadedFile",
    "archive_kind",
    "display_name",
    "form_escape",
    "form_filename",
    "read_path",
    "read_uploaded_files",
    "read_zip",
    "uploaded_name",
]

_IGNORED_DIRS = frozenset({"__macosx"})
_IGNORED_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini"})
# What an iPhone export puts beside the photos: .AAE files (the edits made in Photos, as XML)
# and the video half of a Live Photo (IMG_0002.MOV beside IMG_0002.HEIC). Not photos the user
# chose, so skipped like system files rather than refused as "not a photo" against the set.
_EDIT_SIDECARS = frozenset({".aae"})
_LIVE_VIDEOS = frozenset({".mov", ".mp4"})
# The iPhone camera's own names (IMG_0002, IMG_E0002 once edited): a QuickTime movie so named
# is a Live Photo's video even when the export left its photo out (or sent it as another name).
_IPHONE_NAME = re.compile(r"IMG_E?\d{4}", re.IGNORECASE)
# Google Takeout writes each photo's metadata beside it as JSON: IMG_0001.jpg.json (newer
# exports IMG_0001.jpg.supplemental-metadata.json, cut short in long names) or IMG_0001.json.
# Refused as "not a photo", eight of them took a set of eight photos from "fair" to "poor".
_TAKEOUT_SIDECAR = ".json"
# Takeout names the side file of IMG_0001(1).jpg "IMG_0001.jpg(1).json": the number after the
# photo's whole name.
_TAKEOUT_NUMBERED = re.compile(r"(?P<name>.+)(?P<ext>\.[^.()/]+)\((?P<n>\d+)\)")
_PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg", ".heic", ".heif", ".png", ".avif", ".webp"})
# Documents people keep beside their photos (a README.md or notes.txt in the zip, a PDF sent
# with the files): refused as "not a photo", each was counted as a photo left out, which reads
# as photos lost. Skipped like the side files, but only when the content is no image format
# either: a JPEG named notes.txt is still read (and judged) as the photo it is. (No .docx or
# .odt: those are zips, refused as archives inside the upload before this sees them.)
_DOCUMENTS = frozenset({".txt", ".md", ".markdown", ".rtf", ".pdf", ".doc", ".csv"})

_EOCD = struct.Struct("<4s4H2IH")  # end of central directory record (22 bytes)
_Z64_LOCATOR = struct.Struct("<4sIQI")  # zip64 end of central directory locator (20 bytes)
_Z64_EOCD = struct.Struct("<4sQ2H2I4Q")  # zip64 end of central directory record (56 bytes)
_CENTRAL = struct.Struct("<4s6H3I5H2I")  # central directory file header (46 bytes)
_LOCAL = struct.Struct("<4s5H3I2H")  # local file header (30 bytes)
_SIG_EOCD = b"PK\x05\x06"
_SIG_Z64_LOCATOR = b"PK\x06\x07"
_SIG_Z64_EOCD = b"PK\x06\x06"
_SIG_CENTRAL = b"PK\x01\x02"
_SIG_LOCAL = b"PK\x03\x04"
_MAX_COMMENT = 0xFFFF

_FLAG_ENCRYPTED = 0x0001
_FLAG_STRONG_ENCRYPTION = 0x0040
_FLAG_UTF8 = 0x0800
_METHOD_STORED = 0
_METHOD_DEFLATED = 8
_METHOD_BZIP2 = 12
_METHOD_AES = 99  # WinZip AES: an encrypted member, whatever the flags say
_METHOD_NAMES = {_METHOD_STORED: "stored", _METHOD_DEFLATED: "deflate", _METHOD_BZIP2: "bzip2"}
_FILE_ATTRIBUTE_REPARSE_POINT = 0x400  # a Windows symlink or junction

_CHUNK = 64 * 1024
# Entry and file names longer than these are refused before anything normalises them: NFC is
# quadratic in a run of combining marks (a 64 KB name holds the GIL ~6 s), and no file system a
# photo comes from allows more than 255 characters a name (ext4: 255 bytes; APFS, NTFS: 255
# characters). 1,024 bytes bounds a whole path, and with it the work per name (under 1 ms).
_MAX_NAME_BYTES = 1024
_MAX_PART_CHARS = 255
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class _Entry:
    raw_name: bytes
    name: str  # decoded, as the archive states it
    # With an Info-ZIP Unicode Path (0x7075, shown as ``name``): the plain name, which some
    # extractors show instead.
    alt_name: str | None
    flags: int
    method: int
    crc: int
    compressed_size: int
    size: int
    header_offset: int
    external_attr: int

    @property
    def is_dir(self) -> bool:
        return self.name.endswith("/")


@dataclass(frozen=True)
class _Span:
    entry: _Entry
    data_start: int
    data_end: int


# --------------------------------------------------------------------------------------------
# Public API


def read_zip(data: bytes, *, limits: UploadLimits) -> tuple[list[UploadedFile], list[Finding]]:
    """The files of a zip upload and ``info`` findings about skipped entries.

    Raises :class:`InvalidInputError` (a specific ``code``) when the archive as a whole is
    refused, and :class:`ServerShortOfMemoryError` when the server ran out of memory reading it;
    nothing else escapes, whatever the bytes.
    """
    if len(data) > limits.max_upload_bytes:
        raise _refuse(ErrorCode.UPLOAD_TOO_LARGE,
                      f"the upload is larger than {byte_size(limits.max_upload_bytes)}")
    try:
        return _read_zip(data, limits=limits)
    except InvalidInputError:
        raise
    except MemoryError as exc:
        # zlib and bz2 raise it when an allocation fails while inflating (Z_MEM_ERROR,
        # BZ_MEM_ERROR), as does building a member's bytes: the sizes were checked against the
        # limits before, so this says nothing of the archive, and the same bytes may read fine
        # a minute later. Not "not a readable zip archive", which tells the user to fix a file
        # that is fine.
        logger.warning("reading a zip upload: the server was short of memory (%r)", exc)
        raise ServerShortOfMemoryError(
            "the upload could not be read: the server was short of memory; nothing is wrong "
            "with the archive: upload it again in a few minutes") from None
    except Exception as exc:  # a parser bug must still be a 422 about this archive, not a 500
        logger.warning("unexpected failure reading a zip upload: %r", exc)
        raise _refuse(ErrorCode.BAD_ARCHIVE, "the upload is not a readable zip archive",
                      details=[type(exc).__name__]) from None


def read_uploaded_files(
    files: Sequence[SentFile], *, limits: UploadLimits, form_escaped: bool = True
) -> tuple[list[UploadedFile], list[Finding]]:
    """Photos sent one by one (multipart ``files``): the same refusals as a zip's members.
    Archives among them are refused: a zip goes to upload-zip. A file sent as the spooled file
    that holds it is read here, once, and not at all when it is larger than a photo may be.
    ``form_escaped``: the names are multipart filenames (see ``uploaded_name``); False, they
    are the names as the device has them."""
    if len(files) > limits.max_members:
        raise _refuse(ErrorCode.TOO_MANY_MEMBERS,
                      f"{len(files)} files sent; at most {limits.max_members} are accepted")
    sizes = [_sent_size(sent) for _name, sent in files]
    total = sum(sizes)
    if total > limits.max_upload_bytes:
        raise _refuse(ErrorCode.UPLOAD_TOO_LARGE,
                      f"the upload is larger than {byte_size(limits.max_upload_bytes)}")
    out: list[UploadedFile] = []
    findings: list[Finding] = []
    seen: dict[str, str] = {}
    for index, ((raw_name, sent), size) in enumerate(zip(files, sizes, strict=True)):
        # Browsers send a basename, scripts may send anything: it is only ever displayed, and
        # bounded before it is normalised for display.
        _check_name_length(raw_name, len(raw_name.encode("utf-8", "surrogatepass")),
                           what="the file", redo="send it again")
        name = uploaded_name(raw_name, index, form_escaped=form_escaped)
        if _is_ignored(name):
            findings.append(_ignored(name, "a system file"))
            continue
        key = _fold(name)
        if key in seen:
            raise _refuse(ErrorCode.DUPLICATE_MEMBER,
                          f"two files are named {name!r}: rename one of them (or leave one "
                          "out) and send them again", details=[seen[key], name])
        seen[key] = name
        if size > limits.max_member_bytes:
            # Known from its size: a 60 MB camera raw file was read whole on the web and the
            # API before it got this finding.
            out.append(_too_large(name, size, limits=limits))
            continue
        blob = sent if isinstance(sent, bytes) else sent.read(size)
        kind = archive_kind(blob)
        out.append(UploadedFile(name=name, data=blob) if kind is None
                   else _nested(name, kind, inside="among the photos sent"))
    return _without_sidecars(out, findings), findings


def _sent_size(sent: bytes | BinaryIO) -> int:
    """The bytes of a sent file: its length, or what is left of the file from where it stands."""
    if isinstance(sent, bytes):
        return len(sent)
    at = sent.tell()
    end = sent.seek(0, os.SEEK_END)
    sent.seek(at)
    return end - at


def read_path(path: Path, *, limits: UploadLimits) -> tuple[list[UploadedFile], list[Finding]]:
    """A folder of photos (its regular files, not its subfolders) or a zip of them."""
    if path.is_dir():
        return _read_folder(path, limits=limits)
    if path.is_file():
        if path.stat().st_size > limits.max_upload_bytes:
            raise _refuse(ErrorCode.UPLOAD_TOO_LARGE,
                          f"{path.name} is larger than {byte_size(limits.max_upload_bytes)}")
        data = path.read_bytes()
        sniffed = sniff_image(data)
        if sniffed.is_image:
            # One photo named where its folder was: "the upload is not a zip archive" named
            # neither the file nor what to name instead.
            raise _refuse(ErrorCode.BAD_ARCHIVE,
                          f"{path.name} is a photo ({sniffed.label}), not a folder or a "
                          "zip of photos: name the folder it is in, or a zip of the photos")
        return read_zip(data, limits=limits)
    raise _refuse(ErrorCode.NO_SUCH_PATH, f"{path} is neither a folder nor a zip file")


def uploaded_name(raw: str, index: int, *, form_escaped: bool = True) -> str:
    """The name the photo sent ``index``-th (from 0) as ``raw`` is read and stored under. The
    web page's report matches the files on the device to their rows by it.

    ``raw`` is a multipart part's filename. Browsers write a '"' in it as %22, a CR as %0D and
    a LF as %0A, and escape nothing else (the HTML standard's multipart/form-data encoding), so
    exactly those are read back: 'say "cheese".jpg' was shown as 'say %22cheese%22.jpg'.

    A '/' always ends a folder's name. A backslash does only in a Windows path (a drive letter,
    as in old browsers' 'C:\\Users\\me\\x.jpg' or 'C:\\fakepath\\x.jpg', a '\\\\server' share,
    or a '.' or '..' folder): a browser on Windows sends the base name alone, and on Linux and
    macOS 'back\\slash.JPG' is a file's whole name, which was cut to 'slash.JPG' (and
    'a\\x.jpg' beside 'b\\x.jpg' refused as two files of one name). The name is only ever
    shown, never used as a path, so a backslash kept in it is harmless.

    A '%' is not escaped, so a file named '100%22off.jpg' arrives as one named '100"off.jpg'
    does: where the sender says the name as it is (``form_escaped`` False: the web page's
    script sends each name beside its file), nothing is read back."""
    name = form_filename(raw) if form_escaped else raw
    if _WINDOWS_PATH.search(name):
        name = name.replace("\\", "/")
    return _clean(name.rstrip("/").rsplit("/", 1)[-1]) or f"photo{index + 1}"


def form_filename(raw: str) -> str:
    """A multipart part's filename as the browser had it: %22, %0D and %0A read back (see
    ``uploaded_name``)."""
    return _FORM_ESCAPE.sub(lambda found: _FORM_ESCAPES[found[0]], raw)


def form_escape(name: str) -> str:
    """``name`` as a browser writes it as a multipart part's filename (the inverse of
    ``form_filename``)."""
    return name.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


_FORM_ESCAPES = {"%22": '"', "%0D": "\r", "%0A": "\n"}
_FORM_ESCAPE = re.compile("|".join(_FORM_ESCAPES))
_WINDOWS_PATH = re.compile(r"^(?:[A-Za-z]:\\|\\\\)|(?:^|\\)\.\.?\\")


def display_name(raw: str) -> str:
    """A name safe to show: the last path component, no control or bidi-override characters,
    NFC-normalized, at most 100 characters."""
    base = raw.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return _clean(base)


def archive_kind(data: bytes) -> str | None:
    """What archive ``data`` is (by content), or None. Also finds a zip appended to another file
    (a JPEG+zip polyglot), which zip tools open as a zip."""
    kind = _leading_archive(data)
    if kind is None and _appended_zip(data):
        return APPENDED_ZIP
    return kind


APPENDED_ZIP = "zip archive (appended)"


# --------------------------------------------------------------------------------------------
# Zip


def _read_zip(data: bytes, *, limits: UploadLimits) -> tuple[list[UploadedFile], list[Finding]]:
    cd_offset, cd_size, count = _find_central_directory(data)
    if count > limits.max_entries:
        raise _too_many(count, limits)
    entries = _parse_central_directory(data, cd_offset, cd_size, count, limits=limits)
    spans = _locate_members(data, entries, cd_offset=cd_offset)

    findings: list[Finding] = []
    wanted: list[_Span] = []
    seen: dict[str, str] = {}
    for span in spans:
        entry = span.entry
        _check_path(entry.name)
        if entry.alt_name is not None:
            _check_path(entry.alt_name)
        _check_file_type(entry)
        key = _fold(entry.name)
        if key in seen:
            raise _refuse(ErrorCode.DUPLICATE_MEMBER,
                          f"the archive holds {_clean(entry.name)!r} more than once: "
                          "rename one of them and make the archive again",
                          details=[_clean(seen[key]), _clean(entry.name)])
        seen[key] = entry.name
        if entry.is_dir:
            findings.append(_ignored(_clean(entry.name), "a folder entry"))
        elif _is_ignored(entry.name):
            findings.append(_ignored(_clean(entry.name), "a system file"))
        else:
            wanted.append(span)
    if len(wanted) > limits.max_members:
        raise _refuse(ErrorCode.TOO_MANY_MEMBERS,
                      f"the archive holds {len(wanted)} files; at most {limits.max_members} "
                      "are accepted")
    _check_declared_sizes([s.entry for s in wanted], archive_bytes=len(data), limits=limits)

    names = _display_names([s.entry.name for s in wanted])
    files: list[UploadedFile] = []
    for span, name in zip(wanted, names, strict=True):
        unreadable = _unreadable(name, span.entry)
        if unreadable is not None:
            # One member with a password (or made by a tool with an exotic method) is that
            # photo's problem: the others are read, as for a file too large.
            files.append(unreadable)
        elif span.entry.size > limits.max_member_bytes:
            # Known from the declared size: not one byte of it is decompressed.
            files.append(_too_large(name, span.entry.size, limits=limits))
        else:
            files.append(_inflate(data, span, name=name))
    return _without_sidecars(files, findings), findings


def _find_central_directory(data: bytes) -> tuple[int, int, int]:
    """(offset, size, entry count) of the central directory, from the end record."""
    size = len(data)
    eocd_pos = -1
    # The end record is the last 22 bytes unless a comment follows it; search the window a
    # comment can occupy, nearest the end first, and take the record whose comment ends the file.
    low = max(0, size - _EOCD.size - _MAX_COMMENT)
    pos = data.rfind(_SIG_EOCD, low)
    followed = False  # an end record whose comment ends before the file does
    while pos >= 0:
        if pos + _EOCD.size <= size:
            comment_len = _EOCD.unpack_from(data, pos)[7]
            if pos + _EOCD.size + comment_len == size:
                eocd_pos = pos
                break
            followed = followed or pos + _EOCD.size + comment_len < size
        pos = data.rfind(_SIG_EOCD, low, pos)
    if eocd_pos < 0 and followed:
        # Refused still (what follows could hide another end record), but not as "not a zip":
        # zipfile and unzip open it, so the user would not believe that.
        raise _refuse(ErrorCode.BAD_ARCHIVE,
                      "the upload is a zip archive with bytes after its end; make the zip again")
    if eocd_pos < 0:
        raise _refuse(ErrorCode.BAD_ARCHIVE, "the upload is not a zip archive")
    _sig, disk, cd_disk, disk_entries, entries, cd_size, cd_offset, _c = _EOCD.unpack_from(
        data, eocd_pos)
    directory_end = eocd_pos
    locator = eocd_pos - _Z64_LOCATOR.size
    if locator >= 0 and data[locator:locator + 4] == _SIG_Z64_LOCATOR:
        _s, z64_disk, z64_offset, disks = _Z64_LOCATOR.unpack_from(data, locator)
        if z64_disk != 0 or disks > 1:
            raise _refuse(ErrorCode.BAD_ARCHIVE, "multi-part (spanned) zip archives are not supported")
        if z64_offset + _Z64_EOCD.size > locator or data[z64_offset:z64_offset + 4] != _SIG_Z64_EOCD:
            raise _refuse(ErrorCode.BAD_ARCHIVE, "the zip64 end record is damaged")
        (_s2, record_size, _made, _need, disk, cd_disk, disk_entries, entries, cd_size,
         cd_offset) = _Z64_EOCD.unpack_from(data, z64_offset)
        if z64_offset + 12 + record_size != locator:
            raise _refuse(ErrorCode.BAD_ARCHIVE, "the zip64 end record is damaged")
        directory_end = z64_offset
    if disk != 0 or cd_disk != 0 or disk_entries != entries:
        raise _refuse(ErrorCode.BAD_ARCHIVE, "multi-part (spanned) zip archives are not supported")
    # The directory must end exactly where the end record starts: this refuses data prepended
    # to the archive (self-extractors, polyglots) and directories that point elsewhere.
    if cd_offset + cd_size != directory_end:
        raise _refuse(ErrorCode.BAD_ARCHIVE, "the zip archive's directory is damaged or misplaced")
    return cd_offset, cd_size, entries


def _parse_central_directory(
    data: bytes, cd_offset: int, cd_size: int, count: int, *, limits: UploadLimits
) -> list[_Entry]:
    end = cd_offset + cd_size
    pos = cd_offset
    entries: list[_Entry] = []
    while pos < end:
        if len(entries) >= limits.max_entries:  # the end record's count may lie
            raise _too_many(len(entries) + 1, limits, at_least=True)
        if pos + _CENTRAL.size > end:
            raise _refuse(ErrorCode.BAD_ARCHIVE, "the zip archive's directory is truncated")
        (sig, _made_by, _needed, flags, method, _time, _date, crc, csize, usize, name_len,
         extra_len, comment_len, _disk, _internal, external, offset) = _CENTRAL.unpack_from(data, pos)
        if sig != _SIG_CENTRAL:
            raise _refuse(ErrorCode.BAD_ARCHIVE, "the zip archive's directory is damaged")
        name_start = pos + _CENTRAL.size
        extra_start = name_start + name_len
        next_pos = extra_start + extra_len + comment_len
        if next_pos > end:
            raise _refuse(ErrorCode.BAD_ARCHIVE, "the zip archive's directory is truncated")
        raw_name = data[name_start:extra_start]
        extra = data[extra_start:extra_start + extra_len]
        usize, csize, offset = _zip64_sizes(extra, usize, csize, offset)
        # Windows PowerShell's Compress-Archive writes folder\01.jpg: a backslash separates, as
        # Info-ZIP and libarchive read it. Normalised before any check, so ..\x, \x and C:\x
        # are refused as the paths they are.
        decoded, dos_name = _decode_name(raw_name, flags)
        name = decoded.replace("\\", "/")
        _check_name_length(name, len(raw_name))
        alt_name = _unicode_path(extra, raw_name)
        if alt_name is None and dos_name is not None:
            alt_name = dos_name.replace("\\", "/")
        elif alt_name is not None:
            # The name its maker meant, where the plain one holds only what a code page could
            # (Windows tools write "??.jpg" for 写真.jpg): shown. The plain one is what other
            # extractors show: both are held to the same bounds and paths.
            alt_name = alt_name.replace("\\", "/")
            _check_name_length(alt_name, len(alt_name.encode("utf-8")))
            name, alt_name = alt_name, name
        entries.append(_Entry(
            raw_name=raw_name, name=name, alt_name=alt_name, flags=flags, method=method, crc=crc,
            compressed_size=csize, size=usize, header_offset=offset, external_attr=external,
        ))
        pos = next_pos
    if len(entries) != count:
        raise _refuse(ErrorCode.BAD_ARCHIVE, "the zip archive's directory disagrees with its end record")
    return entries


def _extra_fields(extra: bytes) -> Iterable[tuple[int, bytes]]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if pos + 4 + length > len(extra):
            raise _refuse(ErrorCode.BAD_ARCHIVE, "a zip entry's extra field is damaged")
        yield tag, extra[pos + 4:pos + 4 + length]
        pos += 4 + length


def _zip64_sizes(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    if 0xFFFFFFFF not in (usize, csize, offset):
        return usize, csize, offset
    for tag, body in _extra_fields(extra):
        if tag != 0x0001:
            continue
        # The zip64 field holds, in this order, only the values whose 32-bit field is saturated.
        values = [usize, csize, offset]
        pos = 0
        for index in range(3):
            if values[index] == 0xFFFFFFFF:
                if pos + 8 > len(body):
                    raise _refuse(ErrorCode.BAD_ARCHIVE, "a zip entry's zip64 field is damaged")
                values[index] = struct.unpack_from("<Q", body, pos)[0]
                pos += 8
        return values[0], values[1], values[2]
    raise _refuse(ErrorCode.BAD_ARCHIVE, "a zip entry's zip64 field is missing")


def _decode_name(raw: bytes, flags: int) -> tuple[str, str | None]:
    """The name as its maker meant it, and the plain cp437 reading when that is another path
    (a Shift-JIS name whose second byte is a backslash), which other extractors may use."""
    if flags & _FLAG_UTF8:
        return raw.decode("utf-8", "replace"), None
    try:
        # Info-ZIP's zip (Linux, macOS) and macOS's Archive Utility write UTF-8 without the
        # flag: read as cp437, Zoë.jpg showed as Zo├½.jpg. Names in a DOS code page are
        # almost never valid UTF-8 (an accented letter would have to follow a box-drawing one).
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        pass
    dos = raw.decode("cp437")
    try:
        # Windows in Japanese writes its code page, Shift-JIS (cp932), unflagged: read as
        # cp437, 写真.jpg showed as Ä╩É^.jpg. Windows in a Western language writes its OEM code
        # page (cp437, cp850) the same way, and most accented names read as cp932 too (ü, ö are
        # lead bytes, ñ is a half-width katakana: Björk.jpg reads Bj排k.jpg), so cp932 is
        # taken only when the cp437 reading is plainly garbled and the cp932 one is plainly
        # Japanese.
        japanese = raw.decode("cp932")
    except UnicodeDecodeError:
        return dos, None
    # 0x5C, the backslash, is a trail byte in cp932 (表 is 95 5C): read as cp437 it splits the
    # name into a folder and a file, which is garbling too.
    split = raw.count(b"\\") > japanese.count("\\")
    if not (_reads_japanese(japanese) and (split or _garbled_dos(dos))):
        return dos, None
    # The cp437 reading is then held to the same path checks, as other extractors may use it.
    return japanese, (dos if b"\\" in raw else None)


# What cp437 shows for the bytes no Western name holds: box drawing and blocks (B0-DF), the
# Greek and math signs (E0-FF, but for ß), and ₧ ⌐ ¬. Shift-JIS's second bytes land there.
_DOS_GARBLE = frozenset(
    bytes([*range(0xB0, 0x100), 0x9E, 0xA9, 0xAA]).replace(b"\xe1", b"").decode("cp437"))


def _garbled_dos(name: str) -> bool:
    return any(c in _DOS_GARBLE for c in name)


def _reads_japanese(name: str) -> bool:
    """ASCII and full-width Japanese only (kana, kanji, their punctuation and full-width
    letters), so not the half-width katakana an accented cp437 letter reads as."""
    return any(ord(c) >= 0x80 for c in name) and all(
        ord(c) < 0x80
        or 0x3000 <= ord(c) <= 0x30FF  # full-width punctuation, hiragana, katakana
        or 0x3400 <= ord(c) <= 0x4DBF or 0x4E00 <= ord(c) <= 0x9FFF  # kanji
        or 0xF900 <= ord(c) <= 0xFAFF  # compatibility kanji
        or 0xFF01 <= ord(c) <= 0xFF5E  # full-width letters and digits
        for c in name)


def _unicode_path(extra: bytes, raw_name: bytes) -> str | None:
    for tag, body in _extra_fields(extra):
        # Info-ZIP Unicode Path: version 1, CRC-32 of the plain name, then the UTF-8 name.
        if (tag == 0x7075 and len(body) >= 5 and body[0] == 1
                and struct.unpack_from("<I", body, 1)[0] == zlib.crc32(raw_name)):
            return body[5:].decode("utf-8", "replace")
    return None


def _locate_members(data: bytes, entries: list[_Entry], *, cd_offset: int) -> list[_Span]:
    """Each member's data range, from its local header, checked to overlap no other member and
    to agree with the directory."""
    spans: list[_Span] = []
    disagreeing: list[str] = []
    for entry in entries:
        pos = entry.header_offset
        if pos + _LOCAL.size > cd_offset:
            raise _refuse(ErrorCode.BAD_ARCHIVE, f"{_clean(entry.name)!r}: its data is outside the archive")
        (sig, _needed, flags, method, _time, _date, _crc, _csize, _usize, name_len,
         extra_len) = _LOCAL.unpack_from(data, pos)
        if sig != _SIG_LOCAL:
            raise _refuse(ErrorCode.BAD_ARCHIVE, f"{_clean(entry.name)!r}: its local header is damaged")
        data_start = pos + _LOCAL.size + name_len + extra_len
        data_end = data_start + entry.compressed_size
        if data_end > cd_offset:
            raise _refuse(ErrorCode.BAD_ARCHIVE, f"{_clean(entry.name)!r}: its data is outside the archive")
        # Tools that pick the local header over the directory must see the same member: a
        # disagreement is how an archive shows different files to different readers.
        local_name = data[pos + _LOCAL.size:pos + _LOCAL.size + name_len]
        if (local_name != entry.raw_name or method != entry.method
                or (flags & _FLAG_ENCRYPTED) != (entry.flags & _FLAG_ENCRYPTED)):
            disagreeing.append(entry.name)
        spans.append(_Span(entry=entry, data_start=data_start, data_end=data_end))
    # Overlap first: entries sharing one local header also disagree with it by name, and the
    # overlap is the more telling reason.
    ordered = sorted(spans, key=lambda s: s.entry.header_offset)
    for before, after in itertools.pairwise(ordered):
        if after.entry.header_offset < before.data_end:
            raise _refuse(
                ErrorCode.OVERLAPPING_ENTRIES,
                f"the archive entries {_clean(before.entry.name)!r} and "
                f"{_clean(after.entry.name)!r} share bytes (a zip bomb technique)")
    if disagreeing:
        raise _refuse(ErrorCode.BAD_ARCHIVE,
                      f"{_clean(disagreeing[0])!r}: its local header disagrees with the directory")
    return spans


def _check_name_length(name: str, size: int, *, what: str = "the archive entry",
                       redo: str = "zip the photos again") -> None:
    """Refuses a name over the bounds (``size``: its length in bytes as sent) before anything
    normalises it in full."""
    parts = name.replace("\\", "/").split("/")
    if size > _MAX_NAME_BYTES or any(len(part) > _MAX_PART_CHARS for part in parts):
        raise _refuse(ErrorCode.NAME_TOO_LONG,
                      f"{what} {_clean(name)!r} has a name longer than {_MAX_PART_CHARS} "
                      f"characters (or a path longer than {_MAX_NAME_BYTES} bytes); rename it "
                      f"and {redo}")


def _check_path(name: str) -> None:
    parts = name.split("/")
    unsafe = (
        name == "" or name.startswith("/") or "\x00" in name
        or _DRIVE.match(name) is not None or any(part == ".." for part in parts)
    )
    if unsafe:
        raise _refuse(ErrorCode.UNSAFE_PATH,
                      f"the archive entry {_clean(name)!r} has an unsafe path (absolute, '..' "
                      "or a drive letter)")


def _check_file_type(entry: _Entry) -> None:
    mode = entry.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if stat.S_ISLNK(mode) or entry.external_attr & _FILE_ATTRIBUTE_REPARSE_POINT:
        raise _refuse(ErrorCode.SYMLINK_IN_ARCHIVE,
                      f"the archive entry {_clean(entry.name)!r} is a symbolic link")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise _refuse(ErrorCode.SPECIAL_FILE,
                      f"the archive entry {_clean(entry.name)!r} is not a regular file")


def _unreadable(name: str, entry: _Entry) -> UploadedFile | None:
    """A member this reader cannot decompress, as its finding (none of its bytes), or None."""
    if entry.flags & (_FLAG_ENCRYPTED | _FLAG_STRONG_ENCRYPTION) or entry.method == _METHOD_AES:
        return UploadedFile(name=name, data=b"", refused=Finding(
            "reject", "password_protected", f"{name} is password-protected in the archive",
            "make the zip again without a password, or upload the photo itself", photo=name))
    if entry.method not in _METHOD_NAMES:
        return UploadedFile(name=name, data=b"", refused=Finding(
            "reject", "unsupported_compression",
            f"{name} is compressed with method {entry.method}, which cannot be read",
            "make the zip with your system's \"Compress\" command, or upload the photo itself",
            photo=name))
    return None


def _check_declared_sizes(entries: list[_Entry], *, archive_bytes: int,
                          limits: UploadLimits) -> None:
    # Declared sizes are checked first so honest big archives are refused before any work; the
    # reading then holds every member to its declared size, so these limits bound memory too.
    # A member declared larger than a photo may be is that member's finding, not a refusal
    # (it is never decompressed), but it still counts here: the total and the ratios are the
    # machine's protection, whatever each member is.
    for entry in entries:
        if entry.method == _METHOD_STORED and entry.size != entry.compressed_size:
            # A stored member's size is its bytes': a declaration that says otherwise lies.
            raise _size_mismatch(_clean(entry.name))
    total = sum(e.size for e in entries)
    if total > limits.max_total_bytes:
        raise _refuse(ErrorCode.ARCHIVE_TOO_LARGE,
                      f"the archive decompresses to more than {limits.mib(limits.max_total_bytes)}")
    for entry in entries:
        if entry.size > max(limits.ratio_min_bytes, limits.max_ratio * entry.compressed_size):
            raise _refuse(ErrorCode.COMPRESSION_RATIO,
                          f"{_clean(entry.name)} is compressed more than {limits.max_ratio}:1 "
                          "(photos barely compress; this is a zip bomb pattern)")
    if total > max(limits.ratio_min_bytes, limits.max_ratio * archive_bytes):
        raise _refuse(ErrorCode.COMPRESSION_RATIO,
                      f"the archive is compressed more than {limits.max_ratio}:1 "
                      "(photos barely compress; this is a zip bomb pattern)")


def _inflate(data: bytes, span: _Span, *, name: str) -> UploadedFile:
    """The member, its bytes never more than its declared size (CVE-2024-0450: the size a zip
    declares is a claim, so the output is counted as it is produced); an archive inside the
    archive is refused from its first bytes, decompressed no further."""
    entry = span.entry
    compressed = memoryview(data)[span.data_start:span.data_end]
    if entry.method == _METHOD_STORED:
        if len(compressed) != entry.size:
            raise _size_mismatch(name)
        pieces: Iterator[bytes | memoryview] = _slices(compressed)
    elif entry.method == _METHOD_DEFLATED:
        pieces = _deflate(compressed, entry.size, name=name)
    else:
        pieces = _bunzip(compressed, entry.size, name=name)
    out = bytearray()
    looked = False
    try:
        for piece in pieces:
            out += piece
            if not looked and len(out) >= _HEAD_BYTES:
                looked = True
                kind = _leading_archive(bytes(out[:_HEAD_BYTES]))
                if kind is not None:
                    return _nested(name, kind, inside="inside the archive")
    except (zlib.error, OSError, ValueError, EOFError) as exc:  # a corrupt compressed stream
        logger.debug("cannot decompress %s: %r", name, exc)
        raise _refuse(ErrorCode.BAD_ARCHIVE, f"{name} is damaged in the archive") from None
    if len(out) != entry.size:
        raise _size_mismatch(name)
    if zlib.crc32(out) != entry.crc:
        raise _refuse(ErrorCode.BAD_ARCHIVE, f"{name} is damaged in the archive (checksum mismatch)")
    blob = bytes(out)
    del out
    kind = archive_kind(blob)  # a short member's head, or a zip appended to a photo
    return UploadedFile(name=name, data=blob) if kind is None \
        else _nested(name, kind, inside="inside the archive")


def _room(produced: int, limit: int) -> int:
    """How many bytes to produce next: the head first (``_HEAD_BYTES``, which says whether the
    member is an archive, so that one is decompressed no further), then a chunk at a time; at
    most one byte more than declared (that byte proves the declaration false; never 0, which
    zlib would read as "unlimited")."""
    step = _HEAD_BYTES - produced if produced < _HEAD_BYTES else _CHUNK
    return min(limit - produced + 1, step)


def _slices(stored_bytes: memoryview) -> Iterator[memoryview]:
    at = 0
    while at < len(stored_bytes):
        piece = stored_bytes[at:at + _room(at, len(stored_bytes))]
        at += len(piece)
        yield piece


def _deflate(compressed: memoryview, limit: int, *, name: str) -> Iterator[bytes]:
    engine = zlib.decompressobj(-15)
    produced = 0
    fed = 0
    while not engine.eof:
        room = _room(produced, limit)
        if engine.unconsumed_tail:
            piece = engine.decompress(engine.unconsumed_tail, room)
        elif fed < len(compressed):
            piece = engine.decompress(compressed[fed:fed + _CHUNK], room)
            fed += _CHUNK
        else:
            piece = engine.decompress(b"", room)  # output still held inside zlib, if any
            if not piece:
                raise _refuse(ErrorCode.BAD_ARCHIVE, f"{name} is cut off inside the archive")
        produced += len(piece)
        if produced > limit:
            raise _size_mismatch(name)
        yield piece


def _bunzip(compressed: memoryview, limit: int, *, name: str) -> Iterator[bytes]:
    engine = bz2.BZ2Decompressor()
    produced = 0
    fed = 0
    while not engine.eof:
        room = _room(produced, limit)
        if engine.needs_input:
            if fed >= len(compressed):
                raise _refuse(ErrorCode.BAD_ARCHIVE, f"{name} is cut off inside the archive")
            chunk = bytes(compressed[fed:fed + _CHUNK])
            fed += _CHUNK
        else:
            chunk = b""
        piece = engine.decompress(chunk, room)
        produced += len(piece)
        if produced > limit:
            raise _size_mismatch(name)
        yield piece


def _size_mismatch(name: str) -> InvalidInputError:
    return _refuse(ErrorCode.SIZE_MISMATCH,
                   f"{name} does not have the size the archive declares (a zip bomb pattern or a "
                   "damaged archive)")


# --------------------------------------------------------------------------------------------
# Folders


def _read_folder(path: Path, *, limits: UploadLimits) -> tuple[list[UploadedFile], list[Finding]]:
    findings: list[Finding] = []
    chosen: list[os.DirEntry[str]] = []
    scanned = 0
    with os.scandir(path) as listing:
        for entry in listing:
            scanned += 1
            if scanned > limits.max_entries:
                raise _too_many(scanned, limits, at_least=True)
            if entry.is_symlink():
                # Never followed: a link can point anywhere on this machine.
                findings.append(_ignored(_clean(entry.name), "a symbolic link"))
            elif entry.is_dir():
                # Selfies kept in Pictures/2024 are the usual case: "nothing to do" beside "0
                # usable photos" left the user nothing to act on.
                name = _clean(entry.name)
                findings.append(_ignored(name, "a folder (only the top level is read)",
                                         advice=f"if your photos are in it, name the folder "
                                                f"{name} itself (or move them up)"))
            elif not entry.is_file():
                findings.append(_ignored(_clean(entry.name), "not a regular file"))
            elif _is_ignored(entry.name) or entry.name.startswith("."):
                findings.append(_ignored(_clean(entry.name), "a system or hidden file"))
            else:
                chosen.append(entry)
    if len(chosen) > limits.max_members:
        raise _too_many(len(chosen), limits)
    chosen.sort(key=lambda e: e.name)
    files: list[UploadedFile] = []
    total = 0
    for entry, name in zip(chosen, _display_names([e.name for e in chosen]), strict=True):
        with open(entry.path, "rb") as fh:
            # An archive is known from its first bytes: read no further.
            head = fh.read(_HEAD_BYTES)
            kind = _leading_archive(head)
            if kind is not None:
                files.append(_nested(name, kind, inside="in the folder"))
                continue
            # Read one byte past the limit rather than trust stat(): the file may grow meanwhile.
            blob = head + fh.read(max(0, limits.max_member_bytes + 1 - len(head)))
            if len(blob) > limits.max_member_bytes:
                size = max(len(blob), os.fstat(fh.fileno()).st_size)  # the size, for the message
                del blob
                files.append(_too_large(name, size, limits=limits))
                continue
        total += len(blob)
        if total > limits.max_total_bytes:
            raise _refuse(ErrorCode.ARCHIVE_TOO_LARGE,
                          f"the photos add up to more than {limits.mib(limits.max_total_bytes)}")
        kind = archive_kind(blob)  # a zip appended to a photo
        files.append(UploadedFile(name=name, data=blob) if kind is None
                     else _nested(name, kind, inside="in the folder"))
    return _without_sidecars(files, findings), findings


# --------------------------------------------------------------------------------------------
# Helpers


_ARCHIVE_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"PK\x03\x04", "zip archive"),
    (b"PK\x05\x06", "zip archive"),
    (b"PK\x07\x08", "zip archive"),
    (b"\x1f\x8b\x08", "gzip archive"),
    (b"7z\xbc\xaf\x27\x1c", "7-Zip archive"),
    (b"Rar!\x1a\x07", "RAR archive"),
    (b"\xfd7zXZ\x00", "xz archive"),
    (b"\x28\xb5\x2f\xfd", "zstd archive"),
    (b"MSCF\x00\x00\x00\x00", "cabinet archive"),
)
# Three-letter "BZh" alone would catch text files; the level digit and block magic make it sure.
_BZIP2 = re.compile(rb"BZh[1-9]1AY&SY")
# What ``_leading_archive`` reads: every magic above and a tar header's "ustar" (bytes 257-262).
_HEAD_BYTES = 512


def _leading_archive(data: bytes) -> str | None:
    """What archive ``data`` starts as (its first ``_HEAD_BYTES`` decide), or None."""
    head = data[:16]
    for prefix, kind in _ARCHIVE_MAGIC:
        if head.startswith(prefix):
            return kind
    if _BZIP2.match(head):
        return "bzip2 archive"
    if len(data) >= 262 and data[257:262] == b"ustar":
        return "tar archive"
    return None


def _appended_zip(data: bytes) -> bool:
    # A zip reader starts from the end: an end record near the end of a file whose directory size
    # leads back to a central directory header makes it a zip, whatever comes first. Readers are
    # lenient (zipfile and unzip open a zip followed by stray bytes, and find a zip64 record
    # right before its locator), so any end record in the last 64 KiB + 22 bytes counts, plain
    # or zip64, wherever its comment ends. Offsets are not used: in an appended zip they are off
    # by the length of what comes first, which readers work out from where the records are.
    size = len(data)
    low = max(0, size - _EOCD.size - _MAX_COMMENT)
    pos = data.rfind(_SIG_EOCD, low)
    while pos >= 0:
        if pos + _EOCD.size <= size and _directory_ends_at(data, pos, _EOCD.unpack_from(data, pos)[5]):
            return True
        pos = data.rfind(_SIG_EOCD, low, pos)
    # A zip64 locator precedes the plain end record, so its window starts that much earlier.
    pos = data.rfind(_SIG_Z64_LOCATOR, max(0, low - _Z64_LOCATOR.size))
    while pos >= 0:
        record = pos - _Z64_EOCD.size
        if (pos + _Z64_LOCATOR.size <= size and record >= 0
                and data[record:record + 4] == _SIG_Z64_EOCD
                and _directory_ends_at(data, record, _Z64_EOCD.unpack_from(data, record)[8])):
            return True
        pos = data.rfind(_SIG_Z64_LOCATOR, max(0, low - _Z64_LOCATOR.size), pos)
    return False


def _directory_ends_at(data: bytes, end: int, cd_size: int) -> bool:
    start = end - cd_size
    return cd_size > 0 and start >= 0 and data[start:start + 4] == _SIG_CENTRAL


def _too_large(name: str, size: int, *, limits: UploadLimits) -> UploadedFile:
    """A file over the size a photo may be: its finding, and none of its bytes."""
    return UploadedFile(name=name, data=b"", refused=Finding(
        "reject", "file_too_large",
        f"{name} is {limits.over_limit(size)}, over the {limits.mib(limits.max_member_bytes)} "
        "a photo may be",
        "export it as JPEG (a camera raw or ProRAW file is far larger than a photo needs)",
        photo=name))


def _nested(name: str, kind: str, *, inside: str) -> UploadedFile:
    """An archive inside the upload: its finding, and none of its bytes."""
    if kind == APPENDED_ZIP:
        # A photo with a zip after it (a polyglot): a photo to send again, not one to unpack.
        message = f"{name} has a zip archive appended to it"
        advice = "export the photo again as a plain JPEG and upload that"
    else:
        message = f"{name} is an archive {inside} (a {kind})"
        advice = "unpack it and upload its photos"
    return UploadedFile(name=name, data=b"", refused=Finding(
        "reject", "nested_archive", message, advice, photo=name))


def _is_ignored(name: str) -> bool:
    parts = [p for p in name.replace("\\", "/").split("/") if p]
    if not parts:
        return False
    base = parts[-1]
    return (any(p.casefold() in _IGNORED_DIRS for p in parts[:-1]) or base.startswith("._")
            or base.casefold() in _IGNORED_NAMES)


def _without_sidecars(files: list[UploadedFile], findings: list[Finding]) -> list[UploadedFile]:
    """``files`` less the side files of a phone export, each noted in ``findings``."""
    photo_names = [f.name for f in files
                   if os.path.splitext(f.name)[1].casefold() in _PHOTO_SUFFIXES]
    stems = {_fold(os.path.splitext(name)[0]) for name in photo_names}
    photos = {_fold(name) for name in photo_names}
    out: list[UploadedFile] = []
    for f in files:
        stem, suffix = os.path.splitext(f.name)
        suffix = suffix.casefold()
        if suffix in _EDIT_SIDECARS:
            findings.append(_ignored(f.name, "an iPhone edit file (.AAE), not a photo"))
        elif suffix == _TAKEOUT_SIDECAR and _describes_a_photo(_fold(stem), photos, stems):
            findings.append(_ignored(f.name, "a Google Takeout metadata file (.json), not a "
                                             "photo"))
        elif (suffix in _LIVE_VIDEOS and f.data[4:8] == b"ftyp"  # by content, not only name
              and (_fold(stem) in stems
                   or (f.data[8:12] == b"qt  " and _IPHONE_NAME.fullmatch(stem)))):
            findings.append(_ignored(f.name, "the video of a Live Photo, not a photo"))
        elif (suffix in _DOCUMENTS and f.refused is None
              and not sniff_image(f.data).is_image):
            findings.append(_ignored(f.name, f"a document ({suffix}), not a photo"))
        else:
            out.append(f)
    return out


def _describes_a_photo(stem: str, photos: set[str], stems: set[str]) -> bool:
    """Whether a .json file's name (less .json, folded) is a Takeout side file of a photo of the
    upload: the photo's name, its stem, or the photo's name and a (possibly cut) suffix such as
    ".supplemental-metadata"; Takeout's name for the second IMG_0001(1).jpg's,
    IMG_0001.jpg(1).json; and an album folder's metadata.json. Only beside a photo: a lone
    .json is the user's own upload."""
    if not photos:
        return False
    numbered = _TAKEOUT_NUMBERED.fullmatch(stem)
    return (stem in photos or stem in stems
            or any(stem.startswith(photo + ".") for photo in photos)
            or (numbered is not None
                and f"{numbered['name']}({numbered['n']}){numbered['ext']}" in photos)
            or stem.replace("\\", "/").rsplit("/", 1)[-1] == "metadata")


def _fold(name: str) -> str:
    # macOS writes decomposed (NFD) names, others composed: "é" twice is one name.
    return unicodedata.normalize("NFC", name).casefold()


def _clean(text: str) -> str:
    # Only the ends of an overlong text are shown, so only they are normalised: NFC is
    # quadratic in a run of combining marks. (Names that are read are within the bounds.)
    if len(text) > _MAX_NAME_BYTES:
        text = text[:60] + "..." + text[-40:]
    # Control and format characters (bidi overrides can make "gpj.exe" read "exe.jpg") go.
    kept = "".join(ch for ch in unicodedata.normalize("NFC", text)
                   if unicodedata.category(ch) not in ("Cc", "Cf", "Cs"))
    return kept if len(kept) <= 100 else kept[:60] + "..." + kept[-37:]


def _display_names(raw_names: list[str]) -> list[str]:
    """Basenames for display; where two collide, the cleaned path tells them apart (findings
    are matched to photos by name, so names must be unique, whatever their case or form).

    A folder (Linux allows it) or a cleaned path can still hold names that fold alike. Each is
    shown as it is, with a note the user can act on, never an invented name ('café.JPG (2)' named
    no file on disk): names that still look the same (one é composed, NFC, one decomposed, NFD,
    as macOS writes it; or a name holding an invisible character that cleaning took out) are
    shown with their code points; names that differ only in case are numbered in their group."""
    bases = [display_name(n) or "photo" for n in raw_names]
    counts = Counter(_fold(base) for base in bases)
    names = [base if counts[_fold(base)] == 1 else _clean(raw.strip("/")) or base
             for raw, base in zip(raw_names, bases, strict=True)]
    looks = Counter(names)
    names = [f"{name} (as written: {_code_points(raw.strip('/'))})" if looks[name] > 1 else name
             for raw, name in zip(raw_names, names, strict=True)]
    alike = Counter(_fold(name) for name in names)
    nth: Counter[str] = Counter()
    shown: list[str] = []
    used: set[str] = set()
    for name in names:
        key = _fold(name)
        if alike[key] > 1:
            nth[key] += 1
            name = f"{name} ({nth[key]} of {alike[key]} names that differ only in case)"
        candidate, n = name, 2
        # Names unique whatever comes (no name known to need it): the notes above tell apart
        # every set of names a folder or an archive can hold.
        while _fold(candidate) in used:
            candidate = f"{name} ({n})"
            n += 1
        used.add(_fold(candidate))
        shown.append(candidate)
    return shown


def _code_points(text: str) -> str:
    """``text`` in printable ASCII: a backslash or a quote after a backslash, and each other
    character as \\u or \\U and its code point, as bash's $'...' and Python read it
    ('cafe\\u0301.JPG'), so the user can tell the names apart and rename one."""
    out = "".join("\\" + ch if ch in "\\'" else ch if " " <= ch <= "~"
                  else f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}"
                  for ch in text)
    return out if len(out) <= 200 else out[:120] + "..." + out[-77:]


def _ignored(name: str, what: str, *,
             advice: str = "nothing to do: only photos are read") -> Finding:
    return Finding("info", "ignored_file", f"{name} was skipped: {what}", advice, photo=name)


def _too_many(count: int, limits: UploadLimits, *, at_least: bool = False) -> InvalidInputError:
    shown = f"more than {count - 1}" if at_least else str(count)
    return _refuse(ErrorCode.TOO_MANY_MEMBERS,
                   f"the upload holds {shown} entries; at most {limits.max_members} photos "
                   f"({limits.max_entries} entries in all) are accepted")


def too_many_parts(detail: str, *, limits: UploadLimits) -> InvalidInputError | None:
    """The intake's ``too_many_members`` refusal of a multipart upload the form parser stopped
    before the intake counted its files: Starlette refuses a form of more than 1000 files or
    fields (its ``max_files``/``max_fields``) with a 400 whose ``detail`` is "Too many files.
    Maximum number of files is 1000." (or fields). That form is well made, only too big, so it
    gets the answer 201 files get, not "the body could not be read". None for any other
    detail."""
    found = re.fullmatch(r"Too many (files|fields)\. Maximum number of \1 is (\d+)\.", detail)
    if found is None:
        return None
    kind, most = found.groups()
    sent = "files" if kind == "files" else "form fields"
    return _refuse(ErrorCode.TOO_MANY_MEMBERS,
                   f"more than {most} {sent} sent; at most {limits.max_members} files are "
                   "accepted")


def _refuse(code: ErrorCode, message: str, *, details: list[str] | None = None) -> InvalidInputError:
    return InvalidInputError(message, code=code, details=details or [])
