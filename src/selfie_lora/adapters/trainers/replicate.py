"""The Replicate training backend (``SELFIE_LORA_TRAINER=replicate``).

``ReplicateTrainer.train`` creates (or resumes) a training of ``job.trainer_version`` into the
model's one destination, polls it to the end, and copies the LoRA out of the output before
Replicate deletes it (outputs live about an hour). What it guarantees:

* The destination model is created once (GET, then create on 404; a 409 means someone else won
  the race, which is fine).
* A training is created at most once per job, even when a create POST times out after Replicate
  acted on it: before every create attempt (the first too, for a worker that died between create
  and ``sink.started``) it lists recent trainings and adopts the one made for this job. The marker
  it looks for is the uploaded ``input_images`` URL (echoed in ``input``), and for an upload made
  by an earlier process the file's ``metadata.selfie_lora_training_id``.
* 429, 5xx, timeouts and connection errors are retried with exponential backoff that honours
  ``Retry-After``, POSTs included (the official client retries only idempotent methods, and
  sleeps on its own clock; its retry layer is bypassed so there is one policy, with an injected
  ``sleep``).
* Vendor errors become :mod:`selfie_lora.errors` with a sentence a user can act on.

``ReplicateSession`` (one client, one retry policy, capped downloads) is shared with
:mod:`selfie_lora.adapters.generators.replicate`.
"""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import time
import zipfile
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from replicate.client import Client
from replicate.exceptions import ReplicateError, ReplicateException
from replicate.pagination import Page
from replicate.training import Training

from selfie_lora.adapters.trainers.replicate_webhooks import parse_log_progress
from selfie_lora.adapters.trainers.weights import (
    DEFAULT_MAX_WEIGHTS_BYTES,
    extract_safetensors,
    find_weights_url,
)
from selfie_lora.domain.entities import TrainingStatus
from selfie_lora.errors import (
    ConfigError,
    TrainerError,
    TrainerUnavailableError,
    TrainingCanceledError,
    TrainingFailedError,
    TrainingInterruptedError,
    WeightsNotFoundError,
)
from selfie_lora.services.ports import ProgressSink, TrainingJob, TrainingPhoto, TrainingResult

logger = logging.getLogger(__name__)

__all__ = [
    "MARKER_METADATA_KEY",
    "ReplicateSession",
    "ReplicateTrainer",
    "build_training_zip",
    "parse_version_ref",
]

T = TypeVar("T")

MARKER_METADATA_KEY = "selfie_lora_training_id"
_VERSION_REF = re.compile(r"^(?P<model>[^/\s:]+/[^/\s:]+):(?P<id>[0-9A-Za-z]+)$")
_THROTTLE_HINT = re.compile(r"available in (\d+(?:\.\d+)?) second", re.IGNORECASE)
# A metadata lookup per candidate costs a request; a crashed worker's training is recent.
_MAX_FILE_LOOKUPS = 10
_LOOKUP_WINDOW = timedelta(hours=6)
_MAX_LIST_PAGES = 3

_UNAVAILABLE = (
    "Replicate cannot be reached right now (or keeps answering that it is busy). "
    "Nothing was lost: try again in a few minutes."
)
_BAD_TOKEN = (
    "The training service is not allowed to use Replicate (the API token was rejected). "
    "Ask the operator to check REPLICATE_API_TOKEN."
)


def parse_version_ref(ref: str) -> tuple[str, str]:
    """Split ``owner/name:version`` into ``("owner/name", "version")``; ValueError otherwise."""
    match = _VERSION_REF.match(ref.strip())
    if match is None:
        raise ValueError(f"{ref!r} is not a Replicate version reference (owner/name:version)")
    return match.group("model"), match.group("id")


def build_training_zip(photos: Iterable[TrainingPhoto]) -> bytes:
    """The ``input_images`` zip: ``NNN.jpg`` plus ``NNN.txt`` holding the caption.

    Names are generated (never the user's file names) and every photo gets its caption file, so
    the trainer uses our captions, which carry the trigger word, as they are.
    """
    buffer = io.BytesIO()
    count = 0
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for index, photo in enumerate(photos):
            stem = f"{index:03d}"
            # JPEGs are already compressed: store them; deflate the captions.
            archive.writestr(f"{stem}.jpg", photo.data)
            archive.writestr(
                zipfile.ZipInfo(f"{stem}.txt", date_time=(2024, 1, 1, 0, 0, 0)),
                photo.caption.encode("utf-8"),
                compress_type=zipfile.ZIP_DEFLATED,
            )
            count += 1
    if count == 0:
        raise TrainingFailedError(
            "a training job without photos",
            user_message="There are no photos to train on. Upload your photos again.",
        )
    return buffer.getvalue()


# --------------------------------------------------------------------------- session


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _same_origin(a: str, b: str) -> bool:
    x, y = urlsplit(a), urlsplit(b)
    return (x.scheme, x.hostname, x.port) == (y.scheme, y.hostname, y.port)


class ReplicateSession:
    """One ``replicate.Client`` and one retry policy, for one unit of work; close it after.

    The session owns the HTTP transports (mounted over the client's own retrying transport), so
    closing it closes every socket it opened.
    """

    def __init__(
        self,
        *,
        api_token: str,
        base_url: str,
        timeout: float,
        max_retries: int,
        sleep: Callable[[float], None],
        refused: type[TrainerError] = TrainerError,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self._api_token = api_token
        self._sleep = sleep
        self._refused = refused
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._retry_after: float | None = None
        self._timeout = httpx.Timeout(timeout)
        self._api_transport = httpx.HTTPTransport()
        self._download_transport = httpx.HTTPTransport()
        hooks: dict[str, list[Callable[[httpx.Response], None]]] = {"response": [self._remember_retry_after]}
        self.client = Client(
            api_token=api_token,
            base_url=self.base_url,
            timeout=self._timeout,
            # Our transport for every URL: the client's own retry layer would sleep on the real
            # clock and skip POSTs; one policy (ours) is easier to reason about and to test.
            mounts={"all://": self._api_transport},
            event_hooks=hooks,
        )
        self._http = httpx.Client(
            timeout=self._timeout,
            follow_redirects=True,
            transport=self._download_transport,
            event_hooks=hooks,
        )

    def close(self) -> None:
        self._http.close()
        self._api_transport.close()
        self._download_transport.close()

    def __enter__(self) -> ReplicateSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _remember_retry_after(self, response: httpx.Response) -> None:
        if response.status_code == 429 or response.status_code >= 500:
            self._retry_after = _parse_retry_after(response.headers.get("Retry-After"))

    # ----------------------------------------------------------------- retries

    def call(
        self,
        what: str,
        fn: Callable[[], T],
        *,
        reconcile: Callable[[], T | None] | None = None,
    ) -> T:
        """Run ``fn`` with retries. ``what`` completes "could not ..." in messages.

        ``reconcile`` runs before every *re*-try and may return a result to use instead of
        calling ``fn`` again (a create that did happen although its answer was lost).
        """
        attempt = 0
        while True:
            if attempt > 0 and reconcile is not None:
                adopted = reconcile()
                if adopted is not None:
                    return adopted
            self._retry_after = None
            try:
                return fn()
            except (ReplicateException, httpx.HTTPError, ValueError) as exc:
                delay = self._retry_delay(exc, attempt)
                if delay is None:
                    raise self._map(exc, what) from exc
                if attempt >= self.max_retries:
                    raise TrainerUnavailableError(
                        f"could not {what} after {attempt + 1} attempts: {_describe(exc)}",
                        user_message=_UNAVAILABLE,
                    ) from exc
                attempt += 1
                logger.warning(
                    "could not %s (%s); retry %d of %d in %.1f s",
                    what,
                    _describe(exc),
                    attempt,
                    self.max_retries,
                    delay,
                )
                self._sleep(delay)

    def _retry_delay(self, exc: Exception, attempt: int) -> float | None:
        """Seconds to wait before retrying ``exc``, or None when it must not be retried."""
        status: int | None = None
        hint: float | None = None
        if isinstance(exc, ReplicateError):
            status = exc.status
            if status == 429 and exc.detail:
                found = _THROTTLE_HINT.search(exc.detail)
                hint = float(found.group(1)) if found else None
        elif isinstance(exc, httpx.HTTPStatusError):
            status = exc.response.status_code
        elif isinstance(exc, httpx.TransportError):
            status = None  # timeouts, refused or reset connections: always worth a retry
        else:
            return None
        if status is not None and status != 429 and status < 500:
            return None
        backoff = min(self._backoff_max, self._backoff_base * 2.0**attempt)
        server_hint = self._retry_after if self._retry_after is not None else hint
        return max(backoff, server_hint) if server_hint is not None else backoff

    def _map(self, exc: Exception, what: str) -> TrainerError:
        if isinstance(exc, ReplicateError):
            detail = exc.detail or exc.title or "no detail"
            if exc.status in {401, 403}:
                return TrainerUnavailableError(
                    f"Replicate refused our credentials when trying to {what}: {detail}",
                    user_message=_BAD_TOKEN,
                )
            return self._refused(
                f"Replicate answered {exc.status} when trying to {what}: {detail}",
                user_message=f"Replicate refused to {what}: {_shorten(detail)}.",
            )
        if isinstance(exc, httpx.HTTPStatusError):
            code = exc.response.status_code
            return self._refused(
                f"HTTP {code} when trying to {what}",
                user_message=f"Could not {what} (HTTP {code}).",
            )
        return TrainerUnavailableError(
            f"unexpected answer from Replicate when trying to {what}: {_describe(exc)}",
            user_message=_UNAVAILABLE,
        )

    # ----------------------------------------------------------------- raw requests

    def _auth_for(self, url: str) -> dict[str, str]:
        # The token goes to the API only, never to the hosts that serve outputs.
        if _same_origin(url, self.base_url):
            return {"Authorization": f"Bearer {self._api_token}"}
        return {}

    def upload(
        self, data: bytes, *, filename: str, content_type: str, metadata: dict[str, Any]
    ) -> dict[str, Any]:
        """``POST /v1/files`` as the official client does it, but with a timeout (the client
        uploads with none, which can hang a worker for ever). Returns the file object."""
        url = f"{self.base_url}/v1/files"

        def send() -> dict[str, Any]:
            response = self._http.post(
                url,
                headers=self._auth_for(url),
                files={"content": (filename, data, content_type)},
                data={"metadata": json.dumps(metadata)},
            )
            if response.status_code >= 400:
                raise ReplicateError.from_response(response)
            body = response.json()
            if not isinstance(body, dict) or not isinstance(body.get("urls"), dict):
                raise ValueError("file upload answer has no urls")
            return body

        return self.call("upload the photos", send)

    def get_json(self, path: str, *, what: str) -> Any:
        """``GET`` an API path and return its JSON as is (the client's models drop fields it
        does not declare, such as a training's ``metrics``)."""
        url = f"{self.base_url}{path}"

        def fetch() -> Any:
            response = self._http.get(url, headers=self._auth_for(url))
            if response.status_code >= 400:
                raise ReplicateError.from_response(response)
            return response.json()

        return self.call(what, fetch)

    def download(self, url: str, *, max_bytes: int, what: str) -> bytes:
        """GET ``url`` (retrying), refusing more than ``max_bytes``."""
        if url.startswith("data:"):
            import base64

            return base64.b64decode(url.split(",", 1)[1])

        def fetch() -> bytes:
            with self._http.stream("GET", url, headers=self._auth_for(url)) as response:
                response.raise_for_status()
                declared = response.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise _TooLargeError(url, max_bytes)
                chunks: list[bytes] = []
                total = 0
                for chunk in response.iter_bytes():
                    total += len(chunk)
                    if total > max_bytes:
                        raise _TooLargeError(url, max_bytes)
                    chunks.append(chunk)
                return b"".join(chunks)

        try:
            return self.call(what, fetch)
        except _TooLargeError as exc:
            raise WeightsNotFoundError(
                str(exc),
                user_message="The trainer's output is larger than this service accepts.",
            ) from exc


class _TooLargeError(Exception):
    def __init__(self, url: str, limit: int) -> None:
        super().__init__(f"{url} is larger than the {limit} byte cap")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ReplicateError):
        return f"HTTP {exc.status}: {exc.detail or exc.title}"
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _shorten(text: str, limit: int = 240) -> str:
    """First meaningful line of a remote error, bounded (tracebacks are not for users)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    meaningful = [line for line in lines if not line.startswith(("Traceback", "File "))]
    line = (meaningful or lines or ["unknown error"])[-1 if meaningful else 0]
    line = line.rstrip(".")
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# --------------------------------------------------------------------------- the trainer


class ReplicateTrainer:
    """The ``Trainer`` port on Replicate. See the module docstring for what it guarantees."""

    backend = "replicate"

    def __init__(
        self,
        *,
        api_token: str,
        base_url: str = "https://api.replicate.com",
        owner: str,
        hardware: str = "cpu",
        poll_interval: float = 5.0,
        max_retries: int = 5,
        sleep: Callable[[float], None] = time.sleep,
        timeout: float = 30.0,
        max_weights_bytes: int = DEFAULT_MAX_WEIGHTS_BYTES,
        webhook_events: tuple[str, ...] = ("start", "completed"),
    ) -> None:
        if not api_token:
            raise ConfigError("the Replicate backend needs REPLICATE_API_TOKEN")
        if not owner:
            raise ConfigError("the Replicate backend needs SELFIE_LORA_REPLICATE_OWNER")
        self._api_token = api_token
        self._base_url = base_url
        self._owner = owner
        self._hardware = hardware
        self._poll_interval = poll_interval
        self._max_retries = max_retries
        self._sleep = sleep
        self._timeout = timeout
        self._max_weights_bytes = max_weights_bytes
        self._webhook_events = list(webhook_events)
        self._ensured: set[str] = set()
        self._ensured_lock = threading.Lock()

    def session(self) -> ReplicateSession:
        return ReplicateSession(
            api_token=self._api_token,
            base_url=self._base_url,
            timeout=self._timeout,
            max_retries=self._max_retries,
            sleep=self._sleep,
            refused=TrainingFailedError,
        )

    def cancel_remote(self, remote_id: str) -> None:
        with self.session() as session:
            self._cancel(session, remote_id)

    # ----------------------------------------------------------------- train

    def train(self, job: TrainingJob, *, sink: ProgressSink) -> TrainingResult:
        try:
            trainer_model, trainer_version_id = parse_version_ref(job.trainer_version)
        except ValueError as exc:
            raise TrainingFailedError(
                str(exc),
                user_message=(
                    f"The trainer version {job.trainer_version!r} is not a Replicate version "
                    "(owner/name:version). Ask the operator to fix SELFIE_LORA_TRAINER_VERSION."
                ),
            ) from exc
        destination = self._destination(job.destination)
        with self.session() as session:
            if job.remote_id:
                remote_id = job.remote_id
                logger.info("training %s: resuming Replicate training %s", job.training_id, remote_id)
                training = session.call("read the training", lambda: session.client.trainings.get(remote_id))
            else:
                self._ensure_destination(session, destination)
                training = self._create(session, job, destination, trainer_version_id)
                logger.info(
                    "training %s: Replicate training %s of %s into %s",
                    job.training_id,
                    training.id,
                    trainer_model,
                    destination,
                )
                sink.started(remote_id=training.id)
            finished = self._wait(session, job, training, sink)
            return self._collect(session, job, finished, destination)

    def _destination(self, destination: str) -> str:
        if "/" not in destination:
            return f"{self._owner}/{destination}"
        if destination.split("/", 1)[0] != self._owner:
            # the destination is pinned on the model: keep it, but say so
            logger.warning("destination %s is not owned by the configured owner %s", destination, self._owner)
        return destination

    # ----------------------------------------------------------------- destination

    def _ensure_destination(self, session: ReplicateSession, destination: str) -> None:
        with self._ensured_lock:
            if destination in self._ensured:
                return
        owner, name = destination.split("/", 1)
        client = session.client

        def lookup() -> bool:
            try:
                client.models.get(owner, name)
            except ReplicateError as exc:
                if exc.status == 404:
                    return False
                raise
            return True

        def create() -> bool:
            try:
                client.models.create(owner=owner, name=name, visibility="private", hardware=self._hardware)
            except ReplicateError as exc:
                if exc.status == 409:  # created meanwhile (another worker, or our lost answer)
                    return False
                raise
            return True

        if not session.call("look up the destination model", lookup):
            if session.call("create the destination model", create):
                logger.info("created Replicate model %s (private)", destination)
            else:
                logger.info("Replicate model %s already existed", destination)
        with self._ensured_lock:
            self._ensured.add(destination)

    # ----------------------------------------------------------------- create

    def _create(
        self,
        session: ReplicateSession,
        job: TrainingJob,
        destination: str,
        trainer_version_id: str,
    ) -> Training:
        uploads: set[str] = set()

        def find_existing() -> Training | None:
            found = self._find_existing(session, job, destination, trainer_version_id, uploads)
            if found is not None:
                logger.warning(
                    "training %s: adopting Replicate training %s created by an earlier attempt",
                    job.training_id,
                    found.id,
                )
            return found

        existing = find_existing()
        if existing is not None:
            return existing

        archive = build_training_zip(job.photos)
        uploaded = session.upload(
            archive,
            filename=f"selfie-lora-{job.training_id}.zip",
            content_type="application/zip",
            metadata={MARKER_METADATA_KEY: job.training_id},
        )
        input_url = str(uploaded["urls"]["get"])
        uploads.add(input_url)
        recipe = job.recipe
        inputs: dict[str, Any] = {
            "input_images": input_url,
            "trigger_word": job.trigger_word,
            # our captions hold the trigger word; the trainer's autocaption often drops it
            "autocaption": False,
            "steps": recipe.steps,
            "lora_rank": recipe.lora_rank,
            "learning_rate": recipe.learning_rate,
            "resolution": str(recipe.resolution),
            "batch_size": recipe.batch_size,
        }
        # The webhook finds its training by the remote id in its signed body, never by anything
        # in the URL (which nobody signs).
        webhook = job.webhook_url
        client = session.client

        def create() -> Training:
            if webhook is None:
                return client.trainings.create(
                    version=job.trainer_version, input=inputs, destination=destination
                )
            return client.trainings.create(
                version=job.trainer_version,
                input=inputs,
                destination=destination,
                webhook=webhook,
                webhook_events_filter=self._webhook_events,
            )

        return session.call("create the training", create, reconcile=find_existing)

    def _find_existing(
        self,
        session: ReplicateSession,
        job: TrainingJob,
        destination: str,
        trainer_version_id: str,
        uploads: set[str],
    ) -> Training | None:
        """A training already created for this job, from the newest pages of the list."""
        client = session.client
        lookups = 0
        cursor: str | None = None
        for _ in range(_MAX_LIST_PAGES):
            page = session.call("list recent trainings", _page_loader(client, cursor))
            for training in page.results:
                version = training.version if isinstance(training.version, str) else training.version.id
                if version != trainer_version_id:
                    continue
                if training.destination and training.destination != destination:
                    continue
                images = (training.input or {}).get("input_images")
                if not isinstance(images, str):
                    continue
                if images in uploads:
                    return training
                if lookups < _MAX_FILE_LOOKUPS and self._recent(training):
                    file_id = self._own_file_id(session, images)
                    if file_id is not None:
                        lookups += 1
                        if self._file_marker(session, file_id) == job.training_id:
                            return training
            if page.next is None:
                break
            cursor = page.next
        return None

    @staticmethod
    def _recent(training: Training) -> bool:
        created = _parse_time(training.created_at)
        return created is None or datetime.now(UTC) - created <= _LOOKUP_WINDOW

    @staticmethod
    def _own_file_id(session: ReplicateSession, url: str) -> str | None:
        if not _same_origin(url, session.base_url):
            return None
        match = re.fullmatch(r"/v1/files/([^/]+)", urlsplit(url).path)
        return match.group(1) if match else None

    @staticmethod
    def _file_marker(session: ReplicateSession, file_id: str) -> str | None:
        def read() -> str | None:
            try:
                found = session.client.files.get(file_id)
            except ReplicateError as exc:
                if exc.status == 404:  # expired or deleted: cannot be ours to adopt
                    return None
                raise
            value = (found.metadata or {}).get(MARKER_METADATA_KEY)
            return value if isinstance(value, str) else None

        return session.call("read an uploaded file", read)

    # ----------------------------------------------------------------- wait

    def _wait(
        self,
        session: ReplicateSession,
        job: TrainingJob,
        training: Training,
        sink: ProgressSink,
    ) -> Training:
        total = max(1, job.recipe.steps)
        step = 0
        loss: float | None = None
        last: tuple[str, int, int] | None = None
        remote_id = training.id
        while True:
            progress = parse_log_progress(training.logs, expected_total=total) or parse_log_progress(
                training.logs, label="train"
            )
            if progress is not None:
                total = progress.total
                # logs can be truncated or restart a bar: progress never goes back
                step = max(step, min(progress.step, total))
                loss = progress.loss if progress.loss is not None else loss
            status = training.status
            if status in {"starting", "processing"}:
                if (status, step, total) != last:
                    sink.progress(status=TrainingStatus(status), step=step, total=total, loss=loss)
                    last = (status, step, total)
            elif status == "succeeded":
                if last is None or last[1] != total:
                    # The training's own status is set by the caller once the weights are safe;
                    # here only the step count reaches its total.
                    sink.progress(status=TrainingStatus.PROCESSING, step=total, total=total, loss=loss)
                return training
            elif status == "failed":
                error = training.error or "no error message"
                logger.warning(
                    "training %s: Replicate training %s failed: %s",
                    job.training_id,
                    remote_id,
                    error,
                )
                raise TrainingFailedError(
                    f"Replicate training {remote_id} failed: {error}",
                    user_message=(
                        f"The training failed on Replicate: {_shorten(str(error))}. "
                        "Check your photos and try again."
                    ),
                    details=[{"remote_id": remote_id, "logs_tail": (training.logs or "")[-2000:]}],
                )
            elif status == "canceled":
                raise TrainingCanceledError(
                    f"Replicate training {remote_id} was canceled on Replicate",
                    user_message=(
                        "The training was canceled on Replicate before it finished. "
                        "Start it again when you are ready."
                    ),
                )
            else:
                logger.warning("training %s: unknown Replicate status %r", job.training_id, status)

            if sink.interrupted():
                # This worker stops; the remote training goes on and the next attempt adopts it.
                raise TrainingInterruptedError(
                    f"training {job.training_id}: the worker stops; Replicate training "
                    f"{remote_id} keeps running")
            if sink.cancel_requested():
                self._cancel(session, remote_id)
                raise TrainingCanceledError(
                    f"training {job.training_id} canceled by request",
                    user_message="The training was canceled.",
                )
            self._sleep(self._poll_interval)
            training = session.call("check on the training", lambda: session.client.trainings.get(remote_id))

    @staticmethod
    def _cancel(session: ReplicateSession, remote_id: str) -> None:
        try:
            session.call("cancel the training", lambda: session.client.trainings.cancel(remote_id))
            logger.info("canceled Replicate training %s", remote_id)
        except TrainerError as exc:
            # It may have ended meanwhile; the user still asked for a cancel, so honour it here.
            logger.warning("could not cancel Replicate training %s: %s", remote_id, exc)

    # ----------------------------------------------------------------- collect

    def _collect(
        self,
        session: ReplicateSession,
        job: TrainingJob,
        training: Training,
        destination: str,
    ) -> TrainingResult:
        url, where = find_weights_url(training.output)
        try:
            data = session.download(url, max_bytes=self._max_weights_bytes, what="download the LoRA weights")
        except TrainingFailedError as exc:  # a 4xx: the output is gone (they expire in ~1 h)
            raise WeightsNotFoundError(
                f"could not download the weights of Replicate training {training.id}: {exc}",
                user_message=(
                    "The training finished, but its LoRA file could no longer be downloaded "
                    "from Replicate. Start the training again."
                ),
            ) from exc
        weights, detail = extract_safetensors(data, source_name=url, max_bytes=self._max_weights_bytes)
        job.work_dir.mkdir(parents=True, exist_ok=True)
        path = job.work_dir / "lora.safetensors"
        _write_atomically(path, weights)
        method = f"replicate {where}: {detail}"
        logger.info(
            "training %s: LoRA weights found via %s (%d bytes)", job.training_id, method, len(weights)
        )

        output = training.output
        remote_version = output.get("version") if isinstance(output, dict) else None
        if not isinstance(remote_version, str) or not remote_version:
            remote_version = self._latest_version(session, destination)
        mismatch = False
        if remote_version is not None:
            model = remote_version.split(":", 1)[0]
            mismatch = model != destination
            if mismatch:
                # replicate-python #419: a pinned trainer version was once ignored
                logger.warning(
                    "training %s: output version %s does not belong to destination %s",
                    job.training_id,
                    remote_version,
                    destination,
                )
        metrics: dict[str, Any] = {"remote_id": training.id}
        predict_time = _predict_time(session, training)
        if predict_time is not None:
            metrics["predict_time"] = predict_time
        return TrainingResult(
            weights_path=path,
            weights_method=method,
            remote_version=remote_version,
            version_mismatch=mismatch,
            metrics=metrics,
        )

    @staticmethod
    def _latest_version(session: ReplicateSession, destination: str) -> str | None:
        """The destination's newest version, for outputs that carry no ``version``."""
        try:
            model = session.call("read the destination model", lambda: session.client.models.get(destination))
        except TrainerError as exc:
            logger.warning("could not read %s's latest version: %s", destination, exc)
            return None
        latest = model.latest_version
        if latest is None:
            logger.warning("the output names no version and %s has none", destination)
            return None
        logger.info("the output names no version; using %s's latest (%s)", destination, latest.id)
        return f"{destination}:{latest.id}"


def _page_loader(client: Client, cursor: str | None) -> Callable[[], Page[Training]]:
    def load() -> Page[Training]:
        return client.trainings.list() if cursor is None else client.trainings.list(cursor)

    return load


def _predict_time(session: ReplicateSession, training: Training) -> float | None:
    """Replicate's ``metrics.predict_time`` (billed seconds), else the timestamps' difference."""
    try:
        raw = session.get_json(f"/v1/trainings/{training.id}", what="read the training's metrics")
    except TrainerError as exc:
        logger.info("no metrics for Replicate training %s: %s", training.id, exc)
        raw = None
    metrics = raw.get("metrics") if isinstance(raw, dict) else None
    if isinstance(metrics, dict) and isinstance(metrics.get("predict_time"), int | float):
        return float(metrics["predict_time"])
    started, completed = _parse_time(training.started_at), _parse_time(training.completed_at)
    if started is None or completed is None:
        return None
    return round((completed - started).total_seconds(), 3)


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".part")
    partial.write_bytes(data)
    partial.replace(path)
