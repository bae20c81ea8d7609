"""The local trainer when its base folder is broken: what the user is told, inline and in the
child process alike. Each case is a real folder (the tiny FLUX's, or a model_index.json alone)
made wrong the way an operator's copy of FLUX.1 can be, not a vendor function replaced."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import pytest

from selfie_lora.config import Settings
from selfie_lora.domain.entities import TrainingStatus
from selfie_lora.domain.recipes import get_recipe
from selfie_lora.errors import (
    ConfigError,
    TrainerError,
    TrainerUnavailableError,
    TrainingFailedError,
)
from selfie_lora.services.ports import TrainingJob, TrainingPhoto
from selfie_lora.wiring import default_trainers
from tests.support.photos import synthetic_photo

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from selfie_lora.adapters.flux import loader as flux_loader
from selfie_lora.adapters.flux.tiny import tiny_pipeline_dir
from selfie_lora.adapters.flux.trainer import LocalTrainer

pytestmark = pytest.mark.slow

RECIPE = get_recipe("local-tiny-v1")
MISCONFIGURED = "The local trainer is not set up correctly on this server; contact the operator."
Isolation = Literal["inline", "process"]


class Sink:
    def __init__(self) -> None:
        self.steps: list[int] = []

    def started(self, *, remote_id: str | None) -> None:
        del remote_id

    def progress(self, *, status: TrainingStatus, step: int, total: int,
                 loss: float | None = None) -> None:
        self.steps.append(step)

    def cancel_requested(self) -> bool:
        return False

    def interrupted(self) -> bool:
        return False


def _job(work: Path, recipe: Any = RECIPE) -> TrainingJob:
    return TrainingJob(
        training_id="tr_faults", trigger_word="TOK", destination="local/tok",
        trainer_version=recipe.name, recipe=recipe,
        photos=tuple(TrainingPhoto(name=f"p{i}.jpg", data=synthetic_photo(i, size=64),
                                   caption="a photo of TOK person") for i in range(2)),
        work_dir=work)


def _trainer(base: str, cache_dir: Path, isolation: Isolation, **kwargs: Any) -> LocalTrainer:
    return LocalTrainer(base_model=base, cache_dir=cache_dir, isolation=isolation, device="cpu",
                        num_threads=1, **kwargs)


def _train_error(trainer: LocalTrainer, job: TrainingJob) -> TrainerError:
    with pytest.raises(TrainerError) as raised:
        trainer.train(job, sink=Sink())
    return raised.value


# --------------------------------------------------------------------------- model_index.json

MODEL_INDEXES = {
    "a-list": [],
    "a-null-component": {"_class_name": "FluxPipeline", "transformer": None},
}


def _base_with_index(tmp_path: Path, index: Any) -> Path:
    base = tmp_path / "base"
    base.mkdir()
    (base / "model_index.json").write_text(json.dumps(index))
    return base


@pytest.mark.parametrize("index", MODEL_INDEXES.values(), ids=MODEL_INDEXES.keys())
def test_a_malformed_model_index_is_a_configuration_error(tmp_path: Path, index: Any) -> None:
    base = _base_with_index(tmp_path, index)
    with pytest.raises(ConfigError, match=str(base)):
        flux_loader.load_pipeline(str(base), cache_dir=tmp_path, device="cpu")


def test_a_training_refuses_a_model_index_that_is_not_an_object_before_importing_torch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file check: a training child spent its first seconds importing torch and diffusers
    only to read the folder's model_index.json and fail."""
    from selfie_lora.adapters.flux import train_loop

    def no_torch() -> None:
        raise AssertionError("torch was asked for before the base folder was checked")

    monkeypatch.setattr(train_loop, "require_torch", no_torch)
    base = _base_with_index(tmp_path, MODEL_INDEXES["a-list"])
    with pytest.raises(ConfigError, match="is not a diffusers model index"):
        train_loop.train_flux_lora(pipeline_source=str(base), cache_dir=tmp_path,
                                   photos=[(synthetic_photo(0), "TOK")],
                                   recipe=get_recipe("local-tiny-v2"), out_path=tmp_path / "l")


@pytest.mark.parametrize("isolation", ["inline", "process"])
@pytest.mark.parametrize("index", MODEL_INDEXES.values(), ids=MODEL_INDEXES.keys())
def test_a_malformed_model_index_tells_the_user_the_server_is_misconfigured(
        tmp_path: Path, shared_model_cache: Path, index: Any, isolation: Isolation) -> None:
    """Not 'Training failed; try again': trying again cannot help, the operator must act."""
    base = _base_with_index(tmp_path, index)
    error = _train_error(_trainer(str(base), shared_model_cache, isolation), _job(tmp_path / "w"))
    assert isinstance(error, TrainerUnavailableError)
    assert error.user_message == MISCONFIGURED
    assert error.message.startswith("local trainer misconfigured: ")


@pytest.mark.parametrize("isolation", ["inline", "process"])
def test_a_gpu_torch_does_not_see_tells_the_user_the_server_is_misconfigured(
        tmp_path: Path, shared_model_cache: Path, isolation: Isolation) -> None:
    """SELFIE_LORA_DEVICE=cuda:7 on a machine without that GPU failed the training as any
    error of the run ('Training failed on this server; try again'; found in review): it is
    the operator's setting, and the message says so."""
    trainer = LocalTrainer(base_model="tiny", cache_dir=shared_model_cache, isolation=isolation,
                           device="cuda:999", num_threads=1)
    error = _train_error(trainer, _job(tmp_path / "w"))
    assert isinstance(error, TrainerUnavailableError)
    assert error.user_message == MISCONFIGURED
    assert error.message.startswith("local trainer misconfigured: SELFIE_LORA_DEVICE is "
                                    "cuda:999, but torch sees ")


def test_a_childs_error_reads_as_the_same_error_inline(tmp_path: Path,
                                                      shared_model_cache: Path) -> None:
    """The child sends its error's class and text: the parent's error must not say the class
    twice ('TrainingFailedError: TrainingFailedError: ...')."""
    job = _job(tmp_path / "w", replace(RECIPE, steps=0))  # refused before torch is imported
    inline = _train_error(_trainer("tiny", shared_model_cache, "inline"), job)
    child = _train_error(_trainer("tiny", shared_model_cache, "process"), job)
    assert type(child) is type(inline)
    assert (child.message, child.user_message) == (inline.message, inline.user_message)
    assert "Error:" not in child.message


# --------------------------------------------------------------------------- vendor errors


def _tiny_copy(tmp_path: Path, cache_dir: Path, **components: list[str]) -> Path:
    """The tiny FLUX's folder, some components declared as another class."""
    base = tmp_path / "base"
    shutil.copytree(tiny_pipeline_dir(cache_dir), base)
    index = json.loads((base / "model_index.json").read_text())
    (base / "model_index.json").write_text(json.dumps({**index, **components}))
    return base


def test_a_vendor_error_in_the_loop_fails_the_training_alike_inline_and_in_the_child(
        tmp_path: Path, shared_model_cache: Path) -> None:
    """A T5 tokenizer swapped for CLIP's loads, then the T5 encoder indexes past its table:
    torch raises an IndexError, which inline isolation let out of LocalTrainer.train as it was
    (the worker failed the training as an internal error) while the child reported it."""
    base = _tiny_copy(tmp_path, shared_model_cache, tokenizer_2=["transformers", "CLIPTokenizer"])
    inline = _train_error(_trainer(str(base), shared_model_cache, "inline"), _job(tmp_path / "i"))
    child = _train_error(_trainer(str(base), shared_model_cache, "process"), _job(tmp_path / "p"))
    assert isinstance(inline, TrainingFailedError)
    assert inline.message.startswith("local training failed: IndexError: ")
    assert (type(child), child.message, child.user_message) == (
        type(inline), inline.message, inline.user_message)
    assert "try again" in inline.user_message


# --------------------------------------------------------------------------- a stuck child


def _unblock(fifo: Path) -> None:
    """Let a reader stuck on ``fifo`` go on (it reads an end of file), if one is still there."""
    with contextlib.suppress(OSError):  # no reader left: the trainer stopped it
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def _blocking_base(tmp_path: Path) -> tuple[Path, Path]:
    """A base folder whose transformer config is a FIFO nobody writes: (the folder, the FIFO).
    A child loading it blocks there, alive and silent."""
    base = tmp_path / "base"
    (base / "transformer").mkdir(parents=True)
    (base / "model_index.json").write_text("{}")
    fifo = base / "transformer" / "config.json"
    os.mkfifo(fifo)
    return base, fifo


def _train_blocked(trainer: LocalTrainer, job: TrainingJob, sink: Sink, *,
                   fifo: Path) -> tuple[BaseException | object, float]:
    """Train ``job`` in a thread until it ends (60 s at most), then let the child blocked on
    ``fifo`` go on: what the training raised or returned, and the seconds it took."""
    outcome: list[BaseException | object] = []

    def train() -> None:
        try:
            outcome.append(trainer.train(job, sink=sink))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=train, daemon=True)
    started = time.monotonic()
    thread.start()
    try:
        thread.join(timeout=60)
        assert not thread.is_alive(), "the trainer still waits on its blocked child"
    finally:
        seconds = time.monotonic() - started
        _unblock(fifo)
        thread.join(timeout=60)
    [ended] = outcome
    return ended, seconds


def test_a_child_that_makes_no_progress_is_stopped_and_its_training_fails(
        tmp_path: Path, shared_model_cache: Path) -> None:
    """A base folder whose transformer config is a FIFO nobody writes (``_blocking_base``): the
    child blocks reading it, alive and silent, as on a network folder that no longer answers.
    The heartbeat keeps the lease, so without a watchdog the training stays 'processing' and the
    worker is lost."""
    base, fifo = _blocking_base(tmp_path)
    trainer = _trainer(str(base), shared_model_cache, "process", stall_timeout_s=2.0,
                       stop_grace_s=0.5)
    children_before = set(multiprocessing.active_children())
    error, seconds = _train_blocked(trainer, _job(tmp_path / "w"), Sink(), fifo=fifo)
    assert 2.0 <= seconds < 30
    assert isinstance(error, TrainingFailedError)
    assert error.user_message == "Training stopped responding on this server; try again."
    assert "SELFIE_LORA_LOCAL_STALL_SECONDS" in error.message
    assert set(multiprocessing.active_children()) <= children_before  # the child is gone


def test_the_stall_timeout_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    def local_trainer() -> Any:
        return default_trainers(Settings())["local"]

    # Loading FLUX.1 from a slow disk and its first step send nothing for minutes.
    assert local_trainer().stall_timeout_s == 1800
    monkeypatch.setenv("SELFIE_LORA_LOCAL_STALL_SECONDS", "600")
    assert local_trainer().stall_timeout_s == 600
    monkeypatch.setenv("SELFIE_LORA_LOCAL_STALL_SECONDS", "0")
    with pytest.raises(ValueError, match="local_stall_seconds"):
        Settings()


# --------------------------------------------------------------------------- a stopping worker


class _StoppingSink(Sink):
    """The worker's stop: ``interrupted`` once ``stopping`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.stopping = threading.Event()

    def interrupted(self) -> bool:
        return self.stopping.is_set()


class _ChildKilledByTheStop(LocalTrainer):
    """A child that ends without a word (as one killed by the SIGTERM systemd sends the whole
    unit does), having written a checkpoint or not, while the worker stops (at once, or a
    moment later: the worker's own SIGTERM lands after the child's)."""

    def __init__(self, sink: _StoppingSink, *, checkpoint: bool, exitcode: int,
                 stop_after_s: float | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sink, self.checkpoint, self.exitcode = sink, checkpoint, exitcode
        self.stop_after_s = stop_after_s
        self.children = 0

    def _train_in_child(self, request: Any, reporter: Any, keep: Any, *,
                        job_id: str) -> dict[str, Any]:
        from selfie_lora.adapters.flux.checkpoints import checkpoint_name
        from selfie_lora.adapters.flux.trainer import _ChildDiedError

        self.children += 1
        if self.children > 1:
            raise AssertionError("a new training child was started while the worker stops")
        if self.checkpoint:
            assert request.checkpoint_dir is not None
            request.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            (request.checkpoint_dir / checkpoint_name(10)).write_bytes(b"checkpoint")
        if self.stop_after_s is not None:
            threading.Timer(self.stop_after_s, self.sink.stopping.set).start()
        raise _ChildDiedError(self.exitcode)


@pytest.mark.parametrize(("checkpoint", "exitcode", "stop_after_s"), [
    (False, -15, 0.0), (True, -15, 0.0), (False, -15, 0.3), (True, -9, 0.0)])
def test_a_child_that_dies_while_the_worker_stops_hands_the_training_back(
        tmp_path: Path, checkpoint: bool, exitcode: int, stop_after_s: float) -> None:
    from selfie_lora.errors import TrainingInterruptedError

    sink = _StoppingSink()
    if stop_after_s == 0.0:
        sink.stopping.set()
    trainer = _ChildKilledByTheStop(sink, checkpoint=checkpoint, exitcode=exitcode,
                                    stop_after_s=stop_after_s or None, base_model="tiny",
                                    cache_dir=tmp_path / "cache", device="cpu")
    # Never failed ("it may have run out of memory"), never a new child during the stop.
    with pytest.raises(TrainingInterruptedError):
        trainer.train(_job(tmp_path / "work"), sink=sink)
    assert trainer.children == 1


def test_a_child_that_dies_of_a_signal_while_nothing_stops_still_fails(tmp_path: Path) -> None:
    sink = _StoppingSink()
    trainer = _ChildKilledByTheStop(sink, checkpoint=False, exitcode=-15, stop_after_s=None,
                                    base_model="tiny", cache_dir=tmp_path / "cache",
                                    device="cpu")
    error = _train_error(trainer, _job(tmp_path / "work"))
    assert isinstance(error, TrainingFailedError)
    assert "exited with code -15" in str(error)


class _ChildDiesAfterEachCheckpoint(LocalTrainer):
    """A child that writes a newer checkpoint each time, then dies without a word (killed)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.children = 0

    def _train_in_child(self, request: Any, reporter: Any, keep: Any, *,
                        job_id: str) -> dict[str, Any]:
        from selfie_lora.adapters.flux.checkpoints import checkpoint_name
        from selfie_lora.adapters.flux.trainer import _ChildDiedError

        self.children += 1
        assert request.checkpoint_dir is not None
        request.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        (request.checkpoint_dir / checkpoint_name(10 * self.children)).write_bytes(b"checkpoint")
        raise _ChildDiedError(-9)


def test_each_restart_of_a_dead_child_is_counted(tmp_path: Path) -> None:
    """A child's death and restart moved no figure: only a log line said it, until the
    restarts ran out and the training failed."""
    from selfie_lora.testing.fakes import RecordingTelemetry

    telemetry = RecordingTelemetry()
    trainer = _ChildDiesAfterEachCheckpoint(base_model="tiny", cache_dir=tmp_path / "cache",
                                            device="cpu", max_restarts=2, telemetry=telemetry)
    error = _train_error(trainer, _job(tmp_path / "work"))
    assert isinstance(error, TrainingFailedError)
    assert trainer.children == 3
    assert telemetry.trainer_restarts == ["local", "local"]


class _StopsAfter(Sink):
    """Asks to cancel (or, as a stopping worker, to hand back) ``after_s`` after it was made."""

    def __init__(self, stop: str, *, after_s: float) -> None:
        super().__init__()
        self.stop, self.at = stop, time.monotonic() + after_s

    def cancel_requested(self) -> bool:
        return self.stop == "cancel" and time.monotonic() >= self.at

    def interrupted(self) -> bool:
        return self.stop == "interrupt" and time.monotonic() >= self.at


@pytest.mark.parametrize("stop", ["cancel", "interrupt"])
def test_a_child_still_loading_the_model_is_stopped_at_once(
        tmp_path: Path, shared_model_cache: Path, stop: str) -> None:
    """A child slow to load its model (its transformer config a FIFO nobody writes: it blocks
    there, as on a slow disk or a FLUX.1 load of minutes) has nothing to checkpoint: a cancel or
    a worker's stop ends it at once, not after stop_grace_s (old code: 30 s, then 10 s more for
    a SIGTERM the child ignores; cancel-loading.sh: 16.5 s for the tiny model's load)."""
    from selfie_lora.errors import TrainingCanceledError, TrainingInterruptedError

    base, fifo = _blocking_base(tmp_path)
    trainer = _trainer(str(base), shared_model_cache, "process", stop_grace_s=30.0)
    sink = _StopsAfter(stop, after_s=1.0)
    children_before = set(multiprocessing.active_children())
    error, seconds = _train_blocked(trainer, _job(tmp_path / "w"), sink, fifo=fifo)
    assert seconds < 10
    assert isinstance(error, TrainingCanceledError if stop == "cancel"
                      else TrainingInterruptedError)
    assert sink.steps == []  # it never reported a step
    assert set(multiprocessing.active_children()) <= children_before  # the child is gone
