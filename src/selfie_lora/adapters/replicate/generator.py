"""Generating with a trained Replicate version (``backend = "replicate"``).

A prediction runs on ``job.remote_version`` (the ``owner/name:<id>`` the training produced); the
images are downloaded at once (Replicate deletes outputs after about an hour) and returned as
PNG bytes. Retries and error mapping are :class:`ReplicateSession`'s.
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import Any

from PIL import Image, UnidentifiedImageError
from replicate.prediction import Prediction

from selfie_lora.adapters.replicate.session import (
    GENERATOR_FAILURES,
    ReplicateConnection,
    ReplicateSession,
    parse_version_ref,
)
from selfie_lora.errors import ErrorCode, GenerationError, InvalidInputError
from selfie_lora.services.ports import GenerationJob

logger = logging.getLogger(__name__)

__all__ = ["ReplicateGenerator"]

_MAX_IMAGE_BYTES = 64 * 1024 * 1024
_FAILED = "Generating the images failed on Replicate: {error}. Try again, or change the prompt."


class ReplicateGenerator:
    """The ``Generator`` port on Replicate predictions."""

    backend = "replicate"

    def __init__(
        self, *, connection: ReplicateConnection, poll_interval: float = 1.0, max_polls: int = 600,
    ) -> None:
        self._connection = connection
        self._poll_interval = poll_interval
        self._sleep = connection.sleep
        self._max_polls = max_polls

    def _session(self) -> ReplicateSession:
        return self._connection.session(GENERATOR_FAILURES)

    def generate(self, job: GenerationJob) -> list[bytes]:
        if not job.remote_version:
            raise InvalidInputError(
                "this version has no Replicate model version to generate with",
                code=ErrorCode.NO_REMOTE_VERSION,
            )
        try:
            _, version_id = parse_version_ref(job.remote_version)
        except ValueError as exc:
            raise InvalidInputError(str(exc), code=ErrorCode.NO_REMOTE_VERSION) from exc
        inputs: dict[str, Any] = {
            "prompt": job.prompt,
            "lora_scale": job.lora_scale,
            "num_outputs": job.num_outputs,
            "output_format": "png",
        }
        if job.seed is not None:
            inputs["seed"] = job.seed
        if job.width is not None and job.height is not None:
            inputs.update({"aspect_ratio": "custom", "width": job.width, "height": job.height})

        with self._session() as session:
            client = session.client
            # The bare version id: accepted by every form of POST /v1/predictions.
            prediction = session.call(
                "start generating",
                lambda: client.predictions.create(version=version_id, input=inputs),
            )
            prediction_id = prediction.id
            polls = 0
            while prediction.status not in {"succeeded", "failed", "canceled"}:
                polls += 1
                if polls > self._max_polls:
                    raise GenerationError(
                        "Generating took too long on Replicate. Try again.",
                        details=[f"prediction {prediction_id} still {prediction.status} after "
                                 f"{polls} polls"])
                self._sleep(self._poll_interval)
                prediction = session.call(
                    "check on the generation", lambda: client.predictions.get(prediction_id)
                )
            if prediction.status != "succeeded":
                error = str(prediction.error or prediction.status)
                raise GenerationError(
                    _FAILED.format(error=error.strip().splitlines()[-1][:200].rstrip(".")),
                    details=[f"prediction {prediction_id} {prediction.status}: {error}"])
            urls = _output_urls(prediction)
            logger.info("prediction %s on %s: %d image(s)", prediction_id, job.remote_version, len(urls))
            return [
                _as_png(
                    session.download(url, max_bytes=_MAX_IMAGE_BYTES, what="download the image"),
                    url,
                )
                for url in urls
            ]


def _output_urls(prediction: Prediction) -> list[str]:
    output = prediction.output
    items = output if isinstance(output, list) else [output]
    urls = [str(getattr(item, "url", item)) for item in items if item]
    if not urls:
        raise GenerationError("Replicate returned no images. Try again.",
                              details=[f"prediction {prediction.id} succeeded without images"])
    return urls


def _as_png(data: bytes, source: str) -> bytes:
    """PNG bytes as they are, anything else decoded and re-encoded as PNG."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=["PNG", "JPEG", "WEBP"]) as image:
                image.load()
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                return buffer.getvalue()
    except (
        UnidentifiedImageError,
        OSError,
        Image.DecompressionBombWarning,
        Image.DecompressionBombError,
        ValueError,
    ) as exc:
        raise GenerationError("Replicate returned something that is not an image. Try again.",
                              details=[f"{source} is not an image: {exc}"]) from exc
