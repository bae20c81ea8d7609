"""Fuzzing the readers with mutated valid inputs: read_zip may only raise InvalidInputError, and
never through its catch-all (which turns a parser bug into bad_archive), and decode_photo never
raises at all (it answers a DecodedPhoto or a Finding)."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import zipfile
from collections.abc import Iterator

import pillow_heif
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selfie_lora.dataset.archive import read_zip
from selfie_lora.dataset.decode import DecodedPhoto, decode_photo
from selfie_lora.dataset.limits import UploadedFile, UploadLimits
from selfie_lora.domain.entities import Finding
from selfie_lora.errors import InvalidInputError
from tests.support.hostile import encode, jpeg, photo

# Small limits keep a mutation that inflates a declared size from costing seconds.
LIMITS = UploadLimits(max_pixels=400_000, max_side=2000, max_member_bytes=4 * 1024 * 1024,
                      max_total_bytes=8 * 1024 * 1024)
FUZZ = settings(max_examples=1000, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@functools.cache
def _images() -> tuple[bytes, ...]:
    pillow_heif.register_heif_opener()
    heic = io.BytesIO()
    photo((48, 40)).save(heic, format="HEIF", quality=60)
    return (
        jpeg((48, 40)),
        encode(photo((48, 40)), "PNG"),
        encode(photo((48, 40)).convert("P"), "PNG", transparency=0),
        encode(photo((48, 40)), "WEBP", quality=60),
        encode(photo((48, 40)), "AVIF", quality=60),
        heic.getvalue(),
    )


@functools.cache
def _zips() -> tuple[bytes, ...]:
    out = []
    for compression in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=compression) as zf:
            zf.writestr("a/one.jpg", jpeg((32, 32), seed=1))
            zf.writestr("two.png", encode(photo((32, 32)), "PNG"))
            zf.writestr("__MACOSX/._one.jpg", b"junk")
        out.append(buf.getvalue())
    return tuple(out)


_INTERESTING = st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF])
# Positions wrap around the input; small ones hit the headers, where parsers decide the most.
_POSITION = st.one_of(st.integers(0, 96), st.integers(0, 1 << 20))
_mutation = st.one_of(
    st.tuples(st.just("flip"), _POSITION, st.integers(0, 7)),
    st.tuples(st.just("set"), _POSITION, _INTERESTING),
    st.tuples(st.just("truncate"), _POSITION, st.just(0)),
    st.tuples(st.just("insert"), _POSITION, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), _POSITION, st.integers(1, 64)),
)


def _mutate(data: bytes, mutations: list[tuple[str, int, object]]) -> bytes:
    out = bytearray(data)
    for kind, position, arg in mutations:
        if not out:
            break
        pos = position % len(out)
        if kind == "flip":
            assert isinstance(arg, int)
            out[pos] ^= 1 << arg
        elif kind == "set":
            assert isinstance(arg, int)
            out[pos] = arg
        elif kind == "truncate":
            del out[pos:]
        elif kind == "insert":
            assert isinstance(arg, bytes)
            out[pos:pos] = arg
        else:
            assert isinstance(arg, int)
            del out[pos:pos + arg]
    return bytes(out)


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _no_catch_all() -> Iterator[None]:
    """Fails when read_zip's catch-all fired: it answers bad_archive to any exception, so an
    IndexError in the parser would otherwise pass here as a proper refusal."""
    log = logging.getLogger("selfie_lora.dataset.archive")
    recorder = _Recorder()
    # Whatever logging setup an earlier test left, the catch-all's warning must reach us.
    disabled, level = log.disabled, log.level
    log.disabled = False
    log.setLevel(logging.WARNING)
    log.addHandler(recorder)
    try:
        yield
    finally:
        log.removeHandler(recorder)
        log.disabled = disabled
        log.setLevel(level)
        # Here, not after: the catch-all's refusal is an InvalidInputError on its way out.
        caught = [m for m in recorder.messages if m.startswith("unexpected failure reading a zip")]
        assert not caught, caught


def _decode_never_raises(name: str, data: bytes) -> None:
    result = decode_photo(UploadedFile(name, data), limits=LIMITS, min_side=16)
    assert isinstance(result, DecodedPhoto | Finding)
    if isinstance(result, DecodedPhoto):
        assert result.image.mode == "RGB"
    else:
        assert result.severity == "reject"


@FUZZ
@given(seed=st.integers(0, 2), mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_read_zip_only_refuses(seed: int, mutations: list[tuple[str, int, object]]) -> None:
    data = _mutate(_zips()[seed], mutations)
    try:
        with _no_catch_all():
            files, findings = read_zip(data, limits=LIMITS)
    except InvalidInputError as exc:
        refusal: InvalidInputError | None = exc
    else:
        refusal = None
    if refusal is not None:
        assert refusal.code != InvalidInputError.code  # always a specific code
        return
    assert all(f.severity == "info" for f in findings)
    for upload in files:
        _decode_never_raises(upload.name, upload.data)


@FUZZ
@given(seed=st.integers(0, 5), mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_decode_photo_never_raises(seed: int, mutations: list[tuple[str, int, object]]) -> None:
    _decode_never_raises("fuzz.jpg", _mutate(_images()[seed], mutations))


@FUZZ
@given(data=st.binary(max_size=512))
def test_random_bytes_are_never_a_crash(data: bytes) -> None:
    with contextlib.suppress(InvalidInputError), _no_catch_all():
        read_zip(data, limits=LIMITS)
    _decode_never_raises("noise.jpg", data)
