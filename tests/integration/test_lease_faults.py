"""A worker that holds a training's lease and meets a fault (see "What survives a crash" in the
README): another worker of the same machine takes the training over while this one still runs
it. The earlier attempt leaves the later one alone."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from selfie_lora.config import Settings
from selfie_lora.domain.entities import TrainingStatus
from selfie_lora.testing.fakes import FakeGenerator, FakeTrainer, RecordingTelemetry
from selfie_lora.wiring import Services, build_services
from tests.conftest import make_settings, one_person_analyzer
from tests.support.photos import photo_zip


def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class Machine:
    """Workers of one machine: one database, one HOME (so one work folder), a service each."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.workers: list[Services] = []

    def worker(self, trainer: FakeTrainer) -> Services:
        svc = build_services(self.settings, trainers={"local": trainer},
                             face_analyzer=one_person_analyzer(),
                             generators={"local": FakeGenerator()},
                             telemetry=RecordingTelemetry())
        self.workers.append(svc)
        return svc

    def close(self) -> None:
        for svc in self.workers:
            svc.close()


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Machine]:
    # Heartbeats minutes apart: a lease ends only when the test ends it, never by a late beat.
    m = Machine(make_settings(tmp_path, heartbeat_seconds=300, lease_seconds=600))
    try:
        yield m
    finally:
        m.close()


def test_a_worker_taken_over_leaves_the_later_attempts_folder_alone(machine: Machine) -> None:
    """Worker A's lease ends while A still runs the training (its heartbeats were late); worker
    B, on the same machine, takes it over. A then stops: it removes its own attempt's folder,
    not B's, and B's training ends as if A had never been there."""
    gate_a, gate_b = threading.Event(), threading.Event()
    trainer_a, trainer_b = FakeTrainer(gate=gate_a, steps=1), FakeTrainer(gate=gate_b, steps=1)
    a, b = machine.worker(trainer_a), machine.worker(trainer_b)
    user, _ = a.users.create(name="ann")
    started = a.training.upload_zip(user=user, data=photo_zip(3))
    assert started.training is not None
    training_id = started.training.id
    stop_a = threading.Event()
    run_a = threading.Thread(target=a.training.run, args=(training_id,),
                             kwargs={"owner": "A", "stopping": stop_a})
    run_b = threading.Thread(target=b.training.run, args=(training_id,), kwargs={"owner": "B"})
    run_a.start()
    try:
        _until(lambda: len(trainer_a.jobs) == 1)
        folder_a = trainer_a.jobs[0].work_dir

        b.training.reconcile(dead_owners=("A",))  # A's lease ends (A is alive, unaware)
        run_b.start()
        _until(lambda: len(trainer_b.jobs) == 1)
        folder_b = trainer_b.jobs[0].work_dir
        assert folder_b != folder_a
        assert not folder_a.exists()  # an earlier attempt's folder is of no use to B

        stop_a.set()  # A notices at its next safe point, cleans up, finds the training not its own
        run_a.join(10)
        assert not run_a.is_alive()
        assert folder_b.is_dir()

        gate_b.set()
        run_b.join(10)
        assert not run_b.is_alive()
    finally:  # no thread outlives a failed assertion
        stop_a.set()
        gate_a.set()
        gate_b.set()
        run_a.join(10)
        if run_b.ident is not None:
            run_b.join(10)
    final = b.repo.get_training(training_id)
    assert final is not None
    assert (final.status, final.attempt, final.error) == (TrainingStatus.SUCCEEDED, 2, None)
    assert not folder_b.parent.exists()  # the last attempt takes the training's folder with it
