"""Fixtures for the Replicate backend: a stand-in server, trainers and generators pointed at it,
training jobs with real JPEGs, and a recording progress sink.

Registered from ``tests/conftest.py`` with ``pytest_plugins = ["tests.conftest_replicate"]``.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from selfie_lora.adapters.replicate.generator import ReplicateGenerator
from selfie_lora.adapters.replicate.session import ReplicateConnection
from selfie_lora.adapters.replicate.trainer import ReplicateTrainer
from selfie_lora.domain.entities import TrainingStatus
from selfie_lora.domain.recipes import DEFAULT_REPLICATE_TRAINER_VERSION, get_recipe
from selfie_lora.services.ports import TrainingJob, TrainingPhoto
from selfie_lora.testing.replicate_standin import ReplicateStandIn

REPLICATE_OWNER = "selfie-lora"
REPLICATE_TRIGGER = "zqx_person"


@dataclass
class RecordingSink:
    """A ``ProgressSink`` that records every call; asks for a cancel after ``cancel_after``
    checks when set, and says the worker stops after ``interrupt_after`` checks when set."""

    cancel_after: int | None = None
    interrupt_after: int | None = None
    interrupt_checks: int = 0
    started_ids: list[str | None] = field(default_factory=list)
    updates: list[tuple[TrainingStatus, int, int, float | None]] = field(default_factory=list)
    cancel_checks: int = 0

    creating_calls: int = 0
    markers: list[str] = field(default_factory=list)

    def started(self, *, remote_id: str | None) -> None:
        self.started_ids.append(remote_id)

    def creating(self) -> None:
        self.creating_calls += 1

    def uploaded(self, *, marker: str) -> None:
        self.markers.append(marker)

    def progress(self, *, status: TrainingStatus, step: int, total: int, loss: float | None = None) -> None:
        self.updates.append((status, step, total, loss))

    def cancel_requested(self) -> bool:
        self.cancel_checks += 1
        return self.cancel_after is not None and self.cancel_checks >= self.cancel_after

    def interrupted(self) -> bool:
        self.interrupt_checks += 1
        return self.interrupt_after is not None and self.interrupt_checks >= self.interrupt_after


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), ((seed * 40) % 256, 90, 140)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def replicate_standin() -> Iterator[ReplicateStandIn]:
    """A started stand-in of Replicate's API (fresh per test)."""
    with ReplicateStandIn() as standin:
        yield standin


@pytest.fixture
def replicate_sleeps() -> list[float]:
    """Every delay the trainers and generators asked to sleep (they never really sleep)."""
    return []


@pytest.fixture
def replicate_trainer_factory(
    replicate_standin: ReplicateStandIn, replicate_sleeps: list[float]
) -> Callable[..., ReplicateTrainer]:
    """``make(**overrides) -> ReplicateTrainer`` pointed at the stand-in."""

    def make(**overrides: Any) -> ReplicateTrainer:
        connection: dict[str, Any] = {
            "api_token": replicate_standin.token,
            "base_url": replicate_standin.base_url,
            "max_retries": 3,
            "sleep": replicate_sleeps.append,
            "timeout": 10.0,
        }
        kwargs: dict[str, Any] = {"owner": REPLICATE_OWNER, "poll_interval": 2.0}
        for key, value in overrides.items():
            (connection if key in connection else kwargs)[key] = value
        return ReplicateTrainer(connection=ReplicateConnection(**connection), **kwargs)

    return make


@pytest.fixture
def replicate_trainer(replicate_trainer_factory: Callable[..., ReplicateTrainer]) -> ReplicateTrainer:
    return replicate_trainer_factory()


@pytest.fixture
def replicate_generator(
    replicate_standin: ReplicateStandIn, replicate_sleeps: list[float]
) -> ReplicateGenerator:
    return ReplicateGenerator(
        connection=ReplicateConnection(api_token=replicate_standin.token,
                                       base_url=replicate_standin.base_url, max_retries=3,
                                       sleep=replicate_sleeps.append, timeout=10.0),
        poll_interval=1.0,
    )


@pytest.fixture
def replicate_job_factory(tmp_path: Path) -> Callable[..., TrainingJob]:
    """``make(**overrides) -> TrainingJob`` with real JPEGs captioned with the trigger word."""

    def make(
        *,
        photos: int = 3,
        trigger_word: str = REPLICATE_TRIGGER,
        destination: str = f"{REPLICATE_OWNER}/lora-u1",
        training_id: str | None = None,
        **overrides: Any,
    ) -> TrainingJob:
        training_id = training_id or uuid.uuid4().hex
        fields: dict[str, Any] = {
            "training_id": training_id,
            "trigger_word": trigger_word,
            "destination": destination,
            "trainer_version": DEFAULT_REPLICATE_TRAINER_VERSION,
            "recipe": get_recipe("replicate-person-v1"),
            "photos": tuple(
                TrainingPhoto(
                    name=f"{i:03d}.jpg",
                    data=_jpeg(i),
                    caption=f"a photo of {trigger_word}, a person, photo {i}",
                )
                for i in range(photos)
            ),
            "work_dir": tmp_path / "work" / training_id,
        }
        fields.update(overrides)
        return TrainingJob(**fields)

    return make


@pytest.fixture
def replicate_sink() -> RecordingSink:
    return RecordingSink()
