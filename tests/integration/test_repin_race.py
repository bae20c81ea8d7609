"""A re-pin and a start exclude each other. ``change_trainer_version`` checks that no training
is active and writes the new pin; a start that lands between the two would queue a training on
the old pin after a re-pin that said nothing was running (invariant 3). The test stops the re-pin
right after its check, starts a training meanwhile, and lets the re-pin go on: the start waits for
it and plans on the new pin (or, had it gone first, the re-pin would be refused). On SQLite and,
when ``SELFIE_LORA_TEST_POSTGRES_URL`` is set, PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from selfie_lora.domain.entities import Training
from selfie_lora.errors import ConflictError
from selfie_lora.services.models import ModelService
from selfie_lora.services.training import StartResult
from tests.conftest import fake_services_on
from tests.support.backends import DATABASES
from tests.support.photos import photo_zip

NEW_PIN = "local-tiny-v1"
# How long the start is given to slip in while the re-pin waits between its check and its write.
SLIP_IN_SECONDS = 1.5


class PausingRepository:
    """A repository (or the transaction ``atomic()`` gave) that, once it has listed a model's
    trainings, says so and waits to be let go: the re-pin stopped between its check and its
    write."""

    def __init__(self, inner: Any, *, checked: threading.Event, go: threading.Event) -> None:
        self._inner = inner
        self._checked = checked
        self._go = go

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def list_trainings(self, model_id: str) -> Any:
        found = self._inner.list_trainings(model_id)
        self._checked.set()
        assert self._go.wait(30), "the test never let the re-pin go on"
        return found

    @contextmanager
    def atomic(self) -> Iterator[PausingRepository]:
        with self._inner.atomic() as tx:
            yield PausingRepository(tx, checked=self._checked, go=self._go)


@pytest.mark.parametrize("database", DATABASES)
def test_a_start_during_a_repin_trains_on_the_new_pin(tmp_path: Path, database: str) -> None:
    services = fake_services_on(database, tmp_path)
    try:
        user, _ = services.users.create(name="cy")
        first = services.training.upload_zip(user=user, data=photo_zip(3))
        assert first.training is not None
        services.training.run(first.training.id)
        old_pin = services.models.get(user=user).trainer_version
        assert old_pin != NEW_PIN

        checked, go = threading.Event(), threading.Event()
        pausing = ModelService(repo=PausingRepository(services.repo, checked=checked, go=go),
                               blobs=services.blobs)
        outcomes: dict[str, Any] = {}

        def repin() -> None:
            try:
                outcomes["repin"] = pausing.change_trainer_version(
                    user=user, trainer_version=NEW_PIN, reason="test")
            except ConflictError as exc:
                outcomes["repin"] = exc

        def start() -> None:
            outcomes["start"] = services.training.start(user=user)

        repinning = threading.Thread(target=repin)
        starting = threading.Thread(target=start)
        repinning.start()
        try:
            assert checked.wait(30), "the re-pin never checked for active trainings"
            starting.start()
            starting.join(SLIP_IN_SECONDS)  # the old code's start is done by then
        finally:
            go.set()
            repinning.join(60)
            if starting.is_alive() or starting.ident is not None:
                starting.join(60)
        assert not repinning.is_alive()
        assert not starting.is_alive()

        started = outcomes["start"]
        assert isinstance(started, StartResult)
        queued: Training = started.training
        model = services.models.get(user=user)
        if isinstance(outcomes["repin"], ConflictError):  # the start went first: no re-pin
            assert model.trainer_version == old_pin
        else:
            assert model.trainer_version == NEW_PIN
        # Whichever went first: no training runs on a pin the model no longer has.
        assert queued.trainer_version == model.trainer_version, (
            f"a training was queued on {queued.trainer_version} while the re-pin to "
            f"{NEW_PIN} said nothing was running")
    finally:
        services.close()
