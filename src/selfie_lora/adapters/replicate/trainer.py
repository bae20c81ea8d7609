"""The Replicate training backend (``SELFIE_LORA_TRAINER=replicate``).

``ReplicateTrainer.train`` creates (or resumes) a training of ``job.trainer_version`` into the
model's one destination, polls it to the end, and copies the LoRA out of the output before
Replicate deletes it (outputs live about an hour). What it guarantees:

* The destination model is created once (GET, then create on 404; a 409 means someone else won
  the race, which is fine), and checked once per process; a create refused because it no longer
  exists (deleted on Replicate since) makes it again and creates once more.
* A training is created at most once per job, even when a create POST times out after Replicate
  acted on it: before every create attempt (the first too, for a worker that died between create
  and ``sink.started``) it lists recent trainings and adopts the one made for this job. The marker
  it looks for is the uploaded ``input_images`` URL (echoed in ``input``), stored on the training's
  row (``sink.uploaded``) before every create; only for a row from before that was stored, the
  file's ``metadata.selfie_lora_training_id``.
* 429, 5xx, timeouts and connection errors are retried with exponential backoff that honours
  ``Retry-After`` (up to 60 s), POSTs included (the official client retries only idempotent
  methods, and sleeps on its own clock; its retry layer is bypassed so there is one policy, with
  an injected ``sleep``).
* Vendor errors become :mod:`selfie_lora.errors` with a sentence a user can act on.

Retries and error mapping are :mod:`selfie_lora.adapters.replicate.session`'s, shared with the
generator.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import re
import threading
import zipfile
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from replicate.exceptions import ReplicateError
from replicate.training import Training

from selfie_lora.adapters.replicate.outputs import (
    DEFAULT_MAX_WEIGHTS_BYTES,
    extract_safetensors,
    find_weights_url,
)
from selfie_lora.adapters.replicate.session import (
    TRAINER_FAILURES,
    CallStoppedError,
    ReplicateConnection,
    ReplicateSession,
    parse_time,
    parse_version_ref,
    same_origin,
    shorten,
    shown_url,
)
from selfie_lora.adapters.replicate.statuses import ABORTED, ENDED, validated
from selfie_lora.adapters.replicate.webhooks import parse_log_progress
from selfie_lora.disk_space import is_full_error, is_quota_error
from selfie_lora.domain.entities import TrainingStatus
from selfie_lora.errors import (
    ConfigError,
    InvalidInputError,
    StorageError,
    StorageFullError,
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
    "ReplicateTrainer",
    "build_training_zip",
]

MARKER_METADATA_KEY = "selfie_lora_training_id"
# A metadata lookup per candidate costs a request; a crashed worker's training is recent.
_MAX_FILE_LOOKUPS = 10
_LOOKUP_WINDOW = timedelta(hours=6)
_MAX_LIST_PAGES = 3
# A cancel (and the look for a run whose create's answer was lost) is asked once, each request
# waiting this long at most: it runs on a user's cancel request and in every reconcile pass,
# and the owed cancel (``remote_cancel_pending``) is asked again by the next pass. The full
# retry policy held them 62 s with fast 503s, about 7 minutes when Replicate did not answer.
CANCEL_TIMEOUT_S = 5.0
# How many times the destination is read for the version an output that names none was
# published as (``poll_interval`` apart): Replicate may add it a moment after the run ends.
_VERSION_LOOKS = 3

class _DestinationMissingError(Exception):
    """A training's create refused with 404 because its destination model does not exist."""


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


# --------------------------------------------------------------------------- failures

# What a failed Replicate training's error says, for what the user should do next, as the local
# backend tells an out-of-memory run from bad photos. Replicate's side first: a GPU that ran out
# of memory while reading a photo is still not the photo's fault.
_REMOTE_FAULT = re.compile(
    r"out of memory|\bOOM\b|\bCUDA\b|\bGPU\b|\bNCCL\b|timed? ?out|timeout|deadline|"
    r"internal|infrastructure|interrupted|killed|unavailable|no space left|"
    r"connection (?:reset|refused|error|aborted)", re.IGNORECASE)
_INPUT_FAULT = re.compile(
    r"\bzip\b|input_images|\bimages?\b|\bphotos?\b|caption|\bfaces?\b|\bjpe?g\b|\bpng\b|"
    r"decode|corrupt", re.IGNORECASE)
REMOTE_FAULT_ADVICE = ("This was a problem on Replicate's side, not your photos: start the training "
                       "again later; if it keeps happening, tell the operator.")
INPUT_FAULT_ADVICE = "Check your photos and try again."
UNKNOWN_FAULT_ADVICE = ("Start the training again; if it fails the same way, tell the operator "
                        "this error.")


def failure_advice(error: str) -> str:
    """The sentence after a failed Replicate training's error: what the user can do about it."""
    if _REMOTE_FAULT.search(error):
        return REMOTE_FAULT_ADVICE
    if _INPUT_FAULT.search(error):
        return INPUT_FAULT_ADVICE
    return UNKNOWN_FAULT_ADVICE


# --------------------------------------------------------------------------- the trainer


class ReplicateTrainer:
    """The ``Trainer`` port on Replicate. See the module docstring for what it guarantees."""

    backend = "replicate"

    def __init__(
        self,
        *,
        connection: ReplicateConnection,
        owner: str,
        hardware: str = "cpu",
        poll_interval: float = 5.0,
        max_weights_bytes: int = DEFAULT_MAX_WEIGHTS_BYTES,
        webhook_events: tuple[str, ...] = ("start", "completed"),
        normalize_weights: Callable[[bytes], bytes] | None = None,
    ) -> None:
        if not owner:
            raise ConfigError("the Replicate backend needs SELFIE_LORA_REPLICATE_OWNER")
        self._connection = connection
        self._owner = owner
        self._hardware = hardware
        self._poll_interval = poll_interval
        self._sleep = connection.sleep
        self._max_weights_bytes = max_weights_bytes
        self._webhook_events = list(webhook_events)
        # The trainers write no ``.alpha`` tensors and in their own dtype; a version is stored
        # in the layout we document (bf16, ``.alpha`` per module). Given by the wiring: the
        # LoRA layout code is the FLUX adapter's.
        self._normalize_weights = normalize_weights
        self._ensured: set[str] = set()
        self._ensured_lock = threading.Lock()

    def session(self) -> ReplicateSession:
        return self._connection.session(TRAINER_FAILURES)

    def _one_try_session(self) -> ReplicateSession:
        """A session that asks once, briefly: for calls whose failure is asked again later."""
        return dataclasses.replace(
            self._connection, max_retries=0,
            timeout=min(self._connection.timeout, CANCEL_TIMEOUT_S),
        ).session(TRAINER_FAILURES)

    def cancel_remote(self, remote_id: str) -> None:
        # One try (a read and the cancel, at most CANCEL_TIMEOUT_S each): the service keeps
        # the cancel owed when this raises, and its reconciler asks again.
        with self._one_try_session() as session:
            try:
                raw = session.get_json(f"/v1/trainings/{remote_id}", what="read the training")
            except TrainerUnavailableError:
                raw = None  # its status unknown: the cancel is sent all the same
            except TrainerError as exc:
                # A lasting refusal (a 404: the run is unknown to this account, or gone): every
                # later ask would get the same answer, and there is nothing it could cancel.
                logger.warning("Replicate training %s cannot be read, nothing left to cancel: %s",
                               remote_id, exc)
                return
            status = raw.get("status") if isinstance(raw, dict) else None
            if status in ENDED:
                logger.info("Replicate training %s has ended (%s): nothing to cancel",
                            remote_id, status)
                return
            if not self._cancel(session, remote_id):
                raise TrainerUnavailableError(
                    f"Replicate training {remote_id} could not be canceled now")

    def find_remote(
        self, *, training_id: str, destination: str, marker: str | None = None
    ) -> str | None:
        """The Replicate training created for ``training_id`` whose id was never stored, found
        as a later attempt's create would adopt it (the stored upload URL ``marker``; for a row
        without one, the upload's metadata), in the newest pages of the list; None when there
        is none."""
        uploads = {marker} if marker else set()
        # Asked only to cancel what it finds, which the reconciler asks again: one try.
        with self._one_try_session() as session:
            found = self._find_existing(session, training_id, self._destination(destination), uploads)
        return None if found is None else found.id

    # ----------------------------------------------------------------- train

    def train(self, job: TrainingJob, *, sink: ProgressSink) -> TrainingResult:
        try:
            trainer_model, _ = parse_version_ref(job.trainer_version)
        except ValueError as exc:
            raise TrainingFailedError(
                str(exc),
                user_message=(
                    f"The trainer version {job.trainer_version!r} is not a Replicate version "
                    "(owner/name:version). Ask the operator to fix SELFIE_LORA_TRAINER_VERSION."
                ),
            ) from exc
        destination = self._destination(job.destination)

        # Every retried call's backoff asks this every second, not only the polls': a cancel or
        # a worker stop waited out the create's, the upload's or the download's whole backoff
        # (up to 5 minutes with Retry-After), and a run was created (billed) after the cancel.
        stop = _stop_check(sink)
        with self.session() as session:
            if job.remote_id:
                remote_id = job.remote_id
                logger.info("training %s: resuming Replicate training %s", job.training_id, remote_id)
                try:
                    training = _get_training(session, remote_id, what="read the training",
                                             stop=stop)
                except CallStoppedError:
                    self._stopped(session, job, remote_id, sink)
            else:
                try:
                    self._ensure_destination(session, destination, stop=stop)
                    training = self._create(session, job, destination, sink, stop=stop)
                except CallStoppedError:
                    self._stopped(session, job, None, sink)
                logger.info(
                    "training %s: Replicate training %s of %s into %s",
                    job.training_id,
                    training.id,
                    trainer_model,
                    destination,
                )
                sink.started(remote_id=training.id)
            finished = self._wait(session, job, training, sink)
            try:
                return self._collect(session, job, finished, destination, stop=stop)
            except CallStoppedError:
                self._stopped(session, job, finished.id, sink)

    def _destination(self, destination: str) -> str:
        if "/" not in destination:
            return f"{self._owner}/{destination}"
        if destination.split("/", 1)[0] != self._owner:
            # the destination is pinned on the model: keep it, but say so
            logger.warning("destination %s is not owned by the configured owner %s", destination, self._owner)
        return destination

    # ----------------------------------------------------------------- destination

    def _ensure_destination(self, session: ReplicateSession, destination: str, *,
                            stop: Callable[[], bool] | None = None) -> None:
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

        if not session.call("look up the destination model", lookup, stop=stop):
            if session.call("create the destination model", create, stop=stop):
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
        sink: ProgressSink,
        *,
        stop: Callable[[], bool],
    ) -> Training:
        # The upload an earlier attempt stored before its create: its run is matched exactly.
        uploads: set[str] = {job.remote_marker} if job.remote_marker else set()

        def find_existing() -> Training | None:
            found = self._find_existing(session, job.training_id, destination, uploads,
                                        stop=stop)
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

        # Recorded before the upload: from here on a run may exist that only its marker finds
        # (a worker dying with the create's answer), and a cancel must look for it.
        sink.creating()
        archive = build_training_zip(job.photos)
        uploaded = session.upload(
            archive,
            filename=f"selfie-lora-{job.training_id}.zip",
            content_type="application/zip",
            metadata={MARKER_METADATA_KEY: job.training_id},
            stop=stop,
        )
        input_url = str(uploaded["urls"]["get"])
        # Stored before the create (fenced: a worker that lost the training creates nothing), so
        # that the run, should its answer be lost with this worker, is found by this URL alone.
        sink.uploaded(marker=input_url)
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

        def create_or_missing() -> Training:
            try:
                return create()
            except ReplicateError as exc:
                if exc.status == 404 and "destination" in str(exc.detail or "").lower():
                    raise _DestinationMissingError(str(exc.detail)) from exc
                raise

        for again in (False, True):
            # Asked once more right before the run is made: a cancel asked by now creates none.
            if stop():
                raise CallStoppedError("stopped before creating the training")
            try:
                return session.call("create the training", create_or_missing,
                                    reconcile=find_existing, stop=stop)
            except _DestinationMissingError as exc:
                if again:
                    raise TrainingFailedError(
                        f"Replicate refused to create the training: {exc}, after {destination} "
                        "was created again",
                        user_message=(
                            f"Replicate refused to create the training: its destination model "
                            f"{destination} does not exist, and creating it again did not help. "
                            "Nothing was trained or billed. Tell the operator: the account of "
                            "REPLICATE_API_TOKEN must be able to create and train models of "
                            f"{destination.split('/', 1)[0]} (SELFIE_LORA_REPLICATE_OWNER)."
                        ),
                    ) from exc
                # Checked once by this process and cached for its life: deleted on Replicate
                # since (on replicate.com, by an operator). Made again as a first training does,
                # rather than fail every retrain until the workers restart.
                logger.warning("training %s: Replicate says the destination %s does not exist "
                               "(deleted since this process checked it); creating it again",
                               job.training_id, destination)
                with self._ensured_lock:
                    self._ensured.discard(destination)
                self._ensure_destination(session, destination, stop=stop)
        raise AssertionError("unreachable")  # the second pass returns or raises

    def _find_existing(
        self,
        session: ReplicateSession,
        training_id: str,
        destination: str,
        uploads: set[str],
        *,
        stop: Callable[[], bool] | None = None,
    ) -> Training | None:
        """A training already created for this job, from the newest pages of the list.

        Found by its upload alone (``uploads``, the URLs stored on the row before each create:
        an exact match, whatever else the account runs; a row from before those were stored,
        by its uploads' metadata), never by the trainer version: Replicate has run (and reported)
        another trainer version than the create named (replicate-python #419), and a lost
        create's training missed for that would be created, and billed, a second time.

        The list is read as raw JSON, not through the official client: the client parses every
        item's ``output.version``, so one odd training on the account (another tool's, with a
        null or bare-id version) failed the whole list, and with it every new training. An
        item that does not read as a training is skipped; ours is then read by its id.
        """
        lookups = 0
        path = "/v1/trainings"
        for _ in range(_MAX_LIST_PAGES):
            page = session.get_json(path, what="list recent trainings", stop=stop)
            results = page.get("results") if isinstance(page, dict) else None
            for item in results if isinstance(results, list) else []:
                remote_id = item.get("id") if isinstance(item, dict) else None
                if not isinstance(item, dict) or not isinstance(remote_id, str) or not remote_id:
                    continue
                if _listed_destination(item) not in {None, destination}:
                    continue
                inputs = item.get("input")
                images = inputs.get("input_images") if isinstance(inputs, dict) else None
                if not isinstance(images, str):
                    continue
                if images in uploads:
                    return _get_training(session, remote_id, what="read the training", stop=stop)
                # With a stored upload URL the match is exact; only a row from before it was
                # stored (no marker) is looked for by its uploads' metadata, within a budget.
                if not uploads and lookups < _MAX_FILE_LOOKUPS and _recent(item):
                    file_id = self._own_file_id(session, images)
                    if file_id is not None:
                        lookups += 1
                        if self._file_marker(session, file_id, stop=stop) == training_id:
                            return _get_training(session, remote_id, what="read the training",
                                                 stop=stop)
            following = _next_page(page)
            if following is None:
                break
            path = following
        return None

    @staticmethod
    def _own_file_id(session: ReplicateSession, url: str) -> str | None:
        if not same_origin(url, session.base_url):
            return None
        match = re.fullmatch(r"/v1/files/([^/]+)", urlsplit(url).path)
        return match.group(1) if match else None

    @staticmethod
    def _file_marker(session: ReplicateSession, file_id: str, *,
                     stop: Callable[[], bool] | None) -> str | None:
        def read() -> str | None:
            try:
                found = session.client.files.get(file_id)
            except ReplicateError as exc:
                if exc.status == 404:  # expired or deleted: cannot be ours to adopt
                    return None
                raise
            value = (found.metadata or {}).get(MARKER_METADATA_KEY)
            return value if isinstance(value, str) else None

        return session.call("read an uploaded file", read, stop=stop)

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
                        f"The training failed on Replicate: {shorten(str(error))}. "
                        f"{failure_advice(str(error))}"
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
            elif status == ABORTED:
                logger.warning("training %s: Replicate aborted training %s before it started",
                               job.training_id, remote_id)
                raise TrainingFailedError(
                    f"Replicate training {remote_id} was aborted (its deadline passed before it "
                    "started)",
                    user_message=(
                        "Replicate aborted the training before it started (it waited too long "
                        f"for a machine). {REMOTE_FAULT_ADVICE}"
                    ),
                    details=[{"remote_id": remote_id}],
                )
            else:
                logger.warning("training %s: unknown Replicate status %r", job.training_id, status)

            self._stop_if_asked(session, job, remote_id, sink)
            self._sleep(self._poll_interval)
            try:
                # A poll's retries ask too: a cancel must not wait out an outage's backoff.
                training = _get_training(session, remote_id, what="check on the training",
                                         stop=_stop_check(sink))
            except CallStoppedError:
                self._stopped(session, job, remote_id, sink)

    def _stopped(self, session: ReplicateSession, job: TrainingJob, remote_id: str | None,
                 sink: ProgressSink) -> NoReturn:
        """After a call's backoff was stopped (``CallStoppedError``): the worker stops, or the
        user canceled (the run, ``remote_id``, is canceled; with none yet, the service looks
        for one whose create's answer was lost, if a create began)."""
        if remote_id is not None:
            self._stop_if_asked(session, job, remote_id, sink)
        elif sink.interrupted():
            raise TrainingInterruptedError(
                f"training {job.training_id}: the worker stops before its Replicate training "
                "was created")
        elif sink.cancel_requested():
            raise TrainingCanceledError(
                f"training {job.training_id} canceled by request before its Replicate training "
                "was created",
                user_message="The training was canceled.", remote_ended=False,
            )
        raise TrainingInterruptedError(  # asked, then no longer (the row was reread)
            f"training {job.training_id}: a call to Replicate was stopped"
            + (f"; Replicate training {remote_id} keeps running" if remote_id else ""))

    def _stop_if_asked(self, session: ReplicateSession, job: TrainingJob, remote_id: str,
                       sink: ProgressSink) -> None:
        """Raise when the worker stops (the remote training goes on: the next attempt adopts
        it) or the user canceled (the remote training is canceled)."""
        if sink.interrupted():
            raise TrainingInterruptedError(
                f"training {job.training_id}: the worker stops; Replicate training "
                f"{remote_id} keeps running")
        if sink.cancel_requested():
            # Not waited out in an outage either: a cancel Replicate did not take is owed, and
            # the service asks again until it does.
            told = self._cancel(session, remote_id, stop=lambda: True)
            raise TrainingCanceledError(
                f"training {job.training_id} canceled by request",
                user_message="The training was canceled.", remote_ended=told,
            )

    @staticmethod
    def _cancel(session: ReplicateSession, remote_id: str, *,
                stop: Callable[[], bool] | None = None) -> bool:
        """Whether nothing is left to cancel: Replicate has the cancel, or refused it for good (a
        4xx but 429: the run is unknown to this account, or gone; asking again would get the
        same answer for ever). Not (an outage: 429, 5xx, the network, a refused token): the
        caller ends the training all the same (the user asked for it), and the service asks
        again until Replicate has it."""
        try:
            session.call("cancel the training", lambda: session.client.trainings.cancel(remote_id),
                         stop=stop)
            logger.info("canceled Replicate training %s", remote_id)
            return True
        except (TrainerUnavailableError, CallStoppedError) as exc:
            logger.warning("could not cancel Replicate training %s: %s", remote_id, exc)
            return False
        except TrainerError as exc:
            logger.warning("Replicate refused for good to cancel training %s, nothing left to "
                           "cancel: %s", remote_id, exc)
            return True

    # ----------------------------------------------------------------- collect

    def _collect(
        self,
        session: ReplicateSession,
        job: TrainingJob,
        training: Training,
        destination: str,
        *,
        stop: Callable[[], bool],
    ) -> TrainingResult:
        url, where = find_weights_url(training.output)
        try:
            data = session.download(url, max_bytes=self._max_weights_bytes,
                                    what="download the LoRA weights", stop=stop)
        except TrainingFailedError as exc:  # a 4xx: the output is gone (they expire in ~1 h)
            raise WeightsNotFoundError(
                f"could not download the weights of Replicate training {training.id}: {exc}",
                user_message=(
                    "The training finished, but its LoRA file could no longer be downloaded "
                    "from Replicate. Start the training again."
                ),
            ) from exc
        weights, detail = extract_safetensors(data, source_name=shown_url(url),
                                              max_bytes=self._max_weights_bytes)
        weights = self._normalized(weights, training_id=job.training_id)
        path = job.work_dir / "lora.safetensors"
        try:
            job.work_dir.mkdir(parents=True, exist_ok=True)
            _write_atomically(path, weights)
        except OSError as exc:
            # This machine's disk (full, read-only), not the training: a StorageError, as the
            # local backend raises, so the worker steps away and the next attempt (with room, or
            # on another machine) adopts the run by its id and downloads its output again
            # (Replicate keeps it about an hour). A bare OSError failed the paid training for
            # good, as an internal error. A full disk is StorageFullError, as the local one's
            # and the blob store's are: waited out, not counted; a quota (EDQUOT) said as one.
            said = f"the trained LoRA cannot be written to {path}: {exc.strerror or exc}"
            if is_full_error(exc):
                raise StorageFullError(said, quota=is_quota_error(exc)) from exc
            raise StorageError(said) from exc
        method = f"replicate {where}: {detail}"
        logger.info(
            "training %s: LoRA weights found via %s (%d bytes)", job.training_id, method, len(weights)
        )

        output = training.output
        remote_version = output.get("version") if isinstance(output, dict) else None
        if not isinstance(remote_version, str) or not remote_version:
            remote_version = self._own_latest_version(session, job, training, destination,
                                                      stop=stop)
        mismatch = remote_version.split(":", 1)[0] != destination
        if mismatch:
            # replicate-python #419: a pinned trainer version was once ignored
            logger.warning(
                "training %s: output version %s does not belong to destination %s",
                job.training_id,
                remote_version,
                destination,
            )
        metrics: dict[str, Any] = {"remote_id": training.id}
        ran = _trainer_version_ran(training, job.trainer_version)
        if ran is not None:
            # replicate-python #419: Replicate ran another trainer than the pinned one. The LoRA
            # is kept (it is the user's, trained and paid for), but its record must say which
            # trainer made it, not the pin.
            logger.warning(
                "training %s: Replicate training %s ran trainer %s, not the pinned %s",
                job.training_id,
                training.id,
                ran,
                job.trainer_version,
            )
            metrics["trainer_version_ran"] = ran
        predict_time = _predict_time(session, training, stop=stop)
        if predict_time is not None:
            metrics["predict_time"] = predict_time
        return TrainingResult(
            weights_path=path,
            weights_method=method,
            remote_version=remote_version,
            version_mismatch=mismatch,
            trainer_version_ran=ran,
            metrics=metrics,
        )

    def _normalized(self, weights: bytes, *, training_id: str) -> bytes:
        """``weights`` in the stored layout; as the trainer wrote them when they are in none we
        can read (the user's LoRA, trained and paid for, is kept all the same; its kohya export
        says what it does not understand)."""
        if self._normalize_weights is None:
            return weights
        try:
            return self._normalize_weights(weights)
        except InvalidInputError as exc:
            logger.warning("training %s: the LoRA is stored as the trainer wrote it: %s",
                           training_id, exc.message)
            return weights

    def _own_latest_version(self, session: ReplicateSession, job: TrainingJob,
                            training: Training, destination: str, *,
                            stop: Callable[[], bool]) -> str:
        """For an output that names no version: the destination's newest version, only when
        Replicate made it for this run (created at or after the run was). An older one is
        another training's (the previous retrain's, or a run canceled here after it had
        succeeded there): stored as this one's, its scoring and every generation "with" the
        new version would run the old weights. Replicate may add the version a moment after
        the run ends, so it is looked for a few times, ``poll_interval`` apart; then the
        training fails saying so, rather than pointing at weights that are not its own."""
        since = parse_time(training.created_at)
        latest: str | None = None
        for look in range(_VERSION_LOOKS):
            if look:
                if stop():
                    raise CallStoppedError("stopped while looking for the training's version")
                self._sleep(self._poll_interval)
            try:
                model = session.call("read the destination model",
                                     lambda: session.client.models.get(destination), stop=stop)
            except TrainerUnavailableError:
                raise  # the worker steps away; the next attempt adopts the run and looks again
            except TrainerError as exc:
                logger.warning("training %s: could not read %s's latest version: %s",
                               job.training_id, destination, exc)
                break
            version = model.latest_version
            if version is None:
                continue
            latest = version.id
            created = version.created_at
            made = (parse_time(created) if isinstance(created, str)
                    else created if isinstance(created, datetime) else None)
            if made is not None and made.tzinfo is None:
                made = made.replace(tzinfo=UTC)
            if since is not None and made is not None and made >= since:
                logger.info("training %s: the output names no version; using %s's latest (%s), "
                            "made by this run", job.training_id, destination, version.id)
                return f"{destination}:{version.id}"
        logger.warning("training %s: Replicate training %s names no version in its output and "
                       "%s has none made since it began (latest: %s)", job.training_id,
                       training.id, destination, latest)
        raise TrainingFailedError(
            f"Replicate training {training.id} names no version in its output, and "
            f"{destination} has no version made since the training began (latest: {latest})",
            user_message=(
                "The training finished on Replicate, but Replicate did not say which version "
                f"of {destination} holds the new weights, and none made by this training "
                "appeared there. Nothing was stored, so no version runs another training's "
                "weights. Start the training again; if it happens again, tell the operator."
            ),
            details=[{"remote_id": training.id, "destination": destination,
                      "latest_version": latest}],
        )


def _stop_check(sink: ProgressSink) -> Callable[[], bool]:
    """What a retried call's backoff asks each second: stop waiting, the worker stops or the
    user canceled (the poll's and every other call's the same)."""
    return lambda: sink.interrupted() or sink.cancel_requested()


def _get_training(session: ReplicateSession, remote_id: str, *, what: str,
                  stop: Callable[[], bool] | None = None) -> Training:
    """Our training, read as raw JSON (as the list is). The official client's
    ``trainings.get`` parses ``output.version`` as ``owner/name:id``: a null one raised a
    TypeError nobody maps (an internal error) and a bare id "unavailable" for ever, so a paid
    LoRA whose weights URL was right there was never collected."""
    training: Training = session.get_json(f"/v1/trainings/{remote_id}", what=what,
                                          parse=_training_from_json, stop=stop)
    return training


def _training_from_json(raw: object) -> Training:
    """A ``Training`` from the API's JSON, with an ``output.version`` that is not an
    ``owner/name:id`` dropped: ``_collect`` then reads it as a missing one (the destination's
    latest version). A body that is no training raises ValueError (mapped as unavailable)."""
    if not isinstance(raw, dict):
        raise ValueError(f"a training answered as a {type(raw).__name__}, not an object")
    data = dict(raw)
    output = data.get("output")
    destination: str | None = None
    if isinstance(output, dict) and "version" in output:
        version = output.get("version")
        try:
            destination = parse_version_ref(version)[0] if isinstance(version, str) else None
        except ValueError:
            destination = None
        if destination is None:
            logger.warning("Replicate training %s names an unreadable output version %r: "
                           "read as none", data.get("id"), version)
            data["output"] = {k: v for k, v in output.items() if k != "version"}
    training = validated(Training, data)
    if destination is not None:
        training.destination = destination
    return training


def _listed_destination(item: dict[str, Any]) -> str | None:
    """The destination (``owner/name``) of a listed training, as the official client reads it
    (``destination``, else the model of ``output.version``); None when it names none."""
    named = item.get("destination")
    if isinstance(named, str) and named:
        return named
    output = item.get("output")
    version = output.get("version") if isinstance(output, dict) else None
    if isinstance(version, str) and ":" in version:
        return version.split(":", 1)[0]
    return None


def _recent(item: dict[str, Any]) -> bool:
    created = parse_time(item.get("created_at"))
    return created is None or datetime.now(UTC) - created <= _LOOKUP_WINDOW


def _next_page(page: object) -> str | None:
    """The path (with its query) of the list's next page, None on the last one. Only the path
    is kept: it is read from the session's API, whatever host ``next`` names (a proxy's)."""
    following = page.get("next") if isinstance(page, dict) else None
    if not isinstance(following, str) or not following:
        return None
    parts = urlsplit(following)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


def _trainer_version_ran(training: Training, pinned: str) -> str | None:
    """The trainer version (``owner/name:id``) ``training`` says it ran, when that is not
    ``pinned``; None when it is, or when the training does not say."""
    reported = training.version if isinstance(training.version, str) else training.version.id
    if not reported:
        return None
    pinned_model, _ = parse_version_ref(pinned)
    # Replicate answers the bare id; a full reference is taken as it is.
    ran = reported if ":" in reported else f"{training.model or pinned_model}:{reported}"
    return None if ran == pinned else ran


def _predict_time(session: ReplicateSession, training: Training, *,
                  stop: Callable[[], bool]) -> float | None:
    """Replicate's ``metrics.predict_time`` (billed seconds), else the timestamps' difference."""
    try:
        raw = session.get_json(f"/v1/trainings/{training.id}", what="read the training's metrics",
                               stop=stop)
    except TrainerError as exc:
        logger.info("no metrics for Replicate training %s: %s", training.id, exc)
        raw = None
    metrics = raw.get("metrics") if isinstance(raw, dict) else None
    if isinstance(metrics, dict) and isinstance(metrics.get("predict_time"), int | float):
        return float(metrics["predict_time"])
    started, completed = parse_time(training.started_at), parse_time(training.completed_at)
    if started is None or completed is None:
        return None
    return round((completed - started).total_seconds(), 3)


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".part")
    partial.write_bytes(data)
    partial.replace(path)
