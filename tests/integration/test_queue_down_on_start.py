"""A queue that cannot be reached when a training is started (Redis down): the training is
committed already, so the start is accepted (202) with a warning logged, and the reconciler
queues it later; an error answer would have the client retry into 409. While the queue is down the
reconciler still does what needs only the database (cancels of trainings whose worker died)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from selfie_lora.domain.entities import Training, TrainingStatus, User
from selfie_lora.testing.fakes import InMemoryQueue
from selfie_lora.wiring import Services
from tests.conftest import auth
from tests.integration.test_api import upload
from tests.support.clock import Clock
from tests.support.photos import photo_zip


@dataclass
class DownQueue(InMemoryQueue):
    """A queue whose server is down: nothing can be queued."""

    down: bool = True
    # The next this many enqueues fail even while the queue is up (a connection that drops).
    refuse_next: int = 0

    def enqueue_training(self, training_id: str) -> None:
        if self.down or self.refuse_next > 0:
            self.refuse_next = max(0, self.refuse_next - 1)
            raise ConnectionError("Error 111 connecting to redis:6379. Connection refused.")
        super().enqueue_training(training_id)

    def queued_training_ids(self) -> set[str]:
        if self.down:
            raise ConnectionError("Error 111 connecting to redis:6379. Connection refused.")
        return super().queued_training_ids()


def started(services: Services, name: str) -> tuple[Training, User]:
    user, _ = services.users.create(name=name)
    result = services.training.upload_zip(user=user, data=photo_zip(3))
    assert result.training is not None
    return result.training, user


def test_a_start_the_queue_cannot_take_is_accepted_and_reconciled(
    client: TestClient, services: Services, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    queue = DownQueue()
    monkeypatch.setattr(services.training, "_queue", queue)
    h = auth(services, "ann")
    with caplog.at_level(logging.WARNING, logger="selfie_lora.services.training"):
        started = upload(client, h)  # asserts 202
    training = started["training"]
    assert training["status"] == TrainingStatus.QUEUED
    assert any("could not be queued" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    assert queue.pending == []

    queue.down = False
    services.training.reconcile()
    assert queue.pending == [training["id"]]


def test_a_cancel_of_a_training_whose_worker_died_does_not_wait_for_the_queue(
    services: Services, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    queue = DownQueue(down=False)
    monkeypatch.setattr(services.training, "_queue", queue)
    clock = Clock()
    monkeypatch.setattr(services.training, "_clock", clock)
    ann_training, ann = started(services, "ann")
    lost, _bob = started(services, "bob")
    queue.pending.remove(lost.id)  # its message was taken by a worker that died before it ran
    # A worker holds ann's training and dies; her cancel comes while it still looks alive, so
    # it is only requested.
    assert services.training._claim(ann_training.id, owner="dead-worker",
                                    stopping=threading.Event()) is not None
    clock.advance(seconds=5)
    assert services.training.cancel(user=ann, training_id=ann_training.id).cancel_requested

    queue.down = True
    clock.advance(seconds=60)  # the holder is long silent
    with caplog.at_level(logging.WARNING, logger="selfie_lora.services.training"):
        report = services.training.reconcile()

    assert report.canceled == (ann_training.id,)
    done = services.repo.get_training(ann_training.id)
    assert done is not None
    assert done.status is TrainingStatus.CANCELED
    assert report.enqueued == ()  # could not be queued: tried again next round
    assert any("queue cannot be read" in r.getMessage() for r in caplog.records)
    assert any("could not be queued again" in r.getMessage() and lost.id in r.getMessage()
               for r in caplog.records)

    queue.down = False
    assert services.training.reconcile().enqueued == (lost.id,)
    assert queue.pending.count(lost.id) == 1


def test_one_training_the_queue_refuses_does_not_keep_the_others_waiting(
    services: Services, monkeypatch: pytest.MonkeyPatch,
) -> None:
    queue = DownQueue(down=False)
    monkeypatch.setattr(services.training, "_queue", queue)
    trainings = [started(services, name)[0] for name in ("ann", "bob")]
    queue.pending.clear()  # both messages were taken by a worker that died before it ran
    queue.refuse_next = 1  # whichever the reconciler rings first

    report = services.training.reconcile()

    assert len(report.enqueued) == 1
    assert queue.pending == list(report.enqueued)
    assert set(services.training.reconcile().enqueued) == {t.id for t in trainings} - set(
        report.enqueued)


@pytest.mark.parametrize("leaving", ["hand_back", "step_away"])
def test_a_worker_leaving_a_training_while_the_queue_is_down_logs_no_error(
    services: Services, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    leaving: str,
) -> None:
    """A worker stopped (SIGTERM, a deploy) or stepping away from an outage while Redis is down
    released the training and then raised the queue's ConnectionError from its ring again, which
    the worker logged as 'the worker failed to run it' with a traceback, its own line never
    written (scale review). The training is released either way; the reconciler rings it once
    the queue is back."""
    from selfie_lora.services.training import _UnreachableError

    queue = DownQueue(down=False)
    monkeypatch.setattr(services.training, "_queue", queue)
    training, _ann = started(services, "ann")
    queue.pending.clear()  # the worker below took the message
    held = services.training._claim(training.id, owner="worker-a", stopping=threading.Event())
    assert held is not None

    queue.down = True
    with caplog.at_level(logging.INFO, logger="selfie_lora.services.training"):
        if leaving == "hand_back":
            services.training._hand_back(held)
        else:
            services.training._step_away(held, _UnreachableError(
                "the database could not be reached", remote_id=None,
                reason="the database could not be reached"))

    released = services.repo.get_training(training.id)
    assert released is not None
    # Nobody holds it: handed back (no owner) or stepped away from (its lease over).
    assert released.lease_owner is None or (
        released.lease_expires_at is not None
        and released.lease_expires_at <= services.training._clock())
    assert any("could not be queued now" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    said = "handed back" if leaving == "hand_back" else "the next attempt continues it"
    assert any(said in r.getMessage() for r in caplog.records)

    queue.down = False
    assert services.training.reconcile().enqueued == (training.id,)


# Old code: both lines again at every round (every SELFIE_LORA_RECONCILE_SECONDS) of the outage,
# and nothing said when it ended.
def test_the_reconciler_says_a_queue_outage_once_and_its_end(
    services: Services, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    queue = DownQueue(down=False)
    monkeypatch.setattr(services.training, "_queue", queue)
    lost, _ann = started(services, "ann")
    queue.pending.clear()  # its message was taken by a worker that died before it ran

    def said(text: str, level: int) -> int:
        return sum(text in r.getMessage() and r.levelno == level for r in caplog.records)

    queue.down = True
    with caplog.at_level(logging.INFO, logger="selfie_lora.services.training"):
        for _round in range(3):
            assert services.training.reconcile().enqueued == ()
        assert said("the queue cannot be read", logging.WARNING) == 1
        assert said(f"training {lost.id} has nobody running it and could not be queued",
                    logging.WARNING) == 1

        queue.down = False
        assert services.training.reconcile().enqueued == (lost.id,)
        assert services.training.reconcile().enqueued == ()
        assert said("the queue can be read again", logging.INFO) == 1

        queue.down = True  # another outage: said again
        services.training.reconcile()
        assert said("the queue cannot be read", logging.WARNING) == 2
