"""The training state machine: only forward, and a terminal state is never left."""

from __future__ import annotations

import dataclasses
from datetime import datetime

from selfie_lora.domain.entities import Training, TrainingStatus
from selfie_lora.errors import InvalidTransitionError

_ORDER = {
    TrainingStatus.QUEUED: 0,
    TrainingStatus.STARTING: 1,
    TrainingStatus.PROCESSING: 2,
    TrainingStatus.SUCCEEDED: 3,
    TrainingStatus.FAILED: 3,
    TrainingStatus.CANCELED: 3,
}


def can_transition(current: TrainingStatus, new: TrainingStatus) -> bool:
    """Whether ``current -> new`` is allowed. Staying in a non-terminal state is allowed
    (progress updates); moving back, or leaving a terminal state, is not."""
    if current.is_terminal:
        return False
    return _ORDER[new] >= _ORDER[current]


def transition(
    training: Training, new: TrainingStatus, *, at: datetime, reason: str
) -> Training:
    """Return ``training`` moved to ``new``, with the change recorded in its history."""
    if not can_transition(training.status, new):
        raise InvalidTransitionError(
            f"training {training.id} cannot go from {training.status} to {new}"
        )
    if new is training.status:
        return training
    entry = {"from": str(training.status), "to": str(new), "at": at.isoformat(), "reason": reason}
    changes: dict[str, object] = {"status": new, "history": (*training.history, entry)}
    if new in (TrainingStatus.STARTING, TrainingStatus.PROCESSING) and training.started_at is None:
        changes["started_at"] = at
    if new is TrainingStatus.SUCCEEDED:
        # A succeeded training carries no error: a reason an earlier attempt stepped away for
        # (``lease.step_away``: "the database could not be reached" while its version was
        # scored) is over once it ends well. Failed and canceled ones are given their own.
        changes["error"] = None
    if new.is_terminal:
        changes["completed_at"] = at
        # An ended training holds nothing: whoever ran it is done with it.
        changes["lease_owner"] = None
        changes["lease_expires_at"] = None
    return dataclasses.replace(training, **changes)  # type: ignore[arg-type]
