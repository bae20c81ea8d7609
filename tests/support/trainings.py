"""A training to drive by hand: uploaded and queued, its row read back as the test goes."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from selfie_lora.domain.entities import Training
from selfie_lora.services.ports import TrainingJob
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
