"""A queue that cannot be reached when a training is started (Redis down): the training is
committed already, so the start is accepted (202) with a warning logged, and the reconciler
queues it later; an error answer would have the client retry into 409."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from selfie_lora.domain.entities import TrainingStatus
from selfie_lora.testing.fakes import InMemoryQueue
from selfie_lora.wiring import Services
from tests.conftest import auth
from tests.integration.test_api import upload


@dataclass
class DownQueue(InMemoryQueue):
    """A queue whose server is down: nothing can be queued."""

    down: bool = True

    def enqueue_training(self, training_id: str) -> None:
        if self.down:
            raise ConnectionError("Error 111 connecting to redis:6379. Connection refused.")
        super().enqueue_training(training_id)


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
