"""A thread that outlives its worker's stop (``Worker.stop`` timed out: a training past its last
safe point, a reconcile sending alerts) meets the job queue that ``Services.close`` closed
(``QueueClosedError``). That is the process stopping, not a queue outage: said at INFO, no
WARNING and no outage begun, and nothing is lost (the next reconcile queues what it could not).
Review read-report1 R1: the old code logged 'could not be queued now' and 'the queue cannot be
read' (an outage) at WARNING, and a consumer 'the queue cannot be reached'."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from selfie_lora.domain.entities import Training
from selfie_lora.testing.fakes import InMemoryQueue
from selfie_lora.wiring import Services
from selfie_lora.worker import Identity, Worker
from tests.integration.test_queue_contract import StubTraining
from tests.support.photos import photo_zip


def _started(services: Services, name: str) -> Training:
    user, _ = services.users.create(name=name)
    result = services.training.upload_zip(user=user, data=photo_zip(3))
    assert result.training is not None
    return result.training


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _infos(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.INFO and text in r.getMessage()]


def test_a_training_handed_back_after_the_queue_closed_is_said_at_info_and_queued_later(
    services: Services, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    queue = InMemoryQueue()
    monkeypatch.setattr(services.training, "_queue", queue)
    training = _started(services, "ann")
    queue.pending.clear()  # the worker below took the message
    held = services.training._claim(training.id, owner="worker-a", stopping=threading.Event())
    assert held is not None

    queue.close()  # Services.close, the worker's stop having timed out
    with caplog.at_level(logging.DEBUG, logger="selfie_lora"):
        services.training._hand_back(held)

    assert _warnings(caplog) == []
    [said] = _infos(caplog, "the job queue is closed")
    assert training.id in said
    assert "this process is stopping" in said
    assert "the next reconcile queues it" in said
    # The next start's reconcile (a queue of its own) queues it.
    monkeypatch.setattr(services.training, "_queue", InMemoryQueue())
    assert services.training.reconcile().enqueued == (training.id,)


def test_a_reconcile_after_the_queue_closed_is_no_outage(
    services: Services, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    queue = InMemoryQueue()
    monkeypatch.setattr(services.training, "_queue", queue)
    lost = [_started(services, name) for name in ("ann", "bob")]
    queue.pending.clear()  # taken by a worker that died before it ran them

    queue.close()
    with caplog.at_level(logging.DEBUG, logger="selfie_lora"):
        assert services.training.reconcile().enqueued == ()
        assert _warnings(caplog) == []
        # Once for the pass, not once per training.
        [said] = _infos(caplog, "the job queue is closed")
        assert "this process is stopping" in said
        assert "the next reconcile" in said

        # No outage began, so none ends: the next queue's first read says nothing of one.
        monkeypatch.setattr(services.training, "_queue", InMemoryQueue())
        assert set(services.training.reconcile().enqueued) == {t.id for t in lost}
    assert _infos(caplog, "can be read again") == []
    assert _warnings(caplog) == []


def test_a_queue_closed_while_the_reconcile_rings_is_said_once_and_ends_the_ringing(
    services: Services, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """Closed between the pass's read of the queue and its rings."""

    class ClosesAfterRead(InMemoryQueue):
        def queued_training_ids(self) -> set[str]:
            ids = super().queued_training_ids()
            self.close()
            return ids

    queue = ClosesAfterRead()
    monkeypatch.setattr(services.training, "_queue", queue)
    for name in ("ann", "bob"):
        _started(services, name)
    queue.pending.clear()

    with caplog.at_level(logging.DEBUG, logger="selfie_lora"):
        assert services.training.reconcile().enqueued == ()
    assert _warnings(caplog) == []
    assert len(_infos(caplog, "the job queue is closed")) == 1


def test_a_consumer_that_meets_the_queue_closed_ends_at_info(
    caplog: pytest.LogCaptureFixture,
) -> None:
    queue = InMemoryQueue()
    queue.enqueue_training("t1")  # stays for the next start
    queue.close()
    worker = Worker(training=StubTraining(), queue=queue, identity=Identity(name="w"),  # type: ignore[arg-type]
                    threads=2, reconcile_seconds=60)
    with caplog.at_level(logging.DEBUG, logger="selfie_lora.worker"):
        worker.start()
        try:
            deadline = time.monotonic() + 10
            while len(_infos(caplog, "the job queue is closed")) < 2:
                assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
                time.sleep(0.02)
            time.sleep(1.2)  # an outage's retry would have come by now
        finally:
            assert worker.stop(grace=5)
    assert _warnings(caplog) == []
    said = _infos(caplog, "the job queue is closed")
    assert len(said) == 2  # one per consumer, which ends: not one a second
    assert "this process is stopping" in said[0]
    assert "next start" in said[0]
    assert queue.pending == ["t1"]
