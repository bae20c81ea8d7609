"""Likeness-tracking test rig: the training and likeness services on SQLite (or PostgreSQL, with
``database="postgres"`` and ``SELFIE_LORA_TEST_POSTGRES_URL``), the file blob store
and an in-memory queue (jobs run when the test says), with a generator stand-in that answers with
real photos (tests/fixtures/photos) and dlib's real face analyzer."""

from __future__ import annotations

import hashlib
import io
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageOps

from selfie_lora.adapters.db.repository import SqlRepository, make_engine
from selfie_lora.adapters.faces.dlib_faces import DlibFaceAnalyzer
from selfie_lora.adapters.storage.fs import FileSystemBlobStore
from selfie_lora.domain.entities import Dataset, Model, Training, User, Version
from selfie_lora.domain.faces import Face
from selfie_lora.domain.plan import TrainingDefaults
from selfie_lora.services.common import new_id, utcnow
from selfie_lora.services.generation import GenerationService
from selfie_lora.services.layout import photo_key
from selfie_lora.services.likeness import LikenessService
from selfie_lora.services.models import ModelService
from selfie_lora.services.ports import Alerter, FaceAnalyzer, GenerationJob, Generator
from selfie_lora.services.training import TrainingService
from selfie_lora.services.users import UserService
from selfie_lora.testing.fakes import (
    FakeTrainer,
    InMemoryQueue,
    PhotoGenerator,
    RecordingAlerter,
    SimulatedCrash,
)
from tests.support.backends import copy_migrated_sqlite, migrated_engine
from tests.support.photos import FIXTURES

# Big enough for dlib's HOG detector to find the faces in these portraits (80 px and up).
SIDE = 512
OBAMA = ("obama.jpg", "obama2.jpg", "obama3.jpg")


@cache
def fixture_photo(name: str, *, mirrored: bool = False) -> bytes:
    """A fixture photo, scaled to ``SIDE``, as JPEG (mirrored: the same person, other pixels)."""
    with Image.open(FIXTURES / name) as img:
        rgb = img.convert("RGB")
    rgb.thumbnail((SIDE, SIDE))
    if mirrored:
        rgb = ImageOps.mirror(rgb)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def flat_image(side: int = 256) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (120, 130, 140)).save(buf, format="PNG")
    return buf.getvalue()


def same_person() -> list[bytes]:
    """Photos of the user, not the training photos themselves."""
    return [fixture_photo(n, mirrored=True) for n in OBAMA]


def other_person() -> list[bytes]:
    return [fixture_photo("biden.jpg")]


def no_face() -> list[bytes]:
    return [flat_image()]


class RememberingAnalyzer:
    """dlib's analyzer, remembering its answer per image: the same fixture photos are analysed
    in test after test, and what dlib finds in them is tested on its own (test_dlib_faces)."""

    def __init__(self, inner: DlibFaceAnalyzer) -> None:
        self._inner = inner
        self.model_name = inner.model_name
        self._answers: dict[tuple[bytes, tuple[int, ...], bool, bool], list[Face]] = {}
        self._lock = threading.Lock()

    def ready(self) -> None:
        self._inner.ready()

    def detect(self, image: Any, *, landmarks: bool = True, embed: bool = True) -> list[Face]:
        key = (hashlib.sha256(image.tobytes()).digest(), tuple(image.shape), landmarks, embed)
        with self._lock:
            known = self._answers.get(key)
        if known is None:
            known = self._inner.detect(image, landmarks=landmarks, embed=embed)
            with self._lock:
                self._answers[key] = known
        return list(known)  # faces are frozen: sharing them is safe


@cache
def shared_analyzer() -> RememberingAnalyzer:
    # dlib's models load once per test session (about a second).
    return RememberingAnalyzer(DlibFaceAnalyzer())


def store_dataset(repo: SqlRepository, blobs: FileSystemBlobStore, user: User,
                  photos: list[bytes]) -> Dataset:
    """An accepted dataset of ``photos``, stored as the intake stores prepared photos."""
    hashes = []
    for data in photos:
        sha = hashlib.sha256(data).hexdigest()
        blobs.put(photo_key(sha), data)
        hashes.append(sha)
    dataset = Dataset(id=new_id(), user_id=user.id, images_total=len(photos),
                      images_accepted=len(photos), photo_hashes=tuple(hashes), findings=(),
                      accepted=True, sha256=hashlib.sha256("".join(hashes).encode()).hexdigest(),
                      created_at=utcnow())
    repo.add_dataset(dataset)
    return dataset


@dataclass
class Rig:
    root: Path
    generator: Generator
    faces: FaceAnalyzer = field(default_factory=shared_analyzer)
    alerter: Alerter | None = field(default_factory=RecordingAlerter)
    tolerance: float = 0.02
    probe_count: int = 4
    seed: int = 0
    gate_enabled: bool = True
    clock: Callable[[], datetime] = utcnow
    database: str = "sqlite"  # or "postgres" (tests.support.backends.DATABASES)
    public_url: str | None = None
    # What a reconcile pass's alert sends are timed by, and the longest one send takes.
    monotonic: Callable[[], float] = time.monotonic
    alert_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.database == "sqlite":
            copy_migrated_sqlite(self.root / "db.sqlite")
            self.engine = make_engine(f"sqlite:///{self.root / 'db.sqlite'}")
        else:
            self.engine = migrated_engine(self.database, self.root)
        self.repo = SqlRepository(self.engine)
        self.blobs = FileSystemBlobStore(self.root / "blobs")
        self.queue = InMemoryQueue()
        self.trainer = FakeTrainer(steps=2)
        self.dying = Dying(self.generator)
        self.generation = GenerationService(repo=self.repo, blobs=self.blobs,
                                            generators={"local": self.dying})
        self.likeness = LikenessService(
            repo=self.repo, blobs=self.blobs, generation=self.generation, faces=self.faces,
            alerter=self.alerter, tolerance=self.tolerance, probe_count=self.probe_count,
            gate_enabled=self.gate_enabled, clock=self.clock, public_url=self.public_url,
            alert_timeout=self.alert_timeout,
        )
        self.training = TrainingService(
            repo=self.repo, blobs=self.blobs, queue=self.queue, trainers={"local": self.trainer},
            defaults=lambda: TrainingDefaults(backend="local", trainer_version="local-tiny-v1",
                                              owner="local", replicate_recipe="replicate-person-v1",
                                              probe_count=self.probe_count),
            work_dir=self.root / "work", rng=random.Random(self.seed), likeness=self.likeness,
            monotonic=self.monotonic,
        )
        self.models = ModelService(repo=self.repo, blobs=self.blobs)
        self.users = UserService(repo=self.repo)

    def close(self) -> None:
        self.engine.dispose()

    def user(self, name: str = "ann") -> User:
        existing = self.repo.get_user_by_name(name)
        return existing or self.users.create(name=name)[0]

    def train(self, user: User, photos: list[bytes] | None = None) -> Version:
        """Upload ``photos`` (default: the user's three portraits), train: the training ends once
        its version is scored and judged. Returns the new version as the gate left it."""
        dataset = store_dataset(self.repo, self.blobs, user,
                                photos or [fixture_photo(n) for n in OBAMA])
        return self.train_dataset(user, dataset.id)

    def train_dataset(self, user: User, dataset_id: str) -> Version:
        """Train on a stored dataset: the training ends once its version is scored and judged.
        Returns the new version as the gate left it."""
        started = self.training.start(user=user, dataset_id=dataset_id)
        self.queue.drain(self.training.run)
        training = self.repo.get_training(started.training.id)
        assert training is not None
        assert training.version_id is not None, training
        version = self.repo.get_version(training.version_id)
        assert version is not None
        return version

    def train_until_scoring(self, user: User, photos: list[bytes] | None = None) -> Training:
        """Start a training and let its worker die as it begins to score the stored version:
        the training is left ``processing``, its version pending, its lease held."""
        dataset = store_dataset(self.repo, self.blobs, user,
                                photos or [fixture_photo(n) for n in OBAMA])
        started = self.training.start(user=user, dataset_id=dataset.id)
        self.dying.armed = True
        with pytest.raises(SimulatedCrash):
            self.queue.drain(self.training.run)
        training = self.repo.get_training(started.training.id)
        assert training is not None
        assert training.is_scoring, training
        return training

    def restart(self) -> None:
        """A worker starts again under the dead one's name: it takes over what it held."""
        self.training.reconcile(dead_owners=(self.training.owner,))
        self.queue.drain(self.training.run)

    def model(self, user: User) -> Model:
        model = self.repo.get_model_for_user(user.id)
        assert model is not None
        return model


@dataclass
class Dying:
    """A generator that, when ``armed``, dies on its next call as the worker's process would."""

    inner: Generator
    armed: bool = False
    backend: str = "local"

    def generate(self, job: GenerationJob) -> list[bytes]:
        if self.armed:
            self.armed = False
            raise SimulatedCrash("the worker died while it scored a version")
        return self.inner.generate(job)


def photo_generator(photos: list[bytes]) -> PhotoGenerator:
    return PhotoGenerator(photos=list(photos))


def png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        assert img.format == "PNG"
        return img.size


def rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def count_charts_drawn(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every chart drawn from now on, as the number of points it drew (the real drawing still
    runs): whether a view drew the chart again or sent the stored one."""
    from selfie_lora.services import likeness as likeness_module

    drawn: list[int] = []
    real = likeness_module.render_chart

    def counted(points: Any, **kwargs: Any) -> bytes:
        drawn.append(len(points))
        return real(points, **kwargs)

    monkeypatch.setattr(likeness_module, "render_chart", counted)
    return drawn
