"""Starting, running and ending trainings: the one owner of a training's status.

Every entry point that can start a training (HTTP upload-zip, upload, start, CLI, demo) calls
``start`` or ``upload``; nothing else creates a model or plans a training.

A training's life (``domain.states``, ``domain.lease``)::

    queued -> starting -> processing [-> version stored, phase "scoring"] -> succeeded
                                                                     \\-> failed / canceled

The queue is only a doorbell: a worker that gets a training's id **claims its lease** in the
database (owner, attempt, expiry), keeps it alive with a heartbeat, and writes only while it
still holds it (``_update_held``: a worker whose lease was taken over writes nothing). ``run``
picks up from wherever the row says the training is, so any attempt can resume any earlier one:

- no version yet: the trainer runs (Replicate adopts its remote training by the stored remote id;
  the local trainer starts over), then the weights are stored, hashed and published as a version
  in one transaction, at most once per training;
- a version stored: the likeness service scores it and the gate decides; the decision, the
  version's activation and the training's end are one transaction, so "succeeded" always comes
  with the final answer on which version is active.

``reconcile`` (every worker, at start-up and periodically) rings the doorbell again for any
unfinished training that nobody holds and no message will reach, and cancels the ones whose user
asked for it while nobody held them. A training whose workers died ``max_attempts`` times is
failed with a sentence the user can act on. A worker that shuts down hands its trainings back
(lease released, message re-queued) instead of ending them. Once a remote run exists (a remote id
is stored), a trainer that cannot be reached, or a storage error while its weights are copied,
does not end the training either: the worker steps away (``step_away``: like a hand-back, but
counted as a take-over) and the next attempt adopts the remote run, so an outage costs neither
the run nor the version it adds to the destination; one that outlasts ``max_attempts`` fails the
training and cancels the remote run, as every real failure of a training with a remote run does.
A database that fails one of the worker's fenced writes (``_holding``) makes it step away the
same way, whatever the backend: a local training continues from its last checkpoint. When the
database server itself could not be reached (``DatabaseUnreachableError``: down, restarting) that
step-away spends none of its attempts: the owner is let go (``_leave_for_outage``), or, when the
database cannot record even that, this worker's next claim counts nothing (``_left_uncounted``),
and another worker's take-over counts nothing when that worker saw the database away itself
(unreachable, or its disk full: a heartbeat fails either way) over the lease's expiry
(``lost_to_database_outage``).
A full disk (the worker's, the blob store's or the database's: ENOSPC, a quota,
``StorageFullError``) is an outage of the machine, not a fault of the training nor of its worker:
the worker leaves the training to wait for room (``wait_for_room``) without spending one of its
attempts, tried again after a growing gap (up to a minute), said once per outage
(``_wait_for_room``), so that space freed an hour later still finds it waiting.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import random
import shutil
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from selfie_lora.dataset.limits import SentFile, UploadedFile
from selfie_lora.dataset.prepare import prepared_square_side
from selfie_lora.disk_space import QUOTA_ADVICE, is_full_error, is_quota_error, machine_disk_words
from selfie_lora.domain.alerts import ClaimedAlert
from selfie_lora.domain.entities import (
    Dataset,
    Finding,
    GateStatus,
    Model,
    Recipe,
    Training,
    TrainingStatus,
    User,
    Version,
)
from selfie_lora.domain.lease import (
    WORKER_STALE_FOR,
    ClaimOutcome,
    LeasePolicy,
    Recovery,
    claim,
    exhausted_error,
    expire_lease,
    holder_is_silent,
    holds,
    is_held_back,
    lease_is_live,
    lost_to_database_outage,
    recovery_action,
    release,
    room_wait_over,
    room_wait_was_quota,
    scoring_exhausted,
    scoring_stops,
    step_away,
    storage_waited,
    storage_waited_for_weights,
    wait_for_room,
    wait_out,
    wait_text,
    waited_for_room_since,
)
from selfie_lora.domain.likeness import (
    LOCKED_AWAY_KEY,
    LikenessFacts,
    LikenessStatus,
    Undecided,
    trainer_metrics,
)
from selfie_lora.domain.plan import (
    TrainingDefaults,
    TrainingPlan,
    check_fits_base_model,
    new_model,
    photos_fit,
    photos_too_small,
    pin_for_training,
    plan_training,
)
from selfie_lora.domain.progress import add_loss_point, mark_pace
from selfie_lora.domain.recipes import recipe_for
from selfie_lora.domain.states import can_transition, transition
from selfie_lora.domain.versions import VERSION_ACTIVATED, holder_of_remote_version
from selfie_lora.errors import (
    AuthError,
    BlobMissingError,
    BlobStoreUnreachableError,
    ConfigError,
    ConflictError,
    DatabaseLockedError,
    DatabaseRefusedError,
    DatabaseUnreachableError,
    ErrorCode,
    InvalidInputError,
    LeaseLostError,
    NoModelError,
    NotFoundError,
    QueueClosedError,
    SelfieLoraError,
    StorageError,
    StorageFullError,
    StorageUnavailableError,
    TrainerError,
    TrainerUnavailableError,
    TrainingCanceledError,
    TrainingFailedError,
    TrainingInterruptedError,
    UploadInProgressError,
    WeightsNotFoundError,
    describe,
)
from selfie_lora.logs import training_context
from selfie_lora.services.checkpoints import TrainingCheckpoints
from selfie_lora.services.common import (
    FULL_DISK,
    KEPT_WAITING,
    POOL_TAKEN,
    QUOTA_USED_UP,
    ModelHistory,
    Outage,
    PinFacts,
    new_id,
    next_training_pin,
    pin_facts,
    refusal_said,
    refused,
    utcnow,
)
from selfie_lora.services.intake import IntakeService, PreparedDataset
from selfie_lora.services.layout import manifest_key, photo_key, weights_key
from selfie_lora.services.likeness import (
    AlertSends,
    BaselinePhotosUnreadableError,
    GateVerdict,
    LikenessService,
)
from selfie_lora.services.owners import default_owner
from selfie_lora.services.ports import (
    BlobStore,
    JobQueue,
    ProgressBar,
    Repository,
    Telemetry,
    Trainer,
    TrainingJob,
    TrainingPhoto,
    TrainingResult,
    WebhookVerifier,
    training_progress,
)
from selfie_lora.services.private_files import private_folders
from selfie_lora.services.samples import TrainingSamples
from selfie_lora.services.telemetry import NullTelemetry

logger = logging.getLogger(__name__)

# A reconcile that outlived its worker's stop met the queue closed (``Services.close``): not an
# outage, so INFO and said once a pass; the trainings it would queue wait for the next one.
_QUEUE_CLOSED_AT_RECONCILE = ("reconcile: the job queue is closed (this process is stopping); "
                              "trainings nobody runs are queued by the next reconcile "
                              "(another process's, or this one's next start)")
# How the user's sentence of a training ended by an error of ours other than its trainer's begins.
_COULD_NOT_RUN = "The training could not run"
# ... and what follows, by the error's kind (the first that matches): never the error's own
# words, which are the operator's: "conflicting write: UNIQUE constraint failed:
# versions.training_id", "blob 'checkpoints/<id>/step-00000005.ckpt' is missing", a trainer's
# "cannot load the FLUX pipeline from /srv/...". A kind not here says the last sentence.
_AGAIN = "Start the training again; if it happens again, tell the operator."
_COULD_NOT_RUN_BY_KIND: tuple[tuple[type[SelfieLoraError], str], ...] = (
    (BlobMissingError, f"a file it continues from is gone from the server's storage. {_AGAIN}"),
    (NotFoundError, f"something it needs is gone from the server's storage. {_AGAIN}"),
    (ConflictError, "its result could not be saved, as a change made at the same moment "
                    f"clashed with it. {_AGAIN}"),
    (ConfigError, "training is not set up correctly on this server; please tell the "
                  "operator."),
    (SelfieLoraError, f"the server met an error. {_AGAIN}"),
)
CANCELED_MESSAGE = ("The training was canceled. Your active version is unchanged; start a new "
                    "training when you are ready.")
INTERNAL_ERROR_MESSAGE = ("The training stopped because of an internal error. Your active "
                          "version is unchanged; please try again, and contact support if it "
                          "happens again.")
# Why a training whose worker's database failed it waits on its row: the next attempt runs it.
DATABASE_UNREACHABLE = "the database could not be reached"
# ... and one whose worker's database answered but kept a statement of it waiting past its bound
# (``DatabaseLockedError``: a lock held elsewhere past SQLite's busy timeout or PostgreSQL's
# lock_timeout, a statement past statement_timeout): said as such, not as a server out of reach,
# which sent its user and the operator after an outage that was not there.
DATABASE_LOCKED = ("the database was busy (a lock held by other work, or a slow statement, kept "
                   "it waiting)")
# ... and one whose worker met an error it did not expect while it held the training.
INTERRUPTED_BY_ERROR = "the worker running it met an error"
# ... and one whose worker could not fetch its photos or checkpoint (the blob store away, or
# this machine's disk full).
STORAGE_UNREACHABLE = "the stored photos or checkpoint could not be fetched"
WEIGHTS_NOT_STORED = "the trained LoRA could not be stored"
SCORING_UNREACHABLE = "its version could not be scored"
# ... and one whose database kept its scoring waiting (a lock): the next attempt scores it.
SCORING_LOCKED = f"its version could not be scored yet: {DATABASE_LOCKED}"
LOCAL_DISK_FAILED = "the trained LoRA could not be written on the worker's disk"
# ... and one whose worker found a disk full: it waits for room, its attempts not spent. No
# detail: the row's error is the user's (GET /api/training/progress, `selfie-lora train`), and
# the error's own words name the server's folders and free space, which the operator's WARNING
# says (``_wait_for_room``).
DISK_FULL = ("a disk of the server is full: the training waits for space to be freed and goes "
             "on by itself then")
# ... or a quota used up (EDQUOT): freeing space on the disk need not help it.
DISK_QUOTA = ("a disk quota of the server is used up: the training waits for the quota to be "
              "raised or files it counts to be deleted and goes on by itself then")
# ... how, as its backend keeps what it made: a local training's checkpoints are stored; a remote
# run's output only as long as its backend keeps it (Replicate: about an hour after the run ends).
DISK_FULL_LOCAL = ", from its last checkpoint"
DISK_FULL_REMOTE = (", downloading its trained LoRA from {backend} again ({backend} keeps a "
                    "finished run's output about an hour, so {act} before then)")
# How long a remote run's downloaded output, not stored for an object storage outage, waits
# for the storage uncounted (``wait_out``): Replicate keeps a finished run's output about an
# hour, so well inside that; then its attempts are spent as before (spaced 1 min, then 5), and
# the training fails naming the outage while the output is still there to start again from.
REMOTE_STORAGE_WAIT_LIMIT = timedelta(minutes=20)
# The user's sentence for a remote training whose output expired while it waited for room: the
# full disk is why, and freeing space is what to do, where the backend's own sentence
# ("could no longer be downloaded from Replicate") named neither.
ROOM_EXPIRED_MESSAGE = (
    "The training finished, but a disk of the server was full for {waited}, so its LoRA file "
    "could not be stored, and meanwhile {backend} let the trained output expire (it keeps it "
    "about an hour). Free space on the server's disk (or ask its operator to) and start the "
    "training again.")
# ... and for a quota used up (EDQUOT) that it waited for: "full" and "free space" sent the
# operator to ``df``, which shows the room a quota does not give.
QUOTA_EXPIRED_MESSAGE = (
    "The training finished, but a disk quota of the server was used up for {waited}, so its "
    "LoRA file could not be stored, and meanwhile {backend} let the trained output expire (it "
    "keeps it about an hour). Raise the server's disk quota or delete files it counts (or ask "
    "its operator to) and start the training again.")
# The same for an output that expired while the training waited for the object storage (its
# LoRA downloaded but not stored, ``wait_out``): the outage is why, and running the training
# again is what to do, where the backend's sentence named neither.
STORAGE_EXPIRED_MESSAGE = (
    "The training finished, but the server's storage could not be reached to store its LoRA "
    "file, and while the training waited for it {backend} let the trained output expire (it "
    "keeps it about an hour). Nothing is wrong with your photos: start the training again.")
# An upload that starts a training holds the user's slot while its photos are checked: for
# UPLOAD_CLAIM_TTL at a time, renewed every UPLOAD_CLAIM_RENEWAL while the upload runs, so a
# process that dies holding it blocks its user for UPLOAD_CLAIM_TTL at most. (It was one claim of
# 10 minutes, long enough for any check: after a crash the user was refused for up to 10 minutes,
# told to wait for an upload that would never finish.) A claim that lapses under a live upload
# costs nothing worse than a second upload checked meanwhile: one training per model is the
# database's rule, whatever the claims.
UPLOAD_CLAIM_TTL = timedelta(seconds=60)
UPLOAD_CLAIM_RENEWAL = timedelta(seconds=20)
# The key of a version's gate details that keeps its training's take-overs when it was stored.
RECOVERIES_WHEN_STORED = "recoveries_when_stored"
# How often the checkpoint between probes reads the training's cancel flag (monotonic seconds):
# a cancel asked of a scoring worker lands at the next probe, and a scoring that calls the
# checkpoint often still costs the database one read a second at most.
SCORING_CANCEL_POLL_SECONDS = 1.0


def caption_for(trigger_word: str) -> str:
    # Written by us for every photo: the trainer's autocaption prefix is often missing.
    return f"a photo of {trigger_word}"



@dataclass(frozen=True)
class StartResult:
    training: Training
    model: Model


@dataclass(frozen=True)
class CancelOutcome:
    """What a user's cancel did: ``already_ended`` when the training had ended (succeeded, failed,
    or canceled by an earlier request) before this one could act, so nothing was canceled.
    ``message`` is the one sentence every front (web page, API answer) says about it."""

    training: Training
    already_ended: bool

    @property
    def message(self) -> str:
        if self.already_ended:
            return f"The training had already ended ({self.training.status}): nothing to cancel."
        if self.training.status.is_terminal:
            return "Training canceled."
        # A worker that holds it stops within a second or two: its status then says how it ended.
        return "Canceling the training: it stops within a few seconds."


@dataclass(frozen=True)
class TrainingView:
    """A training and, once stored, its version (with the likeness gate's state and reason)."""

    training: Training
    version: Version | None
    # The steps the training has a sample image of (``sample_image``), in order.
    samples: tuple[int, ...] = ()


@dataclass(frozen=True)
class UploadResult:
    dataset: Dataset
    training: Training | None
    model: Model | None


@dataclass(frozen=True)
class NextPin(PinFacts):
    """A model as its next training pins it (``model``: backend, trainer version, destination),
    and the facts that say whether that pin is its own already (``fixed``: it has had a
    training, or its user re-pinned it) or still follows the configuration until its first
    training."""

    model: Model


# Why a version left undecided by its ended training (a lock refused its hold) is held by a
# later reconcile pass (``UNJUDGED_REASON``'s {why}, its owner's words), and how many a pass
# holds at most (the rest wait for the next).
LEFT_UNDECIDED = "its training ended before the gate could decide"
_UNDECIDED_BATCH = 50


@dataclass(frozen=True)
class ReconcileReport:
    enqueued: tuple[str, ...] = ()
    canceled: tuple[str, ...] = ()
    alerts_tried: int = 0
    remote_cancels_tried: int = 0


class _ReplayedWebhookError(Exception):
    """Leaves the transaction of a webhook whose id was recorded before (nothing written)."""


class _CanceledMeanwhileError(Exception):
    """Leaves the transaction of an unjudged version's hold (its alert and log entry undone)
    whose training's user asked to cancel it meanwhile: it is held as canceled instead."""


class TrainingService:
    def __init__(
        self,
        *,
        repo: Repository,
        blobs: BlobStore,
        queue: JobQueue,
        trainers: Mapping[str, Trainer],
        defaults: Callable[[], TrainingDefaults],
        work_dir: Path,
        likeness: LikenessService,
        intake: IntakeService | None = None,
        webhook_url: str | None = None,
        webhooks: WebhookVerifier | None = None,
        rng: random.Random | None = None,
        lease: LeasePolicy | None = None,
        clock: Callable[[], datetime] = utcnow,
        owner: str | None = None,
        telemetry: Telemetry | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._repo = repo
        self._telemetry: Telemetry = telemetry or NullTelemetry()
        self._blobs = blobs
        self._checkpoints = TrainingCheckpoints(blobs)
        self._samples = TrainingSamples(blobs)
        self._queue = queue
        self._trainers = dict(trainers)
        # A callable, not a value: the configured default may change while the service runs,
        # and the tests change it to prove that a pinned model ignores it.
        self._defaults = defaults
        self._work_dir = work_dir
        self._likeness = likeness
        self._intake = intake
        self._webhook_url = webhook_url
        self._webhooks = webhooks
        self._rng = rng or random.SystemRandom()
        self.lease = lease or LeasePolicy()
        self._clock = clock
        # What a reconcile pass's sends are timed by (``AlertSends``): the time spent, not the
        # wall clock's, which may jump.
        self._monotonic = monotonic
        self.owner = owner or default_owner()
        # The reconciler's rounds while the queue is down say so once, not every round.
        self._queue_outage = Outage()
        # A full disk (``_wait_for_room``) and, for a local training, the object storage away
        # (``BlobStoreUnreachableError``, ``_wait_for_storage``): outages waited out uncounted,
        # each said once, its waits spaced by its own gaps (read from ``self.lease`` when
        # used).
        self._room = _Waits(lambda waits: self.lease.full_disk_gap(waits))
        self._storage = _Waits(lambda waits: self.lease.storage_outage_gap(waits))
        # The trainings this worker left uncounted (a wait above, a database outage) while the
        # database could not record it: their next claim here counts no recovery either.
        self._left_uncounted: set[str] = set()
        # When this worker saw the database away (or its disk full): a lease that ran out
        # meanwhile was lost to the outage, and its take-over here counts no recovery
        # (``lost_to_database_outage``).
        self._database_away = _SeenAway()

    # ------------------------------------------------------------------ start (every entry point)
    def start(self, *, user: User, dataset_id: str | None = None,
              new_dataset: Dataset | None = None, _upload_token: str | None = None,
              _resume: _Resume | None = None,
              _committed: Callable[[], None] | None = None) -> StartResult:
        """Get or create the user's model, plan a (re)training and queue it: on ``dataset_id``,
        the latest accepted dataset, or ``new_dataset`` (checked photos, stored in the same
        transaction as the training, so a refused start stores nothing).

        Raises ``ConflictError`` when the model already has a queued or running training (the
        database enforces it too) or an upload of the user is about to start one, or when the
        dataset's photos were prepared below the pinned recipe's resolution (code
        ``photos_need_upload_again``: a re-pin to more pixels since they were uploaded),
        ``InvalidInputError`` when there is no usable dataset. ``_committed`` runs after the
        commit and before the training is queued (the upload's ``keep_stored``: a worker finds
        the photos there).
        """
        defaults = self._defaults()
        with self._repo.atomic() as tx:
            now = self._clock()
            claimed_until = tx.upload_claim_expiry(user.id, now=now, except_token=_upload_token)
            if claimed_until is not None:
                raise _upload_in_progress(claimed_until, now=now)
            if new_dataset is not None:
                tx.add_dataset(new_dataset)
                dataset: Dataset | None = new_dataset
            elif dataset_id is None:
                dataset = tx.latest_accepted_dataset(user.id)
            else:
                dataset = tx.get_dataset(dataset_id)
            if dataset is None or dataset.user_id != user.id:
                if dataset_id is None:
                    raise InvalidInputError(
                        "there are no photos to train on yet: upload a zip of photos first",
                        code=ErrorCode.NO_DATASET,
                    )
                raise NotFoundError("no such dataset")
            if not dataset.accepted:
                raise InvalidInputError("that dataset was not accepted", code=ErrorCode.DATASET_REJECTED)
            # Locked: a re-pin (ModelService.change_trainer_version) checks that no training is
            # active and writes the pin under the same lock, so this start plans on the pin it
            # left, or the re-pin finds this training and is refused.
            model = tx.get_model_for_user(user.id, for_update=True)
            trainings = _refuse_if_busy(tx, model)
            facts = pin_facts(tx, model, trainings=trainings) if model is not None else None
            plan = plan_training(
                model, user_id=user.id, new_model_id=new_id(), defaults=defaults, rng=self._rng,
                now=self._clock(),
                trained_before=facts is not None and facts.trained_before,
                has_version=model is not None and _has_version(tx, model, trainings=trainings),
                repinned_by_user=facts is not None and facts.repinned_by_user,
            )
            if model is not None:
                # On the pin this training takes: a first training's is the configured one.
                check_fits_base_model(plan.model, defaults)
            if _resume is not None:
                _resume.check(plan)
                # Under the model's lock: two resumes of one training never both commit.
                resumed = tx.resumed_as(_resume.origin.model_id, _resume.origin.id)
                if resumed is not None:
                    raise ConflictError(_resumed_already(resumed, tx.get_training(resumed)),
                                        code=ErrorCode.NOT_RESUMABLE)
            # After a re-pin to a recipe of more pixels (local-flux-v1's 512 px to v2's 1024),
            # the stored photos are the crops made for the old one: refused, not upscaled.
            refused = _photos_refusal(self._prepared_resolution(dataset), recipe=plan.recipe,
                                      trainer_version=plan.trainer_version)
            if refused is not None:
                raise refused
            training_id = _resume.training_id if _resume else new_id()
            if plan.is_new_model:
                tx.add_model(plan.model)
            elif model is not None and plan.model is not model:
                # The first training pins the configured version (contract invariant 3), which
                # moved since the upload that made the model: stored and logged as the pin.
                # With another backend its destination too, still never created remotely.
                tx.set_model_pin(model.id, backend=plan.backend,
                                 trainer_version=plan.trainer_version,
                                 destination=plan.destination)
                # The plan recorded this pin (and what it replaces) in its preserved facts.
                pin = plan.preserved["pinned_at_first_training"]
                tx.add_event(model_id=model.id, kind="trainer_version_pinned", data={
                    "by": "first_training", "training_id": training_id,
                    "from": dict(pin["replaces"]),
                    "to": {key: value for key, value in pin.items() if key != "replaces"}})
            training = Training(
                id=training_id, model_id=plan.model.id,
                dataset_id=dataset.id,
                backend=plan.backend, status=TrainingStatus.QUEUED,
                is_retraining=plan.is_retraining, trigger_word=plan.trigger_word,
                destination=plan.destination, trainer_version=plan.trainer_version,
                recipe=plan.recipe, preserved=plan.preserved, created_at=self._clock(),
                total_steps=plan.recipe.steps,
            )
            if _resume is not None:
                training = _resume.continued(training)
            tx.add_training(training)
            tx.add_event(model_id=plan.model.id, kind="training_queued", data={
                "training_id": training.id,
                "kind": "retraining" if plan.is_retraining else "first_training",
                "trigger_word": plan.trigger_word, "destination": plan.destination,
                "trainer_version": plan.trainer_version, "backend": plan.backend,
                "lora_scale": plan.model.lora_scale, "preserved": plan.preserved,
                "recipe": plan.recipe.as_dict(), "dataset_id": dataset.id,
                **({"resumed_from": _resume.origin.id, "resumed_at_step": _resume.step}
                   if _resume is not None else {}),
            })
        logger.info(
            "%s %s queued for model %s (trigger %s, destination %s, trainer %s, preserved %s)",
            "retraining" if plan.is_retraining else "first training", training.id, plan.model.id,
            plan.trigger_word, plan.destination, plan.trainer_version, sorted(plan.preserved),
        )
        if _committed is not None:
            _committed()
        # After the commit: a crash before this line leaves a queued training without a
        # message, which the reconciler finds and queues. So does a queue that cannot be
        # reached now (Redis down): the training exists, and answering an error would have the
        # client retry into "a training is already running".
        self._ring(training.id)
        return StartResult(training=training, model=plan.model)

    def _ring(self, training_id: str) -> None:
        """Put a message for a training on the queue, its row already committed: a queue that
        cannot be reached now (Redis down) is logged, not raised, since the reconciler queues
        any training left queued without a message."""
        try:
            self._queue.enqueue_training(training_id)
        except QueueClosedError:
            # Not a fault: this process is stopping and closed its queue before this thread
            # ended (a training handed back, or a request, past the worker's stop grace).
            logger.info("training %s: not queued now, the job queue is closed (this process "
                        "is stopping); the next reconcile queues it (another process's, or "
                        "this server's next start)", training_id)
        except Exception as exc:
            logger.warning("training %s: could not be queued now (%s: %s); the reconciler "
                           "queues it", training_id, type(exc).__name__, exc)

    def upload(
        self, *, user: User, read: Callable[[], tuple[Sequence[UploadedFile], Sequence[Finding]]],
        start: bool = True,
    ) -> UploadResult:
        """Check uploaded photos (``read`` gives the files, and notes from reading them) and
        store them as a dataset; with ``start``, also start a training on them.

        A start claims the user's training slot before the photos are even read, so a second
        upload or start meanwhile gets 409 at once, and a refused upload stores nothing."""
        intake = self._require_intake()
        if not start:
            files, notes = read()
            return self._store_upload(user=user, prepared=intake.prepare_files(
                user=user, files=files, findings=notes))
        with self._upload_claim(user) as token:
            files, notes = read()
            prepared = intake.prepare_files(user=user, files=files, findings=notes)
            started = self.start(user=user, new_dataset=prepared.dataset, _upload_token=token,
                                 _committed=lambda: intake.keep_stored(prepared=prepared))
        return UploadResult(dataset=prepared.dataset, training=started.training,
                            model=started.model)

    @contextmanager
    def _upload_claim(self, user: User) -> Iterator[str]:
        """Claim the user's slot for an upload that starts a training (its token), renewed
        while the block runs and released after it; ``UploadInProgressError`` when another
        upload holds it, ``ConflictError`` when a training is queued or running."""
        token = new_id()
        with self._repo.atomic() as tx:
            # Locked as a start locks it: a start still open (PostgreSQL runs them side by side)
            # commits its training first, and this upload is refused before it reads a photo.
            model = tx.get_model_for_user(user.id, for_update=True)
            trainings = _refuse_if_busy(tx, model)
            if model is not None:  # refused before its photos are read and cropped for it
                defaults = self._defaults()
                check_fits_base_model(next_training_pin(tx, model, defaults, trainings=trainings),
                                      defaults)
            now = self._clock()
            try:
                claimed_until = tx.claim_upload(user.id, token=token, now=now,
                                                expires_at=now + UPLOAD_CLAIM_TTL)
            except ConflictError as exc:
                # Two first uploads raced for the claim's row: the loser is just as busy.
                raise _upload_in_progress(now + UPLOAD_CLAIM_TTL, now=now) from exc
            if claimed_until is not None:
                raise _upload_in_progress(claimed_until, now=now)
        done = threading.Event()
        renewing = threading.Thread(target=self._renew_upload_claim, args=(user, token, done),
                                    name=f"upload-claim-{token[:8]}", daemon=True)
        renewing.start()
        try:
            yield token
        finally:
            done.set()
            renewing.join(timeout=5)
            self._repo.release_upload(user.id, token=token)

    def _renew_upload_claim(self, user: User, token: str, done: threading.Event) -> None:
        while not done.wait(UPLOAD_CLAIM_RENEWAL.total_seconds()):
            try:
                kept = self._repo.renew_upload_claim(
                    user.id, token=token, expires_at=self._clock() + UPLOAD_CLAIM_TTL)
            except SelfieLoraError as exc:
                # The database is away: try again at the next renewal (if it stays away the
                # claim lapses, which refuses nothing that the database would not).
                logger.warning("user %s: the upload's claim could not be renewed: %s",
                               user.name, exc.message)
                continue
            except Exception:
                logger.exception("user %s: the upload's claim could not be renewed", user.name)
                continue
            if not kept:
                # It lapsed (this process stalled) and another upload took it: that one holds
                # the slot now, and this upload's start is refused.
                logger.warning("user %s: the upload's claim lapsed and another upload took it",
                               user.name)
                return

    def _store_upload(self, *, user: User, prepared: PreparedDataset) -> UploadResult:
        """An upload that starts nothing: its dataset, and the user's model made if this is
        the first (the answer and ``GET /api/model`` show its trigger word from then on; the
        first training takes everything it fixed)."""
        try:
            model = self._add_upload(user=user, prepared=prepared)
        except ConflictError:
            # Another first upload or start of this user made the model meanwhile (one model
            # per user, unique): this transaction rolled back, and the next finds the model.
            model = self._add_upload(user=user, prepared=prepared)
        self._require_intake().keep_stored(prepared=prepared)
        return UploadResult(dataset=prepared.dataset, training=None, model=model)

    def _add_upload(self, *, user: User, prepared: PreparedDataset) -> Model:
        with self._repo.atomic() as tx:
            tx.add_dataset(prepared.dataset)
            model = tx.get_model_for_user(user.id)
            if model is not None:
                return model
            model = new_model(user_id=user.id, model_id=new_id(), defaults=self._defaults(),
                              rng=self._rng, now=self._clock())
            tx.add_model(model)
            tx.add_event(model_id=model.id, kind="model_created", data={
                "by": "upload", "dataset_id": prepared.dataset.id,
                "trigger_word": model.trigger_word, "destination": model.destination,
                "trainer_version": model.trainer_version, "backend": model.backend})
        logger.info("model %s made by an upload of user %s (trigger %s, destination %s, "
                    "trainer %s)", model.id, user.id, model.trigger_word, model.destination,
                    model.trainer_version)
        return model

    def upload_zip(self, *, user: User, data: bytes, start: bool = True) -> UploadResult:
        """``POST /api/training/upload-zip``: a zip of photos."""
        intake = self._require_intake()
        return self.upload(user=user, read=lambda: intake.read_zip(data), start=start)

    def upload_files(self, *, user: User, files: Sequence[SentFile],
                     start: bool = True, form_escaped: bool = True) -> UploadResult:
        """``POST /api/training/upload``: photos sent one by one (name, and bytes or the
        spooled file holding them, read no further than a photo may be). ``form_escaped``:
        the names are multipart filenames (a '"' sent as %22); False, the names as they are."""
        intake = self._require_intake()
        return self.upload(user=user, read=lambda: intake.read_files(
            files, form_escaped=form_escaped), start=start)

    def upload_path(self, *, user: User, path: Path, start: bool = True) -> UploadResult:
        """``selfie-lora train PATH``: a folder or zip of photos on this machine."""
        intake = self._require_intake()
        return self.upload(user=user, read=lambda: intake.read_path(path), start=start)

    # ------------------------------------------------------------------ queries
    def photos_to_upload_again(self, *, user: User) -> str | None:
        """A sentence saying the user's stored photos must be uploaded again before their model
        trains (``start`` refuses them, 409 ``photos_need_upload_again``): the latest accepted
        ones were prepared below the resolution of the recipe the model is pinned to now (a
        re-pin to more pixels). None when they fit, or there are none."""
        model = self._repo.get_model_for_user(user.id)
        dataset = self._repo.latest_accepted_dataset(user.id)
        if model is None or dataset is None:
            return None
        defaults = self._defaults()  # one reading for the pin and its recipe
        model = next_training_pin(self._repo, model, defaults)
        recipe = recipe_for(backend=model.backend, trainer_version=model.trainer_version,
                            replicate_recipe=defaults.replicate_recipe)
        prepared = self._prepared_resolution(dataset)
        if prepared is None or photos_fit(prepared_resolution=prepared, recipe=recipe):
            return None
        return (f"Your stored photos were prepared at {prepared} px, and "
                f"{model.trainer_version} trains at {recipe.resolution} px: upload your "
                "photos again before you train (a training on the stored ones is refused, "
                "since every photo would be upscaled).")

    def next_pin(self, *, user: User) -> NextPin | None:
        """What the model page says of the user's trainer version: the one their next training
        uses (the first one takes the configured version, unless they chose one), not the one
        stored at the upload. None before the model is made."""
        model = self._repo.get_model_for_user(user.id)
        if model is None:
            return None
        # One read of the facts serves both the pin and the page's words about it.
        facts = pin_facts(self._repo, model)
        return NextPin(model=pin_for_training(model, self._defaults(),
                                              trained_before=facts.trained_before,
                                              repinned_by_user=facts.repinned_by_user),
                       trained_before=facts.trained_before,
                       repinned_by_user=facts.repinned_by_user)

    def start_refusal(self, *, user: User) -> ConflictError | None:
        """What ``start`` would refuse the user's next training on their latest accepted photos
        with, for their model as it is pinned now: 409 ``base_model_mismatch`` (a local model
        pinned to a recipe for another base model) or ``photos_need_upload_again`` (photos
        prepared below the pinned recipe's resolution), the same error and advice, so a page
        says it before the user submits. None when neither applies, or there is no model or no
        photos yet; a training under way is not this answer's (the start refuses it too)."""
        model = self._repo.get_model_for_user(user.id)
        dataset = self._repo.latest_accepted_dataset(user.id)
        if model is None or dataset is None:
            return None
        defaults = self._defaults()
        model = next_training_pin(self._repo, model, defaults)
        try:
            check_fits_base_model(model, defaults)
        except ConflictError as exc:
            return exc
        recipe = recipe_for(backend=model.backend, trainer_version=model.trainer_version,
                            replicate_recipe=defaults.replicate_recipe)
        return _photos_refusal(self._prepared_resolution(dataset), recipe=recipe,
                               trainer_version=model.trainer_version)

    def _prepared_resolution(self, dataset: Dataset) -> int | None:
        """The resolution ``dataset``'s photos were cropped to at upload: as recorded then, else
        (a dataset stored before uploads recorded it, whose photos were all squares at it) its
        first photo's side. None when neither says: it trains as it always did."""
        if dataset.prepared_resolution is not None:
            return dataset.prepared_resolution
        if not dataset.photo_hashes:
            return None
        try:
            # Only such an old dataset costs this read (a header's worth of one photo).
            return prepared_square_side(self._blobs.get(photo_key(dataset.photo_hashes[0])))
        except SelfieLoraError as exc:
            # The training that runs on it says what is wrong with its photos, if anything.
            logger.warning("dataset %s: could not read the size its photos were prepared at: "
                           "%s", dataset.id, exc.message)
            return None

    def checkpoint_step(self, *, training_id: str) -> int | None:
        """The step of the newest checkpoint kept for the training, None when none is (it has
        not reached its first one): what a hand-back can truthfully say it continues from."""
        latest = self._checkpoints.latest(training_id)
        return None if latest is None else latest.step

    def progress(self, *, user: User, training_id: str | None = None) -> TrainingView:
        """The user's training (default: the latest) with its version once stored."""
        found = self._repo.get_user_training(user.id, training_id)
        if found is None:
            # get() raises the NotFoundError that says why (no model yet, no training yet, none
            # of that id), or finds a training started since.
            training, _model = self.get(user=user, training_id=training_id)
            return self.view(training)
        training, version = found
        return self.view(training, version=version)

    def undecided(self, *, history: ModelHistory) -> dict[str, Undecided]:
        """Why the gate has not decided on ``history``'s pending versions whose worker stepped
        away on a database lock, by version id (``Undecided``): a page says of them that the
        database was busy, not that they are "still being scored", which read as work going on
        when none was. From the history the Versions page reads already: no query."""
        versions = {v.id: v for v in history.versions}
        found: dict[str, Undecided] = {}
        for t in history.trainings:
            version = versions.get(t.version_id) if t.version_id is not None else None
            if version is None:
                continue
            why = self._undecided(version, t, scored=functools.partial(
                _is_scored, history.records.get(version.id)))
            if why is not None:
                found[version.id] = why
        return found

    def undecided_of(self, *, versions: Sequence[Version]) -> dict[str, Undecided]:
        """``undecided`` of ``versions`` alone (the Generate page's list, the version
        ``selfie-lora activate`` made active), each pending one's training and likeness record
        read here: none is most of the time, and nothing is read then."""
        found: dict[str, Undecided] = {}
        for version in versions:
            if version.gate_status is not GateStatus.PENDING:
                continue
            training = self._repo.get_training(version.training_id)
            if training is None:
                continue
            why = self._undecided(version, training,
                                  scored=functools.partial(self._scored, version.id))
            if why is not None:
                found[version.id] = why
        return found

    def _scored(self, version_id: str) -> bool:
        return _is_scored(self._repo.get_likeness(version_id))

    def _undecided(self, version: Version, t: Training, *,
                   scored: Callable[[], bool]) -> Undecided | None:
        """Why the gate has not decided on ``version`` (``t`` its training), if a lock is why;
        ``scored``: whether its likeness record is scored (read only when asked).

        Not by the row's words alone (``SCORING_LOCKED``): they stay until the version is
        stored, so they were said while the next attempt scored it, or after its worker died.
        Only the attempt that stepped away on the lock (``LOCKED_AWAY_KEY``), before any worker
        claims it again. A cancel asked meanwhile is what its next attempt does
        (``CANCELED_NEXT``). A version already scored had the lock on its judging (the verdict's
        write, or a read or the baseline's scoring before the gate decided: the same record):
        its next attempt judges it from its scores (``JUDGING_KEPT_WAITING``). One not scored
        is scored again shortly (``SCORING_KEPT_WAITING``), unless its next attempt judges it
        without scores (its scoring's attempts spent: ``JUDGED_WITHOUT_SCORES_NEXT``). Either
        is held back unjudged by the next attempt once its stops reach ``_judge``'s cut-off
        (``_end_unjudged``: ``HELD_UNJUDGED_NEXT``). Each is what the next attempt
        does: "still being scored", the words of a pending version otherwise, would be false."""
        if (version.gate_status is not GateStatus.PENDING or t.version_id != version.id
                or t.status.is_terminal or t.error != SCORING_LOCKED
                or t.metrics.get(LOCKED_AWAY_KEY) != t.attempt):
            return None
        if t.cancel_requested:
            return Undecided.CANCELED_NEXT
        at_store = int(version.gate_details.get(RECOVERIES_WHEN_STORED, 0))
        # The next claim counts the step-away as a stop (its owner stays).
        stops = scoring_stops(t, recoveries_when_stored=at_store) + 1
        if stops >= 2 * self.lease.max_attempts:  # as ``_judge`` cuts off, scored or not
            return Undecided.HELD_UNJUDGED_NEXT
        if scored():
            return Undecided.JUDGING_KEPT_WAITING
        return (Undecided.SCORING_KEPT_WAITING if stops < self.lease.max_attempts
                else Undecided.JUDGED_WITHOUT_SCORES_NEXT)

    def view(self, training: Training, *, version: Version | None = None) -> TrainingView:
        if version is None and training.version_id:
            version = self._repo.get_version(training.version_id)
        # Listed only for a recipe that samples: the progress is polled every second or two,
        # and a listing is a request to the object storage on the scale path.
        samples = (tuple(self._samples.steps(training.id)) if training.recipe.sample_every > 0
                   else ())
        return TrainingView(training=training, version=version, samples=samples)

    def sample_image(self, *, user: User, training_id: str, step: int) -> bytes:
        """A sample image (JPEG) of the user's training; ``NotFoundError`` for another user's
        training or a step without one."""
        training, _ = self.get(user=user, training_id=training_id)
        return self._samples.image(training.id, step)

    def get(self, *, user: User, training_id: str | None) -> tuple[Training, Model]:
        model = self._repo.get_model_for_user(user.id)
        if model is None:
            raise NoModelError(user=user.name)
        if training_id is None:
            trainings = self._repo.list_trainings(model.id)
            if not trainings:
                raise NotFoundError("no training yet")
            return trainings[0], model
        training = self._repo.get_training(training_id)
        if training is None or training.model_id != model.id:
            raise NotFoundError("no such training")
        return training, model

    # ------------------------------------------------------------------ cancel
    def cancel(self, *, user: User, training_id: str) -> Training:
        """End a training as ``canceled``, whatever its state. A worker holding it (alive: its
        heartbeat is recent) is asked to, and does so within a second or two; a training nobody
        runs (queued, or its worker is gone) is canceled here and now."""
        return self.cancel_with_outcome(user=user, training_id=training_id).training

    def cancel_with_outcome(self, *, user: User, training_id: str | None) -> CancelOutcome:
        """``cancel``, saying whether the training had already ended: a page loaded while it
        ran (it does not update without scripts) or a client's stale view may send a cancel
        after the end, which all fronts then answer the same way (``CancelOutcome.message``).
        ``training_id`` None: the user's latest training (``selfie-lora cancel`` with no id),
        the only one that can be queued or running (one at a time per model)."""
        training, _ = self.get(user=user, training_id=training_id)
        if training.status.is_terminal:
            return CancelOutcome(training=training, already_ended=True)
        canceled: Training | None = None
        ended_before = False
        with self._repo.atomic() as tx:
            current = tx.get_training(training.id, for_update=True)
            assert current is not None
            ended_before = current.status.is_terminal
            if not ended_before:
                tx.request_cancel(current.id)
                if holder_is_silent(current, self._clock(), self.lease):
                    # Its version held apart below: a lock on the version's or the model's row
                    # would refuse the user's cancel itself (a refused hold is left to the
                    # reconcile pass, ``_hold_left_undecided``).
                    canceled = self._cancel_in(tx, current, reason="canceled by its user",
                                               hold=False)
        if canceled is not None and canceled.version_id is not None:
            self._hold_apart(canceled.id, canceled.version_id, canceled=True)
        if canceled is not None:
            self._cancel_remote(canceled)
        else:
            logger.info("training %s: cancel requested of its worker", training.id)
        final = self._repo.get_training(training.id)
        assert final is not None
        # Asked of its worker, which finished the training its own way first (succeeded or
        # failed before its next look at the cancel): that too was over before the cancel acted.
        ran_out = final.status.is_terminal and final.status is not TrainingStatus.CANCELED
        return CancelOutcome(training=final, already_ended=ended_before or ran_out)

    def send_owed_remote_cancels(self, *, training_ids: Collection[str]) -> tuple[Training, ...]:
        """Ask now for the owed cancels of the remote runs of these trainings (ended, their run
        not yet canceled), those this process can: it has their backend's trainer, and the
        backend answers. Those still owed that a worker could still send: their rows are what
        makes a worker's reconcile pass ask again, so a deletion must keep them. A process
        built with no trainer at all (``gc``) returns every one owed, for a worker to send; one
        built with the deployment's trainers but none for that backend (no Replicate token any
        more) returns it not: no process of this deployment ever could send it, and keeping
        the rows for it would block the deletion for ever (its run is named in a warning)."""
        wanted = set(training_ids)
        for t in self._repo.remote_cancels_pending():
            if t.id in wanted:
                self._cancel_remote(t)
        owed = tuple(t for t in self._repo.remote_cancels_pending() if t.id in wanted)
        if not self._trainers:
            return owed
        for t in owed:
            if t.backend not in self._trainers:
                logger.warning(
                    "training %s: its %s run %s is left uncanceled: this deployment has no "
                    "%s trainer (cancel it on %s's site)", t.id, t.backend,
                    t.remote_id or "(id not known)", t.backend, t.backend)
        return tuple(t for t in owed if t.backend in self._trainers)

    # ------------------------------------------------------------------ resume
    def resume(self, *, user: User, training_id: str) -> StartResult:
        """Continue a canceled local training from its last checkpoint, as a new training that
        records where it came from (``resumed_from`` in its ``training_queued`` event): a
        canceled training stays canceled (a terminal state is never left), and the new one
        takes the model's one training slot, its pinned trigger word and trainer version, and
        gets a version number of its own when it ends, like any other.

        ``ConflictError`` when the training is not canceled, was canceled after its version was
        stored (there is nothing left to train), has no checkpoint, or the model has moved to
        another trainer version since; and as ``start`` when the model is busy."""
        origin, _ = self.get(user=user, training_id=training_id)
        if origin.status is not TrainingStatus.CANCELED:
            # "this one succeeded", not "this one is succeeded": an ended training's status is
            # a verb; a waiting or running one's ("queued", "processing") follows "is".
            state = (str(origin.status) if origin.status.is_terminal
                     else f"is {origin.status}")
            raise ConflictError(f"only a canceled training can be resumed; this one {state}",
                                code=ErrorCode.NOT_RESUMABLE)
        if origin.version_id is not None:
            raise ConflictError("this training was canceled after its version was stored: "
                                "there is nothing left to train", code=ErrorCode.NOT_RESUMABLE)
        if self._repo.resumed_as(origin.model_id, origin.id) is not None:
            # Resumed already, its checkpoints still here: that resume was killed between its
            # commit and their deletion (below). Deleted now, as it would have; never resumed
            # twice from the same step.
            self._checkpoints.drop(origin.id)
            raise ConflictError(self._no_checkpoint_message(origin),
                                code=ErrorCode.NOT_RESUMABLE)
        new_training_id = new_id()
        # Made by the copy's fetch, where a full disk or a used-up quota refusing it is a
        # StorageFullError (507), as its write's is: made here first, that refusal was a raw
        # OSError, a 500 "please retry".
        scratch = self._work_dir / f"resume-{new_training_id}"
        try:
            # Copied before the training exists: a queued resumed training always finds it.
            copied = self._checkpoints.copy(origin.id, new_training_id, scratch=scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if copied is None:
            raise ConflictError(self._no_checkpoint_message(origin), code=ErrorCode.NOT_RESUMABLE)
        try:
            # The new training shows the samples of the steps it starts after (it makes the
            # later ones itself), copied before it exists for the same reason.
            self._samples.copy(origin.id, new_training_id, up_to=copied.step)
            started = self.start(user=user, dataset_id=origin.dataset_id, _resume=_Resume(
                origin=origin, training_id=new_training_id, step=copied.step))
        except BaseException:
            self._checkpoints.drop(new_training_id)
            self._samples.drop(new_training_id)
            raise
        # Resumed once: the canceled training's own checkpoints are of no further use.
        self._checkpoints.drop(origin.id)
        logger.info("training %s resumes canceled training %s from step %d",
                    new_training_id, origin.id, copied.step)
        return started

    def _no_checkpoint_message(self, origin: Training) -> str:
        """Why ``origin`` has no checkpoint to resume. A resume drops the origin's checkpoints,
        so "canceled before its first one" was false for a training resumed already, and sent
        its user to a new training, throwing away the steps the resumed one carries."""
        latest: Training | None = None
        seen = {origin.id}
        # Followed to the end of the chain: a resumed training resumed again dropped its own.
        while ((next_id := self._repo.resumed_as(origin.model_id, (latest or origin).id))
               and next_id not in seen):
            seen.add(next_id)
            found = self._repo.get_training(next_id)
            if found is None:
                break
            latest = found
        if latest is None and origin.backend != "local":
            # A remote run keeps no checkpoint for us (on Replicate, none at all): "canceled
            # before its first one" told a user who canceled at step 301 of 1000 that the
            # cancel was early.
            name = "Replicate" if origin.backend == "replicate" else origin.backend
            return (f"a training on {name} cannot be resumed: {name} keeps no checkpoints of "
                    "its trainings, so it would start again from step 0; start a new training")
        if latest is None:
            return ("this training left no checkpoint to resume from (it was canceled before "
                    "its first one); start a new training")
        return _resumed_already(latest.id, latest)

    def resume_point(self, training: Training) -> int | None:
        """The step ``resume`` would continue ``training`` from; None when it cannot."""
        if training.status is not TrainingStatus.CANCELED or training.version_id is not None:
            return None
        stored = self._checkpoints.latest(training.id)
        if stored is None or self._repo.resumed_as(training.model_id, training.id) is not None:
            return None  # resumed already (by a resume killed before it deleted them)
        return stored.step

    # ------------------------------------------------------------------ worker side
    def run(self, training_id: str, *, owner: str | None = None,
            stopping: threading.Event | None = None) -> None:
        """Run one training from wherever it is to its end, or until ``stopping`` is set (the
        worker shuts down: the training is handed back at its next safe point). Called for
        every queue message; a duplicate message, or one for a training another worker holds,
        does nothing."""
        stop = stopping or threading.Event()
        if stop.is_set():
            return
        with training_context(training_id):  # every line logged meanwhile names the training
            held = self._claim(training_id, owner=owner or self.owner, stopping=stop)
            if held is None:
                return
            try:
                with held.heartbeat():
                    self._advance(held)
            except LeaseLostError:
                logger.warning("training %s: another worker took it over; this one stops",
                               training_id)
            except _UnreachableError as exc:
                # After the heartbeat has stopped: a beat now would renew the lease stepped away.
                self._step_away(held, exc)
            except TrainingInterruptedError:
                self._hand_back(held)
            except StorageFullError as exc:
                # A full disk met outside the fences (a read that needed a temporary file):
                # the machine's outage, waited out like the others, with no traceback.
                self._step_away(held, _UnreachableError(exc.message, remote_id=held.remote_id,
                                                        reason=DATABASE_UNREACHABLE, cause=exc))
            except SelfieLoraError as exc:
                # What escaped the work after the claim (a read outside the fence, a bug): the
                # worker steps away now, lease ended and message queued, where the lease was left
                # to run out with no heartbeat and no message, for the reconciler to find.
                if isinstance(exc, DatabaseUnreachableError):  # an outage: no traceback
                    self._step_away(held, _UnreachableError(
                        exc.message, remote_id=held.remote_id, reason=DATABASE_UNREACHABLE,
                        cause=exc))
                    return
                logger.exception("training %s: the worker could not go on with it (%s); "
                                 "stepping away", training_id, type(exc).__name__)
                reason = (_database_reason(exc) if isinstance(exc, StorageError)
                          else INTERRUPTED_BY_ERROR)
                # A lock's cause only: it has the next claim name the lock (``locked``), where
                # "this worker's restart" sent the operator after a crash. Not every storage
                # error's, which would count the others here as outages, not attempts.
                self._step_away(held, _UnreachableError(
                    exc.message, remote_id=held.remote_id, reason=reason,
                    cause=exc if isinstance(exc, DatabaseLockedError) else None))

    def worker_alive(self, name: str) -> None:
        """Worker ``name`` (one that consumes the queue) is alive now: it counts as live in
        /metrics for a lease's time (``SELFIE_LORA_LEASE_SECONDS``), the rule by which its
        trainings would be taken over, and says so again every heartbeat."""
        now = self._clock()
        self._repo.worker_alive(name, now=now, expires_at=now + self.lease.ttl,
                                forget_before=now - WORKER_STALE_FOR)

    def worker_skewed(self, name: str, *, database_now: datetime, max_skew: float) -> None:
        """Worker ``name`` runs, but its clock is past the skew limit (``max_skew`` seconds), so
        it takes no training: counted as stale for as long as it runs so, and live again at its
        first beat once its clock is right. Its row is written on the database's clock
        (``database_now``), the one every server's is within the limit of: on its own clock it
        was off by the skew for all of them (2 h behind: in neither state; ahead: live). Renewed
        every heartbeat, so never forgotten while it runs (it stopped renewing, and an hour
        later was counted in neither state)."""
        # Expired the limit and a lease ago (the lease: slack for the time since the database's
        # reading, and for the check's own round trip): a server up to the limit behind the
        # database still sees it expired, not live; a lease alone was not enough once the limit
        # is over the lease (10 s against a 2 s lease; the setting allows an hour). At most
        # half the stale window, so that a server as far ahead still counts it stale, not
        # forgotten: past half an hour no margin holds for both sides, and the two share it.
        margin = min(self.lease.ttl + timedelta(seconds=max_skew), WORKER_STALE_FOR / 2)
        self._repo.worker_alive(name, now=database_now, expires_at=database_now - margin,
                                forget_before=database_now - WORKER_STALE_FOR)

    def worker_gone(self, name: str) -> None:
        """Worker ``name`` stopped: counted no more (not as a stale worker either)."""
        self._repo.worker_gone(name)

    def reconcile(self, *, dead_owners: Sequence[str] = (),
                  stopping: threading.Event | None = None) -> ReconcileReport:
        """Queue again every unfinished training that nobody holds and no queued message will
        reach, and cancel those whose user asked for it while nobody held them. ``dead_owners``:
        lease owners known to be gone (a worker restarting under its old name). A queue that
        cannot be reached stops only the queuing: cancels and alerts need the database alone.
        Each part (trainings, due alerts, owed remote cancels) runs whatever the others met,
        but for a database that gave no answer (hung: each part would wait as long again); the
        first failure is raised after all have run. ``stopping`` (the worker's stop) set, the
        pass starts no more alert sends (``AlertSends``): they are left for a later pass."""
        with self._database_away.watch(self._clock):
            return self._reconcile(dead_owners=dead_owners, stopping=stopping)

    def _reconcile(self, *, dead_owners: Sequence[str],
                   stopping: threading.Event | None) -> ReconcileReport:
        # Three parts, each run whatever became of the others: a database error in one (the
        # alerts' claim, say) skipped the parts after it until the next round, owed remote
        # cancels included, a Replicate run billed on for one more round. The first failure is
        # raised once all have run, for the caller to say as it says any (once an outage).
        failures: list[Exception] = []
        enqueued: list[str] = []
        canceled: list[str] = []
        # The backends that did not take a remote call this pass: the other owed cancels of
        # theirs wait for the next pass (they stay owed) instead of each waiting out an
        # unreachable Replicate, which held the pass (and so the queuing of dead workers'
        # trainings) for minutes.
        unreachable: set[str] = set()
        with _reconcile_part(failures, "queuing or canceling trainings nobody runs"):
            self._recover_trainings(dead_owners=dead_owners, enqueued=enqueued,
                                    canceled=canceled, unreachable=unreachable)
        alerts_tried = 0
        # One send budget for the pass's two parts that send (the due alerts, then those of
        # the versions it holds last): each send costs up to the alert timeout against an
        # endpoint slow to answer, and a cap of each part's own let one pass send twice
        # ALERTS_PER_PASS. A count, a time and the worker's stop: ten sends took 50 s at the
        # default timeout, where a worker's stop allows 30 s. A failed send ends both parts'
        # sends (the endpoint is likely down: the holds' first send cost the pass one more
        # timeout). The unsent stay due for the next passes (a hold's: due at once when the
        # budget was spent before it, claimed then due when spent during it).
        sends = self._likeness.alert_sends(stopping=stopping, monotonic=self._monotonic)
        if not _unanswered(failures, skipping="sending the alerts that are due"):
            failed = len(failures)
            with _reconcile_part(failures, "sending the alerts that are due"):
                # The alerts of held versions whose sender died, or whose delivery is due again.
                alerts_tried = self._likeness.deliver_due_alerts(sends=sends)
            if len(failures) != failed:
                # A round that failed part way sent an unknown number of its alerts: none more
                # now.
                sends.end()
        remote_cancels = 0
        if not _unanswered(failures, skipping="asking again for the remote cancels owed"):
            with _reconcile_part(failures, "asking again for the remote cancels owed"):
                # The remote runs of ended trainings whose cancel did not get through.
                remote_cancels = self._cancel_pending_remotes(unreachable=unreachable)
        # Last: the lock that left these versions undecided may still be held (briefly waited
        # for, but billed remote runs and dead workers' trainings come first).
        if not _unanswered(failures, skipping="holding back the versions left undecided"):
            with _reconcile_part(failures, "holding back the versions left undecided"):
                self._hold_left_undecided(sends=sends)
        if failures:
            raise failures[0]
        return ReconcileReport(enqueued=tuple(enqueued), canceled=tuple(canceled),
                               alerts_tried=alerts_tried, remote_cancels_tried=remote_cancels)

    def _hold_left_undecided(self, *, sends: AlertSends) -> None:
        """Hold back the versions whose hold a lock refused when their training ended (left
        pending, ``_hold_apart``): nothing else decides them, and every front would say they are
        still being scored; their alerts are sent now as far as ``sends`` allows (what is left
        of the pass's budget), the rest left due at once (the budget spent before the hold), or
        claimed, then due (spent during it). The lock that left them so may last:
        each hold waits for it a moment only (``atomic_briefly``), and the first one still
        locked ends the part until the next pass (the others likely wait on the same lock: each
        would cost the pass its wait)."""
        for version, t in self._repo.undecided_versions_of_ended_trainings(limit=_UNDECIDED_BATCH):
            alert = None
            hold = None
            try:
                with self._repo.atomic_briefly() as tx:
                    if t.status is TrainingStatus.CANCELED:
                        held = self._likeness.hold_canceled(tx, version.id)
                    else:
                        # A pass that may send no more leaves the alert due at once, unclaimed,
                        # for the next pass: claimed, it waited out the 5-minute claim unsent.
                        hold = self._likeness.hold_unjudged(tx, version.id, why=LEFT_UNDECIDED,
                                                            claim=sends.allowed())
                        held = hold is not None
                        alert = hold.alert if hold is not None else None
                if hold is not None:
                    hold.log()  # committed: its alert now stands
            except DatabaseLockedError as exc:
                logger.info("reconcile: version %d of training %s still could not be held back "
                            "(%s); the next round tries again", version.number, t.id,
                            exc.message)
                return
            if held:  # not when it was decided meanwhile, or its model is gone
                logger.info("reconcile: version %d of ended training %s held back",
                            version.number, t.id)
            # One claimed but not sent now (the budget spent during the hold) stays claimed, and
            # is due once its claim runs out (a later round's ``deliver_due_alerts``), as a dead
            # sender's: each send to an endpoint that is down would cost this pass its deadline,
            # and one slow to answer too past the pass's budget of them (``sends``).
            if alert is not None and sends.allowed():
                sends.sent(delivered=self._likeness.deliver_alert(alert))

    def _recover_trainings(self, *, dead_owners: Sequence[str], enqueued: list[str],
                           canceled: list[str], unreachable: set[str]) -> None:
        """The reconcile pass's trainings: those nobody runs queued again, those canceled
        while nobody held them ended (their ids added to ``enqueued`` and ``canceled`` as
        they go, so a later failure keeps what was done)."""
        now = self._clock()
        active = list(self._repo.active_trainings())
        for i, t in enumerate(active):
            if (t.lease_owner is not None and t.lease_owner in dead_owners
                    and not is_held_back(t, now)):
                # Its holder is gone: end the lease now, so the claim of the next attempt
                # counts a recovery like any other take-over. A hold is nobody's run: it waits
                # out an outage whatever became of the worker that set it.
                active[i] = self._update(t.id, lambda c: expire_lease(c, now, dead_owners))
        ticket = self._queue_outage.attempt()
        closed = False  # the job queue closed: this process is stopping, not an outage
        try:
            queued: Collection[str] = self._queue.queued_training_ids()
        except QueueClosedError:
            # A reconcile that outlived its worker's stop: nothing is queued here now, and the
            # next reconcile (another process's, or this one's next start) queues them. Its
            # cancels below need only the database and go on.
            logger.info(_QUEUE_CLOSED_AT_RECONCILE)
            queued = ()
            quiet = closed = True
        except Exception as exc:
            # The queue is down (Redis): what waits in it is unknown, so every training nobody
            # holds is rung again below (a duplicate message is claimed once, the other does
            # nothing). The rest of the pass needs only the database and goes on: a cancel of
            # a training whose worker died must not wait for Redis.
            began = self._queue_outage.begins(ticket=ticket)
            logger.log(logging.WARNING if began else logging.DEBUG,
                       "reconcile: the queue cannot be read (%s); trainings nobody runs are "
                       "queued again if it takes them, tried every round (its end is logged)",
                       describe(exc))
            queued = ()
            # Its trainings' own lines too: the round that finds the outage names each one it
            # could not queue, later rounds of the same outage repeat nothing.
            quiet = not began
        else:
            quiet = False
            if self._queue_outage.ends(ticket=ticket):
                logger.info("reconcile: the queue can be read again")
        for t in active:
            action = recovery_action(t, now=now, queued_ids=queued, policy=self.lease)
            with training_context(t.id):  # the lines about it carry its id, like a worker's
                if action is Recovery.ENQUEUE:
                    if closed:
                        continue  # said once above
                    try:
                        self._queue.enqueue_training(t.id)
                    except QueueClosedError:
                        # Closed since the read above: said once, as there.
                        logger.info(_QUEUE_CLOSED_AT_RECONCILE)
                        closed = True
                        continue
                    except Exception as exc:
                        # Stays unqueued, and the next round tries again; the trainings after
                        # it (and their cancels) are not kept waiting.
                        logger.log(logging.DEBUG if quiet else logging.WARNING,
                                   "training %s has nobody running it and could not be "
                                   "queued again now (%s: %s); the next round tries again",
                                   t.id, type(exc).__name__, exc)
                        continue
                    logger.info("training %s (%s, attempt %d) has nobody running it: queued "
                                "again", t.id, t.status, t.attempt)
                    enqueued.append(t.id)
                elif action is Recovery.CANCEL:
                    # Ended on its own row, its version (if stored) held apart after: a lock on
                    # the version's or the model's rows failed this part of every pass while it
                    # lasted (the training left processing, those after it neither queued nor
                    # canceled). One left undecided is held by this pass's last part, or later.
                    with self._repo.atomic() as tx:
                        current = tx.get_training(t.id, for_update=True)
                        done = (self._cancel_in(tx, current, reason="canceled by its user; its "
                                                "worker was gone", hold=False)
                                if current is not None and
                                recovery_action(current, now=self._clock(), queued_ids=(),
                                                policy=self.lease) is Recovery.CANCEL
                                else None)
                    if done is not None and done.version_id is not None:
                        self._hold_apart(t.id, done.version_id, canceled=True)
                    if done is not None:
                        # A hang raised here skips the append: the pass's report is dropped when
                        # it raises, so the cancel, committed above, goes unreported only.
                        self._cancel_remote(done, unreachable=unreachable)
                        canceled.append(t.id)

    def receive_webhook(self, *, headers: dict[str, str], body: bytes) -> Training | None:
        """``POST /api/webhooks/<backend>``: verify it, then apply it (``apply_webhook``)."""
        if self._webhooks is None:
            raise AuthError("webhooks are not configured on this server")
        event = self._webhooks.verify(headers=headers, body=body)
        return self.apply_webhook(webhook_id=event.webhook_id, remote_id=event.remote_id,
                                  status=event.status, bars=event.bars)

    def apply_webhook(self, *, webhook_id: str, remote_id: str, status: str,
                      bars: Sequence[ProgressBar] = ()) -> Training | None:
        """A verified webhook about a remote training: progress only (the worker that holds the
        training finishes it). The training is found by the remote id in the signed body. Of
        its logs' progress ``bars`` only the training's own counts (``training_progress``, by
        its ``total_steps``, as the poller reads them).

        A webhook id is recorded in the transaction that applies its update, so a delivery
        whose update failed is applied when Replicate sends it again; a delivery applied
        before changes nothing and is answered like the first (Replicate retries anything but
        a 2xx, and the contract answers the route with 2xx)."""
        try:
            new_status: TrainingStatus | None = TrainingStatus(status)
        except ValueError:
            new_status = None
        if new_status is not None and new_status.is_terminal:
            new_status = TrainingStatus.PROCESSING

        def apply(t: Training) -> Training:
            if new_status is None or not can_transition(t.status, new_status) or t.is_scoring:
                return t  # a scoring training's trainer is done: remote news changes nothing
            t = transition(t, new_status, at=self._clock(), reason="webhook")
            # Logs also show other bars ("Loading checkpoint shards 2/3" of a run that failed
            # while loading): only the training's own may move its step and total.
            bar = training_progress(bars, expected_total=t.total_steps)
            if bar is not None:
                t = dataclasses.replace(t, step=max(t.step, bar.step), total_steps=bar.total)
            return t

        try:
            with self._repo.atomic() as tx:
                try:
                    fresh = tx.record_webhook(webhook_id, now=self._clock())
                except ConflictError as exc:
                    if exc.code is not ErrorCode.WRITE_CONFLICT:
                        raise
                    # The same delivery at once in another transaction, which recorded it first.
                    raise _ReplayedWebhookError from exc
                if not fresh:
                    raise _ReplayedWebhookError
                found = tx.get_training_by_remote_id(remote_id)
                current = (tx.get_training(found.id, for_update=True) if found is not None
                           else None)
                if current is None:
                    return None
                updated = apply(current)
                if updated is not current:
                    tx.save_training(updated)
                return updated
        except _ReplayedWebhookError:
            pass
        logger.info("webhook %s about %s was applied before: nothing to do", webhook_id, remote_id)
        return self._repo.get_training_by_remote_id(remote_id)

    # ------------------------------------------------------------------ claiming and holding
    def _claim(self, training_id: str, *, owner: str,
               stopping: threading.Event) -> _Held | None:
        with self._database_away.watch(self._clock):
            return self._claim_now(training_id, owner=owner, stopping=stopping)

    def _claim_now(self, training_id: str, *, owner: str,
                   stopping: threading.Event) -> _Held | None:
        outage_lost = False
        with self._repo.atomic() as tx:
            current = tx.get_training(training_id, for_update=True)
            if current is None:
                logger.warning("training %s vanished before it ran", training_id)
                return None
            claimed = current
            if (training_id in self._left_uncounted and current.lease_owner == owner
                    and not lease_is_live(current, self._clock())):
                # Left here uncounted (a full disk, the object storage or the database away)
                # and the database could not record it: not counted either.
                claimed = dataclasses.replace(current, lease_owner=None)
            elif (not lease_is_live(current, self._clock()) and lost_to_database_outage(
                    current, self._database_away.spans(self._clock()), policy=self.lease)):
                # Its lease ran out while this worker saw the database away (full, read-only):
                # its holder could not renew it (nor write its step-away), whoever takes it over.
                claimed = dataclasses.replace(current, lease_owner=None)
                outage_lost = True
            outcome, updated = claim(claimed, owner=owner, now=self._clock(), policy=self.lease)
            if outcome is ClaimOutcome.ENDED:
                self._left_uncounted.discard(training_id)  # nothing left to claim
                logger.debug("training %s is already %s", training_id, current.status)
                return None
            if outcome is ClaimOutcome.BUSY:
                logger.debug("training %s is held by %s", training_id, current.lease_owner)
                return None
            if outcome is ClaimOutcome.EXHAUSTED:
                failed = dataclasses.replace(
                    transition(updated, TrainingStatus.FAILED, at=self._clock(),
                               reason=f"its worker stopped {updated.recoveries} times"),
                    error=exhausted_error(updated),
                    remote_cancel_pending=_remote_run_to_cancel(updated))
                tx.save_training(failed)
                tx.add_event(model_id=failed.model_id, kind="training_failed", data={
                    "training_id": failed.id, "error": failed.error,
                    "recoveries": failed.recoveries})
            else:
                tx.save_training(updated)
                tx.add_event(model_id=updated.model_id, kind="training_attempt", data={
                    "training_id": updated.id, "attempt": updated.attempt, "owner": owner,
                    "status": str(updated.status), "taken_over_from": current.lease_owner,
                    "phase": "scoring" if updated.is_scoring else "training"})
        # Dropped only once the claim is written: a claim whose write the still-full disk
        # refused (an error out of the block above) keeps it, so that the claim that goes
        # through once space is freed counts nothing either. A busy one kept it too (returned
        # above): still waiting.
        self._left_uncounted.discard(training_id)
        if updated.recoveries > current.recoveries:  # a take-over from a worker that stopped
            self._telemetry.lease_recovered(phase="scoring" if updated.is_scoring else "training")
        if outcome is ClaimOutcome.EXHAUSTED:
            logger.warning("training %s failed: its worker stopped %d times (%s)", training_id,
                           updated.recoveries, updated.error or "died")
            self._ended(failed, error_code=ErrorCode.TRAINING_INTERRUPTED)
            self._cancel_remote(failed)
            self._checkpoints.drop(training_id)  # failed: it will never be resumed
            return None
        if outage_lost:
            # Worded as the branch below: its own name is this worker restarted.
            logger.warning("training %s: %s %s lease ran out while the database could not be "
                           "reached, took no writes or its disk was full (attempt %d, %s): not "
                           "counted as one of its attempts", training_id, owner,
                           f"takes it over from {current.lease_owner}, whose"
                           if current.lease_owner != owner else "continues it after this "
                           "worker's restart: its previous process's",
                           updated.attempt, updated.status)
        elif (claimed.lease_owner is not None
              and current.metrics.get(LOCKED_AWAY_KEY) == current.attempt):
            # The attempt that just ended stepped away as the database kept it waiting (a lock,
            # a slow statement; counted): said as such, where "this worker's restart: its
            # previous process stopped holding it" sent the operator after a crash that never
            # was. Told by the attempt noted at the step-away, not by the row's words, which
            # stay until the version is stored (a later attempt's crash was said as a lock).
            logger.warning("training %s: %s %s after the database kept it waiting (its row "
                           "says: %s) (attempt %d, %s)", training_id, owner,
                           f"takes it over from {current.lease_owner}"
                           if current.lease_owner != owner else "continues it",
                           current.error, updated.attempt, updated.status)
        elif claimed.lease_owner is not None:  # not one that waited for room here
            # A worker is named by its machine and index: its own name is this worker restarted.
            logger.warning("training %s: %s %s (attempt %d, %s)", training_id, owner,
                           f"takes it over from {current.lease_owner}, which stopped holding it"
                           if current.lease_owner != owner else "continues it after this "
                           "worker's restart: its previous process stopped holding it",
                           updated.attempt, updated.status)
        else:
            logger.info("training %s: %s runs attempt %d (%s)", training_id, owner,
                        updated.attempt, updated.status)
        return _Held(self, updated, owner=owner, stopping=stopping)

    def _keep_checkpoint(self, held: _Held) -> Callable[..., None]:
        """``TrainingCheckpoints.keep`` for ``held``, its lease checked again between storing the
        new checkpoint and deleting the others (the upload may take minutes)."""
        def still_held() -> None:
            with self._holding(held):
                pass

        def keep(training_id: str, path: Path, *, step: int) -> None:
            self._checkpoints.keep(training_id, path, step=step, still_held=still_held)
        return keep

    @contextmanager
    def _holding(self, held: _Held) -> Iterator[tuple[Repository, Training]]:
        """A transaction with the training's row locked, while ``held`` still holds it: the
        fence of every write a worker makes. ``LeaseLostError`` (nothing written) otherwise.

        A database that fails the transaction (a lock past the busy timeout, a fail-over, a
        pool that stayed exhausted) interrupts the training (``_UnreachableError``): the worker
        steps away and the next attempt continues it, from its last checkpoint or by adopting
        its remote run. Failing it would throw away a training that nothing was wrong with, and
        a database away for longer ends the lease all the same."""
        try:
            with self._repo.atomic() as tx:
                current = tx.get_training(held.training_id, for_update=True)
                if current is None or not holds(current, owner=held.owner, attempt=held.attempt):
                    held.lost.set()
                    raise LeaseLostError(f"training {held.training_id} is no longer held by "
                                         f"{held.owner} (attempt {held.attempt})")
                yield tx, current
        except StorageError as exc:
            raise _UnreachableError(exc.message, remote_id=held.remote_id,
                                    reason=_database_reason(exc), cause=exc) from exc

    def _update_held(self, held: _Held, fn: Callable[[Training], Training]) -> Training:
        """``fn`` applied to the training while ``held`` still holds it."""
        with self._holding(held) as (tx, current):
            updated = fn(current)
            if updated is not current:
                tx.save_training(updated)
            return updated

    def _try_update_held(self, held: _Held, fn: Callable[[Training], Training], *,
                         doing: str, quiet_if_full: bool = False) -> Training | None:
        """``_update_held``, or None: the lease is lost, or the database is away (logged, as
        could not ``doing``; at DEBUG with ``quiet_if_full`` for a full disk, which the caller
        says once an outage)."""
        try:
            return self._update_held(held, fn)
        except LeaseLostError:
            return None
        except SelfieLoraError as exc:
            full = isinstance(exc, _UnreachableError) and exc.full
            logger.log(logging.DEBUG if quiet_if_full and full else logging.WARNING,
                       "training %s: could not %s: %s", held.training_id, doing, exc.message)
            return None

    def _hand_back(self, held: _Held) -> None:
        # The database away: the lease runs out on its own and the reconciler rings.
        if self._try_update_held(held, release, doing="hand it back") is None:
            return
        # Ring again at once: a worker that is still up (or this one, restarted) resumes it;
        # with the queue away, the reconciler rings once it is back.
        self._ring(held.training_id)
        logger.info("training %s handed back (attempt %d): this worker is stopping",
                    held.training_id, held.attempt)

    def _progressed(self, held: _Held) -> None:
        """Record, once an attempt, that it made progress its successor keeps (a checkpoint
        stored past the one it resumed from, a poll of its remote run): its take-over starts the
        count of recoveries again (``claim``). A failed write only loses that."""
        if held.progressed:
            return
        if self._try_update_held(held, lambda t: dataclasses.replace(t, progressed=True),
                                 doing="record its progress") is not None:
            held.progressed = True
            self._room_again(held)

    def _room_again(self, held: _Held) -> None:
        """A write of ``held``'s went through (a checkpoint stored, its version): a full disk's
        outage, if there was one, is over."""
        if self._room.ends(ticket=held.room_ticket):
            logger.info("training %s: the disk has room again; the trainings that waited for it "
                        "go on", held.training_id)

    def _scoring_lock_gap(self, held: _Held, t: Training) -> timedelta:
        """How long ``t``, its version stored, waits after a lock (``scoring_lock_gap`` of its
        scoring's stops). Its stops are not known when the lock was met before ``_judge`` read
        its version's count: all its take-overs are taken as the scoring's then, and the first
        gap at least, so that such a lock is not rung back to back either."""
        if held.recoveries_when_stored is not None:
            return self.lease.scoring_lock_gap(
                scoring_stops(t, recoveries_when_stored=held.recoveries_when_stored))
        return max(self.lease.scoring_lock_gap(t.recoveries), self.lease.scoring_lock_gap(0))

    def _wait_for_room(self, held: _Held, exc: _UnreachableError) -> None:
        """Leave a training whose worker found a disk full: it waits (``wait_for_room``, not
        counted as an attempt) and is tried again after a gap that grows to a minute. Said once
        an outage (its end too, ``_room_again``): its tries would repeat it every few seconds."""
        def leave(t: Training, gap: timedelta) -> Training:
            return wait_for_room(t, self._clock(), reason=_disk_full_reason(t, quota=exc.quota),
                                 hold=gap, quota=exc.quota)

        _, gap, began = self._wait(held, self._room, ticket=held.room_ticket, leave=leave,
                                   doing="leave it to wait for room", quiet_if_full=True)
        logger.log(logging.WARNING if began else logging.DEBUG,
                   "training %s: %s (attempt %d); it waits without spending its attempts, tried "
                   "again every %.0f s or more (up to a minute): %s and it goes on by itself "
                   "(the end of the outage is logged)", held.training_id, exc.message,
                   held.attempt, gap.total_seconds(),
                   QUOTA_ADVICE if exc.quota else "free space on that disk")

    def _storage_again(self, held: _Held) -> None:
        """The object storage answered ``held``'s read or write: its outage, if there was one,
        is over."""
        if self._storage.ends(ticket=held.storage_ticket):
            logger.info("training %s: the object storage answers again; the trainings that "
                        "waited for it go on", held.training_id)

    def _wait_for_storage(self, held: _Held, exc: _UnreachableError, *,
                          limit: timedelta | None = None) -> None:
        """Leave a local training whose object storage could not be reached (its photos or
        checkpoint not read, its trained LoRA not stored): it waits out a gap that grows
        (``storage_outage_gap``) and is tried again then, not counted, as a full disk's wait.
        Re-queued at once and counted, a blip of seconds spent all three attempts in under a
        second and threw the finished LoRA away. Said once an outage, its end too; past
        ``limit`` (by default ``storage_wait_limit``) each wait is counted (``wait_out``), and
        said each time."""
        reason = f"{exc.reason} (the object storage could not be reached; tried again by itself)"
        limit = limit or self.lease.storage_wait_limit

        # Only a wait to store a remote run's downloaded output is one that output can expire
        # in (``_expired_while_storage_away``); the photos' read before the run is not.
        weights_of = exc.remote_id if exc.reason == WEIGHTS_NOT_STORED else None

        def leave(t: Training, gap: timedelta) -> Training:
            return wait_out(t, self._clock(), reason=reason, hold=gap, limit=limit,
                            weights_of=weights_of)

        left, gap, began = self._wait(held, self._storage, ticket=held.storage_ticket,
                                      leave=leave, doing="leave it to wait for the storage")
        if left is not None and left.lease_owner is not None:
            # Past ``storage_wait_limit`` ``wait_out`` steps away, the owner kept: its next
            # claim counts. Said at each such wait (``max_attempts`` of them at most): the
            # training now spends its attempts, and fails once they are spent.
            logger.warning("training %s: %s: %s (attempt %d); the object storage has been away "
                           "for over %s: this wait is counted as an interrupted attempt (the "
                           "training fails once they are spent), tried again in %.0f s",
                           held.training_id, exc.reason, exc.message, held.attempt,
                           wait_text(limit), gap.total_seconds())
            return
        logger.log(logging.WARNING if began else logging.DEBUG,
                   "training %s: %s: %s (attempt %d); it waits without spending its attempts, "
                   "tried again in %.0f s (the end of the outage is logged)", held.training_id,
                   exc.reason, exc.message, held.attempt, gap.total_seconds())

    def _wait(self, held: _Held, waits: _Waits, *, ticket: int,
              leave: Callable[[Training, timedelta], Training], doing: str,
              quiet_if_full: bool = False) -> tuple[Training | None, timedelta, bool]:
        """Leave ``held`` to wait out the outage of ``waits`` (``leave``: its row, given the
        gap): the row written (None: not written), the gap, and whether this wait begins the
        outage (said at WARNING, the others at DEBUG). ``doing`` and ``quiet_if_full``: as
        ``_try_update_held``'s."""
        gap = waits.next_gap()
        left = self._try_update_held(held, lambda t: leave(t, gap), doing=doing,
                                     quiet_if_full=quiet_if_full)
        if left is None:
            # The database away too (or its disk full): the lease runs out, the reconciler
            # rings, and this worker's next claim of it counts nothing (``_claim``).
            self._left_uncounted.add(held.training_id)
        return left, gap, waits.outage.begins(ticket=ticket)

    def _leave_for_outage(self, held: _Held, exc: _UnreachableError) -> None:
        """Leave a training whose database could not be reached: the next attempt continues it
        (from its last checkpoint, or adopting its remote run) without spending one of its
        attempts, the owner let go as a full disk's wait lets it go. Two PostgreSQL restarts
        failed every training running through them, "interrupted 3 times because the worker
        running it stopped". Nobody could claim it while the database was away."""
        def leave(t: Training) -> Training:
            return dataclasses.replace(step_away(t, self._clock(), reason=exc.reason),
                                       lease_owner=None)

        if self._try_update_held(held, leave, doing="step away") is None:
            # Not even that written (the database still away): the lease runs out, the
            # reconciler rings, and this worker's next claim of it counts nothing (``_claim``).
            self._left_uncounted.add(held.training_id)
        else:
            self._ring(held.training_id)
        logger.warning("training %s: %s (attempt %d); the next attempt continues it without "
                       "spending one of its attempts", held.training_id, exc.message,
                       held.attempt)

    def _step_away(self, held: _Held, exc: _UnreachableError) -> None:
        """Leave a training while what it needs is unreachable (the database; for a remote run
        that goes on, the trainer's API or the storage of its weights): the next attempt
        continues it (``step_away`` counts it, so an endless outage ends). A full disk
        (``_wait_for_room``), the database server away (``_leave_for_outage``) and the object
        storage away (``_wait_for_storage``; a remote run's for ``REMOTE_STORAGE_WAIT_LIMIT``
        only) are waited out uncounted instead."""
        if exc.full:
            self._wait_for_room(held, exc)
            return
        if exc.outage:
            self._leave_for_outage(held, exc)
            return
        if exc.blob_outage and exc.remote_id is None and (
                exc.scoring or not held.training.remote_create_started):
            # A local training, or any while its version is scored (a remote run's output
            # expires: its outage is waited out uncounted only for a while, below).
            self._wait_for_storage(held, exc)
            return
        if (exc.blob_outage and held.training.version_id is None
                and storage_waited(held.training, self._clock()) < REMOTE_STORAGE_WAIT_LIMIT):
            # A remote run, the storage away (its output downloaded but not stored, or the
            # photos not read at its adoption): waited out uncounted as a local training's, but
            # only for a while (its output expires on the backend); then counted below.
            # Counted from the first failure, an outage of 6 min failed it.
            self._wait_for_storage(held, exc, limit=REMOTE_STORAGE_WAIT_LIMIT)
            return
        # A remote run goes on: the next attempts are spaced (``LeasePolicy.outage_gap``), so
        # that the attempts span an outage of minutes, not the seconds of their retries, before
        # the run is failed and canceled.
        # Not once the version is stored: the remote run has ended (its weights are ours), the
        # scoring has no outage on Replicate to wait out and counts its own stops.
        def leave(t: Training) -> Training:
            goes_on = t.version_id is None and (exc.remote_id is not None
                                                or t.remote_create_started)
            hold = self.lease.outage_gap(t) if goes_on else exc.hold
            reason = exc.reason
            if t.version_id is not None and exc.locked:
                # A lock once its version is stored, wherever it was met (the gate's verdict
                # write, ``_judge``'s read, a read outside the fences): spaced as a lock in the
                # scoring is, where the paths outside ``judge`` were rung back to back and a
                # lock that did not end spent the scoring's attempts in seconds.
                hold = max(hold, self._scoring_lock_gap(held, t))
                reason = SCORING_LOCKED
            left = step_away(t, self._clock(), reason=reason, hold=hold)
            # Which attempt stepped away on a lock: the next claim names the lock only for the
            # attempt that just ended (the row's words stay until the version is stored, and a
            # later attempt may have died for another reason).
            metrics = {k: v for k, v in left.metrics.items() if k != LOCKED_AWAY_KEY}
            if exc.locked:
                metrics[LOCKED_AWAY_KEY] = t.attempt
            return dataclasses.replace(left, metrics=metrics)

        # The database away too: the lease runs out on its own and the reconciler rings again,
        # which counts the attempt all the same.
        left = self._try_update_held(held, leave, doing="step away")
        if left is None:
            return
        if left.lease_expires_at is not None and left.lease_expires_at > self._clock():
            # Held back: a message now would find it busy and be dropped; the reconciler
            # rings once the hold is over.
            if exc.remote_id is None and (exc.scoring or left.version_id is not None):
                logger.warning("training %s: %s (attempt %d); the next attempt continues it "
                               "after %s", held.training_id, exc.message, held.attempt,
                               left.lease_expires_at.isoformat())
                return
            logger.warning("training %s: %s (attempt %d); the remote run %s goes on and the "
                           "next attempt adopts it after %s", held.training_id, exc.message,
                           held.attempt, exc.remote_id or "(its id not known yet)",
                           left.lease_expires_at.isoformat())
            return
        self._ring(held.training_id)
        if exc.remote_id is None:
            logger.warning("training %s: %s (attempt %d); the next attempt continues it",
                           held.training_id, exc.message, held.attempt)
            return
        logger.warning("training %s: %s (attempt %d); the remote run %s goes on and the next "
                       "attempt adopts it", held.training_id, exc.message, held.attempt,
                       exc.remote_id)

    # ------------------------------------------------------------------ the work
    def _advance(self, held: _Held) -> None:
        training = held.training
        if training.cancel_requested:
            self._finish_canceled(held, reason="canceled before it ran")
            return
        if training.version_id is None and not self._train(held):
            return
        self._judge(held)

    def _train(self, held: _Held) -> bool:
        """Run the trainer and publish its version. False when the training ended without one."""
        training = held.training
        trainer = self._trainers.get(training.backend)
        if trainer is None:
            self._finish_failed(
                held, user_message=f"This server has no '{training.backend}' trainer configured; "
                                   "ask the operator to enable it.",
                reason="no trainer for backend", code=ErrorCode.CONFIG_ERROR)
            return False
        if training.status is TrainingStatus.QUEUED:
            self._update_held(held, lambda t: transition(
                t, TrainingStatus.STARTING, at=self._clock(), reason="picked up by a worker"))
        root = self._work_dir / training.id
        # What an earlier attempt left is of no use to this one (a local training resumes from
        # the checkpoint in the blob store; Replicate's state lives on Replicate). Only earlier
        # attempts': a later one may already be at work in this folder (another worker of this
        # machine took the training over from this one, alive but late with its heartbeats).
        _remove_earlier_attempts(root, held.attempt)
        work_dir = _attempt_folder(root, held.attempt)
        try:
            try:
                job = self._job(training, work_dir=work_dir)
                # The newest checkpoint of an earlier attempt (or of the canceled training this
                # one resumes), wherever that ran: the blob store is what every worker sees.
                stored = self._checkpoints.fetch(training.id, work_dir / "resume.ckpt")
            except BlobMissingError:
                raise
            except StorageError as exc:
                # The store is away (or misconfigured), not the photos gone: the next attempt
                # reads them, and an outage that lasts ends the training all the same.
                raise _UnreachableError(exc.message, remote_id=training.remote_id,
                                        reason=STORAGE_UNREACHABLE, cause=exc) from exc
            self._storage_again(held)
            if stored is not None:
                logger.info("training %s continues from its checkpoint at step %d",
                            training.id, stored.step)
            job = dataclasses.replace(
                job, resume_from=work_dir / "resume.ckpt" if stored is not None else None,
                checkpoints=_HeldStore(self, held, keep=self._keep_checkpoint(held),
                                       what="checkpoint",
                                       resumed_at=stored.step if stored is not None else -1),
                samples=_HeldStore(self, held, keep=self._samples.keep, what="sample"))
            sink = _Sink(self, held)
            try:
                result = trainer.train(job, sink=sink)
            except StorageError as exc:
                # This machine's disk (the trained LoRA could not be written), not the training:
                # it steps away with its checkpoints kept, and the next attempt (with room, or
                # on another machine) resumes from the newest; an outage that lasts ends it.
                raise _UnreachableError(exc.message, remote_id=sink.remote_id,
                                        reason=LOCAL_DISK_FAILED, cause=exc) from exc
            except TrainerUnavailableError as exc:
                if sink.remote_id is None and not (sink.create_begun
                                                   or training.remote_create_started):
                    raise  # nothing runs remotely: failing it loses nothing
                # A run runs, or may (a create whose answer, and the list that would have found
                # it, were lost to the outage): failing would cancel a run Replicate accepted,
                # where the next attempt adopts it by its upload's URL.
                raise _UnreachableError(
                    exc.message, remote_id=sink.remote_id,
                    reason=f"{_backend_name(training.backend)} could not be reached") from exc
            try:
                self._store_version(held, result)
            except StorageError as exc:
                # An outage, not a fault of the training: it steps away with its checkpoints
                # kept (failing it would drop them and hours of GPU work with them). The remote
                # output outlives this (about an hour): the next attempt downloads it again; a
                # local one resumes from its last checkpoint. An outage that lasts ends the
                # training after the configured attempts all the same.
                raise _UnreachableError(exc.message, remote_id=sink.remote_id,
                                        reason=WEIGHTS_NOT_STORED, cause=exc) from exc
            self._room_again(held)
            self._storage_again(held)
            self._checkpoints.drop(training.id)
            return True
        except TrainingInterruptedError:
            raise
        except TrainingCanceledError as exc:
            self._finish_canceled(held, reason=exc.message, remote_ended=exc.remote_ended)
        except TrainerError as exc:
            if isinstance(exc, WeightsNotFoundError):
                exc = self._expired_while_waiting(held, exc)
            self._finish_failed(held, user_message=exc.user_message, reason=exc.message,
                                code=exc.code)
        except SelfieLoraError as exc:
            # Its message is the operator's (a database's constraint, a blob's key, a path): the
            # row's reason and the WARNING keep it, the user reads a sentence of its kind.
            self._finish_failed(held, user_message=_could_not_run(exc),
                                reason=exc.message, code=exc.code)
        except Exception as exc:
            if is_full_error(exc):
                # This machine's disk, met by the worker itself (the attempt's folder): waited
                # out, as the same error of the trainer or the stores is. A quota is said as one.
                raise _UnreachableError(f"{machine_disk_words(exc, work_dir)}: {describe(exc)}",
                                        remote_id=None, reason=LOCAL_DISK_FAILED,
                                        full=True, quota=is_quota_error(exc)) from exc
            logger.exception("training %s crashed", training.id)
            self._finish_failed(held, user_message=INTERNAL_ERROR_MESSAGE,
                                reason="internal error", code=ErrorCode.INTERNAL_ERROR)
        finally:
            # This attempt's folder only, for the same reason; the training's folder goes with
            # its last attempt's (or with the garbage collection, once the training ended).
            shutil.rmtree(work_dir, ignore_errors=True)
            with suppress(OSError):
                root.rmdir()  # refused while another attempt's folder is in it
        return False

    def _expired_while_waiting(self, held: _Held,
                               exc: WeightsNotFoundError) -> WeightsNotFoundError:
        """``exc`` (a remote run's output that can no longer be downloaded) said as what it is
        when the training waited for room meanwhile: the full disk (or the quota used up), for
        how long, and what to do.
        The backend's own sentence blamed the backend, and a user would just try again into the
        same full disk. Else when it waited for the object storage (``_expired_while_storage_
        away``)."""
        try:
            current = self._repo.get_training(held.training_id) or held.training
        except SelfieLoraError:
            current = held.training  # the wait noted at the claim is as good
        since = waited_for_room_since(current)
        if since is None:
            return self._expired_while_storage_away(current, exc)
        waited = wait_text(self._clock() - since)
        quota = room_wait_was_quota(current)
        what = ("a disk quota of the server was used up" if quota
                else "a disk of the server was full")
        return WeightsNotFoundError(
            f"{exc.message} ({what} for {waited}, since "
            f"{since.isoformat(timespec='seconds')}: the output expired while the training "
            "waited for room)",
            user_message=(QUOTA_EXPIRED_MESSAGE if quota else ROOM_EXPIRED_MESSAGE).format(
                waited=waited, backend=_backend_name(current.backend)))

    def _expired_while_storage_away(self, current: Training,
                                    exc: WeightsNotFoundError) -> WeightsNotFoundError:
        """``exc`` said as what it is when the training waited for the object storage to store
        this run's output, in the outage still going (``storage_waited_for_weights``: its waits
        began, the last one ended under ``STORAGE_WAIT_BREAK`` ago): the output expired while
        the storage was away, and the training must be run again. The backend's sentence
        ("could no longer be downloaded") said neither. A wait for anything else (the photos
        read before the run was made) keeps the backend's sentence: a 401/403 on the download
        then is not the wait's."""
        now = self._clock()
        waited = storage_waited_for_weights(current, now)
        if waited <= timedelta(0):
            return exc
        since = now - waited
        return WeightsNotFoundError(
            f"{exc.message} (the object storage could not be reached since "
            f"{since.isoformat(timespec='seconds')}: the output expired while the training "
            "waited for it)",
            user_message=STORAGE_EXPIRED_MESSAGE.format(backend=_backend_name(current.backend)))

    def _store_version(self, held: _Held, result: TrainingResult) -> None:
        """Publish the trainer's weights as the model's next version: once per training (the
        fence, and the unique training id on versions). The version is pending until the
        likeness gate decides; nothing on the model changes here."""
        with result.weights_path.open("rb") as fh:
            sha = hashlib.file_digest(fh, "sha256").hexdigest()  # streamed: weights can be GBs
        key = weights_key(sha)
        # Content-addressed and put only if absent: a retried store never rewrites a published
        # version's file. One found there (an orphan of an earlier training with the same
        # bytes) is made fresh instead, so the garbage collector spares it until the version
        # row below names it.
        self._blobs.put_file(key, result.weights_path, if_absent=True)
        metrics = _jsonable(dict(result.metrics))
        now = self._clock()
        with self._holding(held) as (tx, training):
            if training.version_id is not None:
                return  # published by an earlier attempt
            model = tx.get_model(training.model_id)
            assert model is not None
            versions = tx.list_versions(training.model_id)
            holder = holder_of_remote_version(versions, result.remote_version)
            if holder is not None:
                # The backend named a remote version an earlier version already runs on: stored,
                # this one's scoring and every generation "with" it would run that one's weights.
                # Nothing is written (the transaction rolls back); the training fails saying so.
                raise TrainingFailedError(
                    f"the trainer named remote version {result.remote_version}, which version "
                    f"{holder.number} already has",
                    user_message=(
                        f"The training finished, but the hosted model version it named is version "
                        f"{holder.number}'s, not one made from this training's weights. Nothing "
                        "was stored. Start the training again; if it happens again, tell the "
                        "operator."
                    ),
                )
            version = Version(
                id=new_id(), model_id=training.model_id,
                number=(versions[0].number + 1) if versions else 1,
                # The trainer that made these weights: the pin, unless the backend ran
                # another (replicate-python #419), which must not be hidden behind the pin.
                training_id=training.id,
                trainer_version=result.trainer_version_ran or training.trainer_version,
                weights_key=key, weights_sha256=sha, weights_method=result.weights_method,
                remote_version=result.remote_version, version_mismatch=result.version_mismatch,
                created_at=now, gate_status=GateStatus.PENDING,
                # What was active when it was stored, and how many times its user had chosen a
                # version: a pass activates it only while that is still active and the user
                # has chosen none since (a rollback to it included); a version the user
                # activated meanwhile stays active.
                # The take-overs so far were the training's: the scoring's own are counted
                # from here (``scoring_exhausted``), so deaths while it trained do not use up
                # the attempts its scoring gets.
                gate_details={"active_when_stored": model.active_version_id,
                              "activations_when_stored": tx.count_events(
                                  training.model_id, kind=VERSION_ACTIVATED),
                              RECOVERIES_WHEN_STORED: training.recoveries},
            )
            tx.add_version(version)
            loss = _float_or(metrics.get("final_loss"), training.loss)
            tx.save_training(dataclasses.replace(
                training, version_id=version.id, weights_method=result.weights_method,
                step=max(training.step, training.total_steps), error=None, loss=loss,
                metrics=metrics,
            ))
            tx.add_event(model_id=training.model_id, kind="version_stored", data={
                "training_id": training.id, "version_id": version.id,
                "version_number": version.number, "gate": str(version.gate_status),
                "weights_sha256": sha, "weights_method": result.weights_method,
            })
        # A garbage collection that read the references before this commit and looked at the
        # blob's age before the put above may have deleted it since; from the commit on, none
        # does (the version names it). We still have the file: written again if it is gone.
        # Best effort: the version is stored, and a storage error here must not fail its
        # training.
        try:
            if not self._blobs.exists(key):
                logger.warning("training %s: the weights %s were deleted while the version was "
                               "stored (a garbage collection); written again",
                               held.training_id, key)
                self._blobs.put_file(key, result.weights_path, if_absent=True)
        except StorageUnavailableError as exc:
            # S3 (or the database) away for a moment: expected, in its own words, where a
            # traceback (~45 lines, obstore's debug dump in it) said nothing more.
            logger.warning("training %s: could not check that the weights %s are stored: %s "
                           "(the version is stored)", held.training_id, key, exc.message)
        except StorageError as exc:
            logger.exception("training %s: could not check that the weights %s are stored: %s",
                             held.training_id, key, exc.message)
        if result.trainer_version_ran is not None:
            logger.warning("training %s: the trainer ran %s, not the pinned %s; version %d "
                           "records the one that ran", held.training_id,
                           result.trainer_version_ran, held.training.trainer_version,
                           version.number)
        if result.version_mismatch:
            logger.warning("training %s: the trainer's output version %s does not belong to %s",
                           held.training_id, result.remote_version, held.training.destination)
        logger.info("training %s: version %d stored (%s, weights found by %s); scoring it",
                    held.training_id, version.number, sha[:12], result.weights_method)

    def _judge(self, held: _Held) -> None:
        """Score the stored version, then in one transaction: the gate's decision, the
        version's activation when it passed, and the training's end."""
        # Read behind the fence, as every write: a database that fails the read makes the worker
        # step away at once (it escaped ``run`` and left the lease to run out, later counted as
        # a dead worker's).
        with self._holding(held) as (tx, training):
            assert training.version_id is not None
            version = tx.get_version(training.version_id)
        assert version is not None
        # A version stored before this count was kept has none: all its training's take-overs
        # count then, as they used to (it ends sooner, never later).
        at_store = int(version.gate_details.get(RECOVERIES_WHEN_STORED, 0))
        held.recoveries_when_stored = at_store  # a lock from here on: spaced by its stops
        unscorable = None
        stops = scoring_stops(training, recoveries_when_stored=at_store)
        # The attempt before this one stepped away on a lock: not a worker that stopped (the
        # operator would look for a crash).
        locked = training.metrics.get(LOCKED_AWAY_KEY) == training.attempt - 1
        if stops >= 2 * self.lease.max_attempts:
            # Its judging without scores stopped as many times again (a lock on the verdict's
            # rows that does not end, a worker that keeps dying there): ended now, with no
            # write the judging needs, where it was tried every 15 min for ever.
            self._end_unjudged(held, version, stops=stops, locked=locked)
            return
        # A lock met now: the next attempt waits (spaced, a lock of minutes not spending them all).
        lock_gap = self.lease.scoring_lock_gap(stops)
        if scoring_exhausted(training, self.lease, recoveries_when_stored=at_store):
            # Its owner's words: who can compare it and where, not an operator's command (the
            # log line names that); nothing scores it again by itself.
            unscorable = (f"{_scoring_stopped(stops, locked=locked)}; you can compare it with "
                          "the active version on the Versions page")
            if locked:
                logger.warning("training %s: its version is judged without scores, its scoring "
                               "stopped %s (the last time by a database lock); compare it with "
                               "'selfie-lora compare'", held.training_id, _times(stops))
        try:
            verdict = self._likeness.judge(training.version_id, checkpoint=held.checkpoint,
                                           unscorable=unscorable)
        except _ScoringCanceledError:
            # As a cancel found after the last probe (below): the version is kept, held.
            self._finish_canceled(held, reason="canceled while its version was scored")
            return
        except BaselinePhotosUnreadableError as exc:
            # The storage is away: the worker steps away and the next attempt scores it
            # again (counted, so a storage that keeps failing ends in a judging without scores,
            # held); one out of reach is waited out without spending attempts, as below.
            locked = isinstance(exc.__cause__, DatabaseLockedError)
            raise _UnreachableError(exc.message, remote_id=None,
                                    reason=SCORING_LOCKED if locked else STORAGE_UNREACHABLE,
                                    cause=exc.__cause__, scoring=True,
                                    hold=lock_gap if locked else timedelta(0)) from exc
        except StorageUnavailableError as exc:
            # An outage while it was scored (a probe image not stored, its record not
            # written): an interruption, as the training's own, not a version that could not
            # be scored (held for good, and alerted, for a blip). The next attempt goes on from
            # the probe images stored, without spending one of the scoring's attempts.
            raise _UnreachableError(exc.message, remote_id=None, reason=SCORING_UNREACHABLE,
                                    cause=exc, scoring=True) from exc
        except DatabaseLockedError as exc:
            # A lock held elsewhere past the database's wait (or a statement past its timeout)
            # while it was scored: left for the next attempt as an outage is, from the probe
            # images stored, not a version that could not be scored (held for good, and alerted,
            # for a lock of seconds). Counted, unlike an outage (``_step_away``: the database
            # answered), as a training's lock is (``_database_outage``): a lock that never ends
            # spends the scoring's ``max_attempts`` and the version is judged without scores,
            # where an uncounted one would be tried again for ever.
            raise _UnreachableError(exc.message, remote_id=None, reason=SCORING_LOCKED,
                                    cause=exc, scoring=True, hold=lock_gap) from exc
        self._storage_again(held)
        decided = None
        with self._holding(held) as (tx, current):
            if current.cancel_requested:
                self._cancel_in(tx, current, reason="canceled while its version was scored")
                return
            decided = self._likeness.apply_verdict(tx, verdict)
            version = tx.get_version(verdict.version_id)
            assert version is not None
            done = transition(current, TrainingStatus.SUCCEEDED, at=self._clock(),
                              reason="trainer succeeded; version stored and scored")
            tx.save_training(done)
            tx.add_event(model_id=current.model_id, kind="training_succeeded",
                         data=succeeded_event(done, version, verdict))
        if decided is not None:
            # Once committed only: the gate's line (a held version's "likeness alert") written
            # inside the transaction told of a decision, and an alert, that a failed commit never
            # recorded.
            decided.log()
        self._ended(done)
        logger.info("training %s succeeded: version %d %s (%s)", held.training_id,
                    version.number, version.gate_status, version.gate_reason)
        if decided is not None and decided.alert is not None:
            self._likeness.deliver_alert(decided.alert)

    # ------------------------------------------------------------------ endings
    def _end_unjudged(self, held: _Held, version: Version, *, stops: int, locked: bool) -> None:
        """End a training whose version's scoring and then its judging without scores were each
        stopped ``max_attempts`` times (``stops`` in all): it succeeded (its version is stored),
        the version kept, held if its row takes the write, never activated by the gate. The
        training's end is written on its own row only (and the retraining log), so that a lock
        on the version's or the model's row (``apply_verdict`` takes both FOR UPDATE) does not
        keep it from ending; the version's hold is tried in its own transaction first."""
        why = _scoring_stopped(stops, locked=locked)
        alert = self._hold_apart(held.training_id, version.id, canceled=False, why=why)
        with self._holding(held) as (tx, current):
            if current.cancel_requested:
                # Asked while the hold waited (a lock's timeout): ended as asked, as the gate's
                # own end does (its version held apart above, or left undecided).
                self._cancel_in(tx, current, hold=False,
                                reason="canceled while its version was judged")
                done = None
            else:
                done = transition(current, TrainingStatus.SUCCEEDED, at=self._clock(),
                                  reason=f"version stored; not judged: {why}")
                tx.save_training(done)
                judged = tx.get_version(version.id) or version
                tx.add_event(model_id=current.model_id, kind="training_succeeded",
                             data=succeeded_event(done, judged, None))
        if done is not None:
            self._ended(done)
            logger.warning("training %s succeeded: version %d %s, not judged by the likeness "
                           "gate: %s", held.training_id, judged.number, judged.gate_status, why)
        # Sent once the training's end is written, as the gate's own alert is (``_judge``):
        # the version is held either way, its alert recorded with the hold.
        if alert is not None:
            self._likeness.deliver_alert(alert)

    def _ended(self, t: Training, *, error_code: str | None = None) -> None:
        seconds = ((t.completed_at - t.started_at).total_seconds()
                   if t.completed_at is not None and t.started_at is not None else None)
        self._telemetry.training_ended(backend=t.backend, status=str(t.status), seconds=seconds,
                                       error_code=error_code)

    def _finish_failed(self, held: _Held, *, user_message: str, reason: str,
                       code: str) -> None:
        # The failure and its event in one transaction, as a success's and a cancel's: the
        # event in one of its own was lost to a worker killed between the two, and the log
        # never said that training ended (nothing writes it later: the training is over).
        with self._holding(held) as (tx, current):
            t = dataclasses.replace(
                transition(current, TrainingStatus.FAILED, at=self._clock(), reason=reason),
                error=user_message, remote_cancel_pending=_remote_run_to_cancel(current))
            tx.save_training(t)
            tx.add_event(model_id=t.model_id, kind="training_failed",
                         data={"training_id": t.id, "error": user_message})
        self._checkpoints.drop(t.id)  # only a canceled training can be resumed
        self._ended(t, error_code=code)
        # The one line of a failure (at WARNING: an alert counting "training ... failed" lines
        # counts each failure once), whichever way the training got here.
        logger.warning("training %s failed: %s", t.id, reason)
        # A remote run of a failed training would go on, billed, and add a version to the
        # destination that nothing records.
        self._cancel_remote(t)

    def _finish_canceled(self, held: _Held, *, reason: str, remote_ended: bool = False) -> None:
        """End the held training as canceled, and then its remote run, unless the trainer ended
        that already (``remote_ended``: it raised the cancel after canceling the run, or the run
        was canceled on the backend).

        A stored version is held in its own transaction first, then the training's row is ended:
        a lock on the version's or the model's row (the hold takes both FOR UPDATE, as the
        gate's verdict write does) would otherwise refuse the cancel at each claim for ever, as
        ``_end_unjudged`` is bounded for the same reason. A refused hold leaves it undecided."""
        stored = self._repo.get_training(held.training_id)
        tried = None if stored is None else stored.version_id
        if tried is not None:
            self._hold_apart(held.training_id, tried, canceled=True)
        with self._holding(held) as (tx, current):
            canceled = self._cancel_in(tx, current, reason=reason, remote_ended=remote_ended,
                                       hold=current.version_id != tried)
        # A cancel this worker found on the row (asked of an earlier attempt that handed the
        # training back) has a remote run nobody canceled: it would go on, billed, and add a
        # version to the destination that nothing records.
        if canceled is not None:
            self._cancel_remote(canceled)

    def _hold_apart(self, training_id: str, version_id: str, *, canceled: bool,
                    why: str = "") -> ClaimedAlert | None:
        """Hold a version back in its own transaction, beside its training's row ended on its
        own (before it or after): a refusal (a lock on its rows, waited for a moment only: the reconcile pass
        tries it again, and a user's cancel must not wait out a lock's timeout) is logged and
        leaves it undecided. The alert of an unjudged version held, claimed by this process, is
        returned for the caller to deliver (``LikenessService.hold_unjudged``)."""
        try:
            with self._repo.atomic_briefly() as tx:
                if canceled:
                    self._likeness.hold_canceled(tx, version_id)
                    return None
                hold = self._likeness.hold_unjudged(tx, version_id, why=why)
                # A cancel asked before this hold, or while it waited for the version's rows:
                # the training then ends canceled, and its owner, who asked for the end, gets
                # no alert (read after the hold's wait, which a cancel may land in). One asked
                # after this read finds the version held unjudged: its alert stands (README).
                current = tx.get_training(training_id)
                if current is not None and current.cancel_requested:
                    raise _CanceledMeanwhileError
            if hold is not None:
                # Once committed only: a hold rolled back (above) sends no alert, and its line
                # told the operator of one.
                hold.log()
        except _CanceledMeanwhileError:
            # Held as a canceled training's instead, in a transaction of its own (the one above
            # was rolled back). One call deep at most: with ``canceled`` the hold returns before
            # the read that raises this, so this handler is never reached from that call.
            return self._hold_apart(training_id, version_id, canceled=True)
        except StorageError as exc:
            # Still pending (the gate never activates it once its training has ended): its
            # owner can activate it, or compare it, on the Versions page as any version.
            logger.warning("training %s: its version could not be held back (%s); it stays "
                           "undecided and is not activated", training_id, exc.message)
            return None
        return hold.alert if hold is not None else None

    def _cancel_in(self, tx: Repository, t: Training, *, reason: str,
                   remote_ended: bool = False, hold: bool = True) -> Training | None:
        """End ``t`` as canceled inside ``tx`` (its version, if it has one, is held back unless
        ``hold`` is False: held apart already; its remote run, unless ``remote_ended``, is marked
        to be canceled)."""
        if t.status.is_terminal:
            return None
        canceled = dataclasses.replace(
            transition(t, TrainingStatus.CANCELED, at=self._clock(), reason=reason),
            error=CANCELED_MESSAGE,
            remote_cancel_pending=not remote_ended and _remote_run_to_cancel(t))
        tx.save_training(canceled)
        self._ended(canceled)
        if hold and t.version_id is not None:
            self._likeness.hold_canceled(tx, t.version_id)
        tx.add_event(model_id=t.model_id, kind="training_canceled",
                     data={"training_id": t.id, "reason": reason})
        logger.info("training %s canceled (%s)", t.id, reason)
        return canceled

    def _cancel_pending_remotes(self, *, unreachable: set[str]) -> int:
        """Ask again for the cancels of remote runs that an ending could not get through (the
        backend was down, or the process died after the commit), but none of a backend in
        ``unreachable`` (one that failed a call this pass). How many were asked."""
        asked = 0
        for t in self._repo.remote_cancels_pending():
            if _asked_later(t, unreachable):
                continue
            asked += 1
            self._cancel_remote(t, unreachable=unreachable)
        return asked

    def _cancel_remote(self, t: Training, *, unreachable: set[str] | None = None) -> None:
        """A training ended (failed, or canceled by anyone but the trainer itself) before its
        version was stored: its remote twin, if any, is canceled too. Once a version is stored
        the remote run has ended (its output was copied): nothing to cancel. The trainer asks
        once (briefly, on a user's request too); when it could not, the cancel stays owed and
        ``t.backend`` is added to ``unreachable``, the reconcile pass's backends not to ask
        again this pass."""
        trainer = self._trainers.get(t.backend)
        if not t.remote_cancel_pending or trainer is None:
            return
        if _asked_later(t, unreachable):
            return
        remote_id = t.remote_id
        hung: SelfieLoraError | None = None
        if remote_id is None:
            remote_id, hung = self._find_lost_remote(trainer, t, unreachable=unreachable)
            if remote_id is None:
                return
        try:
            trainer.cancel_remote(remote_id)
        except Exception:  # the training is ended either way; the reconciler asks again
            logger.warning("could not cancel remote training %s of %s now; asked again later",
                           remote_id, t.id, exc_info=True)
            if unreachable is not None:
                unreachable.add(t.backend)
            if hung is not None:
                raise hung from None
            return
        if hung is not None:
            # The found run's id got no answer from the database: its cancel is sent all the
            # same (it needs the trainer alone; kept for a pass the database answers, the run
            # billed on meanwhile, its id stored nowhere), the cancel left owed (the next pass
            # finds the run, canceled, and cancels it again: harmless), and the hang ends the
            # pass before its next call waits on it again.
            raise hung
        try:
            self._repo.clear_remote_cancel(t.id)
        except SelfieLoraError as exc:  # asked once more later: a second cancel is harmless
            logger.warning("training %s: remote cancel sent, not recorded (%s)", t.id, exc)
            _raise_if_hung(exc, unreachable=unreachable)

    def _find_lost_remote(self, trainer: Trainer, t: Training, *, unreachable: set[str] | None
                          ) -> tuple[str | None, SelfieLoraError | None]:
        """The remote run of ``t``, ended with a create begun and no remote id stored (its
        worker died with the create's answer), looked for by the create's marker. Found, its id is
        stored (the next round cancels it by id, never looks again); not found, there is nothing to
        cancel and the cancel is no longer owed. None: nothing to cancel now. With it, the error
        of a record the database gave no answer in a reconcile pass (``_hung``), for the caller
        to raise once the found run's cancel is sent."""
        try:
            found = trainer.find_remote(training_id=t.id, destination=t.destination,
                                        marker=t.remote_marker)
        except Exception as exc:  # the training is ended either way; the reconciler asks again
            logger.warning("training %s: could not look for the remote run its lost create may "
                           "have started (%s: %s); asked again later", t.id,
                           type(exc).__name__, exc)
            if unreachable is not None:
                unreachable.add(t.backend)
            return None, None
        try:
            if found is None:
                logger.info("training %s: its create left no remote run: nothing to cancel", t.id)
                self._repo.clear_remote_cancel(t.id)
                return None, None
            logger.warning("training %s: found remote run %s, whose create's answer was lost; "
                           "canceling it", t.id, found)
            self._update(t.id, lambda c: dataclasses.replace(c, remote_id=c.remote_id or found))
        except SelfieLoraError as exc:  # looked for again next round
            logger.warning("training %s: remote run lookup not recorded (%s)", t.id, exc)
            if found is None:
                _raise_if_hung(exc, unreachable=unreachable)
            elif _hung(exc, unreachable=unreachable):
                return found, exc
        return found, None

    # ------------------------------------------------------------------ internals
    def _job(self, training: Training, *, work_dir: Path) -> TrainingJob:
        try:
            dataset = self._repo.get_dataset(training.dataset_id)
        except StorageError as exc:  # the database's, said as such (not the blob store's)
            raise _UnreachableError(exc.message, remote_id=training.remote_id,
                                    reason=_database_reason(exc), cause=exc) from exc
        if dataset is None:
            raise _PhotosGoneError("the training's photos are gone",
                                   user_message=f"{_COULD_NOT_RUN}: its photos are gone; upload "
                                                "the photos again")
        caption = caption_for(training.trigger_word)
        try:
            photos = tuple(
                TrainingPhoto(name=f"{i:03d}.jpg", data=self._blobs.get(photo_key(sha)),
                              caption=caption, face_box=dataset.face_box(i))
                for i, sha in enumerate(dataset.photo_hashes)
            )
        except BlobMissingError as exc:
            if not self._holds_any_of(dataset):
                # Not one file of the upload here, its manifest neither: this process's storage
                # is not the one the upload went to, which uploading again cannot change. The
                # setting to fix is the operator's; the user's step is to tell them.
                mismatch = ("nor any other file of its upload: the worker's storage is not the "
                            "one the photos were uploaded to")
                raise _PhotosGoneError(
                    f"a photo of this training is not in this worker's storage ({exc.message}), "
                    f"{mismatch}. Set SELFIE_LORA_STORAGE_URL to the same storage on every "
                    "server and worker, then train again; uploading the photos again does not "
                    "help until then",
                    user_message=f"{_COULD_NOT_RUN}: a photo of this training is not in this "
                                 f"worker's storage, {mismatch}. Please tell the operator (the "
                                 "workers' storage setting differs from the server's), and "
                                 "train again once they have fixed it; uploading the photos "
                                 "again does not help until then") from exc
            # The blob's key (the storage's layout) for the operator only.
            raise _PhotosGoneError(
                f"a photo of this training is gone from storage ({exc.message}); upload the "
                "photos again",
                user_message=f"{_COULD_NOT_RUN}: a photo of this training is gone from storage; "
                             "upload the photos again") from exc
        return TrainingJob(
            training_id=training.id, trigger_word=training.trigger_word,
            destination=training.destination, trainer_version=training.trainer_version,
            recipe=training.recipe, photos=photos, work_dir=work_dir,
            remote_id=training.remote_id, remote_marker=training.remote_marker,
            webhook_url=self._webhook_url,
        )

    def _holds_any_of(self, dataset: Dataset) -> bool:
        """Whether the store holds the upload's manifest or any of its photos (a few lookups)."""
        keys = [manifest_key(dataset.id), *(photo_key(sha) for sha in dataset.photo_hashes[:8])]
        try:
            return any(self._blobs.exists(key) for key in keys)
        except StorageError:
            return True  # not known: the photo's own message stands

    def _update(self, training_id: str, fn: Callable[[Training], Training]) -> Training:
        with self._repo.atomic() as tx:
            current = tx.get_training(training_id, for_update=True)
            if current is None:
                raise NotFoundError(f"training {training_id} does not exist")
            updated = fn(current)
            if updated is not current:
                tx.save_training(updated)
            return updated

    def _require_intake(self) -> IntakeService:
        if self._intake is None:
            raise RuntimeError("this training service was built without an intake service")
        return self._intake


class _PhotosGoneError(NotFoundError):
    """The training's photos are not there to read (``TrainingService._job``): the operator's
    message names the blob's key; ``user_message`` says the same without it."""

    def __init__(self, message: str, *, user_message: str) -> None:
        super().__init__(message)
        self.user_message = user_message


class _UnreachableError(TrainingInterruptedError):
    """The database, or what a remote run needs (the trainer's API, the storage of its weights),
    cannot be reached: the worker steps away from the training (``TrainingService._step_away``)
    instead of failing it. ``remote_id``: the remote run, if any, the next attempt adopts;
    ``reason``: a sentence for the training's row; ``cause``: the storage error met, which
    says which outage it is (each site passing its own flags, one read left them out and
    counted a database restart as a dead worker); ``full``: a full disk met as another error
    (an ``OSError``), ``quota`` if that is a quota used up (EDQUOT)."""

    def __init__(self, message: str, *, remote_id: str | None, reason: str,
                 cause: BaseException | None = None, full: bool = False,
                 quota: bool = False, scoring: bool = False,
                 hold: timedelta = timedelta(0)) -> None:
        super().__init__(message)
        self.remote_id = remote_id
        self.reason = reason
        # A full disk, not an outage of what the training needs: it waits, not counted.
        self.full = full or isinstance(cause, StorageFullError)
        # ... said as a quota (the row, the WARNING's advice), where freeing space need not help.
        self.quota = quota or (isinstance(cause, StorageFullError) and cause.quota)
        # The database server could not be reached: not counted either (``_leave_for_outage``).
        self.outage = isinstance(cause, DatabaseUnreachableError)
        # The object storage could not be reached: a local training waits, not counted
        # (``_wait_for_storage``).
        self.blob_outage = isinstance(cause, BlobStoreUnreachableError)
        # Met while its stored version was scored: a remote run has ended by then (its weights
        # are ours), so its outage is waited out as a local training's.
        self.scoring = scoring
        # A database lock while its version was scored: how long it waits before its next
        # attempt (``LeasePolicy.scoring_lock_gap``).
        self.hold = hold
        # A lock (the database answered), which the next attempt's take-over line names.
        self.locked = isinstance(cause, DatabaseLockedError)


class _Waits:
    """An outage trainings wait out without spending their attempts (a full disk, the object
    storage away): said once (``outage``: a WARNING when the first wait begins, an INFO when a
    read or write goes through again), its waits spaced by ``gap``, of the n-th wait of the
    outage (0: the first), counted anew once it ends."""

    def __init__(self, gap: Callable[[int], timedelta]) -> None:
        self.outage = Outage()
        self._gap = gap
        self._waits = 0

    def next_gap(self) -> timedelta:
        """The gap of the wait that begins now."""
        gap = self._gap(self._waits)
        self._waits += 1
        return gap

    def ends(self, *, ticket: int) -> bool:
        """A read or write went through: whether that ends the outage (say so)."""
        if not self.outage.ends(ticket=ticket):
            return False
        self._waits = 0
        return True


def _times(count: int) -> str:
    return f"{count} {'time' if count == 1 else 'times'}"


def _is_scored(record: LikenessFacts | None) -> bool:
    """Whether a version's likeness record is scored (``TrainingService._undecided``)."""
    return record is not None and record.status is LikenessStatus.SCORED


def _scoring_stopped(stops: int, *, locked: bool) -> str:
    """Why a version is judged without scores, in its owner's words: its scoring stopped
    ``stops`` times, the last by a database lock (``locked``) or by its worker stopping."""
    if locked:
        return (f"its scoring was stopped {_times(stops)}, the last time because the database "
                "was busy (a lock)")
    return f"the worker scoring it stopped {_times(stops)}"


def _database_reason(exc: BaseException) -> str:
    """The sentence on the row of a training whose database failed its worker with ``exc``: a
    lock or a statement kept waiting (``DatabaseLockedError``) is the database answering, said
    as such (``DATABASE_LOCKED``); anything else as the database out of reach."""
    return DATABASE_LOCKED if isinstance(exc, DatabaseLockedError) else DATABASE_UNREACHABLE


def _database_outage(exc: BaseException) -> bool:
    """Whether ``exc``, met by a heartbeat, a claim or a reconcile, is the database away for
    every worker: the server unreachable, its disk full (SQLite's "database or disk is full",
    PostgreSQL's disk_full), or taking no writes (a fail-over's read-only standby, a read-only
    file). Either way no holder renews its lease (the renewal's write is refused beat after
    beat), so a lease that ran out meanwhile was lost to the outage
    (``lost_to_database_outage``). In a reconcile a full disk may be the blob store's too: an
    outage of the machine all the same, which its trainings wait out. Not this process's pool
    exhausted (``pool_exhausted``): the holder's pool is its own, and its beats may go through.
    Nor a lock or a statement kept waiting past its bound (``DatabaseLockedError``): on
    PostgreSQL a row lock, one slow statement or a cancel is this worker's own (the holder's
    beats go through), and one met at every round (a reconcile statement slower than a lowered
    statement_timeout) took every take-over for an outage's, so a training that kills its worker
    (out of memory) was taken over uncounted for ever (review 4). Counted, it fails after
    ``max_attempts``, as before locks were told apart; a SQLite lock that outlasts a lease costs
    an attempt likewise."""
    if isinstance(exc, DatabaseLockedError):
        return False
    if isinstance(exc, DatabaseRefusedError):
        return not exc.pool_exhausted
    return isinstance(exc, DatabaseUnreachableError | StorageFullError)


def _unanswered(failures: Sequence[Exception], *, skipping: str) -> bool:
    """Whether a part of a reconcile pass got no answer from the database (a hung server:
    ``DatabaseUnreachableError.unanswered``), so that the part ``skipping`` is not run: its
    first call would wait out the driver's answer timeout again, up to three waits a pass (~20 s
    each on PostgreSQL) where a worker's stop allows 30 s, with the clock check off (on, the
    round's clock read meets the hung server first, and the pass is not run). A part whose
    database refused or dropped the connection (at once, no wait) leaves the others to run: an
    owed remote cancel may still be read and asked for."""
    hung = next((f for f in failures
                 if isinstance(f, DatabaseUnreachableError) and f.unanswered), None)
    if hung is None:
        return False
    logger.debug("reconcile: %s skipped, the database did not answer (%s); the next round "
                 "tries again", skipping, describe(hung))
    return True


def _raise_if_hung(exc: SelfieLoraError, *, unreachable: set[str] | None) -> None:
    """Raises ``exc``, a write about a remote run that failed (its cancel stays owed, asked
    again later), when the database gave it no answer in a reconcile pass (``unreachable`` is
    the pass's): the pass's next call, the next owed cancel's, would wait the answer timeout
    again (~20 s on PostgreSQL), one wait an owed cancel, and the pass would end as if it had
    gone through, its later parts run. Outside a pass (a user's cancel) it is kept swallowed:
    the ending it follows is committed."""
    if _hung(exc, unreachable=unreachable):
        raise exc


def _hung(exc: SelfieLoraError, *, unreachable: set[str] | None) -> bool:
    """Whether ``exc`` is a database's no answer in a reconcile pass (``_raise_if_hung``)."""
    return (unreachable is not None and isinstance(exc, DatabaseUnreachableError)
            and exc.unanswered)


@contextmanager
def _reconcile_part(failures: list[Exception], what: str) -> Iterator[None]:
    """One part of a reconcile pass: its error is kept in ``failures`` (the first is raised
    after the pass, and its caller says it) instead of ending the pass. A later part's error of
    the same kind is that failure again (the database away fails every part): said at DEBUG; one
    of another kind is a failure of its own, said here."""
    try:
        yield
    except Exception as exc:
        if failures and type(exc) is type(failures[0]):
            logger.debug("reconcile: %s failed too (%s)", what, describe(exc))
        elif failures:
            logger.warning("reconcile: %s failed too (%s); the next round tries again", what,
                           describe(exc), exc_info=not isinstance(exc, SelfieLoraError))
        failures.append(exc)


class _SeenAway:
    """When this process saw the database away (``_database_outage``: unreachable, its disk
    full or taking no writes): spans from the first failure to the first success after (an
    open span ends now), the last few kept. Shared by threads."""

    _KEPT = 16

    def __init__(self) -> None:
        self._spans: list[tuple[datetime, datetime | None]] = []
        self._lock = threading.Lock()

    def away(self, at: datetime) -> None:
        with self._lock:
            if self._spans and self._spans[-1][1] is None:
                return  # the outage goes on
            self._spans = [*self._spans[-(self._KEPT - 1):], (at, None)]

    def back(self, at: datetime, *, began: datetime | None = None) -> None:
        """A success, completed ``at``, of a call begun at ``began`` (``at`` if not given):
        ends the open span, unless the call began before that span did. A slow heartbeat begun
        before another thread saw the outage says nothing of its end: closing the span then
        (with the beat's start time, before the span's own) left the outage, still going,
        uncovered, and a take-over over it was counted."""
        with self._lock:
            if not self._spans or self._spans[-1][1] is not None:
                return
            opened = self._spans[-1][0]
            if (began or at) < opened:
                return
            self._spans[-1] = (opened, at)

    def spans(self, now: datetime) -> list[tuple[datetime, datetime]]:
        with self._lock:
            return [(began, ended or now) for began, ended in self._spans]

    @contextmanager
    def watch(self, clock: Callable[[], datetime]) -> Iterator[None]:
        """Notes the block's ``_database_outage`` (raised on) or its success."""
        began = clock()
        try:
            yield
        except Exception as exc:
            if _database_outage(exc):
                self.away(clock())
            raise
        self.back(clock(), began=began)


def _failure_level(outage: Outage, ticket: int, exc: SelfieLoraError, *,
                   kind: type[SelfieLoraError] = DatabaseUnreachableError) -> int:
    """The level at which to say that a read, a beat or a store of a running training failed:
    DEBUG while the outage of ``kind`` it met lasts (said once, when it began), else WARNING."""
    if isinstance(exc, kind) and not outage.begins(ticket=ticket):
        return logging.DEBUG
    return logging.WARNING


def _database_back(outage: Outage, ticket: int, training_id: str) -> None:
    """A read or a beat of a running training went through: the database outage it said, if
    any, is over (said once)."""
    if outage.ends(ticket=ticket):
        logger.info("training %s: the database answers again", training_id)


def _attempt_number(folder: Path) -> int | None:
    prefix, _, number = folder.name.partition("-")
    return int(number) if prefix == "attempt" and number.isdecimal() else None


def _remove_earlier_attempts(root: Path, attempt: int) -> None:
    """The folders under a training's work folder of attempts before ``attempt``."""
    try:
        folders = list(root.iterdir())
    except OSError:
        return  # no folder yet
    for folder in folders:
        number = _attempt_number(folder)
        if number is not None and number < attempt:
            shutil.rmtree(folder, ignore_errors=True)


def _attempt_folder(root: Path, attempt: int) -> Path:
    """``root/attempt-<attempt>``, made. An earlier attempt that ends meanwhile removes ``root``
    when it finds it empty, which may fall between making ``root`` and the folder in it: made
    again then."""
    folder = root / f"attempt-{attempt}"
    for _ in range(2):
        with suppress(FileNotFoundError):
            return private_folders(folder)  # 0700: the LoRA and samples are the user's face
    return private_folders(folder)  # a third race is no race: raise what it meets


def _disk_full_reason(t: Training, *, quota: bool) -> str:
    """The row's sentence of ``t`` waiting for room (``quota``: a quota used up): how it goes
    on depends on what is kept."""
    said = DISK_QUOTA if quota else DISK_FULL
    if t.backend == "local":
        return said + DISK_FULL_LOCAL
    if t.remote_id is not None:
        return said + DISK_FULL_REMOTE.format(backend=_backend_name(t.backend),
                                              act=QUOTA_ADVICE if quota else "free space")
    return said  # nothing made yet: it starts when there is room


def _backend_name(backend: str) -> str:
    return "Replicate" if backend == "replicate" else f"the {backend} trainer"


class _ScoringCanceledError(TrainingInterruptedError):
    """Its user canceled the training while its version was scored. An interruption, so that
    the likeness service lets it through (any other error is recorded as a failed scoring) to
    ``TrainingService._judge``, which ends the training as canceled."""


def _photos_refusal(prepared: int | None, *, recipe: Recipe,
                    trainer_version: str) -> ConflictError | None:
    """409 ``photos_need_upload_again`` when photos prepared at ``prepared`` px cannot train
    ``recipe`` (a re-pin to more pixels since their upload: refused, not upscaled)."""
    if prepared is None or photos_fit(prepared_resolution=prepared, recipe=recipe):
        return None
    return ConflictError(photos_too_small(prepared_resolution=prepared, recipe=recipe,
                                          trainer_version=trainer_version),
                         code=ErrorCode.PHOTOS_NEED_UPLOAD_AGAIN)


def _upload_in_progress(claimed_until: datetime, *, now: datetime) -> UploadInProgressError:
    """409 for a start or an upload while another upload of the user holds its slot: that
    upload's photos are still being checked, or its process died and the claim lapses by
    ``claimed_until`` (the answer's Retry-After)."""
    seconds = max(1, math.ceil((claimed_until - now).total_seconds()))
    return UploadInProgressError(
        "an upload of yours is starting a training (its photos are being checked): try again "
        f"when it has ended, or in {seconds} second{'s' if seconds != 1 else ''} if it was "
        "interrupted", retry_after=seconds)


class _Held:
    """A training this worker holds: its lease (owner, attempt) and the heartbeat that keeps it.
    ``lost`` is set when the lease turns out to be someone else's."""

    def __init__(self, service: TrainingService, training: Training, *, owner: str,
                 stopping: threading.Event) -> None:
        self._service = service
        self._stopping = stopping
        self.training = training
        self.training_id = training.id
        self.owner = owner
        self.attempt = training.attempt
        # The remote run of this training, once one is stored (``_Sink.started``).
        self.remote_id = training.remote_id
        # This attempt's progress is on the row (``TrainingService._progressed``): written once.
        self.progressed = False
        # Its stored version's ``RECOVERIES_WHEN_STORED``, once ``_judge`` has read it: the count
        # its scoring's stops start from (``scoring_stops``); None before.
        self.recoveries_when_stored: int | None = None
        # The full-disk and object storage outages as this attempt found them
        # (``Outage.attempt``).
        self.room_ticket = service._room.outage.attempt()
        self.storage_ticket = service._storage.outage.attempt()
        self.lost = threading.Event()
        self._done = threading.Event()
        self._cancel_read_at: float | None = None  # time.monotonic() of the last read
        # The database unreachable while it runs: its cancel checks (several a second) and
        # heartbeats say so once, and once when it answers again, not at every read.
        self.database_outage = Outage()
        # Its disk full or its quota used up, or refusing writes for a state of its own (a
        # read-only standby, the pool's connections all taken, a lock held past its wait): said
        # once likewise, each kind (``refusal_said``), where each beat (every 5 s) logged a
        # WARNING. Met and ended by two threads, the training's (its cancel reads,
        # ``_Sink.cancel_requested``) and the heartbeat's: the kind its end is said in is the
        # Outage's own (``ends_as``), under its lock.
        self.database_refused = Outage()

    def tickets(self) -> tuple[int, int]:
        """Before a read or a beat: its tickets for ``failed`` or ``answered``."""
        return self.database_outage.attempt(), self.database_refused.attempt()

    def failed(self, exc: SelfieLoraError, tickets: tuple[int, int], *, what: str) -> None:
        """Say that a beat or a read of the training failed (``what``): an outage of the
        database, unreachable, its disk full or refusing writes (read-only, its pool's
        connections all taken), once when it begins (WARNING), at DEBUG while it lasts; another
        error at WARNING each time."""
        if refused(exc):
            # A quota told apart from a full disk (``refusal_said``): its mend is to raise the
            # quota, where "the disk stays full" sent the operator to free space ``df`` shows
            # is there. A disk that fills after a quota was said is said too (another kind).
            kind = refusal_said(exc)
            began, _before = self.database_refused.begins_as(kind, ticket=tickets[1])
            lasts = {FULL_DISK: "the disk stays full",
                     QUOTA_USED_UP: f"the disk quota stays used up: {QUOTA_ADVICE}"
                     }.get(kind, f"it is refused for {kind}")
            logger.log(logging.WARNING if began else logging.DEBUG,
                       "training %s: %s: %s (said once while %s; its end is logged)",
                       self.training_id, what, exc.message, lasts)
            return
        logger.log(_failure_level(self.database_outage, tickets[0], exc),
                   "training %s: %s: %s", self.training_id, what, exc.message)

    def answered(self, tickets: tuple[int, int]) -> None:
        """A beat or a read went through: the outage it ends, if any, is said over (once)."""
        _database_back(self.database_outage, tickets[0], self.training_id)
        kind = self.database_refused.ends_as(ticket=tickets[1])
        if kind is not None:
            # In the words of what refused: a pool whose connections were all taken never
            # stopped the database taking writes.
            over = {FULL_DISK: "the database's disk takes writes again",
                    QUOTA_USED_UP: "the database's disk quota takes writes again",
                    POOL_TAKEN: "the database's connections are free again",
                    KEPT_WAITING: "the database no longer keeps its statements waiting"}
            logger.info("training %s: %s", self.training_id,
                        over.get(kind, "the database takes writes again"))

    @contextmanager
    def heartbeat(self) -> Iterator[None]:
        thread = threading.Thread(target=self._beat, name=f"heartbeat-{self.training_id[:8]}",
                                  daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._done.set()
            thread.join(timeout=5)

    def _beat(self) -> None:
        # A thread starts with an empty context: the lines logged here carry the training's id
        # only if it is set again.
        with training_context(self.training_id):
            self._beat_until_done()

    def _beat_until_done(self) -> None:
        policy = self._service.lease
        while not self._done.wait(policy.heartbeat.total_seconds()):
            now = self._service._clock()
            tickets = self.tickets()
            try:
                kept = self._service._repo.renew_lease(
                    self.training_id, owner=self.owner, attempt=self.attempt, now=now,
                    expires_at=now + policy.ttl)
            except SelfieLoraError as exc:
                # The database is unreachable: try again at the next beat. If it stays away the
                # lease expires, another worker takes over and this one's writes are refused.
                self.failed(exc, tickets, what="heartbeat failed")
                if _database_outage(exc):
                    self._service._database_away.away(now)
                continue
            except Exception:
                # Anything else (a bug, an error nobody translated) is tried again too: a
                # heartbeat that ended here would leave the training running under a lease
                # nobody renews, for another worker to take over while this one still runs it.
                logger.exception("training %s: heartbeat failed", self.training_id)
                continue
            self.answered(tickets)
            # When the renewal completed, and only if it began after the outage was seen
            # (``_SeenAway.back``): ``now`` was read before a renewal that may have been slow.
            self._service._database_away.back(self._service._clock(), began=now)
            if not kept:
                self.lost.set()
                if self._ended():
                    # Released by the training's own end (its last transaction ends the lease
                    # before this worker is done: alerts, the remote run's cancel): not a loss.
                    logger.debug("training %s: it has ended; its heartbeat stops",
                                 self.training_id)
                else:
                    logger.warning("training %s: lease lost (attempt %d)", self.training_id,
                                   self.attempt)
                return

    def _ended(self) -> bool:
        """Whether the training has ended (the renewal refused because its end released the
        lease); False when that cannot be read (warned as a loss, which it may be)."""
        try:
            current = self._service._repo.get_training(self.training_id)
        except SelfieLoraError:
            return False
        return current is not None and current.status.is_terminal

    def interrupted(self) -> bool:
        return self.lost.is_set() or self._stopping.is_set()

    def checkpoint(self) -> None:
        """Raise if this worker must stop scoring the training: it lost it, it stops, or the
        training's user canceled it (``_ScoringCanceledError``)."""
        if self.lost.is_set():
            raise LeaseLostError(f"training {self.training_id} was taken over")
        if self._stopping.is_set():
            raise TrainingInterruptedError(f"training {self.training_id}: this worker stops")
        if self._cancel_requested():
            raise _ScoringCanceledError(f"training {self.training_id} canceled by its user")

    def _cancel_requested(self) -> bool:
        """The row's cancel flag, read at most every ``SCORING_CANCEL_POLL_SECONDS``."""
        now = time.monotonic()
        if (self._cancel_read_at is not None
                and now - self._cancel_read_at < SCORING_CANCEL_POLL_SECONDS):
            return False
        self._cancel_read_at = now
        try:
            current = self._service._repo.get_training(self.training_id)
        except SelfieLoraError as exc:
            # Raised into the scoring, a database blip would be recorded as a failed scoring;
            # the next checkpoint reads again, and the verdict's transaction checks anyway.
            logger.warning("training %s: could not read its cancel flag: %s",
                           self.training_id, exc.message)
            return False
        return current is not None and current.cancel_requested


@dataclass(frozen=True)
class _Resume:
    """A training that resumes the canceled ``origin`` from its checkpoint at ``step``."""

    origin: Training
    training_id: str
    step: int

    def check(self, plan: TrainingPlan) -> None:
        """The checkpoint fits only the run it came from: the same pinned trainer and recipe."""
        o = self.origin
        if (plan.model.id != o.model_id or plan.trainer_version != o.trainer_version
                or plan.trigger_word != o.trigger_word or plan.backend != o.backend
                or plan.recipe != o.recipe):
            raise ConflictError(
                f"the model now trains with {plan.trainer_version} (recipe {plan.recipe.name}), "
                f"not as the canceled training did ({o.trainer_version}, recipe "
                f"{o.recipe.name}): its checkpoint does not fit; start a new training instead",
                code=ErrorCode.NOT_RESUMABLE)

    def continued(self, training: Training) -> Training:
        """The new training starts where the checkpoint is: its step and its loss curve so far."""
        return dataclasses.replace(
            training, step=self.step,
            loss_curve=tuple(p for p in self.origin.loss_curve if p[0] <= self.step))


class _HeldStore:
    """The job's checkpoint (or sample) store: the blob store, while this worker holds the
    training. ``keep(training_id, path, step=)`` stores one file."""

    def __init__(self, service: TrainingService, held: _Held, *,
                 keep: Callable[..., None], what: str, resumed_at: int | None = None) -> None:
        self._service = service
        self._held = held
        # The step of the checkpoint the attempt resumed from (-1: none); a checkpoint stored
        # past it is progress the next attempt keeps. None: not checkpoints.
        self._resumed_at = resumed_at
        self._keep = keep
        self._what = what
        # A storage outage (S3 or the database away) said once, not once per checkpoint
        # interval while it lasts, and its end once (the first file stored again).
        self._outage = Outage()

    def save(self, path: Path, *, step: int) -> None:
        ticket = self._outage.attempt()
        try:
            with self._service._holding(self._held):
                pass  # a worker that lost the training stores nothing (and stops soon)
            self._keep(self._held.training_id, path, step=step)
        except LeaseLostError:
            logger.info("training %s: not storing %s %d, the lease is lost",
                        self._held.training_id, self._what, step)
        except SelfieLoraError as exc:
            # Training goes on; a lost checkpoint only costs steps after a crash, a lost
            # sample only a picture.
            outage = isinstance(exc, StorageUnavailableError)
            logger.log(_failure_level(self._outage, ticket, exc, kind=StorageUnavailableError),
                       "training %s: %s %d not stored: %s%s", self._held.training_id,
                       self._what, step, exc.message,
                       " (said once until one is stored again)" if outage else "")
        else:
            if self._outage.ends(ticket=ticket):
                logger.info("training %s: %s %d stored again after the storage outage",
                            self._held.training_id, self._what, step)
            # One at or before it (a run that started over) is no progress.
            if self._resumed_at is not None and step > self._resumed_at:
                self._service._progressed(self._held)


def _could_not_run(exc: SelfieLoraError) -> str:
    """The user's sentence for a training that ``exc``, an error of ours other than its
    trainer's, ended: the error's ``user_message`` where it has one (written for the user), else
    the sentence of its kind; never its message, which is the operator's."""
    user_message = getattr(exc, "user_message", None)
    if isinstance(user_message, str) and user_message:
        return user_message
    said = next(words for kind, words in _COULD_NOT_RUN_BY_KIND if isinstance(exc, kind))
    return f"{_COULD_NOT_RUN}: {said}"


def _has_version(repo: Repository, model: Model, *, trainings: Sequence[Training]) -> bool:
    """Whether ``model`` (whose ``trainings`` these are) has a version to retrain: a first
    training canceled or failed made none, and the next one is still the first
    (is_retraining), under the pin the first start took."""
    return bool(trainings) and bool(repo.list_versions(model.id))


def _resumed_already(training_id: str, latest: Training | None) -> str:
    """The refusal of a resume of a training resumed already as ``training_id`` (``latest``:
    that training, or the end of its chain), one wording for ``resume`` and for ``start``'s
    second look under the model's lock."""
    if latest is not None and latest.status is TrainingStatus.CANCELED:
        return f"this training was resumed already as training {latest.id}; resume that one"
    now = f" (now {latest.status})" if latest is not None else ""
    return f"this training was resumed already as training {training_id}{now}"


def _refuse_if_busy(repo: Repository, model: Model | None) -> Sequence[Training]:
    """Refuses while a training of ``model`` is queued or running; else its trainings, read
    for that (none without a model), which the caller's pin facts use again."""
    if model is None:
        return ()
    trainings = repo.list_trainings(model.id)
    active = [t for t in trainings if t.status.is_active]
    if not active:
        return trainings
    t = active[0]
    # Which training and where it stands, never what an operator should do: this message is
    # the API's and the web's too, and the service cannot know whether workers run (a training
    # a worker stepped away from, or the reconciler queued again, still names its lapsed
    # holder while it waits its turn). The CLI adds what a training waits for.
    at = f" at step {t.step}/{t.total_steps}" if t.total_steps > 0 else ""
    raise ConflictError(f"a training of this model is already queued or running (training "
                        f"{t.id}, {t.status}{at})")


class _Sink:
    """What a trainer reports progress to: the training's row, while this worker holds it."""

    def __init__(self, service: TrainingService, held: _Held) -> None:
        self._service = service
        self._held = held
        self._created = False  # ``creating`` recorded by this attempt
        self._uploaded = False  # ``uploaded`` recorded by this attempt: its create comes next

    @property
    def remote_id(self) -> str | None:
        """The remote run this attempt adopted or started, once stored: from then on an outage
        interrupts the training instead of failing it."""
        return self._held.remote_id

    @property
    def create_begun(self) -> bool:
        """This attempt sent (or was about to send) a remote create, its upload recorded
        (``uploaded``): a run may exist whose id is not known."""
        return self._uploaded

    def creating(self) -> None:
        if self._created:
            return
        self._service._update_held(
            self._held, lambda t: dataclasses.replace(t, remote_create_started=True))
        self._created = True

    def uploaded(self, *, marker: str) -> None:
        # Fenced like every write of the holder: a worker that lost the training creates nothing.
        self._service._update_held(
            self._held, lambda t: dataclasses.replace(t, remote_marker=marker))
        self._uploaded = True

    def started(self, *, remote_id: str | None) -> None:
        def apply(t: Training) -> Training:
            return dataclasses.replace(t, remote_id=remote_id or t.remote_id)

        stored = self._service._update_held(self._held, apply)
        self._held.remote_id = stored.remote_id

    def progress(
        self, *, status: TrainingStatus, step: int, total: int, loss: float | None = None
    ) -> None:
        moved: list[TrainingStatus] = []

        def apply(t: Training) -> Training:
            if not can_transition(t.status, status) or status.is_terminal:
                return t
            if status is not t.status:
                moved.append(status)
            t = transition(t, status, at=self._service._clock(), reason="trainer progress")
            curve = (add_loss_point(t.loss_curve, step=step, loss=loss) if loss is not None
                     else t.loss_curve)
            # The time left is estimated from this attempt's pace (``time_left``).
            metrics = mark_pace(t, step=max(0, step), at=self._service._clock())
            if step > t.step:
                # The run went on after any wait for room: that wait is not why its output
                # could expire (``_expired_while_waiting``).
                metrics = room_wait_over(metrics)
            # error=None: the trainer answers again, so an earlier attempt's outage is over.
            return dataclasses.replace(
                t, step=max(0, step), total_steps=total if total > 0 else t.total_steps,
                loss=loss if loss is not None else t.loss, loss_curve=curve, error=None,
                metrics=metrics,
                # A remote run whose step went past the row's goes on without us: the next
                # attempt adopts it where it is. A poll alone is not progress: an adopted run
                # that had finished (or stood still) answers every attempt, and counting it
                # would restart the count on each step-away of an endless outage. (A local
                # step is kept only by the next checkpoint.)
                progressed=t.progressed or (t.remote_id is not None and step > t.step
                                            and (total <= 0 or step < total)),
            )

        stored = self._service._update_held(self._held, apply)
        self._held.progressed = stored.progressed
        if moved:  # one line per change of state, not per step
            logger.info("training %s is %s (step %d/%d)", self._held.training_id, moved[0],
                        step, total)

    def cancel_requested(self) -> bool:
        tickets = self._held.tickets()
        try:
            current = self._service._repo.get_training(self._held.training_id)
        except StorageError as exc:
            # A read that failed loses nothing: the trainer goes on and asks again at its next
            # poll (a database away for longer fails the next write, which steps away).
            self._held.failed(exc, tickets, what="could not read whether it was canceled")
            return False
        self._held.answered(tickets)
        return current is None or current.cancel_requested or current.status.is_terminal

    def interrupted(self) -> bool:
        return self._held.interrupted()


def succeeded_event(training: Training, version: Version,
                    verdict: GateVerdict | None) -> dict[str, Any]:
    """The retraining log's entry for a succeeded training: first training or retraining, what was
    preserved, the version, the gate's decision and the before/after scores (none without a
    ``verdict``: a version the gate could not judge)."""
    details = verdict.details if verdict is not None else {}
    return {
        "training_id": training.id,
        "kind": "retraining" if training.is_retraining else "first_training",
        "version_id": version.id, "version_number": version.number,
        "weights_sha256": version.weights_sha256, "weights_method": version.weights_method,
        "remote_version": version.remote_version,
        "version_mismatch": version.version_mismatch,
        "preserved": training.preserved, "metrics": trainer_metrics(training.metrics),
        "attempts": training.attempt,
        "gate": {"status": str(version.gate_status), "reason": version.gate_reason},
        "scores": {"before": details.get("before"), "after": details.get("after")},
    }


def _float_or(value: Any, default: float | None) -> float | None:
    try:
        return float(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        out[k] = v if isinstance(v, str | int | float | bool | type(None)) else str(v)
    return out


def _asked_later(t: Training, unreachable: set[str] | None) -> bool:
    """Whether the remote cancel ``t`` owes waits for the next reconcile pass: its backend
    failed a call this pass (``unreachable``), so it is not asked again now."""
    return unreachable is not None and t.backend in unreachable


def _remote_run_to_cancel(t: Training) -> bool:
    """Whether ``t``, ending now, leaves a remote run to cancel: it has one, and no version
    (once a version is stored the run has ended: its output was copied). A create begun with no
    id stored counts: its run, if Replicate made one, is found by its marker."""
    return (t.remote_id is not None or t.remote_create_started) and t.version_id is None
