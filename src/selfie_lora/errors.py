"""The exception tree of selfie-lora.

Every error this package raises on purpose derives from :class:`SelfieLoraError`. Vendor errors
(SQLAlchemy, httpx, replicate, torch) are mapped to these at the adapter boundary, so services and
entry points never see them.

    SelfieLoraError
    ├── ConfigError                 settings that cannot work (missing token, bad URL)
    │   ├── DeploymentMismatchError the storage is another deployment's (HTTP 503 where a
    │   │                           request meets it: an account's deletion)
    │   └── ClockSkewError          this machine's clock is too far from the database's: a
    │                               process refuses to start
    ├── NotFoundError               no such object for this user (HTTP 404)
    │   └── NoModelError            the user has no model yet (before their first upload)
    ├── AuthError                   no key or a wrong key, a wrong password, no session (HTTP 401)
    ├── ForbiddenError              signed in, but not allowed: sign-up closed, a form without
    │                               its CSRF token, a re-pin to a trainer the operator has not
    │                               allowed (HTTP 403)
    ├── RateLimitedError            too many failed sign-ins, or a user's generations at once;
    │                               ``retry_after`` seconds (HTTP 429)
    ├── ConflictError               the request clashes with the state (HTTP 409): a training is
    │   │                           queued or running, the user exists, a webhook was received
    │   │                           before, a concurrent write won, a version's weights are gone
    │   │                           from the storage
    │   ├── WeightsDamagedError     a version's LoRA file cannot be read or is not the one stored
    │   └── UploadInProgressError   an upload is starting one; ``retry_after`` seconds at most if
    │                               that upload's process died
    ├── InvalidInputError           bad request data (HTTP 422)
    │   └── DatasetRejectedError    the photos cannot be trained on; carries the findings
    ├── PayloadTooLargeError        an upload over the configured limit (HTTP 413)
    ├── InvalidTransitionError      a training state change that would go backwards (a bug: HTTP 500)
    ├── ServerShortOfMemoryError    the server ran out of memory reading an upload: nothing is
    │                               wrong with the upload, sending it again later works (HTTP 503)
    ├── ServerStoppingError         the server stopping answered the request before its work
    │   │                           began: that work does not begin (HTTP 503)
    │   └── QueueClosedError        the job queue was used after ``Services.close`` closed it
    ├── ClientGoneError             the client went away while its request waited: the work it
    │                               waited for was dropped (HTTP 499, which nobody receives)
    ├── StorageError                a blob or a record cannot be read or written (a refused
    │   │                           write, a lost connection: HTTP 500 storage_error)
    │   ├── DatabaseRefusedError    the database refuses for a state of its own that lasts: a
    │   │   │                       read-only standby or file (HTTP 500 storage_error; a
    │   │   │                       worker's loops say it once)
    │   │   ├── DatabaseBusyError   the pool's connections all taken past its wait: busy
    │   │   │                       (HTTP 503 storage_unavailable, with Retry-After)
    │   │   └── DatabaseLockedError a statement kept waiting past the database's own bound:
    │   │                           a lock held elsewhere, a statement timeout (HTTP 503
    │   │                           storage_unavailable, with Retry-After)
    │   ├── BlobMissingError        the blob is not there: retrying will not bring it back
    │   ├── StorageUnavailableError an outage of what stores the data, waited out, over once
    │   │   │                       it answers again (HTTP 503 storage_unavailable, with
    │   │   │                       Retry-After)
    │   │   ├── DatabaseUnreachableError the database server cannot be reached (down,
    │   │   │                       restarting, its connection lost)
    │   │   └── BlobStoreUnreachableError the object storage cannot be reached, timed out,
    │   │                           answered 5xx or 429
    │   ├── StorageSettingsError    the object storage's settings are wrong: no such bucket,
    │   │                           a host that does not resolve, http/https or the region
    │   │                           not the server's, not S3 (HTTP 500 config_error: tell
    │   │                           the operator)
    │   └── StorageFullError        the disk (of the blobs, the database, a backup) is full
    │                               or a quota used up: an expected outage, said in one
    │                               line, over once space is freed (HTTP 507)
    ├── GenerationError             the image generator failed
    ├── AlertDeliveryError          the operator's alert endpoint did not take an alert; says
    │                               the endpoint's host and HTTP status at most, never its URL
    ├── TrainingInterruptedError    a worker stops running a training it holds (shutting down:
    │   │                           it hands the training back to the queue)
    │   └── LeaseLostError          another worker took the training over: stop, write nothing
    └── TrainerError                the training backend failed; ``user_message`` says what to do
        ├── TrainerUnavailableError the backend cannot be reached or keeps answering 429/5xx
        ├── TrainingFailedError     the remote or local training ended in ``failed``
        ├── TrainingCanceledError   the training was canceled
        └── WeightsNotFoundError    the training succeeded but no LoRA file was found in its output
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, ClassVar


class ErrorCode(enum.StrEnum):
    """Every code an error answer (``{"error": {"code", ...}}``) can carry, in one place. The
    classes below carry the general one; a raise names a more precise one of the same status."""

    ERROR = "error"
    INTERNAL_ERROR = "internal_error"
    CONFIG_ERROR = "config_error"
    DEPLOYMENT_MISMATCH = "deployment_mismatch"
    HTTP_ERROR = "http_error"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    # 401, 404
    UNAUTHORIZED = "unauthorized"
    WRONG_CREDENTIALS = "wrong_credentials"
    SESSION_EXPIRED = "session_expired"
    NOT_FOUND = "not_found"
    # 403, 429
    FORBIDDEN = "forbidden"
    SIGNUP_CLOSED = "signup_closed"
    CSRF_REJECTED = "csrf_rejected"
    TRAINER_NOT_ALLOWED = "trainer_not_allowed"
    TOO_MANY_ATTEMPTS = "too_many_attempts"
    TOO_MANY_GENERATIONS = "too_many_generations"
    # 409: each conflict its own
    TRAINING_IN_PROGRESS = "training_in_progress"
    UPLOAD_IN_PROGRESS = "upload_in_progress"
    USER_EXISTS = "user_exists"
    KEY_ALREADY_MADE = "key_already_made"
    WEBHOOK_REPLAYED = "webhook_replayed"
    WRITE_CONFLICT = "write_conflict"
    GC_IN_PROGRESS = "gc_in_progress"
    NOT_RESUMABLE = "not_resumable"
    WEIGHTS_MISSING = "weights_missing"
    WEIGHTS_DAMAGED = "weights_damaged"
    PHOTOS_NEED_UPLOAD_AGAIN = "photos_need_upload_again"
    BASE_MODEL_MISMATCH = "base_model_mismatch"
    # 499: what the figures count for a request whose client went away (nobody receives it)
    CLIENT_GONE = "client_gone"
    # 408, 413
    REQUEST_TIMEOUT = "request_timeout"
    BODY_TOO_LARGE = "body_too_large"
    UPLOAD_TOO_LARGE = "upload_too_large"
    # 422
    INVALID_INPUT = "invalid_input"
    INVALID_REQUEST = "invalid_request"
    DATASET_REJECTED = "dataset_rejected"
    NO_DATASET = "no_dataset"
    EMPTY_PATCH = "empty_patch"
    INVALID_NAME = "invalid_name"
    INVALID_PASSWORD = "invalid_password"
    INVALID_LORA_SCALE = "invalid_lora_scale"
    INVALID_TRAINER_VERSION = "invalid_trainer_version"
    REASON_REQUIRED = "reason_required"
    INVALID_PROBE_COUNT = "invalid_probe_count"
    EMPTY_PROMPT = "empty_prompt"
    PROMPT_TOO_LONG = "prompt_too_long"
    INVALID_PROMPT = "invalid_prompt"
    UNSTORABLE_TEXT = "unstorable_text"
    INVALID_SEED = "invalid_seed"
    INVALID_NUM_OUTPUTS = "invalid_num_outputs"
    NO_VERSION = "no_version"
    NO_REMOTE_VERSION = "no_remote_version"
    VERSION_MISMATCH = "version_mismatch"
    NOTHING_TO_COMPARE = "nothing_to_compare"
    SAME_VERSION = "same_version"
    NOT_SCORED = "not_scored"
    UNSUPPORTED_WEIGHTS = "unsupported_weights"
    BAD_WEBHOOK = "bad_webhook"
    # 422: an upload refused as a whole before any photo is read (dataset.archive)
    ARCHIVE_TOO_LARGE = "archive_too_large"
    BAD_ARCHIVE = "bad_archive"
    COMPRESSION_RATIO = "compression_ratio"
    DUPLICATE_MEMBER = "duplicate_member"
    NAME_TOO_LONG = "name_too_long"
    OVERLAPPING_ENTRIES = "overlapping_entries"
    NO_SUCH_PATH = "no_such_path"
    SIZE_MISMATCH = "size_mismatch"
    SPECIAL_FILE = "special_file"
    SYMLINK_IN_ARCHIVE = "symlink_in_archive"
    TOO_MANY_MEMBERS = "too_many_members"
    UNSAFE_PATH = "unsafe_path"
    # 500, 502, 503
    INVALID_TRANSITION = "invalid_transition"
    SERVER_SHORT_OF_MEMORY = "server_short_of_memory"
    SERVER_STOPPING = "server_stopping"
    SERVER_STOPPED_DURING_WORK = "server_stopped_during_work"
    STORAGE_ERROR = "storage_error"
    # 507
    STORAGE_FULL = "storage_full"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    DELETION_PENDING = "deletion_pending"
    GENERATION_FAILED = "generation_failed"
    TRAINING_INTERRUPTED = "training_interrupted"
    LEASE_LOST = "lease_lost"
    TRAINER_ERROR = "trainer_error"
    TRAINER_UNAVAILABLE = "trainer_unavailable"
    TRAINING_FAILED = "training_failed"
    TRAINING_CANCELED = "training_canceled"
    WEIGHTS_NOT_FOUND = "weights_not_found"


class SelfieLoraError(Exception):
    """Root of every error selfie-lora raises on purpose."""

    code: ErrorCode = ErrorCode.ERROR
    http_status: int = 500
    # Seconds after which the same request may be answered otherwise (the Retry-After header),
    # where that is known.
    retry_after: int | None = None

    def __init__(
        self, message: str, *, details: Sequence[Any] = (), code: ErrorCode | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = list(details)
        if code is not None:  # a more precise code than the class's, for the same status
            self.code = code


class ConfigError(SelfieLoraError):
    code = ErrorCode.CONFIG_ERROR
    http_status = 500


class DeploymentMismatchError(ConfigError):
    """The blob store belongs to another deployment than the database (``services.deployment``):
    two deployments share one storage prefix, or a process was given the wrong database. A 503
    where a request meets it (``DELETE /api/me``, refused before anything changed): nothing is
    wrong with the request, and the operator's fix of the settings makes it work."""

    code = ErrorCode.DEPLOYMENT_MISMATCH
    http_status = 503


class ClockSkewError(ConfigError):
    """This machine's clock is further from the database's than SELFIE_LORA_MAX_CLOCK_SKEW_SECONDS
    (``services.clock``): the times it writes (leases, key revocations, ``created_at``) would be
    compared on other machines' clocks and mean something else there. A process refuses to start
    with it; nothing is wrong with the settings, the machine's time is."""


class NotFoundError(SelfieLoraError):
    code = ErrorCode.NOT_FOUND
    http_status = 404


NO_MODEL = "you have no model yet: upload photos to start one"


class NoModelError(NotFoundError):
    """The user has no model (before their first upload). The message speaks to the user, as
    the API and the web do; ``user``, the account's name, lets the command line say it to an
    operator and name its own command instead."""

    def __init__(self, *, user: str) -> None:
        super().__init__(NO_MODEL)
        self.user = user


class AuthError(SelfieLoraError):
    code = ErrorCode.UNAUTHORIZED
    http_status = 401


class ForbiddenError(SelfieLoraError):
    code = ErrorCode.FORBIDDEN
    http_status = 403


class RateLimitedError(SelfieLoraError):
    code = ErrorCode.TOO_MANY_ATTEMPTS
    http_status = 429

    def __init__(self, message: str, *, retry_after: int, code: ErrorCode | None = None) -> None:
        super().__init__(message, details=[{"retry_after": retry_after}], code=code)
        self.retry_after = retry_after


class ConflictError(SelfieLoraError):
    code = ErrorCode.TRAINING_IN_PROGRESS
    http_status = 409


class WeightsDamagedError(ConflictError):
    """A version's LoRA file is there but cannot be read (not safetensors, cut short) or is not
    the file the version stored (its sha256 differs): no retry mends it, another version does."""

    code = ErrorCode.WEIGHTS_DAMAGED


class UploadInProgressError(ConflictError):
    """The user's upload that starts a training holds the user's slot while its photos are
    checked. Its claim lapses ``retry_after`` seconds from now unless that upload's process
    renews it, so a process that died frees the slot by then."""

    code = ErrorCode.UPLOAD_IN_PROGRESS

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, details=[{"retry_after": retry_after}])
        self.retry_after = retry_after


class InvalidInputError(SelfieLoraError):
    code = ErrorCode.INVALID_INPUT
    http_status = 422


class DatasetRejectedError(InvalidInputError):
    """``details`` are the findings; ``boxes`` the face found in each analysed photo (name ->
    left, top, right, bottom as fractions of the photo), for pages that draw them."""

    code = ErrorCode.DATASET_REJECTED

    def __init__(self, message: str, *, details: Sequence[Any] = (),
                 boxes: dict[str, list[float]] | None = None) -> None:
        super().__init__(message, details=details)
        self.boxes = boxes or {}


class PayloadTooLargeError(SelfieLoraError):
    code = ErrorCode.UPLOAD_TOO_LARGE
    http_status = 413


class InvalidTransitionError(SelfieLoraError):
    code = ErrorCode.INVALID_TRANSITION
    http_status = 500


class ServerShortOfMemoryError(SelfieLoraError):
    """Reading an upload failed for want of memory (a zip member inflating while other uploads
    hold the rest): the server's state at that moment, not the user's file."""

    code = ErrorCode.SERVER_SHORT_OF_MEMORY
    http_status = 503


class ServerStoppingError(SelfieLoraError):
    """A stopping server answered the request (``api.stopping``) before its work began: the work
    must not begin then, the answer having told the client to send it again."""

    code = ErrorCode.SERVER_STOPPING
    http_status = 503


class QueueClosedError(ServerStoppingError):
    """The job queue was used after it was closed (``WorkQueue.close``, from ``Services.close``
    once the process's worker has stopped): its connections are gone, and reopening them would
    leave one that nothing closes. Only work still running as a process stops meets it (a
    request past the server's graceful wait, a training thread that outlived its worker's
    stop); a message it could not queue is rung again by the next reconciler."""

    # The message of a call made after the close, by every queue (the huey adapter and the
    # in-memory fake say the same).
    AFTER_CLOSE: ClassVar[str] = "the job queue is closed: this process is stopping"


class ClientGoneError(SelfieLoraError):
    """The client of a request closed its connection while the request waited for queued work,
    which was dropped: an answer nobody receives. 499 is nginx's "client closed request", so the
    request's figures tell it from the server's failures."""

    code = ErrorCode.CLIENT_GONE
    http_status = 499


# Seconds a client is told to wait (``Retry-After``) when the storage is away for a moment.
STORAGE_RETRY_AFTER = 30


class StorageError(SelfieLoraError):
    code = ErrorCode.STORAGE_ERROR
    http_status = 500


class StorageFullError(StorageError):
    """A write found the disk full (ENOSPC, a quota; SQLite's "database or disk is full",
    PostgreSQL's disk_full). Its message names the disk's folder. Nothing is wrong with what was
    written, and no retry helps until the operator frees space: the worker says it once and
    waits, where another storage error of a training's claim would be a bug to trace. A request
    that meets it is answered 507 Insufficient Storage (``storage_full``): the server's fault, not
    the request's, and a retry "in a moment" does not help. ``quota``: a quota used up (EDQUOT),
    not a full disk: freeing space on the disk need not help, so a training's wait says the quota
    (its error has no words of this one's for its user, which name the server's folders)."""

    code = ErrorCode.STORAGE_FULL
    http_status = 507

    def __init__(self, message: str, *, quota: bool = False) -> None:
        super().__init__(message)
        self.quota = quota


class DatabaseRefusedError(StorageError):
    """The database answered, and refuses what it is asked for a state of its own that lasts
    until it passes or the operator acts: its pool's connections all taken past the wait for
    one (``SELFIE_LORA_DB_POOL_SIZE`` too small for the load), a read-only standby (after a
    fail-over, until the application reaches the new primary), a read-only database file. Told
    apart (as ``StorageFullError`` is) because a worker's loop that meets it at every round
    says it once while it lasts, where another database error (a statement refused, a value
    out of bounds) may be a defect, whose traceback is logged each time. ``pool_exhausted``:
    the pool's wait ran out (else the database takes no writes), which a loop says as another
    refusal than a read-only one, since each asks the operator for something else."""

    def __init__(self, message: str, *, pool_exhausted: bool = False) -> None:
        super().__init__(message)
        self.pool_exhausted = pool_exhausted


class DatabaseBusyError(DatabaseRefusedError):
    """Every connection of this process's pool stayed taken past SELFIE_LORA_DB_POOL_TIMEOUT:
    the load of the moment (requests, a worker's threads), not a fault of the request nor of the
    database. A request that meets it is answered as an outage, 503 ``storage_unavailable``
    with ``Retry-After`` ("busy, send it again"), not a 500 a client or load balancer takes for
    a failure. Not a ``StorageUnavailableError``: the server is there, and what waits out an
    outage of it (a training's uncounted step away, a deletion tried again soon) is not told
    apart for this one; a worker's loops say it once, as the refusal it also is."""

    code = ErrorCode.STORAGE_UNAVAILABLE
    http_status = 503
    retry_after = STORAGE_RETRY_AFTER

    def __init__(self, message: str) -> None:
        # The pool's wait ran out, whoever raises it: no keyword to say otherwise, since a busy
        # pool told as a read-only database had a loop's words wrong and a take-over uncounted.
        super().__init__(message, pool_exhausted=True)


class DatabaseLockedError(DatabaseRefusedError):
    """The database kept a statement waiting past its own bound for it: SQLite's write lock held
    by another connection past the busy timeout ("database is locked", SQLITE_BUSY), PostgreSQL's
    lock_timeout (55P03, lock_not_available) or statement_timeout (57014, query_canceled: a
    statement that waits for a lock, or slower than the timeout on a server too loaded or a
    large database; also a cancel from outside, pg_cancel_backend or a pooler's query_timeout,
    not told apart, as only the words differ and lc_messages may translate them). Busy, as
    ``DatabaseBusyError`` is, and answered as it is (503 ``storage_unavailable`` with
    ``Retry-After``), where it was a 500 and a worker's loops
    logged its traceback every round; but the database's state, shared by every process, not
    this process's pool (``pool_exhausted`` False). Not the database away for a take-over
    (``services.training._database_outage``) either: on PostgreSQL a row lock or a slow
    statement is one worker's own, and one met at every round left every take-over uncounted.
    ``lock``: the database said a lock ran out alone (SQLITE_BUSY, 55P03), not 57014's timeout
    or cancel, so a loop's advice names the lock alone (not PostgreSQL's statement timeout to
    an operator of SQLite, which has none); False where not known."""

    code = ErrorCode.STORAGE_UNAVAILABLE
    http_status = 503
    retry_after = STORAGE_RETRY_AFTER

    def __init__(self, message: str, *, lock: bool = False) -> None:
        super().__init__(message)
        self.lock = lock


class BlobMissingError(StorageError):
    """The store answered, and the blob is not in it. Told apart from the store being away
    because a worker steps away from an outage (the next attempt reads it) but not from a
    photo that is gone (no attempt ever will)."""


class StorageUnavailableError(StorageError):
    """The database server or the object storage is away for now (``DatabaseUnreachableError``,
    ``BlobStoreUnreachableError``): an outage, over once it answers again, which a worker waits
    out and a deletion or a scoring tries again soon. A request that meets it is answered 503
    ``storage_unavailable`` with ``Retry-After``. Raised as one of its two subclasses."""

    code = ErrorCode.STORAGE_UNAVAILABLE
    http_status = 503
    retry_after = STORAGE_RETRY_AFTER


class DatabaseUnreachableError(StorageUnavailableError):
    """The database server could not be reached, or dropped the connection (a restart, a
    fail-over): an outage, over once it answers again, not a statement it refused. Told apart
    because a worker waits such an outage out without spending a training's attempts, and says
    it once, where another database error may be a defect that must still end a training.
    ``unanswered``: the server gave no answer at all within the driver's time (the answer
    timeout, the connect timeout): a hung server, on which each further call waits as long
    again, where a refused or dropped connection fails at once."""

    def __init__(self, message: str, *, unanswered: bool = False, details: Sequence[Any] = (),
                 code: ErrorCode | None = None) -> None:
        super().__init__(message, details=details, code=code)
        self.unanswered = unanswered


class BlobStoreUnreachableError(StorageUnavailableError):
    """The object storage could not be reached, did not answer in time, or answered 500, 502,
    503, 504 or 429, or its name could not be resolved for now: an outage, over once it
    answers again, not a blob missing, refused keys (plain ``StorageError``s) or wrong settings
    (``StorageSettingsError``), which no wait mends. Told apart because a worker waits such an
    outage out without spending a training's attempts: a blip of seconds used all three of them
    up in under a second, throwing a finished LoRA away."""


class StorageSettingsError(StorageError):
    """The object storage's settings are wrong: the bucket does not exist, the endpoint's host
    does not resolve, its scheme or region is not the server's, it is not S3, or it answers 501
    to a conditional PUT. No retry mends it: a request that meets it is answered as a
    ``config_error`` (tell the operator), not "retry in a moment"; a training still steps away
    from it (counted)."""

    code = ErrorCode.CONFIG_ERROR


class GenerationError(SelfieLoraError):
    """Making the pictures failed. ``user_message``, when given, is a sentence we wrote for the
    user (no path, URL or traceback in it), answered in place of the fixed 5xx sentence: for a
    failure a retry cannot mend, or whose reason is the user's to know."""

    code = ErrorCode.GENERATION_FAILED
    http_status = 502

    def __init__(
        self, message: str, *, user_message: str | None = None, details: Sequence[Any] = ()
    ) -> None:
        super().__init__(message, details=details)
        self.user_message = user_message


class AlertDeliveryError(SelfieLoraError):
    """An alert did not reach the operator's endpoint. Its message is safe to store on the
    version and show its owner: the kind of failure, the endpoint's host and the HTTP status at
    most. The alert URL's path is often the credential itself (Slack's and Discord's hooks)."""

    http_status = 502


class TrainingInterruptedError(SelfieLoraError):
    """Raised inside a worker to stop work on a training without ending it: the training is
    handed back (or was already taken over) and another attempt resumes it."""

    code = ErrorCode.TRAINING_INTERRUPTED
    http_status = 503


class LeaseLostError(TrainingInterruptedError):
    code = ErrorCode.LEASE_LOST


class TrainerError(SelfieLoraError):
    """A training backend failed. ``user_message`` is a sentence a user can act on."""

    code = ErrorCode.TRAINER_ERROR
    http_status = 502

    def __init__(
        self, message: str, *, user_message: str | None = None, details: Sequence[Any] = ()
    ) -> None:
        super().__init__(message, details=details)
        self.user_message = user_message or message


class TrainerUnavailableError(TrainerError):
    code = ErrorCode.TRAINER_UNAVAILABLE
    http_status = 503


class TrainingFailedError(TrainerError):
    code = ErrorCode.TRAINING_FAILED


class TrainingCanceledError(TrainerError):
    """The training was canceled. ``remote_ended``: its remote run, if any, has ended or has the
    cancel (False: the backend could not be told, and whoever ends the training asks again)."""

    code = ErrorCode.TRAINING_CANCELED

    def __init__(self, message: str, *, user_message: str | None = None,
                 details: Sequence[Any] = (), remote_ended: bool = True) -> None:
        super().__init__(message, user_message=user_message, details=details)
        self.remote_ended = remote_ended


class WeightsNotFoundError(TrainerError):
    code = ErrorCode.WEIGHTS_NOT_FOUND


def describe(exc: BaseException) -> str:
    """A vendor error in one line ("Kind: first line"), for a message that names what failed
    without a driver's multi-line dump."""
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
