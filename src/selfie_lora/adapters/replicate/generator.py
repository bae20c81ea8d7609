"""Generating with a trained Replicate version (``backend = "replicate"``).

A prediction runs on ``job.remote_version`` (the ``owner/name:<id>`` the training produced); the
images are downloaded at once (Replicate deletes outputs after about an hour) and returned as
PNG bytes. Retries and error mapping are :class:`ReplicateSession`'s; the create is sent with
the session's timeout and, retried, adopts the prediction a lost answer made (never two).
"""

from __future__ import annotations

import io
import logging
import secrets
import threading
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from PIL import Image, UnidentifiedImageError
from replicate.prediction import Prediction

from selfie_lora.adapters.replicate.session import (
    GENERATOR_FAILURES,
    ReplicateConnection,
    ReplicateSession,
    parse_time,
    parse_version_ref,
    shown_url,
)
from selfie_lora.adapters.replicate.statuses import ABORTED, ENDED, validated
from selfie_lora.errors import (
    ClientGoneError,
    ErrorCode,
    GenerationError,
    InvalidInputError,
    SelfieLoraError,
)
from selfie_lora.services.ports import MAX_SEED, GenerationJob, image_seed

logger = logging.getLogger(__name__)

__all__ = ["ReplicateGenerator"]

_MAX_IMAGE_BYTES = 64 * 1024 * 1024
# A lost create is looked for among the newest predictions only.
_MAX_LIST_PAGES = 2
# Replicate's clock against ours: a prediction this call made is not older than its start
# (kept short: an identical request made just before is someone else's to use).
_CLOCK_SLACK = timedelta(seconds=5)
# Predictions this process has already handed to a generate(): never adopted again.
_REMEMBERED = 1024
# Pictures of one batch made at once (one prediction each).
_CONCURRENT_PICTURES = 4
_FAILED = "Generating the images failed on Replicate: {error}. Try again, or change the prompt."


# A prediction ``ABORTED``: its deadline passed before it started.
_ABORTED_MESSAGE = ("Replicate aborted the generation before it started (it waited too long for "
                    "a machine). Try again.")


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
        self._used: deque[str] = deque(maxlen=_REMEMBERED)
        self._used_lock = threading.Lock()

    def _session(self) -> ReplicateSession:
        return self._connection.session(GENERATOR_FAILURES)

    def generate(self, job: GenerationJob) -> list[bytes | None]:
        """The batch as one single-image prediction per picture, picture i with
        ``image_seed(seed, i)``: the trained version's predictor seeds a whole batch once (one
        generator for ``num_outputs`` images), so picture i of a batch was not the picture its
        seed makes alone, and it drops an image its safety checker flags and still succeeds,
        which shortened the batch and shifted the pictures' seeds. A picture withheld so is None
        at its place (the others are paid for and kept); a batch of nothing but withheld
        pictures fails, naming them. They run concurrently, a few at a time."""
        if not job.remote_version:
            raise InvalidInputError(
                "this version has no Replicate model version to generate with",
                code=ErrorCode.NO_REMOTE_VERSION,
            )
        try:
            _, version_id = parse_version_ref(job.remote_version)
        except ValueError as exc:
            raise InvalidInputError(str(exc), code=ErrorCode.NO_REMOTE_VERSION) from exc
        # Drawn when none is given: each picture then has a seed of its own, so a picture's
        # lost create is never matched to its sibling's identical prediction.
        seed = job.seed if job.seed is not None else secrets.randbelow(MAX_SEED + 1)
        seeds = [image_seed(seed=seed, index=i) for i in range(job.num_outputs)]
        _check_client(job)
        if len(seeds) == 1:
            try:
                return [self._picture(job, version_id, seed=seeds[0])]
            except _WithheldError:
                raise _withheld_error(seeds) from None
        with ThreadPoolExecutor(max_workers=min(len(seeds), _CONCURRENT_PICTURES),
                                thread_name_prefix="replicate-picture") as pool:
            futures = [pool.submit(self._picture, job, version_id, seed=s) for s in seeds]
            wait(futures)
        withheld = [i for i, f in enumerate(futures)
                    if isinstance(f.exception(), _WithheldError)]
        if len(withheld) == len(seeds):
            raise _withheld_error(seeds)
        # The first other picture's error, if any, is raised: a failed prediction fails the batch.
        return [None if i in withheld else f.result() for i, f in enumerate(futures)]

    def _picture(self, job: GenerationJob, version_id: str, *, seed: int) -> bytes:
        """One picture: a prediction of one image with ``seed``; none is created once the
        client has gone (a picture beyond the first few waits for its turn: the batch is then
        dropped, and nothing more is paid for)."""
        _check_client(job)
        inputs: dict[str, Any] = {
            "prompt": job.prompt,
            "lora_scale": job.lora_scale,
            "num_outputs": 1,
            "output_format": "png",
            "seed": seed,
        }
        if job.width is not None and job.height is not None:
            inputs.update({"aspect_ratio": "custom", "width": job.width, "height": job.height})

        with self._session() as session:
            since = datetime.now(UTC) - _CLOCK_SLACK

            def find_made() -> dict[str, Any] | None:
                with self._used_lock:
                    used = set(self._used)
                found = _find_prediction(session, version_id=version_id, inputs=inputs,
                                         since=since, skip=used)
                if found is not None:
                    logger.warning("adopting prediction %s, made by an attempt whose answer was "
                                   "lost", found.get("id"))
                return found

            # Through the session's own HTTP client (its timeout; the official client sends
            # this POST with none) and never twice for one call: a retry first looks for the
            # prediction a lost answer may have made, as the trainer does for its trainings.
            # The bare version id: accepted by every form of POST /v1/predictions.
            created = session.post_json(
                "/v1/predictions", {"version": version_id, "input": inputs},
                what="start generating", reconcile=find_made,
            )
            prediction = _prediction_from_json(created)
            prediction_id = prediction.id
            with self._used_lock:
                self._used.append(prediction_id)
            polls = 0
            while prediction.status not in ENDED:
                polls += 1
                if polls > self._max_polls:
                    # Given up on: it would run on, billed, for images nobody collects.
                    # (Replicate out of reach instead: a cancel would not reach it either.)
                    _cancel_quietly(session, prediction_id)
                    raise GenerationError(
                        "Generating took too long on Replicate. Try again.",
                        details=[f"prediction {prediction_id} still {prediction.status} after "
                                 f"{polls} polls"])
                self._sleep(self._poll_interval)
                # Raw JSON, parsed here: the client's own read refuses an "aborted" status.
                prediction = session.get_json(f"/v1/predictions/{prediction_id}",
                                              what="check on the generation",
                                              parse=_prediction_from_json)
            if prediction.status == ABORTED:
                raise GenerationError(
                    _ABORTED_MESSAGE, user_message=_ABORTED_MESSAGE,
                    details=[f"prediction {prediction_id} aborted"])
            if prediction.status != "succeeded":
                error = str(prediction.error or prediction.status)
                failed = _FAILED.format(error=error.strip().splitlines()[-1][:200].rstrip("."))
                raise GenerationError(
                    failed, user_message=failed,
                    details=[f"prediction {prediction_id} {prediction.status}: {error}"])
            urls = _output_urls(prediction)
            logger.info("prediction %s on %s: seed %d", prediction_id, job.remote_version, seed)
            return _as_png(
                session.download(urls[0], max_bytes=_MAX_IMAGE_BYTES, what="download the image"),
                shown_url(urls[0]),
            )


def _check_client(job: GenerationJob) -> None:
    """``ClientGoneError`` once nobody waits for ``job``'s pictures, and what ``job.stop``
    raises (the port's contract): before a prediction is created, never while one runs (it is
    paid for by then, and its picture kept)."""
    if job.abandoned():
        logger.info("generation dropped: its client went away")
        raise ClientGoneError("the client went away before its pictures were made")
    job.check_stop()


class _WithheldError(GenerationError):
    """A prediction succeeded without its image (the predictor's safety checker dropped it)."""


def _withheld_error(seeds: list[int]) -> GenerationError:
    """Every picture of the batch withheld: nothing to keep."""
    if len(seeds) == 1:
        message = (f"Replicate withheld the picture (seed {seeds[0]}): its safety checker "
                   "flagged it. Change the prompt or the seed and try again.")
    else:
        which = ", ".join(f"{i + 1} (seed {s})" for i, s in enumerate(seeds))
        message = (f"Replicate withheld every picture ({which}): its safety checker flagged "
                   "them. Change the prompt or the seed and try again.")
    return GenerationError(message, user_message=message,
                           details=[f"pictures without an image: {list(range(1, len(seeds) + 1))}"])


def _cancel_quietly(session: ReplicateSession, prediction_id: str) -> None:
    try:
        session.post_json(f"/v1/predictions/{prediction_id}/cancel", {},
                          what="cancel the generation")
        logger.info("canceled prediction %s, given up on", prediction_id)
    except SelfieLoraError as exc:  # best effort: the caller's error stands
        logger.warning("could not cancel prediction %s, given up on: %s", prediction_id, exc)


def _find_prediction(
    session: ReplicateSession,
    *,
    version_id: str,
    inputs: dict[str, Any],
    since: datetime,
    skip: set[str],
) -> dict[str, Any] | None:
    """The newest prediction of ``version_id`` with exactly ``inputs``, created since ``since``
    and not in ``skip``.

    A prediction carries no marker of ours, so the match is its version and its whole input
    (prompt, scale, seed, size) within this call's lifetime: at worst an identical request of
    the same model (the same user's) sent by another process within seconds is adopted, and
    both get the same images.
    """
    cursor = "/v1/predictions"
    for _ in range(_MAX_LIST_PAGES):
        page = session.get_json(cursor, what="list recent predictions")
        results = page.get("results") if isinstance(page, dict) else None
        for item in results if isinstance(results, list) else []:
            if not isinstance(item, dict) or item.get("status") == "canceled":
                continue
            if item.get("id") in skip:
                continue
            version = item.get("version")
            if isinstance(version, dict):
                version = version.get("id")
            if version != version_id or item.get("input") != inputs:
                continue
            created = parse_time(item.get("created_at"))
            if created is not None and created < since:
                # newest first: everything after this one is older still
                return None
            return item
        following = page.get("next") if isinstance(page, dict) else None
        if not isinstance(following, str) or not following:
            return None
        parts = urlsplit(following)
        cursor = f"{parts.path}?{parts.query}" if parts.query else parts.path
    return None


def _output_urls(prediction: Prediction) -> list[str]:
    output = prediction.output
    items = output if isinstance(output, list) else [output]
    urls = [str(getattr(item, "url", item)) for item in items if item]
    if not urls:
        # The trained version's predictor drops an image its safety checker flags, and succeeds.
        raise _WithheldError("Replicate returned no image: its safety checker may have withheld "
                             "it. Change the prompt or the seed and try again.",
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


def _prediction_from_json(raw: object) -> Prediction:
    """A ``Prediction`` from the API's JSON, ``aborted`` included (the client's status Literal
    lacks it: validated as "failed", then given its own back). Not an object: ValueError
    (mapped as an unexpected answer)."""
    if not isinstance(raw, dict):
        raise ValueError(f"a prediction answered as a {type(raw).__name__}, not an object")
    return validated(Prediction, raw)
