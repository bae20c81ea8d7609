"""How ``serve --processes N`` keeps its processes serving (``api.server.Supervisor``), on fake
processes: one that ends while it serves is started again with its index, a crash loop stops
them all. ``tests/e2e/test_serve_processes.py`` kills a real one."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator

import pytest

from selfie_lora.api.server import RestartPolicy, ServingProcess, Supervisor
from selfie_lora.errors import SelfieLoraError


class FakeProcess:
    """A process the test ends: its sentinel is a pipe whose writing end closes when it does."""

    def __init__(self, name: str, pid: int) -> None:
        self.name = name
        self.pid = pid
        self.exitcode: int | None = None
        self.terminated = False
        self.sentinel, self._alive = os.pipe()

    def end(self, exitcode: int) -> None:
        if self.exitcode is None:
            self.exitcode = exitcode
            os.close(self._alive)

    def is_alive(self) -> bool:
        return self.exitcode is None

    def terminate(self) -> None:
        self.terminated = True
        self.end(-15)

    def join(self, timeout: float | None = None) -> None:
        del timeout  # ended by the time anyone joins it (terminate ends it at once)

    def close(self) -> None:
        self.end(0)
        os.close(self.sentinel)


class Starts:
    """``start`` for a supervisor: a new fake process each call, ready at once unless
    ``dies_at_once``, when it has already ended with exit status 1 (a crash loop)."""

    def __init__(self) -> None:
        self.started: list[tuple[int, FakeProcess]] = []
        self.dies_at_once = False
        self.changed = threading.Condition()

    def __call__(self, index: int) -> tuple[ServingProcess, threading.Event]:
        process = FakeProcess(f"api-{index}", pid=1000 + len(self.started))
        ready = threading.Event()
        if self.dies_at_once:
            process.end(1)
        else:
            ready.set()
        with self.changed:
            self.started.append((index, process))
            self.changed.notify_all()
        return process, ready

    def wait_for(self, count: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.started) >= count, timeout=10), (
                f"{len(self.started)} processes started, not {count}")


@pytest.fixture
def starts() -> Iterator[Starts]:
    made = Starts()
    yield made
    for _index, process in made.started:
        process.close()


def test_a_process_that_ends_while_serving_is_started_again_with_its_index(
        starts: Starts, caplog: pytest.LogCaptureFixture) -> None:
    """api-0 (the worker's and the reconciler's) killed by the OOM killer: the parent noticed
    nothing, and trainings stayed queued for good. Now it is started again, logged."""
    caplog.set_level(logging.INFO, logger="selfie_lora.api.server")
    supervisor = Supervisor(starts, processes=2, policy=RestartPolicy(pause_s=0.0))
    serving = threading.Event()
    runner = threading.Thread(target=supervisor.run,
                              kwargs={"on_serving": lambda _children: serving.set()})
    runner.start()
    try:
        assert serving.wait(10)
        first = starts.started[0][1]
        first.end(-9)
        starts.wait_for(3)
        assert starts.started[2][0] == 0  # the same index: the worker comes back with it
        assert not starts.started[1][1].terminated  # the other went on serving
    finally:
        supervisor.stop()
        runner.join(10)
    assert not runner.is_alive()
    assert all(p.terminated for _i, p in starts.started[1:])  # the live ones, stopped
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["API process api-0 (pid 1000) ended while serving (killed by SIGKILL); "
                      "starting it again in 0 s (restart 1 of the 5 allowed within 600 s)"]


def test_a_crash_loop_stops_every_process_and_fails(starts: Starts,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="selfie_lora.api.server")
    supervisor = Supervisor(starts, processes=2,
                            policy=RestartPolicy(limit=2, pause_s=0.001, max_pause_s=0.0015))

    def kill_the_first(_children: list[ServingProcess]) -> None:
        starts.dies_at_once = True  # every start from now on ends before it serves
        starts.started[0][1].end(-9)

    with pytest.raises(SelfieLoraError) as raised:
        supervisor.run(on_serving=kill_the_first)
    assert raised.value.message == (
        "API process api-0 (pid 1003) ended while serving (exit status 1): 3 ends of API "
        "processes within 600 s, more than the 2 restarts allowed (their logs above say why); "
        "every process was stopped")
    assert [i for i, _p in starts.started] == [0, 1, 0, 0]
    assert starts.started[1][1].terminated  # the one still serving was stopped
    pauses = [r.getMessage().split("starting it again in ")[1].split(" s")[0]
              for r in caplog.records if r.levelno == logging.ERROR]
    assert pauses == ["0.001", "0.0015"]  # doubled, up to the most


def test_a_process_that_ends_while_they_start_stops_them_all(starts: Starts) -> None:
    """As before: one that never served (its app refused to start) fails the command."""
    original = starts.__call__

    def start(index: int) -> tuple[ServingProcess, threading.Event]:
        process, ready = original(index)
        if index == 1:
            ready.clear()
            process.end(3)
        return process, ready

    with pytest.raises(SelfieLoraError, match=r"api-1 ended while it started \(exit status 3"):
        Supervisor(start, processes=2).run(on_serving=lambda _c: None)
    assert starts.started[0][1].terminated
