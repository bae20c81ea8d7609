"""The archive and multi-file readers: every hostile archive of the corpus refused with its own
code, ordinary archives (Mac, Windows, streamed, zip64) read."""

from __future__ import annotations

import bz2
import io
import os
import struct
import tracemalloc
import unicodedata
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selfie_lora.dataset.archive import (
    archive_kind,
    display_name,
    read_path,
    read_uploaded_files,
    read_zip,
    uploaded_name,
)
from selfie_lora.dataset.limits import MIB, UploadedFile, UploadLimits, byte_size
from selfie_lora.domain.entities import Finding
from selfie_lora.errors import InvalidInputError, ServerShortOfMemoryError
from tests.support.hostile import (
    ARCHIVE_BYTES,
    MEMBER_BYTES,
    Raw,
    deflated_zeros,
    jpeg,
    long_name_zip,
    long_unicode_path_zip,
    many_empty_members,
    polyglot_jpeg_zip,
    quoted_overlap_zip,
    raw_zip,
    slow_to_normalise,
    stored,
    unicode_path,
    with_zip64_end,
    zip_of,
)

LIMITS = UploadLimits()


def _refused(call: Callable[[], object]) -> str:
    with pytest.raises(InvalidInputError) as caught:
        call()
    assert caught.value.message
    return caught.value.code


def _refusal(files: list[UploadedFile], name: str) -> Finding:
    """The finding of the file ``name`` refused on its own while reading (none of its bytes)."""
    (found,) = [f for f in files if f.name == name]
    assert found.refused is not None, name
    assert found.data == b""
    assert found.refused.severity == "reject"
    assert found.refused.photo == name
    return found.refused


@pytest.mark.parametrize(("key", "code"), [(k, c) for k, (_b, c) in ARCHIVE_BYTES.items()],
                         ids=list(ARCHIVE_BYTES))
def test_corpus_archives_are_refused_with_their_code(key: str, code: str) -> None:
    data = ARCHIVE_BYTES[key][0]()
    tracemalloc.start()
    try:
        got = _refused(lambda: read_zip(data, limits=LIMITS))
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == code
    assert peak < 20 * 1024 * 1024  # refused before any bomb expands


def test_the_quoted_overlap_zip_is_a_real_bomb_for_zipfile() -> None:
    # The stdlib reader of this Python extracts it (overlapping members); ours refuses it.
    small = quoted_overlap_zip(files=3, kernel_bytes=1000)
    with zipfile.ZipFile(io.BytesIO(small)) as zf:
        sizes = [len(zf.read(name)) for name in zf.namelist()]
    assert sizes[0] > sizes[1] > sizes[2] == 1000
    assert sum(sizes) > len(small) * 2
    assert _refused(lambda: read_zip(small, limits=LIMITS)) == "overlapping_entries"


def test_ten_thousand_members_are_refused_in_little_memory() -> None:
    # Refused from the central directory's count, before any member is read: no list of 10,000
    # entries is ever built. (How fast is a benchmark's business, not a unit test's.)
    data = many_empty_members(10_000)
    tracemalloc.start()
    try:
        assert _refused(lambda: read_zip(data, limits=LIMITS)) == "too_many_members"
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


def test_the_upload_size_is_checked_first() -> None:
    data = zip_of({"a.jpg": jpeg()})
    assert _refused(lambda: read_zip(data, limits=UploadLimits(max_upload_bytes=100))) == \
        "upload_too_large"


def test_data_before_the_archive_is_refused() -> None:
    assert _refused(lambda: read_zip(b"MZ" + bytes(100) + zip_of({"a.jpg": jpeg()}),
                                     limits=LIMITS)) == "bad_archive"


def test_too_many_photos_counted_before_reading() -> None:
    data = zip_of({f"{i}.jpg": b"x" for i in range(201)})
    assert _refused(lambda: read_zip(data, limits=LIMITS)) == "too_many_members"


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED,
                                         zipfile.ZIP_BZIP2])
def test_ordinary_zips_are_read(compression: int) -> None:
    photos = {f"holiday/{i}.jpg": jpeg(seed=i) for i in range(3)}
    files, findings = read_zip(zip_of(photos, compression=compression), limits=LIMITS)
    assert [(f.name, f.data) for f in files] == [(n.split("/")[1], b) for n, b in photos.items()]
    assert findings == []


def test_a_mac_zip_skips_system_files_with_info_findings() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("selfies/", b"")
        zf.writestr("selfies/a.jpg", jpeg(seed=1))
        zf.writestr("__MACOSX/", b"")
        zf.writestr("__MACOSX/selfies/._a.jpg", b"\x00\x05\x16\x07 AppleDouble")
        zf.writestr("selfies/.DS_Store", b"Bud1")
        zf.writestr("selfies/Thumbs.db", b"\xd0\xcf")
        zf.writestr("selfies/desktop.ini", b"[.ShellClassInfo]")
    files, findings = read_zip(buf.getvalue(), limits=LIMITS)
    assert [f.name for f in files] == ["a.jpg"]
    assert len(findings) == 6
    assert {f.severity for f in findings} == {"info"}
    assert {f.code for f in findings} == {"ignored_file"}


def read_every_way(members: dict[str, bytes], folder: Path
                   ) -> list[tuple[list[UploadedFile], list[Finding]]]:
    """``members`` read as a zip, as files sent one by one and as a folder (written into
    ``folder``): what each of the three readers gives."""
    for name, blob in members.items():
        (folder / name).write_bytes(blob)
    return [read_zip(zip_of(members), limits=LIMITS),
            read_uploaded_files(list(members.items()), limits=LIMITS),
            read_path(folder, limits=LIMITS)]


# The start of a QuickTime movie, as an iPhone writes a Live Photo's video.
_MOV = b"\x00\x00\x00\x14ftypqt  \x00\x00\x00\x00qt  " + bytes(64)


def test_an_iphone_export_skips_its_side_files_with_info_findings(tmp_path: Path) -> None:
    """IMG_0002.AAE (an edit file) and IMG_0002.MOV (a Live Photo's video) were read as photos,
    rejected as not_an_image and counted as photos left out against the set's score."""
    members = {"IMG_0002.JPG": jpeg(seed=1), "IMG_0002.AAE": b"<?xml version='1.0'?><plist/>",
               "IMG_0002.MOV": _MOV, "IMG_0004.MOV": _MOV, "holiday.mov": _MOV,
               "notes.aae.jpg": jpeg(seed=2)}
    for files, findings in read_every_way(members, tmp_path):
        # A video neither beside a photo of its name nor named by the iPhone camera is the
        # user's own upload: left to be refused as not a photo.
        assert sorted(f.name for f in files) == ["IMG_0002.JPG", "holiday.mov", "notes.aae.jpg"]
        assert sorted((f.photo, f.severity, f.code) for f in findings) == [
            ("IMG_0002.AAE", "info", "ignored_file"), ("IMG_0002.MOV", "info", "ignored_file"),
            ("IMG_0004.MOV", "info", "ignored_file")]


def _windows_zip(members: dict[str, bytes]) -> bytes:
    """A zip as Windows PowerShell's Compress-Archive writes it: backslash separators, made on
    MS-DOS (FAT attributes), a folder entry ending in a backslash."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, blob in members.items():
            info = zipfile.ZipInfo(name)
            info.create_system = 0
            info.external_attr = 0x10 if name.endswith("\\") else 0x20  # directory / archive
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, blob)
    return buf.getvalue()


def test_a_powershell_zip_with_backslash_separators_is_read() -> None:
    """Compress-Archive's folder\\01.jpg was refused as an unsafe path: Windows users could not
    upload the zip their system made."""
    data = _windows_zip({"selfies\\": b"", "selfies\\01.jpg": jpeg(seed=1),
                         "selfies\\more\\02.jpg": jpeg(seed=2),
                         "selfies\\Thumbs.db": b"\xd0\xcf"})
    files, findings = read_zip(data, limits=LIMITS)
    assert [f.name for f in files] == ["01.jpg", "02.jpg"]
    assert [f.message for f in findings] == ["selfies/ was skipped: a folder entry",
                                             "selfies/Thumbs.db was skipped: a system file"]


@pytest.mark.parametrize("name", ["..\\x.jpg", "selfies\\..\\..\\x.jpg", "\\x.jpg",
                                  "\\\\server\\share\\x.jpg", "C:\\Users\\x.jpg"])
def test_backslash_paths_out_of_the_folder_are_still_unsafe(name: str) -> None:
    assert _refused(lambda: read_zip(_windows_zip({name: jpeg()}), limits=LIMITS)) == \
        "unsafe_path"


_PARTS = st.sampled_from(["a", "B", "..", ".", "", "C:", "x.jpg", "__MACOSX", "._y.jpg",
                          "Thumbs.db", "é.jpg"])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(_PARTS, min_size=1, max_size=4).map("/".join).filter(bool),
                min_size=1, max_size=5, unique=True))
def test_a_backslash_reads_as_a_slash(names: list[str]) -> None:
    """Whatever the paths, a zip naming them with backslashes is read as one naming them with
    slashes: the same photos under the same names, the same findings, the same refusals."""
    def outcome(data: bytes) -> object:
        try:
            files, findings = read_zip(data, limits=LIMITS)
        except InvalidInputError as refused:
            return refused.code
        return [(f.name, f.data) for f in files], findings

    members = {name: jpeg(seed=i) for i, name in enumerate(names)}
    with_slashes = outcome(zip_of(members))
    with_backslashes = outcome(zip_of({n.replace("/", "\\"): b for n, b in members.items()}))
    assert with_backslashes == with_slashes


def _member(raw_name: bytes, blob: bytes, **fields: Any) -> Raw:
    return Raw(name=raw_name, payload=blob, size=len(blob), crc=zlib.crc32(blob), **fields)


def test_utf_8_names_without_the_utf_8_flag_are_read_as_utf_8() -> None:
    """Info-ZIP's zip (Linux, macOS) writes UTF-8 names without the flag: read as cp437,
    "Zoë at the café.jpg" showed as "Zo├½ at the caf├⌐.jpg". Names in a DOS code page still
    read as one (b"caf\\x82" is no UTF-8)."""
    names = ["Zoë at the café.jpg", "Ünal.jpg", "写真.jpg",
             unicodedata.normalize("NFD", "José.jpg")]  # macOS writes decomposed names
    members = [_member(n.encode(), jpeg(seed=i)) for i, n in enumerate(names)]
    members.append(_member(b"caf\x82 cr\x8ame.jpg", jpeg(seed=9)))  # cp437 from an old Windows
    files, _ = read_zip(raw_zip(members), limits=LIMITS)
    assert [f.name for f in files] == ["Zoë at the café.jpg", "Ünal.jpg", "写真.jpg", "José.jpg",
                                       "café crème.jpg"]


def test_shift_jis_names_without_the_utf_8_flag_are_read_as_cp932() -> None:
    """Windows in Japanese writes names in its code page (Shift-JIS, cp932) without the flag:
    read as cp437, 写真.jpg showed as "Ä╩É^.jpg", and 表紙.jpg (95 5C 8E 86: a backslash as
    the second byte) as "Äå.jpg", cut at the backslash. UTF-8 is still tried first, and a name
    cp932 cannot read is still cp437."""
    members = [
        _member(b"\x8e\xca\x90^.jpg", jpeg(seed=1)),  # 写真.jpg in cp932
        _member(b"\x95\\\x8e\x86.jpg", jpeg(seed=2)),  # 表紙.jpg: 5C as a trail byte
        _member(b"\x8e\xa9\x8eB\x82\xe8 01.jpg", jpeg(seed=3)),  # 自撮り 01.jpg
        _member("Zoë.jpg".encode(), jpeg(seed=4)),  # macOS: UTF-8, unflagged
        _member(b"caf\x82.jpg", jpeg(seed=5)),  # cp437: 82 then "." is no cp932
    ]
    files, _ = read_zip(raw_zip(members), limits=LIMITS)
    assert [f.name for f in files] == ["写真.jpg", "表紙.jpg", "自撮り 01.jpg", "Zoë.jpg",
                                       "café.jpg"]


@pytest.mark.parametrize("codec", ["cp437", "cp850"])
def test_western_names_in_a_dos_code_page_are_not_read_as_cp932(codec: str) -> None:
    """Windows Explorer and 7-Zip on Windows in a Western language write names in the OEM code
    page (cp437, cp850) without the flag, and most accented ones also decode as cp932: read
    that way, Björk.jpg showed as "Bj排k.jpg" and España.jpg as "Espa､a.jpg"."""
    names = ["Müller.jpg", "España.jpg", "Björk.jpg", "niño.jpg", "canción.jpg", "Ångström.jpg",
             "Straße.jpg"]
    members = [_member(n.encode(codec), jpeg(seed=i)) for i, n in enumerate(names)]
    assert all(m.name.decode("cp932") != n for m, n in zip(members, names, strict=True))
    files, _ = read_zip(raw_zip(members), limits=LIMITS)
    assert [f.name for f in files] == names


@pytest.mark.parametrize("raw_name", [
    b"..\\\x8e\xca\x90^.jpg",  # ..\写真.jpg
    b"\x95\\..\\x.jpg",  # 表..\x.jpg in cp932, ò\..\x.jpg (out of the folder) in cp437
    b"\x8e\xca\x00\x90^.jpg",  # a NUL inside
])
def test_a_cp932_name_is_held_to_the_path_checks(raw_name: bytes) -> None:
    member = _member(raw_name, jpeg())
    assert _refused(lambda: read_zip(raw_zip([member]), limits=LIMITS)) == "unsafe_path"


def test_control_characters_of_a_cp932_name_are_not_shown() -> None:
    files, _ = read_zip(raw_zip([_member(b"\x8e\xca\x1b[2J\x90^.jpg", jpeg())]),
                        limits=LIMITS)
    assert [f.name for f in files] == ["写[2J真.jpg"]


def test_the_info_zip_unicode_path_is_the_name_shown_when_its_crc_matches() -> None:
    """Windows tools write what the code page can hold ("??.jpg") and the real name in an
    Info-ZIP Unicode Path field; one whose CRC no longer matches the plain name is stale (a
    tool renamed the member without updating it) and ignored."""
    fresh = _member(b"??.jpg", jpeg(seed=1), extra=unicode_path(b"??.jpg", "写真.jpg"))
    stale = _member(b"caf\x82.jpg", jpeg(seed=2),
                    extra=unicode_path(b"caf\x82.jpg", "old.jpg", crc_of=b"old.jpg"))
    files, _ = read_zip(raw_zip([fresh, stale]), limits=LIMITS)
    assert [f.name for f in files] == ["写真.jpg", "café.jpg"]


@pytest.mark.parametrize(("raw_name", "path"), [(b"a.jpg", "../a.jpg"), (b"../a.jpg", "a.jpg")])
def test_either_name_of_a_member_out_of_the_folder_is_unsafe(raw_name: bytes, path: str) -> None:
    member = _member(raw_name, jpeg(), extra=unicode_path(raw_name, path))
    assert _refused(lambda: read_zip(raw_zip([member]), limits=LIMITS)) == "unsafe_path"


def test_streamed_and_zip64_members_are_read() -> None:
    class Unseekable(io.RawIOBase):
        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, b: object) -> int:
            chunk = bytes(b)  # type: ignore[call-overload]
            self.data += chunk
            return len(chunk)

    sink = Unseekable()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_DEFLATED) as zf:  # sizes in data descriptors
        with zf.open("streamed.jpg", "w") as fh:
            fh.write(jpeg(seed=1))
        with zf.open("zip64.jpg", "w", force_zip64=True) as fh:
            fh.write(jpeg(seed=2))
    files, _ = read_zip(bytes(sink.data), limits=LIMITS)
    assert [(f.name, f.data) for f in files] == [("streamed.jpg", jpeg(seed=1)),
                                                 ("zip64.jpg", jpeg(seed=2))]


def test_an_archive_comment_is_fine_and_an_empty_zip_holds_nothing() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.comment = b"made by a phone"
        zf.writestr("a.jpg", jpeg())
    assert len(read_zip(buf.getvalue(), limits=LIMITS)[0]) == 1
    assert read_zip(zip_of({}), limits=LIMITS) == ([], [])


def test_small_compressible_members_pass_the_ratio_check() -> None:
    # 512 KiB of zeros compress ~1000:1 but are under the ratio floor: read (decode refuses it).
    files, _ = read_zip(zip_of({"a.jpg": bytes(512 * 1024)}), limits=LIMITS)
    assert len(files[0].data) == 512 * 1024


def test_display_names_are_basenames_and_unique() -> None:
    data = zip_of({"a/x.jpg": jpeg(seed=1), "b/X.jpg": jpeg(seed=2), "c/\u202egpj.exe": jpeg()})
    files, _ = read_zip(data, limits=LIMITS)
    assert [f.name for f in files] == ["a/x.jpg", "b/X.jpg", "gpj.exe"]
    assert display_name("C:\\Users\\me\\..\\selfie.jpg") == "selfie.jpg"
    assert display_name("bad\x00\x1bname.jpg") == "badname.jpg"
    assert len(display_name("x" * 500 + ".jpg")) <= 100


def test_archive_kind_finds_appended_zips_without_false_alarms() -> None:
    assert archive_kind(polyglot_jpeg_zip()) == "zip archive (appended)"
    assert archive_kind(zip_of({"a": b"b"})) == "zip archive"
    assert archive_kind(jpeg()) is None
    # The end-record signatures inside a photo's bytes are not enough, nor is an end record
    # whose directory is not where it says.
    assert archive_kind(jpeg() + b"PK\x05\x06" + bytes(18)) is None
    assert archive_kind(jpeg() + b"PK\x05\x06" + struct.pack("<4H2IH", 0, 0, 1, 1, 300, 0, 0)
                        + b"more photo") is None
    assert archive_kind(jpeg() + b"PK\x06\x06" + bytes(52) + b"PK\x06\x07" + bytes(16)) is None
    assert archive_kind(jpeg() + zip_of({"a": b"b"})[-22:] + b"\n") is None
    assert archive_kind(os.urandom(4096)) is None


@pytest.mark.parametrize("polyglot", [
    polyglot_jpeg_zip(after=b"\n"),
    polyglot_jpeg_zip(zip64=True),
    polyglot_jpeg_zip(zip64=True, after=b"\x00" * 100),
], ids=["byte_after", "zip64_end", "zip64_end_bytes_after"])
def test_appended_zips_that_zip_tools_open_are_found(polyglot: bytes) -> None:
    with zipfile.ZipFile(io.BytesIO(polyglot)) as zf:  # what an extractor downstream sees
        assert zf.read("payload.txt").startswith(b"#!/bin/sh")
    assert archive_kind(polyglot) == "zip archive (appended)"
    for files, _ in (read_zip(zip_of({"selfie.jpg": polyglot}), limits=LIMITS),
                     read_uploaded_files([("selfie.jpg", polyglot)], limits=LIMITS)):
        finding = _refusal(files, "selfie.jpg")
        assert finding.code == "nested_archive"
        assert "zip archive appended" in finding.message


def test_zip64_end_records_are_read() -> None:
    files, _ = read_zip(with_zip64_end(zip_of({"a.jpg": jpeg()})), limits=LIMITS)
    assert [f.name for f in files] == ["a.jpg"]


def test_local_header_must_agree_with_the_directory() -> None:
    data = bytearray(raw_zip([stored("good.jpg", jpeg())]))
    data[30:34] = b"evil"  # the local header's copy of the name
    assert _refused(lambda: read_zip(bytes(data), limits=LIMITS)) == "bad_archive"


# --------------------------------------------------------------------------------------------
# Long names


class CountingNormalize:
    """unicodedata.normalize, recording the length of every text it is given. A text long enough
    to take seconds is returned unnormalised: code that would normalise it fails here at once."""

    def __init__(self) -> None:
        self.real = unicodedata.normalize
        self.lengths: list[int] = []

    def __call__(self, form: str, text: str) -> str:
        self.lengths.append(len(text))
        return text if len(text) > 4096 else self.real(form, text)


@pytest.mark.parametrize("read", [
    lambda: read_zip(long_name_zip(), limits=LIMITS),
    lambda: read_zip(long_unicode_path_zip(), limits=LIMITS),
    lambda: read_uploaded_files([(slow_to_normalise() + ".jpg", jpeg())], limits=LIMITS),
], ids=["entry_name", "unicode_path_extra", "uploaded_file"])
def test_a_name_slow_to_normalise_is_refused_unnormalised(
        read: Callable[[], object], monkeypatch: pytest.MonkeyPatch) -> None:
    # Normalising this 64 KB name takes ~6 s (1,000 of them in a 0.13 GB zip: ~2 hours).
    counting = CountingNormalize()
    monkeypatch.setattr(unicodedata, "normalize", counting)
    assert _refused(read) == "name_too_long"
    assert counting.lengths  # the refusal shows (a bounded part of) the name
    assert max(counting.lengths) <= 1024


def test_names_up_to_the_bounds_are_read() -> None:
    # 255 characters is what APFS and NTFS allow a name (506 bytes here); 1,024 bytes a path.
    longest = "\u00e9" * 251 + ".jpg"
    deep = "/".join(["d" * 254 + "\u00e9", "d" * 255, "d" * 255, "x" * 251 + ".jpg"])
    assert len(deep.encode()) == 1024
    files, _ = read_zip(zip_of({longest: jpeg(seed=1), deep: jpeg(seed=2)}), limits=LIMITS)
    assert len(files) == 2
    assert len(read_uploaded_files([(longest, jpeg())], limits=LIMITS)[0]) == 1
    for name in ("\u00e9" * 252 + ".jpg", "ok/" + "x" * 252 + ".jpg", "e/" + deep):
        assert _refused(lambda n=name: read_zip(zip_of({n: jpeg()}), limits=LIMITS)) == \
            "name_too_long"
        assert _refused(lambda n=name: read_uploaded_files([(n, jpeg())], limits=LIMITS)) == \
            "name_too_long"


# --------------------------------------------------------------------------------------------
# Several files


def test_uploaded_files_are_named_safely_and_system_files_skipped() -> None:
    files, findings = read_uploaded_files(
        [("../../etc/me.jpg", jpeg(seed=1)), ("C:\\x\\you.jpg", jpeg(seed=2)),
         (".DS_Store", b"Bud1"), ("", jpeg(seed=3))], limits=LIMITS)
    assert [f.name for f in files] == ["me.jpg", "you.jpg", "photo4"]
    assert [f.code for f in findings] == ["ignored_file"]


def test_a_sent_name_is_read_as_the_browser_had_it() -> None:
    """Browsers send '"' as %22 (CR, LF as %0D, %0A) in a part's filename: it was shown as
    'say %22cheese%22.jpg'. And 'back\\slash.JPG', a whole name on Linux and macOS, was cut to
    'slash.JPG', so 'a\\x.jpg' beside 'b\\x.jpg' was refused as two files of one name."""
    files, _ = read_uploaded_files(
        [("say %22cheese%22.jpg", jpeg(seed=1)), ("back\\slash.JPG", jpeg(seed=2)),
         ("a\\x.jpg", jpeg(seed=3)), ("b\\x.jpg", jpeg(seed=4)),
         ("line%0Abreak.jpg", jpeg(seed=5)), ("100%25.jpg", jpeg(seed=6))], limits=LIMITS)
    assert [f.name for f in files] == ['say "cheese".jpg', "back\\slash.JPG", "a\\x.jpg",
                                       "b\\x.jpg", "linebreak.jpg", "100%25.jpg"]
    # A Windows path still gives its base name alone, and a script's folders are still cut.
    for sent in ("C:\\fakepath\\me.jpg", "C:\\Users\\José\\me.jpg", "\\\\nas\\share\\me.jpg",
                 "..\\..\\me.jpg", "x\\..\\me.jpg", "../../me.jpg", "c:/x/me.jpg"):
        assert uploaded_name(sent, 0) == "me.jpg", sent


def test_two_files_of_one_name_are_refused_with_the_name_and_what_to_do() -> None:
    """It said only "two files are named 'x'": nothing about what to do (found in review)."""
    for call in (lambda: read_uploaded_files([("IMG_0001.JPG", jpeg(seed=1)),
                                              ("img_0001.jpg", jpeg(seed=2))], limits=LIMITS),
                 lambda: read_zip(zip_of({"IMG_0001.JPG": jpeg(seed=1),
                                          "img_0001.jpg": jpeg(seed=2)}), limits=LIMITS)):
        with pytest.raises(InvalidInputError) as caught:
            call()
        assert caught.value.code == "duplicate_member"
        assert "'img_0001.jpg'" in caught.value.message
        assert "rename one of them" in caught.value.message


@pytest.mark.parametrize(("files", "limits", "code"), [
    ([("a.jpg", b"1"), ("A.JPG", b"2")], LIMITS, "duplicate_member"),
    ([(f"{i}.jpg", b"x") for i in range(201)], LIMITS, "too_many_members"),
    ([("a.jpg", bytes(200))], UploadLimits(max_upload_bytes=100), "upload_too_large"),
])
def test_uploaded_files_refusals(files: list[tuple[str, bytes]], limits: UploadLimits,
                                 code: str) -> None:
    assert _refused(lambda: read_uploaded_files(files, limits=limits)) == code


# --------------------------------------------------------------------------------------------
# Folders and paths


def test_a_folder_is_read_without_following_links(tmp_path: Path) -> None:
    (tmp_path / "b.jpg").write_bytes(jpeg(seed=2))
    (tmp_path / "a.jpg").write_bytes(jpeg(seed=1))
    (tmp_path / ".hidden.jpg").write_bytes(jpeg(seed=3))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jpg").write_bytes(jpeg(seed=4))
    (tmp_path / "link.jpg").symlink_to(tmp_path / "a.jpg")
    files, findings = read_path(tmp_path, limits=LIMITS)
    assert [f.name for f in files] == ["a.jpg", "b.jpg"]
    assert sorted(f.photo or "" for f in findings) == [".hidden.jpg", "link.jpg", "sub"]


def test_folder_names_alike_but_for_case_or_form_are_shown_as_they_are(tmp_path: Path) -> None:
    """A Linux folder may hold café.JPG twice (composed and decomposed), Photo.Jpg and
    photo.jpg: they were shown as 'café.JPG (2)' and 'photo.jpg (2)', names of no file on disk,
    and the two café.JPG could not be told apart."""
    for i, name in enumerate(["caf\u00e9.JPG", "cafe\u0301.JPG", "Photo.Jpg", "photo.jpg",
                              "noext"]):
        (tmp_path / name).write_bytes(jpeg(seed=i))
    files, _ = read_path(tmp_path, limits=LIMITS)
    assert sorted(f.name for f in files) == [
        "Photo.Jpg (1 of 2 names that differ only in case)",
        "café.JPG (as written: caf\\u00e9.JPG)",
        "café.JPG (as written: cafe\\u0301.JPG)",
        "noext",
        "photo.jpg (2 of 2 names that differ only in case)",
    ]
    assert len({f.name.casefold() for f in files}) == 5  # still unique, as findings need


def test_a_zip_path_is_read(tmp_path: Path) -> None:
    path = tmp_path / "p.zip"
    path.write_bytes(zip_of({"a.jpg": jpeg()}))
    files, _ = read_path(path, limits=LIMITS)
    assert [f.name for f in files] == ["a.jpg"]
    assert _refused(lambda: read_path(path, limits=UploadLimits(max_upload_bytes=10))) == \
        "upload_too_large"


def test_folder_refusals(tmp_path: Path) -> None:
    assert _refused(lambda: read_path(tmp_path / "missing", limits=LIMITS)) == "no_such_path"
    (tmp_path / "a.jpg").write_bytes(bytes(200))
    (tmp_path / "b.jpg").write_bytes(bytes(200))
    assert _refused(lambda: read_path(tmp_path, limits=UploadLimits(max_total_bytes=300))) == \
        "archive_too_large"
    assert _refused(lambda: read_path(tmp_path, limits=UploadLimits(max_members=1))) == \
        "too_many_members"


def test_harmless_odd_names_are_read() -> None:
    # Colons (a macOS "/" in a Finder name) and "./" prefixes are not paths out of anywhere.
    files, _ = read_zip(zip_of({"12:30 selfie.jpg": jpeg(seed=1), "./b.jpg": jpeg(seed=2)}),
                        limits=LIMITS)
    assert [f.name for f in files] == ["12:30 selfie.jpg", "b.jpg"]


def test_compressed_streams_inside_are_nested_archives() -> None:
    import bz2
    import lzma

    for blob in (bz2.compress(jpeg()), lzma.compress(jpeg())):
        files, _ = read_zip(zip_of({"a.jpg": blob}), limits=LIMITS)
        assert _refusal(files, "a.jpg").code == "nested_archive"
    assert archive_kind(b"BZh is how this note starts") is None


class _OutOfMemory:
    """A decompressor that fails as CPython's zlib and bz2 do when an allocation fails
    (Z_MEM_ERROR, BZ_MEM_ERROR: a MemoryError)."""

    eof = False
    unconsumed_tail = b""
    needs_input = True

    def decompress(self, *_args: object) -> bytes:
        raise MemoryError("Out of memory while decompressing data")


@pytest.mark.parametrize(("module", "factory", "compression"), [
    (zlib, "decompressobj", zipfile.ZIP_DEFLATED),
    (bz2, "BZ2Decompressor", zipfile.ZIP_BZIP2),
], ids=["deflate", "bzip2"])
def test_running_out_of_memory_while_inflating_is_the_server_s_failure(
        module: Any, factory: str, compression: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # A MemoryError was reported as "the upload is not a readable zip archive" (422
    # bad_archive): the user's file blamed for the server's shortage, sent again for nothing.
    data = zip_of({"a.jpg": jpeg(), "b.jpg": jpeg()}, compression=compression)
    with monkeypatch.context() as patched:
        patched.setattr(module, factory, lambda *_a: _OutOfMemory())
        with pytest.raises(ServerShortOfMemoryError) as caught:
            read_zip(data, limits=LIMITS)
    assert not isinstance(caught.value, InvalidInputError)
    assert caught.value.code == "server_short_of_memory"
    assert caught.value.http_status == 503
    assert "upload it again in a few minutes" in caught.value.message
    assert "not a readable zip" not in caught.value.message
    files, _notes = read_zip(data, limits=LIMITS)  # the memory back, the same bytes read
    assert [f.name for f in files] == ["a.jpg", "b.jpg"]


def test_a_zip_with_bytes_after_its_end_is_refused_as_such_not_as_no_zip() -> None:
    """zipfile and unzip open a zip with bytes after its end record; "the upload is not a zip
    archive" told the user something they could check was false."""
    data = zip_of({"a.jpg": jpeg()}) + b"\0" * 100
    with pytest.raises(InvalidInputError) as caught:
        read_zip(data, limits=LIMITS)
    assert caught.value.code == "bad_archive"
    assert "not a zip archive" not in str(caught.value)
    assert "after its end" in str(caught.value)
    with pytest.raises(InvalidInputError, match="not a zip archive"):
        read_zip(b"this is not a zip archive", limits=LIMITS)


# --------------------------------------------------------------------------------------------
# One bad file among good photos: that file's finding, the rest read


def _big_raw(name: str = "IMG_0042.DNG", size: int = 51 * MIB) -> Raw:
    """A member declared ``size`` bytes whose data is no deflate stream at all (and whose CRC is
    wrong): reading it fails, so a finding about it proves it was never decompressed. Its
    compressed size keeps it under the 200:1 ratio."""
    return Raw(name=name.encode(), payload=os.urandom(size // 150), size=size, crc=0, method=8)


def _nested_raw(name: str = "x.zip") -> Raw:
    """A nested zip, deflated, of which only the first half of the stream is there (and whose
    CRC is wrong): decompressed past its first bytes, it would be "damaged"."""
    inner = zip_of({"b.jpg": os.urandom(256 * 1024)}, compression=zipfile.ZIP_STORED)
    engine = zlib.compressobj(6, zlib.DEFLATED, -15)
    stream = engine.compress(inner) + engine.flush()
    return Raw(name=name.encode(), payload=stream[:len(stream) // 2], size=len(inner), crc=0,
               method=8)


def _good_raws() -> list[Raw]:
    return [stored(f"good{i}.jpg", jpeg(seed=i)) for i in range(3)]


def test_a_zip_keeps_its_good_photos_beside_an_oversized_member_and_a_nested_zip() -> None:
    """A 51 MB ProRAW DNG or a stray zip among good photos refused the whole upload
    (member_too_large, nested_archive); each is now that file's finding, the rest read."""
    good = _good_raws()
    data = raw_zip([good[0], _big_raw(), good[1], _nested_raw(), good[2]])
    tracemalloc.start()
    try:
        files, notes = read_zip(data, limits=LIMITS)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert notes == []
    assert [f.name for f in files] == ["good0.jpg", "IMG_0042.DNG", "good1.jpg", "x.zip",
                                       "good2.jpg"]
    assert [f.data for f in files if f.refused is None] == [jpeg(seed=i) for i in range(3)]
    big = _refusal(files, "IMG_0042.DNG")
    assert big.code == "file_too_large"
    assert big.message == "IMG_0042.DNG is 51 MB, over the 50 MB a photo may be"
    assert big.advice.startswith("export it as JPEG")
    nested = _refusal(files, "x.zip")
    assert nested.code == "nested_archive"
    assert nested.message.startswith("x.zip is an archive inside the archive")
    assert nested.advice == "unpack it and upload its photos"
    # Neither was decompressed (both would have failed as damaged), nor held in memory.
    assert peak < len(data) + 2 * MIB


def test_a_member_over_the_limit_is_never_decompressed_by_its_declared_size() -> None:
    limits = UploadLimits(max_member_bytes=2 * MIB)
    files, _ = read_zip(raw_zip([*_good_raws(), _big_raw("a.png", 3 * MIB)]), limits=limits)
    finding = _refusal(files, "a.png")
    assert finding.message == "a.png is 3 MB, over the 2 MB a photo may be"
    # Just past the limit: the size is not shown as the limit itself.
    files, _ = read_zip(raw_zip([_big_raw("b.png", 2 * MIB + 1000)]), limits=limits)
    assert _refusal(files, "b.png").message == "b.png is 2.0 MB, over the 2 MB a photo may be"


def test_a_member_lying_about_its_size_is_stopped_at_its_declaration() -> None:
    """Declared 1 MB (within the limit), it inflates to 30 MB: the upload is refused as soon as
    the declared size is passed, never inflating it further (a declaration that lies is the
    archive's, not one photo's)."""
    stream, crc = deflated_zeros(30 * MIB)
    liar = Raw(name=b"liar.jpg", payload=stream, size=MIB, crc=crc, method=8)
    data = raw_zip([*_good_raws(), liar])
    tracemalloc.start()
    try:
        code = _refused(lambda: read_zip(data, limits=UploadLimits(max_member_bytes=2 * MIB)))
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code == "size_mismatch"
    assert peak < 4 * MIB


@pytest.mark.parametrize(("members", "limits", "code"), [
    # The total decompressed size, counted over every member, the oversized ones included.
    ([_big_raw("a.dng", 3 * MIB), _big_raw("b.dng", 3 * MIB)],
     UploadLimits(max_member_bytes=2 * MIB, max_total_bytes=5 * MIB), "archive_too_large"),
    # The count: a refused member is still a file read.
    ([_big_raw("a.dng", 3 * MIB)], UploadLimits(max_member_bytes=2 * MIB, max_members=3),
     "too_many_members"),
    # A bomb over the per-photo limit is a bomb, not a photo too large.
    ([Raw(name=b"bomb.jpg", payload=bytes(1000), size=60 * MIB, crc=0, method=8)], LIMITS,
     "compression_ratio"),
    # A stored member whose declared size is not its bytes' lies.
    ([stored("big.dng", jpeg(), size=60 * MIB)], LIMITS, "size_mismatch"),
], ids=["total_size", "member_count", "bomb_ratio", "stored_size_lie"])
def test_whole_upload_limits_still_refuse_beside_good_photos(
        members: list[Raw], limits: UploadLimits, code: str) -> None:
    assert _refused(lambda: read_zip(raw_zip([*_good_raws(), *members]), limits=limits)) == code


@pytest.mark.parametrize("key", list(MEMBER_BYTES))
def test_corpus_members_are_refused_on_their_own(key: str) -> None:
    build, code = MEMBER_BYTES[key]
    files, _ = read_zip(zip_of({"good.jpg": jpeg(), "bad.jpg": build()}), limits=LIMITS)
    assert [f.data for f in files if f.refused is None] == [jpeg()]
    assert _refusal(files, "bad.jpg").code == code


@pytest.mark.parametrize(("bad", "code"), [
    (stored("bad.jpg", jpeg(), flags=0x1), "password_protected"),  # traditional PKWARE
    (stored("bad.jpg", jpeg(), method=99), "password_protected"),  # WinZip AES
    # LZMA (14): the payload is never decompressed, so it need not be LZMA at all.
    (stored("bad.jpg", jpeg(), method=14), "unsupported_compression"),
], ids=["pkware", "aes", "lzma"])
def test_a_member_that_cannot_be_decompressed_is_refused_alone(bad: Raw, code: str) -> None:
    """A password-protected member or one of an unknown compression method beside good photos
    refused the whole upload (encrypted_member, unsupported_compression); it is now that
    member's finding, known from its header, and the good photos are read."""
    files, _ = read_zip(raw_zip([*_good_raws(), bad]), limits=LIMITS)
    assert [f.data for f in files if f.refused is None] == [jpeg(seed=i) for i in range(3)]
    found = _refusal(files, "bad.jpg")
    assert found.code == code
    if code == "password_protected":
        assert found.message == "bad.jpg is password-protected in the archive"
        assert found.advice == "make the zip again without a password, or upload the photo itself"
    else:
        assert found.message == "bad.jpg is compressed with method 14, which cannot be read"
        assert found.advice == ('make the zip with your system\'s "Compress" command, or upload '
                                "the photo itself")


def test_uploaded_files_keep_the_good_photos_beside_an_oversized_one_and_a_zip() -> None:
    sent = [("good.jpg", jpeg()), ("IMG_0042.DNG", bytes(100_000)),
            ("x.zip", zip_of({"b.jpg": jpeg()}))]
    files, _ = read_uploaded_files(sent, limits=UploadLimits(max_member_bytes=65_536))
    assert [f.data for f in files if f.refused is None] == [jpeg()]
    assert _refusal(files, "IMG_0042.DNG").message == \
        "IMG_0042.DNG is 100000 bytes, over the 65536 bytes a photo may be"
    nested = _refusal(files, "x.zip")
    assert nested.message == "x.zip is an archive among the photos sent (a zip archive)"
    assert nested.advice == "unpack it and upload its photos"
    # The request as a whole is still capped.
    assert _refused(lambda: read_uploaded_files(sent, limits=UploadLimits(
        max_member_bytes=65_536, max_upload_bytes=100_000))) == "upload_too_large"


def test_a_sent_file_is_read_once_and_not_at_all_when_larger_than_a_photo_may_be() -> None:
    """Files handed over as the spooled files holding them (the web page's and the API's
    uploads): each read from where it stands, and one over the limit never read."""
    class Unreadable(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            raise AssertionError("an oversized file was read")

    good = io.BytesIO(b"xx" + jpeg())
    good.seek(2)
    sent: list[tuple[str, bytes | io.BytesIO]] = [
        ("good.jpg", good), ("IMG_0042.DNG", Unreadable(bytes(100_000))), ("b.jpg", jpeg(seed=2))]
    files, _ = read_uploaded_files(sent, limits=UploadLimits(max_member_bytes=65_536))
    assert [f.data for f in files if f.refused is None] == [jpeg(), jpeg(seed=2)]
    assert _refusal(files, "IMG_0042.DNG").message == \
        "IMG_0042.DNG is 100000 bytes, over the 65536 bytes a photo may be"


def test_a_folder_keeps_its_good_photos_beside_an_oversized_file_and_a_zip(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"good{i}.jpg").write_bytes(jpeg(seed=i))
    with open(tmp_path / "IMG_0042.DNG", "wb") as fh:
        fh.truncate(10 * 1024 * MIB)  # 10 GB (sparse): read no further than the limit
    (tmp_path / "x.zip").write_bytes(zip_of({"b.jpg": jpeg()}))
    tracemalloc.start()
    try:
        files, _ = read_path(tmp_path, limits=LIMITS)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [f.data for f in files if f.refused is None] == [jpeg(seed=i) for i in range(3)]
    assert _refusal(files, "IMG_0042.DNG").message == \
        "IMG_0042.DNG is 10240 MB, over the 50 MB a photo may be"
    assert _refusal(files, "x.zip").message == "x.zip is an archive in the folder (a zip archive)"
    assert peak < 2 * LIMITS.max_member_bytes + MIB


def test_an_upload_limit_reads_in_mb_with_a_decimal_where_needed_or_in_bytes() -> None:
    # One wording for the API's guard, the upload routes and `selfie-lora check`.
    assert byte_size(200 * MIB) == "200 MB"
    assert byte_size(3 * MIB // 2) == "1.5 MB"
    assert byte_size(MIB) == "1 MB"
    assert byte_size(150_000_000) == "143 MB"  # 143.05: down, never above the real limit
    assert byte_size(2 * MIB - 1) == "1.9 MB"  # not "2 MB" beside a 1.99 MB file refused
    assert byte_size(100_000) == "100000 bytes"


def test_google_takeout_json_side_files_are_skipped_not_counted(tmp_path: Path) -> None:
    """Takeout's IMG_0001.jpg.json beside each photo was refused as not_an_image and counted as
    a photo left out: eight metadata files took a set of eight photos from "fair" to "poor"."""
    meta = b'{"title": "IMG_0001.jpg", "photoTakenTime": {"timestamp": "1"}}'
    members = {"IMG_0001.jpg": jpeg(seed=1), "IMG_0001.jpg.json": meta,
               "IMG_0002.JPG": jpeg(seed=2), "IMG_0002.json": meta,
               "IMG_0003.jpg": jpeg(seed=3), "IMG_0003.jpg.supplemental-metadata.json": meta,
               # The second IMG_0001's, as Takeout names it, and the album's own (premerge
               # review: both were still counted as photos left out).
               "IMG_0001(1).jpg": jpeg(seed=4), "IMG_0001.jpg(1).json": meta,
               "metadata.json": b'{"title": "Holiday"}',
               "settings.json": meta}
    for files, findings in read_every_way(members, tmp_path):
        # A .json named after no photo is the user's own upload: left to be refused.
        assert sorted(f.name for f in files) == ["IMG_0001(1).jpg", "IMG_0001.jpg",
                                                 "IMG_0002.JPG", "IMG_0003.jpg", "settings.json"]
        assert sorted((f.photo, f.severity, f.code) for f in findings) == [
            ("IMG_0001.jpg(1).json", "info", "ignored_file"),
            ("IMG_0001.jpg.json", "info", "ignored_file"), ("IMG_0002.json", "info", "ignored_file"),
            ("IMG_0003.jpg.supplemental-metadata.json", "info", "ignored_file"),
            ("metadata.json", "info", "ignored_file")]


def test_documents_beside_the_photos_are_skipped_not_counted_as_photos_left_out(
        tmp_path: Path) -> None:
    """A README.md or notes.txt in the upload was refused as not_an_image and counted as a
    photo left out, which read as photos lost. A photo named like a document is still read."""
    members = {"01.jpg": jpeg(seed=1), "README.md": b"# My selfies\n", "notes.txt": b"shot in May",
               "Guide.PDF": b"%PDF-1.7\n", "renamed.txt": jpeg(seed=2)}
    for files, findings in read_every_way(members, tmp_path):
        assert sorted(f.name for f in files) == ["01.jpg", "renamed.txt"]
        assert sorted((f.photo, f.severity, f.code, f.message) for f in findings) == [
            ("Guide.PDF", "info", "ignored_file", "Guide.PDF was skipped: a document (.pdf), not a photo"),
            ("README.md", "info", "ignored_file", "README.md was skipped: a document (.md), not a photo"),
            ("notes.txt", "info", "ignored_file", "notes.txt was skipped: a document (.txt), not a photo")]
