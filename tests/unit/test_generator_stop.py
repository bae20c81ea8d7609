"""The local generator stops a job whose ``stop`` raises (a likeness probe of a training canceled
while it was scored) as it loads its pipeline, waits for it and between diffusion steps: a
cancel waited for the whole probe, a cold pipeline's load included (34 s of a tiny probe on a
busy 2-core machine, minutes for a FLUX.1 one)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from selfie_lora.adapters.flux import generator as flux_generator
from selfie_lora.adapters.flux.generator import LocalGenerator
from selfie_lora.errors import TrainingInterruptedError
from selfie_lora.services.ports import GenerationJob
from tests.support.pipes import GatedPipe, pipeline_of


class CanceledError(TrainingInterruptedError):
    pass


class StopAfter:
    """A job's ``stop``: raises ``CanceledError`` from its ``after``-th call on (``after`` None: once
    ``canceled`` is set)."""

    def __init__(self, after: int | None = None) -> None:
        self.after = after
        self.calls = 0
        self.canceled = threading.Event()

    def __call__(self) -> None:
        self.calls += 1
        if self.canceled.is_set() or (self.after is not None and self.calls >= self.after):
            raise CanceledError("canceled by its user")


def _job(stop: StopAfter | None, *, num_outputs: int = 1) -> GenerationJob:
    return GenerationJob(prompt="probe", num_outputs=num_outputs, seed=1, lora_scale=1.0,
                         trainer_version="local-tiny-v2", stop=stop)


def _generator(tmp_path: Path) -> LocalGenerator:
    return LocalGenerator(base_model="tiny", cache_dir=tmp_path, device="cpu",
                          num_inference_steps=8)


def test_a_job_stopped_between_diffusion_steps_ends_there(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = _generator(tmp_path)
    pipe = GatedPipe()
    pipe.gate.set()
    stop = StopAfter()
    with pipeline_of(generator, pipe, monkeypatch):
        # CanceledError once the third step has run: the step hook raises then.
        original = pipe.__class__.__call__

        def counted(self: GatedPipe, **kwargs: object) -> object:
            hook = kwargs["callback_on_step_end"]

            def at_step(*args: object) -> object:
                if self.steps_run == 3:
                    stop.canceled.set()
                return hook(*args)  # type: ignore[operator]

            return original(self, **{**kwargs, "callback_on_step_end": at_step})

        monkeypatch.setattr(GatedPipe, "__call__", counted)
        with pytest.raises(CanceledError):
            generator.generate(_job(stop, num_outputs=2))
    assert pipe.steps_run == 3  # old code: 16, both pictures' 8 steps
    assert pipe.prompts == []  # no picture made


def test_a_job_that_is_not_stopped_is_made_whole_and_asked_at_each_step(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = _generator(tmp_path)
    pipe = GatedPipe()
    pipe.gate.set()
    stop = StopAfter()
    with pipeline_of(generator, pipe, monkeypatch):
        images = generator.generate(_job(stop, num_outputs=2))
    assert len(images) == 2
    assert pipe.steps_run == 16
    assert stop.calls >= 16  # each step, and before each picture


def test_a_job_with_no_stop_runs_no_step_hook(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = _generator(tmp_path)
    pipe = GatedPipe()
    pipe.gate.set()
    seen: list[object] = []
    original = pipe.__class__.__call__

    def recorded(self: GatedPipe, **kwargs: object) -> object:
        seen.append(kwargs.get("callback_on_step_end"))
        return original(self, **kwargs)

    monkeypatch.setattr(GatedPipe, "__call__", recorded)
    with pipeline_of(generator, pipe, monkeypatch):
        assert len(generator.generate(_job(None))) == 1
    assert seen == [None]  # a user's generation runs as before


def test_a_job_stopped_while_the_pipeline_loads_ends_without_waiting_for_the_load(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = _generator(tmp_path)
    loaded = threading.Event()
    pipe = GatedPipe()
    pipe.gate.set()
    shared = flux_generator._SharedPipeline(pipe=pipe, lock=threading.Lock())

    def slow_load(_self: LocalGenerator, _device: str) -> flux_generator._SharedPipeline:
        assert loaded.wait(30), "the test never let the load end"
        return shared

    monkeypatch.setattr(LocalGenerator, "_pipeline", slow_load)
    stop = StopAfter()
    done = threading.Event()
    raised: list[BaseException] = []

    def run() -> None:
        try:
            generator.generate(_job(stop))
        except BaseException as exc:
            raised.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        time.sleep(0.3)
        assert not done.is_set()  # it waits for the load
        stop.canceled.set()
        # Old code: it waited for the load, then made the picture.
        assert done.wait(5), "the job waited for the pipeline's load"
        assert len(raised) == 1
        assert isinstance(raised[0], CanceledError)
        assert not loaded.is_set()  # ended while the load went on
    finally:
        loaded.set()
        thread.join(10)
    assert pipe.steps_run == 0


def test_a_failed_load_is_raised_to_a_job_that_can_be_stopped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = _generator(tmp_path)

    def failing(_self: LocalGenerator, _device: str) -> flux_generator._SharedPipeline:
        raise flux_generator.GenerationError("loading the base pipeline failed")

    monkeypatch.setattr(LocalGenerator, "_pipeline", failing)
    with pytest.raises(flux_generator.GenerationError, match="base pipeline failed"):
        generator.generate(_job(StopAfter()))
