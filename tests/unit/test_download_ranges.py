"""The byte ranges of a weights download (api.downloads.weights_response) at the edges the
routes' tests do not reach: a file of no bytes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from fastapi.responses import Response

from selfie_lora.api.downloads import weights_response
from selfie_lora.domain.entities import Version
from selfie_lora.services.models import WeightsDownload
from selfie_lora.services.ports import BlobStream


def _empty_download() -> WeightsDownload:
    version = Version(id="v-1", model_id="m", number=1, training_id="t1",
                      trainer_version="local-tiny-v1", weights_key="k", weights_sha256="e3b0",
                      weights_method="output", remote_version=None, version_mismatch=False,
                      created_at=datetime(2026, 1, 1, tzinfo=UTC))
    return WeightsDownload(version=version, url=None, stream=BlobStream(size=0, chunks=iter(())))


@pytest.mark.parametrize("head", [False, True])
@pytest.mark.parametrize(("asked", "status"), [
    ("bytes=-5", 200),  # the last 5 bytes of none: the whole file, empty (no 206 can say it)
    ("bytes=-1", 200),
    ("bytes=-" + "9" * 5000, 200),
    ("bytes=0-", 416),  # a first byte of none
    ("bytes=0-0", 416),
    ("bytes=-0", 416),
])
def test_a_range_of_an_empty_file_is_never_a_206_with_an_invalid_content_range(
        asked: str, status: int, head: bool) -> None:
    """A suffix range of a file of no bytes (``bytes=-5``) was a 206 with ``Content-Range:
    bytes 0--1/0``, which no client can read (RFC 9110 14.4: a 206's range has a first and a
    last byte, and a file of none has neither). The file is sent whole instead (a server may
    ignore a Range, RFC 9110 14.2), empty; a range with a first byte stays a 416 saying the
    size (``bytes */0``)."""
    response: Response = weights_response(_empty_download(), range_header=asked, head=head)
    assert response.status_code == status, response.headers  # old code (suffix): 206
    if status == 416:
        assert response.headers["Content-Range"] == "bytes */0"
    else:
        assert "Content-Range" not in response.headers
        assert response.headers["Content-Length"] == "0"
