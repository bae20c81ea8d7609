"""The job queue on every broker it supports: huey on SQLite (default) and on Redis."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from selfie_lora.adapters.queue.huey_queue import BackgroundWorker, HueyJobQueue
from tests.support.backends import queue_url


@pytest.fixture(params=["sqlite", "redis"])
def queue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HueyJobQueue]:
    q = HueyJobQueue.from_url(queue_url(request.param, tmp_path))
    q.huey.flush()
    yield q
    q.huey.flush()


def wait_until(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


def test_messages_survive_until_a_worker_runs_them(queue: HueyJobQueue) -> None:
    seen: list[str] = []
    queue.set_training_handler(seen.append)
    queue.enqueue_training("t1")
    queue.enqueue_training("t2")
    assert queue.pending() == 2  # durable: stored, nothing ran yet
    worker = BackgroundWorker(queue, workers=1)
    worker.start()
    try:
        wait_until(lambda: len(seen) == 2)
    finally:
        worker.stop()
    assert sorted(seen) == ["t1", "t2"]
    assert queue.pending() == 0


class Overlap:
    """A handler that takes a while and records how many of its calls ever ran at once."""

    def __init__(self, seconds: float = 0.3) -> None:
        self.seconds = seconds
        self.running = 0
        self.peak = 0
        self.done: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, job_id: str) -> None:
        with self._lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        time.sleep(self.seconds)
        with self._lock:
            self.running -= 1
            self.done.append(job_id)


def test_two_workers_never_run_one_training_at_once(queue: HueyJobQueue) -> None:
    handler = Overlap()
    queue.set_training_handler(handler)
    queue.enqueue_training("same")
    queue.enqueue_training("same")
    worker = BackgroundWorker(queue, workers=2)
    worker.start()
    try:
        wait_until(lambda: queue.pending() == 0)
        time.sleep(0.5)
    finally:
        worker.stop()
    assert handler.peak == 1  # a duplicate that arrives while the first runs finds the lock taken
    assert handler.done
    assert set(handler.done) == {"same"}


def test_likeness_jobs_run_beside_trainings_one_worker_per_version(queue: HueyJobQueue) -> None:
    trainings: list[str] = []
    score = Overlap()
    queue.set_training_handler(trainings.append)
    queue.set_quality_handler(score)
    queue.enqueue_training("t1")
    queue.enqueue_quality("v1")
    queue.enqueue_quality("v1")  # a duplicate finds the version's lock taken
    assert queue.pending() == 3
    worker = BackgroundWorker(queue, workers=2)
    worker.start()
    try:
        wait_until(lambda: queue.pending() == 0 and trainings == ["t1"] and bool(score.done))
        time.sleep(0.5)
    finally:
        worker.stop()
    assert score.peak == 1
    assert set(score.done) == {"v1"}
