"""A service's stop and the photo-analysis processes its warm-up is still starting (real
processes: the pool's fork server and its workers)."""

from __future__ import annotations

import threading
import time

from selfie_lora.adapters.faces.dlib_regions import DlibAnalyzerFactory
from selfie_lora.dataset import pipeline
from selfie_lora.domain.faces import FaceAnalyzer

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


def test_a_stop_during_the_warm_up_does_not_wait_for_the_processes_to_load_their_models() -> None:
    """``serve --no-worker`` stopped right after its start took ~1.8 s to stop (2-4 s on a
    loaded machine): its stop waited for the warm-up's two processes to load their models,
    for nothing, as no upload had used them. Now it ends them; the warm-up ends quietly."""
    factory = SlowToLoad()
    warming = threading.Thread(target=pipeline.warm_up, args=(factory,), daemon=True,
                               kwargs={"workers": 2, "since": pipeline.stop_count()})
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
