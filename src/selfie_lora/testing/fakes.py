"""Built-in fakes of the trainer and generator ports, for tests and for trying the API without
torch or a Replicate account. They behave like the real adapters at the port: they report
progress, honour cancellation, fail on request and write a real file."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from selfie_lora.domain.entities import TrainingStatus
from selfie_lora.domain.faces import Face
from selfie_lora.errors import (
    AlertDeliveryError,
    ClientGoneError,
    QueueClosedError,
    TrainingCanceledError,
    TrainingFailedError,
    TrainingInterruptedError,
)
from selfie_lora.services.common import EnqueueListeners
from selfie_lora.services.ports import (
    GenerationJob,
    ProgressSink,
    TrainingJob,
    TrainingResult,
)
from selfie_lora.services.telemetry import NullTelemetry


def fake_safetensors(payload: dict[str, str]) -> bytes:
    """A valid, empty-tensor safetensors file whose metadata holds ``payload``."""
    header = json.dumps({"__metadata__": payload}).encode()
    return struct.pack("<Q", len(header)) + header


class SimulatedCrash(BaseException):
    """Raised by a fake to stand for the process dying right there: nothing after it runs, no
    ``except Exception`` catches it, and whatever the process held (its lease) stays held."""


@dataclass
class FakeTrainer:
    """Records every job. ``outcomes`` is consumed one per training ("succeeded", "failed",
    "canceled", or "crash": the worker dies mid-training); when empty, trainings succeed.
    ``gate`` (if set) is waited on before the training ends, so tests can hold a training in
    ``processing``. ``remote_canceled`` lists what ``cancel_remote`` was asked to cancel.
    ``sample_every``: a small JPEG (its colour from the step) is given to ``job.samples`` every
    that many steps but the last, as the local trainer does."""

    backend: str = "local"
    outcomes: list[str] = field(default_factory=list)
    steps: int = 4
    gate: threading.Event | None = None
    jobs: list[TrainingJob] = field(default_factory=list)
    on_train: Callable[[TrainingJob], None] | None = None
    remote_canceled: list[str] = field(default_factory=list)
    sample_every: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def cancel_remote(self, remote_id: str) -> None:
        self.remote_canceled.append(remote_id)

    def find_remote(
        self, *, training_id: str, destination: str, marker: str | None = None
    ) -> str | None:
        del training_id, destination, marker
        return None

    def _check(self, sink: ProgressSink) -> None:
        if sink.interrupted():
            raise TrainingInterruptedError("the worker stops; the training is handed back")
        if sink.cancel_requested():
            raise TrainingCanceledError("canceled by the user")

    def train(self, job: TrainingJob, *, sink: ProgressSink) -> TrainingResult:
        with self._lock:
            self.jobs.append(job)
            outcome = self.outcomes.pop(0) if self.outcomes else "succeeded"
        if self.on_train is not None:
            self.on_train(job)
        if job.remote_id is None:
            sink.started(remote_id=f"fake-{job.training_id}" if self.backend != "local" else None)
        for step in range(1, self.steps + 1):
            self._check(sink)
            sink.progress(status=TrainingStatus.PROCESSING, step=step, total=self.steps,
                          loss=1.0 / step)
            if (job.samples is not None and self.sample_every > 0
                    and step % self.sample_every == 0 and step < self.steps):
                job.samples.save(fake_sample(job.work_dir, step), step=step)
            if outcome == "crash" and step == max(1, self.steps // 2):
                raise SimulatedCrash(f"the worker died during training {job.training_id}")
        if self.gate is not None:
            while not self.gate.wait(0.02):
                self._check(sink)
        if outcome == "failed":
            raise TrainingFailedError(
                "fake training failed",
                user_message="The training failed: the trainer ran out of memory. Try again "
                             "with fewer photos.",
            )
        if outcome == "canceled":
            raise TrainingCanceledError("canceled on the backend")
        path = job.work_dir / "lora.safetensors"
        path.write_bytes(fake_safetensors({
            "training_id": job.training_id, "trigger_word": job.trigger_word,
            "trainer_version": job.trainer_version,
        }))
        return TrainingResult(weights_path=path, weights_method="fake:file",
                              metrics={"final_loss": 0.25, "steps": self.steps})


def fake_sample(folder: Path, step: int, *, size: int = 16) -> Path:
    """A JPEG of one colour that says which step made it."""
    path = folder / f"sample-{step}.jpg"
    Image.new("RGB", (size, size), ((step * 40) % 256, 80, 160)).save(path, format="JPEG")
    return path


@dataclass
class FakeGenerator:
    """PNGs whose colour depends on the prompt, seed, scale and LoRA, so tests can tell
    versions and scales apart. ``crash_after`` (if set) counts calls down and dies
    (``SimulatedCrash``) when it reaches zero: the worker dying while it scores a version.
    ``fail_with`` (if set) is raised by every call: a storage or generator failure. ``gate`` (if
    set) is waited on before a call generates, ``waiting`` counting the calls held there: a slow
    generation, such as a FLUX.1 picture queued behind others. ``withhold`` (batch places) are
    None, as Replicate's safety checker withholds a picture."""

    backend: str = "local"
    size: int = 32
    jobs: list[GenerationJob] = field(default_factory=list)
    crash_after: int | None = None
    fail_with: Exception | None = None
    gate: threading.Event | None = None
    waiting: int = 0
    withhold: frozenset[int] = frozenset()
    _waiting_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def generate(self, job: GenerationJob) -> list[bytes | None]:
        if self.fail_with is not None:
            raise self.fail_with
        if job.abandoned():  # the port's contract; the gate stands for pictures being made
            raise ClientGoneError("the client went away before its pictures were made")
        job.check_stop()
        if self.gate is not None:
            with self._waiting_lock:
                self.waiting += 1
            try:
                self.gate.wait()
            finally:
                with self._waiting_lock:
                    self.waiting -= 1
        if self.crash_after is not None:
            self.crash_after -= 1
            if self.crash_after <= 0:
                self.crash_after = None
                raise SimulatedCrash("the worker died while scoring a version")
        self.jobs.append(job)
        weights = job.weights_path.read_bytes() if job.weights_path else b""
        out: list[bytes | None] = []
        for i in range(job.num_outputs):
            if i in self.withhold:
                out.append(None)
                continue
            digest = hashlib.sha256(
                f"{job.prompt}|{job.seed}|{job.lora_scale}|{i}|{job.remote_version}".encode()
                + weights
            ).digest()
            img = Image.new("RGB", (self.size, self.size), tuple(digest[:3]))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            out.append(buf.getvalue())
        return out


@dataclass
class PhotoGenerator:
    """A generator stand-in that answers with real photos instead of generating: call ``n``
    returns ``photos[n % len(photos)]`` (as PNG), whatever the prompt. With photos of the user the
    "model" has a perfect likeness, with another person's none, with a flat image no face."""

    photos: Sequence[bytes]
    backend: str = "local"
    jobs: list[GenerationJob] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def generate(self, job: GenerationJob) -> list[bytes]:
        out = []
        with self._lock:
            for _ in range(job.num_outputs):
                job.check_stop()  # the port's contract: before each picture
                photo = self.photos[len(self.jobs) % len(self.photos)]
                self.jobs.append(job)
                out.append(_as_png(photo))
        return out


@functools.lru_cache(maxsize=32)
def _as_png(photo: bytes) -> bytes:
    """``photo`` as a PNG, made once a process (the same bytes every time): encoding each
    picture again took most of a likeness test's CPU (~80 ms a picture, a dozen a test, the
    same few photos in every test)."""
    with Image.open(io.BytesIO(photo)) as img:
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class FakeFaceAnalyzer:
    """A ``FaceAnalyzer`` whose answer a test decides: ``embed(image)`` returns the embedding of
    the one face in ``image`` (an RGB array), or None for no face."""

    embed: Callable[[Any], tuple[float, ...] | None]
    model_name: str = "fake-embedding-v1"
    calls: int = 0
    # The face's share of the image's width and height, centred; 1.0 is the whole image.
    box_fraction: float = 1.0

    def ready(self) -> None:
        """Always ready: nothing to install."""

    def detect(self, image: Any, *, landmarks: bool = True, embed: bool = True) -> list[Face]:
        del landmarks  # a fake face has none
        self.calls += 1
        embedding = self.embed(image)
        if embedding is None:
            return []
        height, width = int(image.shape[0]), int(image.shape[1])
        margin_x = int(width * (1 - self.box_fraction) / 2)
        margin_y = int(height * (1 - self.box_fraction) / 2)
        box = (margin_x, margin_y, width - margin_x, height - margin_y)
        return [Face(box=box, score=1.0,
                     embedding=embedding if embed else None)]


@dataclass
class RecordingAlerter:
    """An ``Alerter`` that keeps what it was sent. ``fail`` makes every delivery raise,
    ``failures`` the next that many; ``crash``: the process dies (``SimulatedCrash``) in the
    next call, before the alert left. ``meanwhile`` runs once, inside the next call before it
    answers: what the world does while that send is in flight (a send that outlasts its claim).
    ``calls`` counts every attempt."""

    sent: list[dict[str, Any]] = field(default_factory=list)
    fail: bool = False
    failures: int = 0
    crash: bool = False
    calls: int = 0
    meanwhile: Callable[[], None] | None = None

    def send(self, alert: dict[str, Any]) -> None:
        self.calls += 1
        if self.meanwhile is not None:
            meanwhile, self.meanwhile = self.meanwhile, None
            meanwhile()
        if self.crash:
            self.crash = False
            raise SimulatedCrash("the worker died while it sent the alert")
        if self.fail or self.failures > 0:
            self.failures = max(0, self.failures - 1)
            raise AlertDeliveryError("the operator's endpoint is down")
        self.sent.append(alert)


@dataclass
class InMemoryQueue:
    """A ``JobQueue`` that only records; tests run the jobs when they choose (``drain``)."""

    pending: list[str] = field(default_factory=list)
    # Set by ``close``: what a real queue lets go of then, this one only records.
    closed: bool = field(default=False, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _enqueued: EnqueueListeners = field(default_factory=EnqueueListeners)

    def enqueue_training(self, training_id: str) -> None:
        with self._lock:
            self._require_open()
            self.pending.append(training_id)
        self._enqueued.ring()

    def on_enqueue(self, listener: Callable[[], None]) -> Callable[[], None]:
        """``EnqueueBell``, as the real queue: a worker waiting on this queue takes at once."""
        return self._enqueued.add(listener)

    def queued_training_ids(self) -> set[str]:
        with self._lock:
            self._require_open()
            return set(self.pending)

    def next_training(self) -> str | None:
        with self._lock:
            self._require_open()
            return self.pending.pop(0) if self.pending else None

    def close(self) -> None:
        """``WorkQueue.close``, as the real queue: calls after it raise, a second one does
        nothing."""
        with self._lock:
            self.closed = True

    def _require_open(self) -> None:
        if self.closed:
            raise QueueClosedError(QueueClosedError.AFTER_CLOSE)

    def drain(self, handler: Callable[[str], None]) -> int:
        count = 0
        while (training_id := self.next_training()) is not None:
            handler(training_id)
            count += 1
        return count


class RecordingTelemetry(NullTelemetry):
    """Telemetry that keeps what it was told, for tests to count."""

    def __init__(self) -> None:
        self.ended: list[tuple[str, str, float | None, str | None]] = []
        self.recoveries: list[str] = []
        self.scorings: list[tuple[str, float]] = []
        self.intakes: list[tuple[float, int, bool]] = []
        self.generations: list[tuple[str, str, float | None]] = []
        self.trainer_restarts: list[str] = []
        self._lock = threading.Lock()

    def generation_ended(self, *, backend: str, status: str, seconds: float | None) -> None:
        with self._lock:
            self.generations.append((backend, status, seconds))

    def trainer_restarted(self, *, backend: str) -> None:
        with self._lock:
            self.trainer_restarts.append(backend)

    def training_ended(self, *, backend: str, status: str, seconds: float | None,
                       error_code: str | None = None) -> None:
        with self._lock:
            self.ended.append((backend, status, seconds, error_code))

    def lease_recovered(self, *, phase: str) -> None:
        with self._lock:
            self.recoveries.append(phase)

    def scoring_done(self, *, seconds: float, status: str) -> None:
        with self._lock:
            self.scorings.append((status, seconds))

    def intake_done(self, *, seconds: float, photos: int, trainable: bool) -> None:
        with self._lock:
            self.intakes.append((seconds, photos, trainable))
