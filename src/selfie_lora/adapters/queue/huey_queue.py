"""The ``JobQueue`` port on huey: SQLite by default, Redis for workers on several machines.

A message carries only a training id (or, for a likeness job, a version id); the database row
holds the state, so a lost or repeated message can never corrupt a training (the handler re-reads
the row and does nothing when the training is already terminal). A per-training lock keeps two
workers off one training, and a per-version lock two workers off one version's scoring.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from huey import Huey, RedisHuey, SqliteHuey
from huey.consumer import Consumer
from huey.exceptions import TaskLockedException

from selfie_lora.errors import ConfigError

logger = logging.getLogger(__name__)

TrainingHandler = Callable[[str], None]
QualityHandler = Callable[[str], None]


def make_huey(url: str, *, immediate: bool = False) -> Huey:
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        # sqlite:////abs/path or sqlite:///rel/path, as SQLAlchemy spells it.
        path = url.removeprefix("sqlite:///")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return SqliteHuey(name="selfie-lora", filename=path, immediate=immediate, results=False)
    if parsed.scheme in ("redis", "rediss"):
        return RedisHuey(name="selfie-lora", url=url, immediate=immediate, results=False)
    raise ConfigError(f"unsupported SELFIE_LORA_QUEUE_URL scheme {parsed.scheme!r}")


class _EmbeddedConsumer(Consumer):  # type: ignore[misc]
    # Signal handlers belong to the process's owner (uvicorn, or the CLI); a consumer started
    # inside ``serve`` must not take them over.
    def _set_signal_handlers(self) -> None:
        pass


class HueyJobQueue:
    def __init__(self, huey: Huey) -> None:
        self.huey = huey
        self._handler: TrainingHandler | None = None
        self._quality_handler: QualityHandler | None = None
        self._task = huey.task(name="selfie_lora.run_training", retries=0)(self._run_training)
        self._quality_task = huey.task(name="selfie_lora.run_quality", retries=0)(
            self._run_quality)

    @classmethod
    def from_url(cls, url: str) -> HueyJobQueue:
        return cls(make_huey(url))

    def set_training_handler(self, handler: TrainingHandler) -> None:
        self._handler = handler

    def set_quality_handler(self, handler: QualityHandler) -> None:
        self._quality_handler = handler

    def enqueue_training(self, training_id: str) -> None:
        self._task(training_id)

    def enqueue_quality(self, version_id: str) -> None:
        self._quality_task(version_id)

    def _run_training(self, training_id: str) -> None:
        if self._handler is None:
            raise ConfigError("this process has no training handler; start a worker")
        try:
            with self.huey.lock_task(f"training-{training_id}"):
                self._handler(training_id)
        except TaskLockedException:
            logger.info("training %s is already being run by another worker", training_id)

    def _run_quality(self, version_id: str) -> None:
        if self._quality_handler is None:
            raise ConfigError("this process has no likeness handler; start a worker")
        try:
            with self.huey.lock_task(f"quality-{version_id}"):
                self._quality_handler(version_id)
        except TaskLockedException:
            # The worker holding the lock scores it and lets the gate decide; nothing is lost.
            logger.info("version %s is already being scored by another worker", version_id)

    def pending(self) -> int:
        return int(self.huey.pending_count())

    def consumer(self, *, workers: int, embedded: bool) -> Consumer:
        cls: Any = _EmbeddedConsumer if embedded else Consumer
        return cls(self.huey, workers=workers, worker_type="thread", periodic=False,
                   initial_delay=0.05, backoff=1.5, max_delay=1.0, check_worker_health=True)


class BackgroundWorker:
    """A huey consumer running on threads inside this process (``serve``'s embedded worker)."""

    def __init__(self, queue: HueyJobQueue, *, workers: int) -> None:
        self._consumer = queue.consumer(workers=workers, embedded=True)
        self._started = False
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if not self._started:
                self._consumer.start()
                self._started = True

    def stop(self) -> None:
        with self._lock:
            if self._started:
                self._consumer.stop(graceful=True)
                self._started = False
