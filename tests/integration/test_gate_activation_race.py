"""The likeness gate and the user's activation of a version exclude each other. Each reads the
model's active version and the version's gate, then writes them; one that read before the other
committed and wrote after it would undo it: the gate putting back a version its user rolled away
from (PostgreSQL, READ COMMITTED), or the user's activation putting a decided version back to
``pending`` for ever. The tests stop one of the two right after its reads, let the other run
meanwhile, and let the first go on: the other waits for it (or, had it gone first, the first
reads what it wrote). On SQLite and, when ``SELFIE_LORA_TEST_POSTGRES_URL`` is set, PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from selfie_lora.domain.entities import GateStatus, TrainingStatus
from selfie_lora.domain.versions import VERSION_ACTIVATED
from selfie_lora.services.models import ModelService
from selfie_lora.testing.fakes import PhotoGenerator
from tests.support.backends import DATABASES
from tests.support.likeness import Rig, other_person, photo_generator, same_person

# How long the other side is given to slip in while the first waits after its reads.
SLIP_IN_SECONDS = 1.5


class SlippingRepository:
    """A repository (or the transaction ``atomic()`` gave) that, the first time ``after`` has
    returned, runs ``meanwhile`` in another thread and gives it ``SLIP_IN_SECONDS`` to finish
    before going on: what the other side does between this side's reads and its writes."""

    def __init__(self, inner: Any, *, after: str, meanwhile: Callable[[], object],
                 state: dict[str, Any] | None = None) -> None:
        self._inner = inner
        self._after = after
        self._meanwhile = meanwhile
        self._state = state if state is not None else {"thread": None, "error": None}

    def __getattr__(self, name: str) -> Any:
        found = getattr(self._inner, name)
        if name != self._after or self._state["thread"] is not None:
            return found

        def then_slip_in(*args: Any, **kwargs: Any) -> Any:
            result = found(*args, **kwargs)
            thread = threading.Thread(target=self._run_meanwhile)
            self._state["thread"] = thread
            thread.start()
            thread.join(SLIP_IN_SECONDS)  # the old code's other side is done by then
            return result

        return then_slip_in

    def _run_meanwhile(self) -> None:
        try:
            self._meanwhile()
        except BaseException as exc:  # re-raised in the test's thread by finish()
            self._state["error"] = exc

    @contextmanager
    def atomic(self) -> Iterator[SlippingRepository]:
        with self._inner.atomic() as tx:
            yield SlippingRepository(tx, after=self._after, meanwhile=self._meanwhile,
                                     state=self._state)

    def finish(self) -> None:
        """Waits for the other side (it may have waited for this one) and raises its error."""
        thread = self._state["thread"]
        assert thread is not None, f"{self._after} was never called"
        thread.join(60)
        assert not thread.is_alive(), "the other side never finished"
        if self._state["error"] is not None:
            raise self._state["error"]


@pytest.fixture(params=DATABASES)
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    r = Rig(root=tmp_path, generator=photo_generator(same_person()), database=request.param)
    yield r
    r.close()


def test_a_rollback_while_the_gate_decides_stands(rig: Rig) -> None:
    # v2 active, v3 stored and scored (it passes); the gate has read what is active and how
    # many times the user chose a version when the user rolls back to v1. The rollback stands:
    # it waits for the gate's transaction, or the gate sees it.
    ann = rig.user()
    v1 = rig.train(ann)
    v2 = rig.train(ann)
    assert rig.model(ann).active_version_id == v2.id
    pending = rig.train_until_scoring(ann)
    assert pending.version_id is not None
    verdict = rig.likeness.judge(pending.version_id)
    assert verdict.status is GateStatus.PASSED

    slipping = SlippingRepository(
        rig.repo, after="count_events",
        meanwhile=lambda: rig.models.activate(user=ann, version_id=v1.id))
    with slipping.atomic() as tx:
        rig.likeness.apply_verdict(tx, verdict)
    slipping.finish()

    v3 = rig.repo.get_version(pending.version_id)
    assert v3 is not None
    assert v3.gate_status is GateStatus.PASSED
    events = [e for e in rig.repo.list_events(v1.model_id) if e["kind"] == VERSION_ACTIVATED]
    assert [e["data"]["to"] for e in events] == [v1.id]  # the user's one choice, acknowledged
    assert rig.model(ann).active_version_id == v1.id, "the gate undid the user's rollback"


def test_an_activation_while_the_gate_decides_keeps_the_gates_decision(rig: Rig) -> None:
    # v1 active, v2 stored, pending (it will be held: another person). The user's activation of
    # v2 has read the version when the worker's gate decides. The decision (held, its alert)
    # stays, the override is recorded beside it, and v2 is active: the user's choice.
    ann = rig.user()
    v1 = rig.train(ann)
    assert isinstance(rig.generator, PhotoGenerator)
    rig.generator.photos = other_person()
    pending = rig.train_until_scoring(ann)
    assert pending.version_id is not None

    slipping = SlippingRepository(rig.repo, after="list_versions", meanwhile=rig.restart)
    ModelService(repo=slipping, blobs=rig.blobs).activate(user=ann, version_id=pending.version_id)
    slipping.finish()

    done = rig.repo.get_training(pending.id)
    assert done is not None
    assert done.status is TrainingStatus.SUCCEEDED
    v2 = rig.repo.get_version(pending.version_id)
    assert v2 is not None
    assert v2.gate_status is GateStatus.HELD, "the activation put the gate's decision back"
    assert "likeness dropped" in (v2.gate_reason or "")
    assert v2.alert is not None
    assert v2.gate_details["override"]["replaced_version_id"] == v1.id
    assert v2.gate_details["baseline_version_id"] == v1.id
    assert rig.model(ann).active_version_id == v2.id  # the user's choice stands
