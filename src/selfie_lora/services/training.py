"""Starting, running and finishing trainings. The only place a model is created or a training
planned: every entry point (HTTP upload-zip, HTTP start, CLI, web UI) calls ``TrainingService.start``.

When the trainer is done its weights are stored as a new version and the likeness job is queued
(``JobQueue.enqueue_quality``). The training stays ``processing`` (its ``version_id`` set, its
phase "scoring", holding the model's one training slot) until that job has scored the version:

- a first version (the model has no active version) has nothing to beat: it is activated at once,
  when it is stored, and its scores become the baseline of the next version;
- any later version is stored with its gate ``pending``; the job (``services.quality``) lets the
  gate decide, then activates the version or holds it back.

Only then is the training marked ``succeeded``, so "succeeded" always comes with a final answer on
which version is active, and why; and a training never runs beside the scoring of its model's
previous version (an inline trainer and an in-process generator do not share a process well).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from selfie_lora.domain.entities import (
    GateStatus,
    Model,
    Training,
    TrainingStatus,
    User,
    Version,
)
from selfie_lora.domain.plan import TrainingDefaults, plan_training
from selfie_lora.domain.quality import (
    FIRST_VERSION_REASON,
    GATE_OFF_REASON,
    QualityStatus,
    VersionQuality,
    training_figures,
)
from selfie_lora.domain.states import can_transition, transition
from selfie_lora.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    SelfieLoraError,
    TrainerError,
    TrainingCanceledError,
)
from selfie_lora.services.common import new_id, utcnow
from selfie_lora.services.intake import photo_key
from selfie_lora.services.ports import (
    BlobStore,
    JobQueue,
    Repository,
    Trainer,
    TrainingJob,
    TrainingPhoto,
    TrainingResult,
)

logger = logging.getLogger(__name__)


def caption_for(trigger_word: str) -> str:
    # Written by us for every photo: the trainer's autocaption prefix is often missing.
    return f"a photo of {trigger_word}"


def weights_key(sha256: str) -> str:
    return f"weights/{sha256}.safetensors"


@dataclass(frozen=True)
class StartResult:
    training: Training
    model: Model


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
        webhook_url: str | None = None,
        rng: random.Random | None = None,
        on_version: Callable[[Version], None] | None = None,
        gate_enabled: bool = True,
    ) -> None:
        self._repo = repo
        self._blobs = blobs
        self._queue = queue
        self._trainers = dict(trainers)
        # A callable, not a value: the configured default may change while the service runs,
        # and the tests change it to prove that a pinned model ignores it.
        self._defaults = defaults
        self._work_dir = work_dir
        self._webhook_url = webhook_url
        self._rng = rng or random.SystemRandom()
        self._on_version = on_version
        # Off: every new version is activated at once (it is still scored).
        self._gate_enabled = gate_enabled

    # ------------------------------------------------------------------ start (every entry point)
    def start(self, *, user: User, dataset_id: str | None) -> StartResult:
        """Get or create the user's model, plan a (re)training and queue it.

        Raises ``ConflictError`` when the model already has a queued or running training (the
        database enforces it too), ``InvalidInputError`` when there is no usable dataset.
        """
        defaults = self._defaults()
        with self._repo.atomic() as tx:
            dataset = (
                tx.latest_accepted_dataset(user.id) if dataset_id is None
                else tx.get_dataset(dataset_id)
            )
            if dataset is None or dataset.user_id != user.id:
                if dataset_id is None:
                    raise InvalidInputError(
                        "there are no photos to train on yet: upload a zip of photos first",
                        code="no_dataset",
                    )
                raise NotFoundError("no such dataset")
            if not dataset.accepted:
                raise InvalidInputError("that dataset was not accepted", code="dataset_rejected")
            model = tx.get_model_for_user(user.id)
            _refuse_if_busy(tx, model)
            plan = plan_training(
                model, user_id=user.id, new_model_id=new_id(), defaults=defaults, rng=self._rng,
                now=utcnow(),
            )
            if plan.is_new_model:
                tx.add_model(plan.model)
            training = Training(
                id=new_id(), model_id=plan.model.id, dataset_id=dataset.id,
                backend=plan.backend, status=TrainingStatus.QUEUED,
                is_retraining=plan.is_retraining, trigger_word=plan.trigger_word,
                destination=plan.destination, trainer_version=plan.trainer_version,
                recipe=plan.recipe, preserved=plan.preserved, created_at=utcnow(),
                total_steps=plan.recipe.steps,
            )
            tx.add_training(training)
            tx.add_event(model_id=plan.model.id, kind="training_queued", data={
                "training_id": training.id,
                "kind": "retraining" if plan.is_retraining else "first_training",
                "trigger_word": plan.trigger_word, "destination": plan.destination,
                "trainer_version": plan.trainer_version, "backend": plan.backend,
                "lora_scale": plan.model.lora_scale, "preserved": plan.preserved,
                "recipe": plan.recipe.as_dict(), "dataset_id": dataset.id,
            })
        logger.info(
            "%s %s queued for model %s (trigger %s, destination %s, trainer %s, preserved %s)",
            "retraining" if plan.is_retraining else "first training", training.id, plan.model.id,
            plan.trigger_word, plan.destination, plan.trainer_version, sorted(plan.preserved),
        )
        self._queue.enqueue_training(training.id)
        return StartResult(training=training, model=plan.model)

    def refuse_if_busy(self, *, user: User) -> None:
        """``ConflictError`` when the user's model has a queued or running training: lets an
        upload be refused before anything is stored (``start`` checks again, atomically)."""
        _refuse_if_busy(self._repo, self._repo.get_model_for_user(user.id))

    # ------------------------------------------------------------------ queries
    def get(self, *, user: User, training_id: str | None) -> tuple[Training, Model]:
        model = self._repo.get_model_for_user(user.id)
        if model is None:
            raise NotFoundError("you have no model yet: upload photos to start one")
        if training_id is None:
            trainings = self._repo.list_trainings(model.id)
            if not trainings:
                raise NotFoundError("no training yet")
            return trainings[0], model
        training = self._repo.get_training(training_id)
        if training is None or training.model_id != model.id:
            raise NotFoundError("no such training")
        return training, model

    def cancel(self, *, user: User, training_id: str) -> Training:
        training, _ = self.get(user=user, training_id=training_id)
        if training.status.is_terminal:
            return training
        if training.is_scoring:
            # The trainer is done and its weights are stored: the likeness gate finishes it.
            logger.info("training %s is being scored; too late to cancel", training.id)
            return training
        self._repo.request_cancel(training.id)
        if training.status is TrainingStatus.QUEUED:
            # Nobody runs it yet: cancel it here (the worker will find it terminal and skip it).
            # A worker that picked it up meanwhile sees the request and cancels it itself.
            self._finish_canceled(training.id, reason="canceled before it started",
                                  only_from=TrainingStatus.QUEUED)
        current = self._repo.get_training(training.id)
        assert current is not None
        return current

    # ------------------------------------------------------------------ worker side
    def run(self, training_id: str) -> None:
        """Run one training to its end. Called by the queue worker; safe to call twice."""
        training = self._repo.get_training(training_id)
        if training is None:
            logger.warning("training %s vanished before it ran", training_id)
            return
        if training.status.is_terminal:
            logger.info("training %s is already %s; nothing to do", training_id, training.status)
            return
        if training.version_id is not None:
            # The trainer finished before a restart; only the likeness job is left to run.
            logger.info("training %s awaits its likeness gate; queueing the scoring", training_id)
            self._queue.enqueue_quality(training.version_id)
            return
        if training.cancel_requested:
            self._finish_canceled(training_id, reason="canceled before it started")
            return
        trainer = self._trainers.get(training.backend)
        if trainer is None:
            self._finish_failed(
                training_id,
                user_message=f"This server has no '{training.backend}' trainer configured; "
                             "ask the operator to enable it.",
                reason="no trainer for backend",
            )
            return
        self._update(training_id, lambda t: transition(
            t, TrainingStatus.STARTING, at=utcnow(), reason="picked up by a worker"))
        work_dir = self._work_dir / training_id
        work_dir.mkdir(parents=True, exist_ok=True)
        try:
            job = self._job(training, work_dir=work_dir)
            result = trainer.train(job, sink=_Sink(self, training_id))
            self._finish_succeeded(training_id, result)
        except TrainingCanceledError as exc:
            self._finish_canceled(training_id, reason=exc.message)
        except TrainerError as exc:
            logger.warning("training %s failed: %s", training_id, exc.message)
            self._finish_failed(training_id, user_message=exc.user_message, reason=exc.message)
        except SelfieLoraError as exc:
            logger.warning("training %s failed: %s", training_id, exc.message)
            self._finish_failed(
                training_id, user_message=f"The training could not run: {exc.message}",
                reason=exc.message,
            )
        except Exception:
            logger.exception("training %s crashed", training_id)
            self._finish_failed(
                training_id,
                user_message="The training stopped because of an internal error. Your active "
                             "version is unchanged; please try again, and contact support if "
                             "it happens again.",
                reason="internal error",
            )
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)

    def recover(self) -> int:
        """Queue again every training left queued or running (after a restart). The per-training
        lock and the terminal check in ``run`` make a duplicate message harmless."""
        active = self._repo.active_trainings()
        for training in active:
            self._queue.enqueue_training(training.id)
        return len(active)

    def apply_remote_update(
        self, *, remote_id: str, status: str, step: int | None, total: int | None,
        training_id: str | None = None,
    ) -> Training | None:
        """A webhook's news about a remote training: progress only. The worker that polls the
        training finishes it (it fetches and stores the weights)."""
        training = self._repo.get_training_by_remote_id(remote_id)
        if training is None and training_id:
            # The webhook can arrive before the worker recorded the remote id.
            candidate = self._repo.get_training(training_id)
            if candidate is not None and candidate.remote_id in (None, remote_id):
                training = candidate
        if training is None:
            return None
        try:
            new_status = TrainingStatus(status)
        except ValueError:
            return training
        if new_status.is_terminal:
            new_status = TrainingStatus.PROCESSING

        def apply(t: Training) -> Training:
            if not can_transition(t.status, new_status) or t.is_scoring:
                return t  # a scoring training's trainer is done: remote news changes nothing
            t = transition(t, new_status, at=utcnow(), reason="webhook")
            if t.remote_id is None:
                t = dataclasses.replace(t, remote_id=remote_id)
            if step is not None and total:
                t = dataclasses.replace(t, step=max(t.step, step), total_steps=total)
            return t

        return self._update(training.id, apply)

    # ------------------------------------------------------------------ internals
    def _job(self, training: Training, *, work_dir: Path) -> TrainingJob:
        dataset = self._repo.get_dataset(training.dataset_id)
        if dataset is None:
            raise NotFoundError("the training's photos are gone")
        caption = caption_for(training.trigger_word)
        photos = tuple(
            TrainingPhoto(name=f"{i:03d}.jpg", data=self._blobs.get(photo_key(sha)), caption=caption)
            for i, sha in enumerate(dataset.photo_hashes)
        )
        return TrainingJob(
            training_id=training.id, trigger_word=training.trigger_word,
            destination=training.destination, trainer_version=training.trainer_version,
            recipe=training.recipe, photos=photos, work_dir=work_dir,
            # The trainer adds ?training_id= so a webhook that beats ``started`` finds its row.
            remote_id=training.remote_id, webhook_url=self._webhook_url,
        )

    def _update(self, training_id: str, fn: Callable[[Training], Training]) -> Training:
        with self._repo.atomic() as tx:
            current = tx.get_training(training_id, for_update=True)
            if current is None:
                raise NotFoundError(f"training {training_id} does not exist")
            updated = fn(current)
            if updated is not current:
                tx.save_training(updated)
            return updated

    def _finish_succeeded(self, training_id: str, result: TrainingResult) -> None:
        data = result.weights_path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        key = weights_key(sha)
        if not self._blobs.exists(key):
            self._blobs.put_file(key, result.weights_path)
        metrics = _jsonable(dict(result.metrics))
        with self._repo.atomic() as tx:
            training = tx.get_training(training_id, for_update=True)
            assert training is not None
            if training.status.is_terminal or training.version_id is not None:
                logger.warning("training %s finished twice; keeping %s", training_id,
                               training.status)
                return
            model = tx.get_model(training.model_id)
            assert model is not None
            versions = tx.list_versions(training.model_id)
            now = utcnow()
            # A first version has nothing to beat; with the gate off nothing is compared.
            decided = model.active_version_id is None or not self._gate_enabled
            reason = None
            if decided:
                reason = FIRST_VERSION_REASON if model.active_version_id is None else GATE_OFF_REASON
            version = Version(
                id=new_id(), model_id=training.model_id,
                number=(versions[0].number + 1) if versions else 1,
                training_id=training.id, trainer_version=training.trainer_version,
                weights_key=key, weights_sha256=sha, weights_method=result.weights_method,
                remote_version=result.remote_version, version_mismatch=result.version_mismatch,
                created_at=now,
                gate_status=GateStatus.PASSED if decided else GateStatus.PENDING,
                gate_reason=reason,
                # Pending: what was active when it was stored. A pass activates it only while
                # that is still so; a version the user activated meanwhile stays active.
                gate_details=({"decided_at": now.isoformat()} if decided
                              else {"active_when_stored": model.active_version_id}),
            )
            tx.add_version(version)
            loss = _float_or(metrics.get("final_loss"), training.loss)
            started = training.started_at or training.created_at
            tx.add_quality(VersionQuality(
                version_id=version.id, model_id=version.model_id, status=QualityStatus.PENDING,
                created_at=now, training=training_figures(
                    metrics, loss=loss, steps=max(training.step, training.total_steps),
                    seconds=round((now - started).total_seconds(), 3)),
            ))
            stored = dataclasses.replace(
                training, version_id=version.id, weights_method=result.weights_method,
                step=max(training.step, training.total_steps), error=None, loss=loss,
            )
            if decided:
                # Only the active version pointer changes: the LoRA scale, trigger word,
                # destination and trainer version on the model are never written here.
                tx.set_model_active_version(training.model_id, version.id)
            # Still processing: the likeness job scores the version and then ends the training
            # (and, for a pending gate, decides first).
            tx.save_training(stored)
            tx.add_event(model_id=training.model_id, kind="version_stored", data={
                "training_id": training.id, "version_id": version.id,
                "version_number": version.number, "gate": str(version.gate_status),
                "activated": decided,
            })
        if result.version_mismatch:
            logger.warning(
                "training %s: the trainer's output version %s does not belong to %s",
                training_id, result.remote_version, training.destination,
            )
        logger.info("training %s: version %d stored (%s, weights found by %s); gate %s",
                    training_id, version.number, sha[:12], result.weights_method,
                    version.gate_status)
        self._queue.enqueue_quality(version.id)
        if self._on_version is not None:
            self._on_version(version)

    def _finish_failed(self, training_id: str, *, user_message: str, reason: str) -> None:
        def fail(t: Training) -> Training:
            if t.status.is_terminal:
                return t
            return dataclasses.replace(
                transition(t, TrainingStatus.FAILED, at=utcnow(), reason=reason),
                error=user_message,
            )

        t = self._update(training_id, fail)
        self._repo.add_event(model_id=t.model_id, kind="training_failed",
                             data={"training_id": training_id, "error": user_message})

    def _finish_canceled(
        self, training_id: str, *, reason: str, only_from: TrainingStatus | None = None
    ) -> None:
        changed = False

        def cancel(t: Training) -> Training:
            nonlocal changed
            if t.status.is_terminal or (only_from is not None and t.status is not only_from):
                return t
            changed = True
            return dataclasses.replace(
                transition(t, TrainingStatus.CANCELED, at=utcnow(), reason=reason),
                error="The training was canceled. Your active version is unchanged; start a new "
                      "training when you are ready.",
            )

        t = self._update(training_id, cancel)
        if changed:
            self._repo.add_event(model_id=t.model_id, kind="training_canceled",
                                 data={"training_id": training_id})


def _refuse_if_busy(repo: Repository, model: Model | None) -> None:
    if model is not None and any(t.status.is_active for t in repo.list_trainings(model.id)):
        raise ConflictError("a training of this model is already queued or running")


class _Sink:
    """What a trainer reports progress to: writes it to the training's row."""

    def __init__(self, service: TrainingService, training_id: str) -> None:
        self._service = service
        self._id = training_id

    def started(self, *, remote_id: str | None) -> None:
        def apply(t: Training) -> Training:
            if t.status.is_terminal:
                return t
            return dataclasses.replace(t, remote_id=remote_id or t.remote_id)

        self._service._update(self._id, apply)

    def progress(
        self, *, status: TrainingStatus, step: int, total: int, loss: float | None = None
    ) -> None:
        def apply(t: Training) -> Training:
            if not can_transition(t.status, status) or status.is_terminal:
                return t
            t = transition(t, status, at=utcnow(), reason="trainer progress")
            return dataclasses.replace(
                t, step=max(0, step), total_steps=total if total > 0 else t.total_steps,
                loss=loss if loss is not None else t.loss,
            )

        self._service._update(self._id, apply)

    def cancel_requested(self) -> bool:
        current = self._service._repo.get_training(self._id)
        return current is None or current.cancel_requested or current.status.is_terminal


def succeed(training: Training, *, at: datetime) -> Training:
    """``training`` (its version stored) moved to ``succeeded``."""
    return transition(training, TrainingStatus.SUCCEEDED, at=at,
                      reason="trainer succeeded; version stored and scored")


def succeeded_event(
    training: Training, version: Version, *, metrics: dict[str, Any],
    scores: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The retraining log's entry for a succeeded training: first training or retraining, what was
    preserved, the version, the gate's decision and, once scored, the before/after scores."""
    return {
        "training_id": training.id,
        "kind": "retraining" if training.is_retraining else "first_training",
        "version_id": version.id, "version_number": version.number,
        "weights_sha256": version.weights_sha256, "weights_method": version.weights_method,
        "remote_version": version.remote_version,
        "version_mismatch": version.version_mismatch,
        "preserved": training.preserved, "metrics": metrics,
        "gate": {"status": str(version.gate_status), "reason": version.gate_reason},
        "scores": scores or {"before": None, "after": None},
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
