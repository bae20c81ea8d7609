"""Ports: the small interfaces the services need, implemented by ``adapters``.

Every port has an in-memory or loopback fake used by the tests, and every adapter of a port runs
the same contract tests.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from selfie_lora.domain.accounts import ErasurePlan, UserHoldings
from selfie_lora.domain.backup import BackupSummary
from selfie_lora.domain.entities import (
    ApiKey,
    Dataset,
    FaceBox,
    GateStatus,
    Generation,
    GenerationPosition,
    JobLease,
    Model,
    Probe,
    Recipe,
    Training,
    TrainingStatus,
    User,
    UserSummary,
    Version,
    WebSession,
)
from selfie_lora.domain.faces import AnalyzerFactory, Face, FaceAnalyzer
from selfie_lora.domain.gc import References
from selfie_lora.domain.likeness import LikenessSummary, VersionLikeness
from selfie_lora.domain.weights import WeightsFormat

__all__ = ["AnalyzerFactory", "Face", "FaceAnalyzer"]  # re-exported: adapters implement them here

# --------------------------------------------------------------------------- trainer


@dataclass(frozen=True)
class TrainingPhoto:
    """One prepared photo (JPEG bytes, no metadata) and its caption, which holds the trigger word;
    ``face_box`` is where the main face is in it (fractions, see ``Dataset.face_boxes``), for a
    recipe that weights the face in the loss; None when unknown."""

    name: str
    data: bytes
    caption: str
    face_box: FaceBox | None = None


@dataclass(frozen=True)
class TrainingJob:
    training_id: str
    trigger_word: str
    destination: str
    trainer_version: str
    recipe: Recipe
    photos: tuple[TrainingPhoto, ...]
    work_dir: Path
    # Set when a worker resumes a training that was already created on the backend.
    remote_id: str | None = None
    # What an earlier attempt's create was made from (``ProgressSink.uploaded``): a run it
    # made whose id was never stored is adopted by this exact marker.
    remote_marker: str | None = None
    webhook_url: str | None = None
    # A trainer that checkpoints (the local one) continues from this file, a checkpoint an
    # earlier attempt or a canceled training made, and gives each new one to ``checkpoints``.
    resume_from: Path | None = None
    checkpoints: CheckpointStore | None = None
    # A trainer that makes sample images (the local one, when ``recipe.sample_every`` > 0)
    # gives each to ``samples``.
    samples: SampleStore | None = None


class CheckpointStore(Protocol):
    """Where a training's checkpoints go to outlive its worker and its machine (the training
    service keeps the newest under the training's keys in the blob store)."""

    def save(self, path: Path, *, step: int) -> None:
        """Keep the checkpoint file at ``path``, written after ``step`` optimizer steps (the
        file may be removed once this returns)."""
        ...


class SampleStore(Protocol):
    """Where a training's sample images go (the training service keeps them under the
    training's keys in the blob store, one per step, and serves them with its progress)."""

    def save(self, path: Path, *, step: int) -> None:
        """Keep the JPEG at ``path``, made with the LoRA after ``step`` optimizer steps; a step
        saved again (a resumed run makes it again) replaces the one before."""
        ...


class ProgressSink(Protocol):
    """What a trainer reports to while it runs. Implemented by the training service."""

    def started(self, *, remote_id: str | None) -> None: ...

    def creating(self) -> None:
        """A remote run is about to be created (called before the upload it is made from): an
        ending that finds no ``remote_id`` stored then looks for the run (``Trainer.find_remote``)
        instead of taking it that none exists."""
        ...

    def uploaded(self, *, marker: str) -> None:
        """What the remote run is about to be created from (Replicate: the uploaded file's URL),
        stored before the create: a later attempt (``TrainingJob.remote_marker``) and a cancel
        (``Trainer.find_remote``) match a run whose create's answer was lost by it exactly."""
        ...

    def progress(
        self, *, status: TrainingStatus, step: int, total: int, loss: float | None = None
    ) -> None: ...

    def cancel_requested(self) -> bool:
        """The user asked to cancel: stop, cancel any remote work, raise
        ``TrainingCanceledError``."""
        ...

    def interrupted(self) -> bool:
        """This worker must stop running the training without ending it (it is shutting down,
        or another worker took the training over): stop, leave any remote work running, raise
        ``TrainingInterruptedError``. Another attempt resumes it."""
        ...


@dataclass(frozen=True)
class TrainingResult:
    weights_path: Path  # a .safetensors file inside job.work_dir
    weights_method: str  # how the weights were found in the trainer's output
    remote_version: str | None = None  # Replicate "owner/name:<hash>" to generate with
    version_mismatch: bool = False  # output.version does not belong to the destination
    # The trainer version that really ran, when the backend reports one other than the job's
    # (replicate-python #419); the stored version records it instead of the pin.
    trainer_version_ran: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


class Trainer(Protocol):
    """A training backend. ``train`` blocks until the training ends.

    Raises ``TrainingFailedError``, ``TrainingCanceledError``, ``TrainerUnavailableError`` or
    ``WeightsNotFoundError`` (all ``TrainerError``, each with a ``user_message``).
    """

    backend: str

    def train(self, job: TrainingJob, *, sink: ProgressSink) -> TrainingResult: ...

    def cancel_remote(self, remote_id: str) -> None:
        """Cancel a training this backend runs elsewhere (a no-op for a backend that runs
        nothing remotely; harmless for a run that has ended). Raises ``TrainerError`` when the
        backend could not be told: the training is ended all the same, and the service asks
        again (``TrainingService.reconcile``) until it has been."""
        ...

    def find_remote(
        self, *, training_id: str, destination: str, marker: str | None = None
    ) -> str | None:
        """The id of the remote run created for ``training_id`` whose id was never stored (the
        worker died with the create's answer), found by what the create was made from (``marker``
        when the row has one, ``ProgressSink.uploaded``); None
        when there is none (always, for a backend that runs nothing remotely). Raises
        ``TrainerError`` when the backend could not be asked."""
        ...


# --------------------------------------------------------------------------- generator


class LoraHold:
    """Jobs that load one LoRA after another (a likeness scoring's probes: one version's
    weights, one scale) let a generator that loads LoRAs into a shared pipeline keep it loaded
    from one job to the next of the same hold, instead of loading it again for each (seconds a
    probe). Whoever makes a hold closes it (``close``, in a ``finally``) when its last job has
    ended: the LoRA is unloaded then, or by the next job of any other hold or of none, which
    never sees it. A closed hold keeps nothing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._release: Callable[[], None] | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def keep(self, release: Callable[[], None]) -> bool:
        """Called by the generator that keeps the hold's LoRA loaded: ``release`` unloads it at
        ``close``. False (nothing kept: unload it now) once the hold is closed."""
        with self._lock:
            if self._closed:
                return False
            self._release = release
            return True

    def dropped(self) -> None:
        """The generator unloaded the LoRA it kept: nothing to release at ``close``."""
        with self._lock:
            self._release = None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            release, self._release = self._release, None
        if release is not None:
            release()


@dataclass(frozen=True)
class GenerationJob:
    prompt: str  # already holds the trigger word
    num_outputs: int
    seed: int | None
    lora_scale: float
    trainer_version: str
    weights_path: Path | None = None  # the local backend loads this LoRA
    # What the file at ``weights_path`` holds: its sha256 (``render`` checked the copy against
    # it), or the version's weights key where no hash was recorded (a key is never written
    # twice). Jobs of one ``lora_hold`` share a load only while it is the same; not the file's
    # path or times, which the object store's blob cache touches at every use. None: the LoRA
    # is never kept.
    weights_id: str | None = None
    remote_version: str | None = None  # the Replicate backend runs a prediction on this
    width: int | None = None
    height: int | None = None
    # Set once nobody waits for the pictures (the HTTP client went away): a generator checks it
    # before it starts (a local one once it has the pipeline, which it may have waited minutes
    # for behind others) and between pictures, and then raises ``ClientGoneError`` with nothing
    # returned. None: never (the CLI, likeness probes).
    client_gone: threading.Event | None = field(default=None, compare=False, repr=False)
    # Called while the pictures are made, and raises to stop them (a likeness probe: the
    # scoring worker's checkpoint, raising once its training is canceled or handed back): a
    # generator calls it (``check_stop``) as it waits for and loads its pipeline, before each
    # picture and, where the backend can, between diffusion steps (a FLUX.1 probe is 28 steps
    # of seconds each); its exception is raised as is, nothing returned. None: never.
    stop: Callable[[], None] | None = field(default=None, compare=False, repr=False)
    # Jobs of one hold may leave their LoRA loaded for the next (``LoraHold``). None: the LoRA
    # is unloaded as the job ends.
    lora_hold: LoraHold | None = field(default=None, compare=False, repr=False)

    def abandoned(self) -> bool:
        """Whether the client this job is made for has gone (``client_gone`` is set)."""
        return self.client_gone is not None and self.client_gone.is_set()

    def check_stop(self) -> None:
        """Raise what ``stop`` raises: the job is no longer wanted."""
        if self.stop is not None:
            self.stop()


# Seeds are unsigned 32-bit, as FLUX pipelines and Replicate take them (the API's bound).
MAX_SEED = 2**32 - 1


def image_seed(*, seed: int, index: int) -> int:
    """The seed of image ``index`` of a batch made with ``seed``: seed + index, wrapped into 0 to
    ``MAX_SEED`` so that each image's seed is one a request may name, and the image can be made
    again on its own (a batch at seed 2**32 - 1 makes its second image with seed 0)."""
    return (seed + index) % (MAX_SEED + 1)


class Generator(Protocol):
    backend: str

    def generate(self, job: GenerationJob) -> Sequence[bytes | None]:
        """PNG bytes, one per output, in the batch's order; None at the place of a picture the
        backend withheld (Replicate's safety checker), so that every other picture keeps its
        place, hence its seed. Raises when every picture is withheld, ``ClientGoneError``
        when ``job.abandoned()`` before it starts or between pictures, and what ``job.stop``
        raises when it calls it (nothing is returned)."""
        ...


# --------------------------------------------------------------------------- faces


# Face (a face found) and FaceAnalyzer (the port) live in the domain, where the photo checks,
# which must not depend on services, can use them too.


# --------------------------------------------------------------------------- storage


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int
    modified: datetime


class BlobStore(Protocol):
    """Named bytes: the local file system (the embedded default) or S3-compatible object storage.

    Keys are made by ``services.layout`` only. Every write is atomic (a reader sees the old
    blob, none, or the whole new one). ``if_absent`` writes only when no blob has the key and
    says whether it wrote: content-addressed keys use it, so a retried job never rewrites a
    published blob. A blob it finds there is made fresh instead (its modification time now,
    its bytes as they were): the garbage collector spares blobs written within its grace
    period, and a writer about to refer to that blob again needs it spared as if just written.
    Missing blobs raise ``StorageError``.
    """

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool: ...

    def put_file(self, key: str, path: Path, *, if_absent: bool = False) -> bool:
        """Streams a file in (multipart on object storage: never whole in memory)."""
        ...

    def get(self, key: str) -> bytes: ...

    def open(self, key: str, *, start: int = 0, end: int | None = None) -> BlobStream:
        """The blob's bytes ``[start, end)`` in chunks (``end`` None: to its end), for answers
        that stream it; raises at once when it is missing. Only that range is read (a seek, an
        S3 ranged GET): a resumed download near the end of a large file must not pull the file
        again. ``size`` is the whole blob's, whatever the range; ``start``
        must be inside the blob (``0 <= start < size``, the caller's to ensure; an empty blob
        is read whole), and an ``end`` past its end reads to its end."""
        ...

    def exists(self, key: str) -> bool: ...

    def modified(self, key: str) -> datetime | None:
        """When the blob was last written or made fresh (UTC); None when it is missing. One
        cheap look (a stat, a HEAD): the garbage collector asks it just before each deletion."""
        ...

    def delete(self, key: str) -> None:
        """Deleting a missing blob is not an error."""
        ...

    def list(self, prefix: str) -> Iterator[BlobInfo]:
        """Every blob whose key starts with ``prefix/`` (any order)."""
        ...

    def remove_leftovers(self) -> int:
        """Removes what writes killed midway left behind, which no listing shows (the file
        system's temporary files once an hour old); how many. Object storage answers 0: its
        incomplete multipart uploads are for the bucket's lifecycle rule."""
        ...

    def local_copy(self, key: str) -> AbstractContextManager[Path]:
        """A path on this machine holding the blob while the context lasts (a cached copy for
        remote stores, which no eviction removes meanwhile: only for blobs that never change,
        such as content-addressed weights)."""
        ...

    def forget_local_copy(self, key: str) -> bool:
        """Drops this machine's cached copy of ``key`` (one found damaged), so the next
        ``local_copy`` fetches it again; whether there was one. The file system store has no
        copies (``local_copy`` is the blob itself): False."""
        ...

    def forget_deleted_local_copies(self) -> int:
        """Drops this machine's cached copies of blobs the store no longer holds (``delete``
        drops the deleting machine's own; this is for every other machine's, and for a copy
        held or still being fetched when its blob went); how many. One cheap look per cached
        copy: the garbage collector asks it on every machine. The file system store: 0."""
        ...

    def download_url(self, key: str, *, expires: timedelta,
                     filename: str | None = None) -> str | None:
        """A short-lived URL that serves the blob without this service (presigned), or None
        where the store has none (the local file system). ``filename``: the name its answer
        gives the file to save (Content-Disposition), where the store can sign one in (S3
        with static keys); else it is saved under the URL's own name."""
        ...

    def check(self) -> None:
        """Raises ``StorageError`` unless the store answers (readiness); ``StorageFullError``
        where its disk has less than ``disk_space.LOW_SPACE_BYTES`` free (the next upload would
        not fit)."""
        ...


@dataclass(frozen=True)
class BlobStream:
    """An open blob: its size and its bytes in chunks (read once). A reader that stops before
    the end calls ``close`` (or reads in ``contextlib.closing``): the chunks hold a file or a
    connection until then."""

    size: int
    chunks: Iterator[bytes]

    def close(self) -> None:
        # The stores' chunks are generators: closing one runs its ``finally``/``with``, which
        # releases the file or the response body at once rather than when it is collected.
        close = getattr(self.chunks, "close", None)
        if close is not None:
            close()


# --------------------------------------------------------------------------- weights


class WeightsConverter(Protocol):
    """Rewrites a stored LoRA file in another tool's layout."""

    def convert(self, data: bytes, *, to: WeightsFormat) -> bytes:
        """``data`` in the layout ``to`` (``diffusers``: as it is). Raises InvalidInputError
        (``unsupported_weights``) for a file the converter does not understand."""
        ...


# --------------------------------------------------------------------------- telemetry


# How a user's generation ended, for ``Telemetry.generation_ended``: its pictures stored
# ("made"), stored with some withheld by the generator's safety checker ("withheld"), refused
# before the generator was asked (bad input, no model or version, too many in flight:
# "refused"), the generator asked and no picture stored ("failed", a batch withheld whole
# included), or dropped because its client went away ("abandoned").
GENERATION_OUTCOMES = ("made", "withheld", "refused", "failed", "abandoned")


class Telemetry(Protocol):
    """The figures an operator watches (``GET /metrics``). Each process records its own; the
    gauges of the whole service (trainings by status, queue depth) are set when read."""

    def training_ended(self, *, backend: str, status: str, seconds: float | None,
                       error_code: str | None = None) -> None:
        """A training reached ``status`` (counted whether it started or not); ``seconds`` from
        its start (None: it never started, and its time is not observed); ``error_code`` why it
        failed."""
        ...

    def scoring_done(self, *, seconds: float, status: str) -> None: ...

    def generation_ended(self, *, backend: str, status: str, seconds: float | None) -> None:
        """A user's generation ended: ``status`` one of ``GENERATION_OUTCOMES``; ``backend`` the
        model's (``none`` when refused before the model was found); ``seconds`` from its
        start, None for a refusal (never timed: it would drown the generations' times)."""
        ...

    def trainer_restarted(self, *, backend: str) -> None:
        """A trainer started its training's process again after it died (the local trainer's
        child, from its newest checkpoint)."""
        ...

    def lease_recovered(self, *, phase: str) -> None:
        """A worker took over a training whose holder stopped."""
        ...

    def intake_done(self, *, seconds: float, photos: int, trainable: bool) -> None: ...

    def http_request(self, *, method: str, route: str, status: int, seconds: float) -> None: ...

    def api_error(self, *, code: str) -> None: ...

    def set_service_gauges(self, *, trainings: dict[str, int], queue_depth: int,
                           waiting: dict[str, int], workers: dict[str, int]) -> None:
        """``waiting``: trainings waiting out an outage, by reason (``lease.OUTAGE_WAITS``);
        ``workers``: the consuming workers by state (``lease.WORKER_STATES``)."""
        ...

    def exposition(self) -> tuple[bytes, str]:
        """The figures in the Prometheus text format, and its content type."""
        ...


# --------------------------------------------------------------------------- repository


class Repository(Protocol):
    """Rows of the service. Each call is its own transaction unless made inside ``atomic()``."""

    def atomic(self) -> AbstractContextManager[Repository]: ...
    def atomic_briefly(self) -> AbstractContextManager[Repository]:
        """``atomic()``, a lock held elsewhere waited for a moment only (``DatabaseLockedError``
        past it), for a write that something else tries again later."""
        ...

    # users
    def add_user(self, user: User) -> None: ...
    def get_user(self, user_id: str, *, for_update: bool = False) -> User | None:
        """``for_update``: as in ``get_model_for_user``."""
        ...
    def get_user_by_name(self, name: str) -> User | None: ...
    def get_user_by_key_hash(self, key_hash: str, *, at: datetime) -> User | None:
        """The owner of the API key with this hash, if the key works ``at`` (not revoked, or
        rotated and its ``revoked_at`` still ahead)."""
        ...
    def add_api_key(self, key: ApiKey) -> None: ...
    def get_api_key(self, key_id: str, *, for_update: bool = False) -> ApiKey | None:
        """``for_update``: as in ``get_model_for_user``."""
        ...
    def list_api_keys(self, user_id: str) -> Sequence[ApiKey]:
        """Oldest first, revoked ones included."""
        ...
    def revoke_api_key(self, key_id: str, *, at: datetime) -> None:
        """The key stops working ``at``: unless it stopped before (a key in its rotation's grace
        is cut short)."""
        ...
    def replace_api_key(self, key_id: str, *, by: str, stops_at: datetime) -> None:
        """Record that ``by`` replaced the key, which works until ``stops_at``."""
        ...

    # passwords, browser sessions, failed sign-ins
    def set_user_password(self, user_id: str, password_hash: str | None) -> None: ...
    def list_users(self, *, at: datetime) -> Sequence[UserSummary]:
        """Every user, oldest first, with the number of their keys that work ``at``."""
        ...
    def set_user_disabled(self, user_id: str, *, at: datetime | None) -> None:
        """Disable the user from ``at`` (None: enable it); ``StorageError`` for no such user."""
        ...
    def request_erasure(self, user_id: str, *, at: datetime,
                        requested_before: datetime | None = None) -> bool:
        """Record that the user's deletion was asked for ``at`` (``erasure_requested_at``).
        With ``requested_before``, only when it was asked for by then: a finisher's claim, which
        one process alone wins. False when nothing changed (no such user, or not due)."""
        ...
    def pending_erasures(self, *, requested_before: datetime | None = None) -> Sequence[User]:
        """The users whose deletion was asked for by ``requested_before``, oldest first; every
        pending one without it (``None``: no bound), whenever it was asked for, one dated ahead
        of this clock (another machine's running fast) included."""
        ...
    def user_holdings(self, user_id: str) -> UserHoldings:
        """The rows the user owns (``users delete``): ids and the blob keys they name."""
        ...
    def delete_user_data(self, user_id: str, *, plan: ErasurePlan,
                         held: UserHoldings) -> dict[str, int]:
        """Delete, in one transaction, every row the user owns but the user's own: generations,
        likeness records, versions, trainings, events, the model, datasets, upload claims, API
        keys and browser sessions; and store ``plan`` on the user's row in that transaction
        (``erasure_plan``), so that a run killed before the blobs are deleted finds what they
        were. ``held``: the holdings ``plan`` was made from; ``HoldingsChangedError``, nothing
        deleted, when a row it would delete (or a blob key such a row names) is not in them
        (saved since they were read). Rows deleted per table (none: nothing was left)."""
        ...
    def erasure_plan(self, user_id: str) -> ErasurePlan | None:
        """The plan ``delete_user_data`` stored for the user; None: none (or no such user)."""
        ...
    def delete_user(self, user_id: str) -> bool:
        """Delete the user's row (``delete_user_data`` first); False when it was gone."""
        ...
    def get_password_hash(self, user_id: str) -> str | None: ...
    def add_session(self, session: WebSession) -> None: ...
    def get_session(self, session_id: str) -> WebSession | None: ...
    def delete_session(self, session_id: str) -> None: ...
    def delete_sessions(self, *, user_id: str | None = None,
                        expired_before: datetime | None = None) -> int:
        """A user's sessions, or the ones expired by then (or both conditions); the count."""
        ...
    def lock_sign_in_keys(self, keys: Sequence[str]) -> None:
        """Inside ``atomic()``: until the transaction ends, every other transaction that locks
        one of ``keys`` waits, so a count of failures and the row added after it go together."""
        ...
    def add_sign_in_failure(self, keys: Sequence[str], *, at: datetime) -> Sequence[int]:
        """A failure under each key; the ids of its rows."""
        ...
    def delete_sign_in_failures(self, ids: Sequence[int]) -> int: ...
    def sign_in_failures(self, key: str, *, since: datetime) -> Sequence[datetime]: ...
    def prune_sign_in_failures(self, *, before: datetime) -> int: ...

    # models
    def add_model(self, model: Model) -> None: ...
    # Targeted updates, never a whole-row save: a training finishing must not write back a
    # LoRA scale it read before the user changed it.
    def set_model_active_version(self, model_id: str, version_id: str | None) -> None: ...
    def set_model_lora_scale(self, model_id: str, scale: float, *, is_custom: bool) -> None: ...
    def set_model_pin(self, model_id: str, *, backend: str, trainer_version: str,
                      destination: str) -> None:
        """The backend, trainer version and destination a model's first training pins
        (``pin_for_training``)."""
        ...
    def set_model_probes(self, model_id: str, probes: Sequence[Probe]) -> None:
        """Stores the probe set only when the model has none: it is fixed once."""
        ...
    def get_model(self, model_id: str, *, for_update: bool = False) -> Model | None:
        """``for_update``: as in ``get_model_for_user``."""
        ...
    def get_model_for_user(self, user_id: str, *, for_update: bool = False) -> Model | None:
        """``for_update`` (inside ``atomic()``): the row stays locked until the transaction
        ends, so what is decided on it (a start, a re-pin, the gate's activation, the user's)
        cannot interleave with another."""
        ...
    def list_model_owners(self, *, limit: int) -> Sequence[str]:
        """The user ids of the first ``limit`` models, oldest first (who may be meant when a
        command names no user)."""
        ...
    def get_model_overview(self, user_id: str
                           ) -> tuple[Model, Version | None, VersionLikeness | None] | None:
        """The user's model, its active version and that version's likeness record, read
        together."""
        ...

    # datasets
    def add_dataset(self, dataset: Dataset) -> None:
        """``AccountErasingError`` when its user's deletion was asked for, or the user is gone
        (as ``add_model`` and ``claim_upload``): checked with the user's row locked against
        the deletion's marking, so that no such row is stored once the deletion read them."""
        ...
    def get_dataset(self, dataset_id: str) -> Dataset | None: ...
    def dataset_sizes(self, dataset_ids: Collection[str]) -> dict[str, int]:
        """The accepted photo count of each of these datasets that exists, in one read."""
        ...
    def latest_accepted_dataset(self, user_id: str) -> Dataset | None: ...

    # trainings
    def add_training(self, training: Training) -> None:
        """Raises ``ConflictError`` when the model already has a queued or running training."""
        ...

    def save_training(self, training: Training) -> None:
        """Writes every field but ``cancel_requested`` (only ``request_cancel`` sets that)."""
        ...

    def request_cancel(self, training_id: str) -> None: ...
    def renew_lease(self, training_id: str, *, owner: str, attempt: int, now: datetime,
                    expires_at: datetime) -> bool:
        """The heartbeat: pushes the lease's expiry while (``owner``, ``attempt``) holds it."""
        ...
    def get_training(self, training_id: str, *, for_update: bool = False) -> Training | None: ...
    def get_training_by_remote_id(self, remote_id: str) -> Training | None: ...
    def list_trainings(self, model_id: str) -> Sequence[Training]: ...

    def list_trainings_page(self, model_id: str, *, limit: int,
                            before: Training | None = None) -> Sequence[Training]:
        """At most ``limit`` of the model's trainings, newest first (by time, then id), those
        after ``before`` in that order."""
        ...

    def get_user_training(self, user_id: str, training_id: str | None
                          ) -> tuple[Training, Version | None] | None:
        """A training of the user's model (``training_id``, or the latest) and the version it
        made, read together; None when the user has no such training."""
        ...

    def active_trainings(self) -> Sequence[Training]: ...
    def undecided_versions_of_ended_trainings(
            self, *, limit: int) -> Sequence[tuple[Version, Training]]:
        """Versions the gate never decided (pending) whose training has ended, each with its
        training (oldest version first, ``limit`` at most)."""
        ...

    def remote_cancels_pending(self) -> Sequence[Training]:
        """Ended trainings whose remote run is still to be canceled (oldest end first)."""
        ...

    def clear_remote_cancel(self, training_id: str) -> None:
        """The backend has the cancel of ``training_id``'s remote run."""
        ...

    def count_trainings_by_status(self) -> dict[str, int]:
        """How many trainings have each status (statuses with none are left out)."""
        ...

    def takes_writes(self) -> bool:
        """Whether the database answers a read of its tables and takes writes now, as far as a
        read can tell, asked on one connection (``/readyz``'s database check): False for a
        PostgreSQL hot standby or a read-only default (``transaction_read_only``). True on
        SQLite, whose read-only file is met by the first write alone. Raises as a read does
        when the database does not answer."""
        ...

    def takes_writes_at(self) -> tuple[bool, datetime]:
        """``takes_writes``, and the database's clock read in the same statement (PostgreSQL's
        ``clock_timestamp()``, as ``server_clock`` reads it; SQLite's is this machine's): the
        database check and the clock check of ``/readyz`` on one pool connection."""
        ...

    def held_trainings(self, *, now: datetime) -> Sequence[Training]:
        """Unfinished trainings held back at ``now``: a live lease with no heartbeat, which only
        a wait or a step-away leaves (``lease.is_held_back``)."""
        ...

    # workers: the ones that consume the queue, each as it last said it was alive
    def worker_alive(self, name: str, *, now: datetime, expires_at: datetime,
                     forget_before: datetime) -> None:
        """Worker ``name`` is alive at ``now`` and counts as live until ``expires_at``; the
        rows of workers whose expiry is before ``forget_before`` are deleted."""
        ...

    def worker_gone(self, name: str) -> None:
        """Worker ``name`` stopped: it is counted no more."""
        ...

    def count_workers(self, *, now: datetime) -> dict[str, int]:
        """``{"live": n, "stale": m}``: the workers whose expiry is after ``now``, and those
        whose expiry passed within ``WORKER_STALE_FOR`` before it (stopped without saying so:
        killed, their machine lost, or their clock skewed); a row that expired earlier is not
        counted."""
        ...

    # upload claims: one upload that starts a training per user at a time
    def claim_upload(self, user_id: str, *, token: str, now: datetime,
                     expires_at: datetime) -> datetime | None:
        """Claim (or, for the same ``token``, renew) the user's slot until ``expires_at``: None;
        or, while another claim of the user is live, its expiry, and nothing changes.
        ``ConflictError`` when two first claims race for the row."""
        ...
    def upload_claim_expiry(self, user_id: str, *, now: datetime,
                            except_token: str | None) -> datetime | None:
        """The expiry of the user's live claim, unless it is ``except_token``'s; else None."""
        ...
    def renew_upload_claim(self, user_id: str, *, token: str, expires_at: datetime) -> bool:
        """Push the expiry of ``token``'s claim; False when the claim is no longer its."""
        ...
    def release_upload(self, user_id: str, *, token: str) -> None: ...

    # webhooks
    def record_webhook(self, webhook_id: str, *, now: datetime) -> bool:
        """False when the id was received before."""
        ...
    def forget_webhooks(self, *, received_before: datetime) -> int:
        """Deletes the ids of webhooks received before ``received_before``; how many."""
        ...

    # versions
    def add_version(self, version: Version) -> None: ...
    def get_version(self, version_id: str) -> Version | None: ...
    def list_versions(self, model_id: str, *, limit: int | None = None,
                      below: int | None = None) -> Sequence[Version]:
        """Newest first; with ``below``, only the versions numbered under it; with ``limit``,
        at most that many (a page of ``GET /api/model/versions``)."""
        ...

    def versions_by_ids(self, model_id: str, version_ids: Collection[str]) -> Sequence[Version]:
        """The versions of ``model_id`` among ``version_ids`` (those gone or another model's
        left out), in no set order: what a page of generations names, read without the rest."""
        ...

    def set_version_gate(self, version_id: str, *, status: GateStatus, reason: str | None,
                         details: dict[str, Any]) -> None: ...
    def set_version_override(self, version_id: str, override: dict[str, Any]) -> None:
        """Records the user's override of the gate (``gate_details["override"]``) and nothing
        else: the gate's status, reason and other details stay as the row has them."""
        ...
    def set_version_alert(self, version_id: str, alert: dict[str, Any] | None, *,
                          due_at: datetime | None = None) -> None:
        """Records the version's alert, due to be sent at ``due_at`` (None: nothing to send)."""
        ...
    def due_alerts(self, now: datetime, *, limit: int) -> Sequence[str]:
        """Versions whose alert is due to be sent at ``now``, the longest due first."""
        ...
    def claim_alert(self, version_id: str, *, now: datetime, until: datetime) -> Version | None:
        """Pushes a due alert's time to ``until`` and returns its version; None when it is not
        due (sent, given up, or claimed by another process meanwhile)."""
        ...
    def record_alert_delivery(self, version_id: str, alert: dict[str, Any], *, claim: datetime,
                              due_at: datetime | None) -> bool:
        """Records the outcome of a send (``alert`` with its ``delivery``, next due at ``due_at``)
        only if the alert's due time is still ``claim``, the one the sender's claim wrote; False,
        and nothing written, when another sender has taken it over since."""
        ...

    # likeness records, one per version
    def save_likeness(self, quality: VersionLikeness) -> None: ...
    def get_likeness(self, version_id: str) -> VersionLikeness | None: ...
    def list_likeness(self, model_id: str, *, version_ids: Collection[str] | None = None
                      ) -> Sequence[VersionLikeness]:
        """The model's likeness records, whole (probes and their embeddings); ``version_ids``:
        those of these versions only."""
        ...

    def list_likeness_summaries(self, model_id: str, *,
                                version_ids: Collection[str] | None = None
                                ) -> Sequence[LikenessSummary]:
        """Every likeness record of the model (``version_ids``: of these versions) without its
        probes' results: one query, whose rows do not carry the probes' embeddings."""
        ...

    # generations
    def add_generation(self, generation: Generation) -> None: ...
    def get_generation(self, generation_id: str) -> Generation | None: ...
    def list_generations(self, user_id: str, *, limit: int = 50,
                         before: GenerationPosition | None = None) -> Sequence[Generation]:
        """The user's newest first (then by id, for those of the same instant); with
        ``before``, only those below that position (the next page after it)."""
        ...

    def delete_generation(self, generation_id: str, *, user_id: str) -> Generation | None:
        """Delete ``user_id``'s generation row (not its blobs): the row as it was, or None when
        there is no such generation of theirs (or another delete took it first)."""
        ...

    # the retraining log and other audit events
    def add_event(self, *, model_id: str, kind: str, data: dict[str, Any]) -> None: ...
    def list_events(self, model_id: str, *, since: datetime | None = None,
                    until: datetime | None = None) -> Sequence[dict[str, Any]]:
        """Oldest first; with ``since``/``until``, those made at or after ``since`` and before
        ``until`` (a page of the log)."""
        ...
    def count_events(self, model_id: str, *, kind: str) -> int: ...
    def resumed_as(self, model_id: str, training_id: str) -> str | None:
        """The id of the training that resumes ``training_id`` (a training of model
        ``model_id``), as its ``training_queued`` event names it (``resumed_from``); None when
        no training resumes it."""
        ...

    # garbage collection (services/gc.py)
    def gc_references(self) -> References:
        """Everything rows refer to: datasets (their photos, and whether a training in any
        status or a likeness record uses them), generations (their images), trainings (ended or
        not), models, versions (their weights)."""
        ...
    def delete_dataset_if_unused(self, dataset_id: str, *, created_before: datetime) -> bool:
        """Deletes the dataset's row if it was created before ``created_before`` and no
        training or likeness record refers to it, checked in the same statement: a training
        started on it meanwhile wins. True when it was deleted."""
        ...
    def delete_generations(self, generation_ids: Sequence[str], *,
                           created_before: datetime) -> int:
        """Deletes those of the generations created before ``created_before``; the count."""
        ...

    # job leases: a periodic job that one process at a time runs
    def claim_job(self, name: str, *, owner: str, now: datetime, expires_at: datetime,
                  due_before: datetime | None = None, take_over: str | None = None) -> bool:
        """Takes the job's lease until ``expires_at`` unless another owner holds an unexpired
        one, or (``due_before`` given) the job last started after ``due_before``. True when
        taken (``now`` is recorded as its start). ``take_over``: an owner known to be dead,
        whose unexpired lease is taken as if it had expired (only if it still holds it). Not
        inside ``atomic()``."""
        ...
    def renew_job(self, name: str, *, owner: str, expires_at: datetime) -> bool:
        """Pushes the lease's expiry while ``owner`` still holds it (nobody took it over)."""
        ...
    def release_job(self, name: str, *, owner: str, now: datetime, finished: bool) -> None:
        """Ends ``owner``'s lease; ``finished``: the job ran to its end at ``now``."""
        ...
    def get_job(self, name: str) -> JobLease | None: ...

    # the deployment this database belongs to (services/deployment.py)
    def get_deployment_id(self) -> str | None:
        """None until ``ensure_deployment_id`` made one."""
        ...
    def ensure_deployment_id(self, candidate: str, *, now: datetime) -> str:
        """The deployment's id, ``candidate`` stored as it when there is none yet: of processes
        that race to store theirs, the first wins and all return its id. Not inside
        ``atomic()``."""
        ...
    def get_deployment_storage_id(self) -> str | None:
        """The id of the storage marker the deployment was bound to; None until
        ``bind_deployment_storage`` stored one (a deployment bound before it existed)."""
        ...
    def bind_deployment_storage(self, candidate: str, *, replace: bool = False) -> str:
        """The storage marker id the deployment is bound to, ``candidate`` stored as it when
        there is none yet (or always, ``replace``): of racing processes the first wins and all
        return its id. Needs the deployment's row (``ensure_deployment_id``). Not inside
        ``atomic()``."""
        ...


# --------------------------------------------------------------------------- queue


@dataclass(frozen=True)
class ProgressBar:
    """One ``step/total`` progress bar of a remote training's logs; ``train``: its label says
    it is the training's (other bars: loading checkpoint shards, caching latents...)."""

    step: int
    total: int
    train: bool = False


@dataclass(frozen=True)
class RemoteTrainingEvent:
    """A verified webhook about a remote training: which delivery, which training, its news.

    ``bars``: every progress bar of its logs, in order. Which one is the training's is only
    known once the training is found (its ``total_steps``): see ``training_progress``.
    """

    webhook_id: str
    remote_id: str
    status: str
    bars: tuple[ProgressBar, ...] = ()


def training_progress(bars: Sequence[ProgressBar], *, expected_total: int) -> ProgressBar | None:
    """The training's own bar among ``bars``, as the poller reads it: the last one over the
    training's ``expected_total`` steps, else the last one labelled as training; None when
    neither is there (a bar of another total, such as "Loading checkpoint shards 2/3", is
    never the training's progress)."""
    for bar in reversed(bars):
        if bar.total == expected_total:
            return bar
    for bar in reversed(bars):
        if bar.train:
            return bar
    return None


class WebhookVerifier(Protocol):
    """Checks a training backend's webhook (its signature, its freshness) and reads it."""

    def verify(self, *, headers: dict[str, str], body: bytes) -> RemoteTrainingEvent:
        """Raises ``AuthError`` when it is not authentic, ``InvalidInputError`` when it is not
        a training event."""
        ...


class JobQueue(Protocol):
    """A doorbell for workers. A message carries a training id only; the row holds the state
    (and the lease on it decides who runs it), so a lost or repeated message is harmless."""

    def enqueue_training(self, training_id: str) -> None: ...

    def queued_training_ids(self) -> set[str]:
        """The ids of the messages waiting for a worker (the reconciler rings again for a
        training that has none and nobody running it)."""
        ...


@runtime_checkable
class EnqueueBell(Protocol):
    """A queue that tells this process's idle workers that this process has just enqueued, so a
    training started by ``serve`` is taken at once, not at the worker's next poll (up to a second
    later once it backs off). Messages from other processes are still found by polling."""

    def on_enqueue(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Calls ``listener`` after each message this object enqueues (it must not block);
        returns the call that stops that."""
        ...


class WorkQueue(JobQueue, Protocol):
    """The queue as workers and operators see it: the other end of the doorbell."""

    def next_training(self) -> str | None:
        """The next training id, or None when none waits."""
        ...

    def pending(self) -> int: ...

    def ping(self) -> None:
        """Raises when the queue cannot be reached."""
        ...

    def close(self) -> None:
        """Lets go of what the queue holds (a database connection, a connection pool), once
        nothing reads it: ``Services.close`` calls it after the process's worker has stopped.
        A second call does nothing; any other call after it raises ``QueueClosedError``
        rather than connecting again. Here, not on ``JobQueue``: closing is its owner's (the
        services'), never the training service's, which only rings."""
        ...


# --------------------------------------------------------------------------- alerts


class PasswordHasher(Protocol):
    """Slow, salted password hashes (the hash names its own algorithm and cost)."""

    def hash(self, password: str) -> str: ...
    def verify(self, password_hash: str, password: str) -> bool:
        """True when ``password`` matches; False when it does not (never raises for that)."""
        ...
    def needs_rehash(self, password_hash: str) -> bool: ...


class Alerter(Protocol):
    """Tells an operator about a version the likeness gate held back. One attempt per call: the
    caller records a failure, carries on and tries again later (``domain.alerts``), so the same
    alert (the same ``alert_id``) may be sent more than once."""

    def send(self, alert: dict[str, Any]) -> None:
        """Raises on a failed delivery: ``AlertDeliveryError``, whose message is stored on the
        version and shown to its owner (so it never quotes the endpoint's URL); any other
        exception is recorded by its type alone."""
        ...




class Backups(Protocol):
    """The deployment's data copied out and back (``services.backup``)."""

    def backup(self, *, dest: Path) -> BackupSummary:
        """A consistent copy of the live data into ``dest`` (a new folder, or a .tar file)."""
        ...

    def restore(self, *, source: Path, force: bool) -> BackupSummary:
        """The backup at ``source``, checked whole, in place of the data: the old data or the
        new, never a mix, whenever the process is killed."""
        ...
