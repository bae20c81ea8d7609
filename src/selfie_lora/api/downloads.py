"""Answers that carry a stored file: streamed from the blob store, or a redirect to it."""

from __future__ import annotations

from fastapi.responses import RedirectResponse, Response, StreamingResponse

from selfie_lora.services.models import WeightsDownload


def weights_response(download: WeightsDownload) -> Response:
    """A version's LoRA file (the API and the web app answer the same way)."""
    headers = {
        "Content-Disposition": f'attachment; filename="{download.filename}"',
        "X-Weights-SHA256": download.sha256,
        "Cache-Control": "private",
    }
    if download.url is not None:
        # The object storage serves the bytes; the client checks them against the header.
        return RedirectResponse(download.url, status_code=307, headers=headers)
    assert download.stream is not None
    headers["Content-Length"] = str(download.stream.size)
    return StreamingResponse(download.stream.chunks, media_type="application/octet-stream",
                             headers=headers)
