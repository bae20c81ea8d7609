"""The local generator drops a job whose client has gone (``GenerationJob.client_gone``) while
it waits for the process's one pipeline and between pictures: found in review, the generations
of clients that had given up each waited their turn, then were made (minutes of a GPU each) and
stored for nobody."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from selfie_lora.adapters.flux.generator import LocalGenerator
from selfie_lora.errors import ClientGoneError
from selfie_lora.services.ports import GenerationJob
from tests.support.pipes import GatedPipe, pipeline_of


def _job(prompt: str, *, num_outputs: int = 1,
         client_gone: threading.Event | None = None) -> GenerationJob:
    return GenerationJob(prompt=prompt, num_outputs=num_outputs, seed=1, lora_scale=1.0,
                         trainer_version="local-tiny-v2", client_gone=client_gone)


def _generator(tmp_path: Path) -> LocalGenerator:
    return LocalGenerator(base_model="tiny", cache_dir=tmp_path, device="cpu")


def test_a_job_waiting_for_the_pipeline_is_dropped_at_once_when_its_client_goes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = _generator(tmp_path)
    with pipeline_of(generator, GatedPipe(), monkeypatch) as pipe, \
            ThreadPoolExecutor(2) as pool:
        first = pool.submit(generator.generate, _job("first"))
        deadline = time.monotonic() + 10
        while pipe.waiting == 0:  # the first holds the pipeline
            assert time.monotonic() < deadline, "the first job never reached the pipeline"
            time.sleep(0.01)
        gone = threading.Event()
        waiting = pool.submit(generator.generate, _job("abandoned", client_gone=gone))
        time.sleep(0.3)
        assert not waiting.done()  # it waits its turn
        gone.set()
        # Old code: it waited for the pipeline, then made its picture for nobody.
        with pytest.raises(ClientGoneError):
            waiting.result(timeout=2)
        assert not first.done()  # dropped while the pipeline was still busy
        pipe.gate.set()
        assert len(first.result(timeout=10)) == 1
    assert pipe.prompts == ["first"]


def test_a_job_whose_client_goes_between_pictures_makes_no_more(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = _generator(tmp_path)
    gone = threading.Event()
    pipe = GatedPipe(after_picture=gone.set)
    pipe.gate.set()
    with pipeline_of(generator, pipe, monkeypatch), pytest.raises(ClientGoneError):
        generator.generate(_job("batch", num_outputs=3, client_gone=gone))
    assert pipe.prompts == ["batch"]  # old code: all three made


def test_a_job_whose_client_stays_is_made_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = _generator(tmp_path)
    pipe = GatedPipe()
    pipe.gate.set()
    with pipeline_of(generator, pipe, monkeypatch):
        images = generator.generate(_job("batch", num_outputs=3, client_gone=threading.Event()))
    assert len(images) == 3
    assert pipe.prompts == ["batch"] * 3
