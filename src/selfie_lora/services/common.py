"""Small helpers shared by the services: clock, ids, and a per-user count of work under way."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from selfie_lora.domain.plan import TrainingDefaults, pin_for_training
from selfie_lora.errors import SelfieLoraError

if TYPE_CHECKING:
    from selfie_lora.domain.entities import Model, Training
    from selfie_lora.services.ports import Repository

# The audit event of an explicit re-pin (ModelService.change): the user's pin from then on.
REPINNED_EVENT = "trainer_version_changed"


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class PinFacts:
    """What ``plan_training`` needs to know of a model's past to decide its pin."""

    trained_before: bool
    repinned_by_user: bool


def pin_facts(repo: Repository, model: Model, *,
              trainings: Sequence[Training] | None = None) -> PinFacts:
    """Whether ``model`` has had a training (of any outcome), and else whether its user re-pinned
    it explicitly: either fixes its trainer version; otherwise its first training takes the
    configured one (contract invariant 3). ``trainings``: the model's, where the caller has
    read them in this transaction already (a start's busy check), else read here."""
    if trainings is None:
        trainings = repo.list_trainings(model.id)
    trained_before = bool(trainings)
    return PinFacts(trained_before=trained_before, repinned_by_user=not trained_before and (
        repo.count_events(model.id, kind=REPINNED_EVENT) > 0))


def next_training_pin(repo: Repository, model: Model, defaults: TrainingDefaults, *,
                      trainings: Sequence[Training] | None = None) -> Model:
    """``model`` as its next training is pinned: what its photos are prepared and checked for,
    and what a start refuses (``TrainingService.start_refusal``). ``trainings`` as for
    ``pin_facts``."""
    facts = pin_facts(repo, model, trainings=trainings)
    return pin_for_training(model, defaults, trained_before=facts.trained_before,
                            repinned_by_user=facts.repinned_by_user)


class PerUserSlots:
    """How many of something each user has under way in this process, ``limit`` at most (a
    user's generations, a user's uploads being taken in). ``take`` one, or get the error
    ``refused(held)`` makes; ``release`` it when done (``hold``: both around a block). A user
    with none under way has no entry left."""

    def __init__(self, limit: int, *, refused: Callable[[int], SelfieLoraError]) -> None:
        self._limit = limit
        self._refused = refused
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, user_id: str) -> None:
        with self._lock:
            held = self._held.get(user_id, 0)
            if held >= self._limit:
                raise self._refused(held)
            self._held[user_id] = held + 1

    def release(self, user_id: str) -> None:
        with self._lock:
            left = self._held.get(user_id, 0) - 1
            if left > 0:
                self._held[user_id] = left
            else:
                self._held.pop(user_id, None)

    def held(self, user_id: str) -> int:
        with self._lock:
            return self._held.get(user_id, 0)

    @contextmanager
    def hold(self, user_id: str) -> Iterator[None]:
        self.take(user_id)
        try:
            yield
        finally:
            self.release(user_id)


class Outage:
    """Whether a dependency (the queue) is in an outage that was already logged: a loop that
    retries it every second says its start once and its end once, instead of a line (or a
    traceback) at every retry. Shared by threads."""

    def __init__(self) -> None:
        self._down = False
        self._lock = threading.Lock()

    def begins(self) -> bool:
        """A call failed: True when this starts the outage (say it), False while it lasts."""
        with self._lock:
            began = not self._down
            self._down = True
            return began

    def ends(self) -> bool:
        """A call succeeded: True when it ends an outage (say so)."""
        if not self._down:  # read without the lock: the usual case, at every call
            return False
        with self._lock:
            ended = self._down
            self._down = False
            return ended
