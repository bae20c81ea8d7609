"""A service's stop and the photo-analysis processes its warm-up is still starting (real
processes: the pool's fork server and its workers)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import pytest

from selfie_lora.adapters.faces.dlib_regions import DlibAnalyzerFactory
from selfie_lora.dataset import pipeline
from selfie_lora.domain.faces import AnalyzerFactory, FaceAnalyzer

LOADING_S = 30.0


class SlowToLoad:
    """A factory whose processes take ``LOADING_S`` to load their models (dlib's and ONNX
    Runtime's take ~0.5 s each on an idle machine, seconds on a loaded one)."""

    # The real factory's: when this test starts the run's fork server, the pools of later tests
    # fork from one that has them loaded, as they would otherwise.
    preload: tuple[str, ...] = DlibAnalyzerFactory.preload

    def __call__(self) -> FaceAnalyzer:
        time.sleep(LOADING_S)
        raise AssertionError("the stop should have ended this process")  # pragma: no cover


class NoFace:
    """Just what a worker's start calls (``_init_worker``): no model to load."""

    def detect(self, *_args: object, **_options: object) -> None:
        return None


class QuickToLoad:
    """A factory whose processes start in a moment: the test's tasks stand for photos."""

    preload: tuple[str, ...] = ()

    def __call__(self) -> FaceAnalyzer:
        return NoFace()  # type: ignore[return-value]  # detect is all a worker's start calls


def until(condition: Any, what: str, *, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_a_stop_during_the_warm_up_does_not_wait_for_the_processes_to_load_their_models() -> None:
    """``serve --no-worker`` stopped right after its start took ~1.8 s to stop (2-4 s on a
    loaded machine): its stop waited for the warm-up's two processes to load their models,
    for nothing, as no upload had used them. Now it ends them; the warm-up ends quietly."""
    factory = SlowToLoad()
    since = pipeline.stop_count()
    result: list[bool] = []
    warming = threading.Thread(
        target=lambda: result.append(pipeline.warm_up(factory, workers=2, since=since)),
        daemon=True)
    warming.start()
    deadline = time.monotonic() + 60
    while True:  # both processes started, each in its initializer
        pool = pipeline._pools.get((2, factory))
        if pool is not None and len(pool._processes or {}) == 2:
            break
        assert time.monotonic() < deadline, "the warm-up did not start its processes"
        time.sleep(0.05)
    processes = list(pool._processes.values())
    started = time.monotonic()
    pipeline.shutdown_pools()
    took = time.monotonic() - started
    assert took < LOADING_S / 2, f"the stop waited {took:.1f} s for the processes"
    assert not any(process.is_alive() for process in processes)
    warming.join(10)
    assert not warming.is_alive()
    assert result == [False]  # it ended quietly, as a stop's


def test_a_stop_waits_for_photos_being_analysed() -> None:
    """The other half: a pool an intake has taken is waited for at a stop, so the photo its
    process is analysing is finished rather than lost (BrokenProcessPool)."""
    factory = QuickToLoad()
    pool = pipeline._intake_pool(2, factory)
    photo = pool.submit(time.sleep, 1.0)  # a photo being analysed
    until(photo.running, "the photo's task did not start")
    pipeline.shutdown_pools()
    assert photo.done()  # the stop waited for it
    assert photo.result() is None  # finished, not lost


def test_an_intake_that_takes_the_pool_as_the_stop_begins_has_its_photo_finished(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An intake looked its pool up, then was marked as its user in a step of its own: a stop
    in between took the pool for one no intake had used, and ended its processes while the
    intake's photo was being analysed (BrokenProcessPool; the intake then started a new pool
    during the stop). The look-up and the mark are now one step: the stop either sees the pool
    marked, and waits, or comes first, and the intake gets a pool of its own."""
    factory = QuickToLoad()
    assert pipeline.warm_up(factory, workers=2)  # a pool as serve's start leaves it
    pool = pipeline._pools[(2, factory)]
    looked_up, stopping, submitted = threading.Event(), threading.Event(), threading.Event()
    real_lookup, real_shutdown = pipeline._process_pool, pool.shutdown

    def lookup_then_pause(workers: int, key: AnalyzerFactory, **options: Any
                          ) -> ProcessPoolExecutor:
        found = real_lookup(workers, key, **options)
        looked_up.set()
        assert stopping.wait(10)  # the intake's thread is pre-empted here; the stop takes over
        return found

    def shutdown_once_submitted(**options: Any) -> None:
        stopping.set()  # the stop has taken its list of pools
        assert submitted.wait(10)
        real_shutdown(**options)

    monkeypatch.setattr(pipeline, "_process_pool", lookup_then_pause)
    monkeypatch.setattr(pool, "shutdown", shutdown_once_submitted)
    outcome: list[BaseException | None] = []

    def intake() -> None:
        taken = pipeline._intake_pool(2, factory)
        photo: Future[None] = taken.submit(time.sleep, 1.0)
        until(photo.running, "the photo's task did not start")
        submitted.set()
        outcome.append(photo.exception(30))

    thread = threading.Thread(target=intake, daemon=True)
    thread.start()
    assert looked_up.wait(10)
    try:
        pipeline.shutdown_pools()
    finally:
        submitted.set()
        thread.join(30)
    assert outcome == [None], outcome  # the photo finished
    assert pool not in pipeline._used  # no mark outlives the stop
