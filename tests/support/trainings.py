"""A training to drive by hand: uploaded and queued, its row read back as the test goes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from selfie_lora.domain.entities import GateStatus, Training, TrainingStatus, Version
from selfie_lora.domain.likeness import LOCKED_AWAY_KEY, LikenessStatus
from selfie_lora.services.ports import TrainingJob
from selfie_lora.services.training import SCORING_LOCKED
from selfie_lora.wiring import Services
from tests.support.photos import photo_zip


def uploaded_training(services: Services, *, name: str = "ann") -> tuple[str, Callable[[], Training]]:
    """A new user ``name``'s training of three photos, uploaded and queued (nothing runs it):
    its id, and a reader of its row as it is now."""
    user, _ = services.users.create(name=name)
    started = services.training.upload_zip(user=user, data=photo_zip(3, size=1100))
    assert started.training is not None
    training_id = started.training.id

    def training() -> Training:
        t = services.repo.get_training(training_id)
        assert t is not None
        return t

    return training_id, training


def stepped_away_on_a_lock(services: Services, version: Version, *, scored: bool) -> Training:
    """``version`` (a trained one) made pending again, its training's row as ``_step_away``
    leaves it after a database lock once the version is stored (not ended, its error
    ``SCORING_LOCKED``, the attempt that stepped away noted): its likeness record scored (the
    lock was on the gate's verdict write) or not (it stopped the scoring). The training's row
    as written, for a test to claim it again (``attempt + 1``)."""
    services.repo.set_version_gate(version.id, status=GateStatus.PENDING, reason=None,
                                   details={})
    record = services.repo.get_likeness(version.id)
    assert record is not None or not scored, "the version was never scored"
    if record is not None:
        services.repo.save_likeness(replace(
            record, status=LikenessStatus.SCORED if scored else LikenessStatus.PENDING))
    done = services.repo.get_training(version.training_id)
    assert done is not None
    stepped_away = replace(done, status=TrainingStatus.PROCESSING, completed_at=None,
                           error=SCORING_LOCKED,
                           metrics={**done.metrics, LOCKED_AWAY_KEY: done.attempt})
    services.repo.save_training(stepped_away)
    return stepped_away


def store_a_checkpoint(job: TrainingJob) -> None:
    """What a local training's attempt leaves to resume from: its checkpoint at step 2, stored."""
    assert job.checkpoints is not None
    ckpt = job.work_dir / "step-2.ckpt"
    ckpt.write_bytes(b"checkpoint at step 2")
    job.checkpoints.save(ckpt, step=2)


class HoldClock:
    """The training service's clock (``now``): a hold (a wait, a step-away) passes when the
    test says so (``past``)."""

    def __init__(self) -> None:
        self.now_at = datetime.now(UTC)

    def now(self) -> datetime:
        return self.now_at

    def past(self, t: Training) -> None:
        assert t.lease_expires_at is not None
        self.now_at = t.lease_expires_at + timedelta(seconds=1)
