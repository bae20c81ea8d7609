"""Answers that carry a stored file: streamed from the blob store, or a redirect to it."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

from fastapi import Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse

from selfie_lora.api.deps import in_thread
from selfie_lora.api.head import ran_for_head
from selfie_lora.api.schemas import picture
from selfie_lora.domain.disposition import content_disposition
from selfie_lora.domain.entities import User
from selfie_lora.services.likeness import Chart, LikenessService
from selfie_lora.services.models import WeightsDownload
from selfie_lora.services.ports import BlobStream

# One byte range (``bytes=0-99``, ``bytes=100-``, ``bytes=-500``): what a resuming download
# (curl -C -, a browser, wget -c) sends. Several ranges at once are answered with the whole file,
# as HTTP allows. ASCII digits only (RFC 9110 14.1.1): ``\d`` takes any script's.
_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)")


def held_tags(if_none_match: str | None) -> frozenset[str]:
    """The entity tags an ``If-None-Match`` names, without quotes and ``W/``: its comparison
    is the weak one (RFC 9110 13.1.2), so a strong and a weak tag of one value match. ``*``
    stands for any."""
    if not if_none_match:
        return frozenset()
    return frozenset(tag.strip().removeprefix("W/").strip('"')
                     for tag in if_none_match.split(",") if tag.strip())


async def chart_answer(request: Request, likeness: LikenessService, user: User) -> Response:
    """The likeness chart (the API's and the Versions page's alike). Its ETag is the digest of
    what it shows (``chart_inputs``, which every GET works out first): a browser holding it
    (``If-None-Match``) gets a 304, the picture neither read nor drawn. Weak: one chart drawn
    by two releases' matplotlib is the same picture, not the same bytes. A HEAD (run as this
    GET, api.head) neither draws the chart nor stores it, and leaves out Content-Length, which
    only the drawing would tell (RFC 9110 9.3.2 lets it; Starlette's ``Content-Length: 0``
    would say the picture is empty)."""
    return await _drawn_answer(
        request, lambda draw, held: likeness.chart(user=user, draw=draw, unless=held))


async def grid_answer(request: Request, likeness: LikenessService, user: User, *,
                      a: str | None, b: str | None) -> Response:
    """A comparison's grid (the API's and the Versions page's alike), as the chart: its ETag
    the digest of what it shows (``grid_inputs``), a 304 to a browser holding it, the grid
    neither read nor drawn; without one, each view of the Versions page fetched it whole. Both
    in the pool: the first comparison on a photo set finds the faces of its photos. A grid
    drawn with a probe image missing (``Chart.whole``) has no ETag and is not to be kept: its
    digest is the whole grid's, and the image may come back under its key. A HEAD neither
    draws nor stores it, and leaves out Content-Length, as the chart's."""
    return await _drawn_answer(
        request, lambda draw, held: likeness.grid(likeness.compare(user=user, a=a, b=b),
                                                  draw=draw, unless=held))


async def _drawn_answer(request: Request,
                        make: Callable[[bool, frozenset[str]], Chart]) -> Response:
    """A picture drawn from stored scores (the chart, a grid): ``make(draw, held)`` in the
    pool, then a 304 to a browser holding its tag, or the PNG (none drawn: no Content-Length,
    which only the drawing would tell)."""
    held = held_tags(request.headers.get("if-none-match"))
    draw = not ran_for_head(request.scope) and "*" not in held
    drawn = await in_thread(lambda: make(draw, held))
    headers = ({"Cache-Control": "private", "ETag": f'W/"{drawn.inputs}"'} if drawn.whole
               else {"Cache-Control": "private, no-store"})
    if drawn.inputs in held or "*" in held:
        return Response(status_code=304, headers=headers)
    response = picture(drawn.png or b"", media_type="image/png")
    response.headers.update(headers)
    if drawn.png is None:
        del response.headers["content-length"]
    return response


def reads_a_part(request: Request) -> bool:
    """Whether a download may send less than the whole file (a Range, or a 304 for an
    If-None-Match): the stored file is then opened for its size alone, and read only as far as
    the answer needs (``WeightsDownload.probe``)."""
    return "range" in request.headers or "if-none-match" in request.headers


def weights_response(download: WeightsDownload, *, range_header: str | None = None,
                     if_range: str | None = None, if_none_match: str | None = None,
                     head: bool = False) -> Response:
    """A version's LoRA file (the API and the web app answer the same way). A streamed file
    answers one byte range with 206 (a download cut off is resumed, not started again), and
    ``head`` the headers alone; its ETag is the file's SHA-256, so a range is never taken from
    another version's file (``If-Range``), and a client holding the file (``If-None-Match``
    naming it, or ``*``) gets a 304 without its bytes. That comes first, Range or not (RFC 9110
    13.2.2: a Range is only read once the preconditions hold)."""
    headers = {
        "Content-Disposition": content_disposition(download.filename),
        "X-Weights-SHA256": download.sha256,
        "Cache-Control": "private",
    }
    if download.url is not None:
        # The object storage serves the bytes; the client checks them against the header.
        return RedirectResponse(download.url, status_code=307, headers=headers)
    stream = download.stream
    assert stream is not None
    etag = f'"{download.sha256}"'
    headers |= {"Accept-Ranges": "bytes", "ETag": etag}
    held = held_tags(if_none_match)
    if download.sha256 in held or "*" in held:
        stream.close()
        return Response(status_code=304, headers=headers)
    wanted = (_byte_range(range_header, stream.size)
              if range_header is not None and (if_range is None or if_range == etag) else None)
    if wanted == "unsatisfiable":
        stream.close()
        return Response(status_code=416, headers={**headers,
                                                  "Content-Range": f"bytes */{stream.size}"})
    status, start, end = 200, 0, stream.size
    if isinstance(wanted, tuple):
        status, (start, end) = 206, wanted
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{stream.size}"
    headers["Content-Length"] = str(end - start)
    if head:
        stream.close()
        return Response(status_code=status, headers=headers,
                        media_type="application/octet-stream")
    if download.open_range is not None and (status == 206 or download.probe):
        # Only the range is read from the store (a seek, an S3 ranged GET); the stream opened
        # first held the first byte only (``for_range``), or is closed unread.
        stream.close()
        chunks = download.open_range(start, end).chunks if end > start else iter(())
    elif status == 200:
        chunks = stream.chunks
    else:
        chunks = _between(stream, start, end)
    return StreamingResponse(chunks, status_code=status, media_type="application/octet-stream",
                             headers=headers)


def _byte_range(header: str, size: int) -> tuple[int, int] | str | None:
    """[start, end) of the one range ``header`` asks of ``size`` bytes; "unsatisfiable" when
    it starts past the end; None when it is no single byte range, or the last bytes of a file
    of none (the whole file is sent)."""
    match = _RANGE.fullmatch(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":  # the last N bytes
        length = _position(last, size)
        if length == 0:
            return "unsatisfiable"
        if size == 0:
            # Satisfiable (RFC 9110 14.1.1), yet no 206 can say it: its Content-Range names a
            # first and a last byte (14.4), and was "bytes 0--1/0". Ignored, as a server may
            # (14.2): the whole file, empty, as a 200.
            return None
        return max(0, size - length), size
    start = _position(first, size)
    end = size if last == "" else min(size, _position(last, size) + 1)
    if start >= size:
        return "unsatisfiable"
    if end <= start:
        return None  # bytes=9-3: not a valid range, ignored
    return start, end


def _position(digits: str, size: int) -> int:
    """``digits`` as a number, or ``size + 1`` when it has more digits than ``size``: past the
    end either way, and int() refuses over 4300 digits (a 5000-digit Range was a 500). The
    zeros in front are dropped first: they count towards those 4300 too."""
    significant = digits.lstrip("0") or "0"
    if len(significant) > len(str(size)):
        return size + 1
    return int(significant)


def _between(stream: BlobStream, start: int, end: int) -> Iterator[bytes]:
    """The stream's bytes [start, end), for a stream with no ranged read of its own (a file
    converted in memory, which holds all its bytes already): the bytes before ``start`` are
    dropped. A stored file is read from ``start`` instead (``WeightsDownload.open_range``)."""
    position = 0
    try:
        for chunk in stream.chunks:
            chunk_end = position + len(chunk)
            if chunk_end > start:
                yield chunk[max(0, start - position):min(len(chunk), end - position)]
            position = chunk_end
            if position >= end:
                break
    finally:
        stream.close()
