"""The photo-check warm-up (``serve``'s start) when the service stops before it has finished."""

from __future__ import annotations

import logging
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from typing import ClassVar

import pytest

from selfie_lora.dataset import pipeline
from selfie_lora.dataset.checks import CheckPolicy
from selfie_lora.dataset.limits import UploadLimits
from selfie_lora.domain.faces import AnalyzerFactory, FaceAnalyzer
from selfie_lora.domain.plan import TrainingDefaults
from selfie_lora.services.intake import IntakeService
from selfie_lora.testing.fakes import FakeFaceAnalyzer


class NeverBuilt:
    """A factory the warm-up keys its pool by; no process is started here to call it."""

    def __call__(self) -> FaceAnalyzer:  # pragma: no cover - no worker process runs
        raise AssertionError("no worker process should start")


def no_defaults() -> TrainingDefaults:  # pragma: no cover - the warm-up reads none
    raise AssertionError("the warm-up reads no defaults")


def intake(factory: AnalyzerFactory) -> IntakeService:
    return IntakeService(repo=None, blobs=None, limits=UploadLimits(), policy=CheckPolicy(),
                         analyzer=FakeFaceAnalyzer(lambda _image: None), defaults=no_defaults,
                         analyzer_factory=factory, workers=2)


def use_pool(monkeypatch: pytest.MonkeyPatch, pool: object) -> None:
    """The warm-up gets ``pool``, registered as this process's, as a started one would be."""

    def registered(workers: int, factory: AnalyzerFactory) -> object:
        with pipeline._pools_lock:
            pipeline._pools[(workers, factory)] = pool  # type: ignore[assignment]
        return pool

    monkeypatch.setattr(pipeline, "_process_pool", registered)


def test_a_stop_during_the_warm_up_logs_no_traceback(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """SIGTERM or Ctrl-C while ``serve`` warmed up: the app's stop shut the pool down between
    the pool's start and its first tasks, and the warm-up logged a WARNING with the traceback of
    "RuntimeError: cannot schedule new futures after shutdown"."""

    class StoppedPool:
        """A pool the stop shut down before its first task (no process of its own)."""

        _processes: ClassVar[dict[int, object]] = {}  # what the stop of a pool no intake used reads
        _executor_manager_thread = None

        def submit(self, *_args: object) -> Future[None]:
            pipeline.shutdown_pools()  # the service's stop, in another thread, at that moment
            raise RuntimeError("cannot schedule new futures after shutdown")

        def shutdown(self, **_options: object) -> None:
            pass

    use_pool(monkeypatch, StoppedPool())
    caplog.set_level(logging.DEBUG)
    intake(NeverBuilt()).warm_up()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert [r for r in caplog.records if r.exc_info] == []
    assert "warm-up stopped" in caplog.text  # one INFO line says why it ended early


def test_tasks_cancelled_by_the_stop_log_no_traceback(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The stop's ``cancel_futures`` cancels warm-up tasks still queued: CancelledError."""

    class CancelledPool:
        _processes: ClassVar[dict[int, object]] = {}
        _executor_manager_thread = None

        def submit(self, *_args: object) -> Future[None]:
            pipeline.shutdown_pools()
            future: Future[None] = Future()
            future.cancel()
            return future

        def shutdown(self, **_options: object) -> None:
            pass

    use_pool(monkeypatch, CancelledPool())
    caplog.set_level(logging.DEBUG)
    intake(NeverBuilt()).warm_up()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert "warm-up stopped" in caplog.text


def test_a_warm_up_that_fails_while_the_service_runs_still_warns(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Only a stop is quiet: a pool that refuses while it is still the service's is a fault."""

    class RefusingPool:
        def submit(self, *_args: object) -> Future[None]:
            raise RuntimeError("cannot schedule new futures after shutdown")

    use_pool(monkeypatch, RefusingPool())
    factory = NeverBuilt()
    try:
        intake(factory).warm_up()
    finally:
        with pipeline._pools_lock:
            pipeline._pools.pop((2, factory), None)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "could not start the photo-analysis processes early"]
    assert warnings[0].exc_info is not None


def test_a_broken_pool_an_upload_dropped_still_warns(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Workers that cannot start (a face model missing): an upload during the warm-up met the
    same BrokenProcessPool and dropped the pool (``_drop_pool``), and the warm-up took the
    pool's absence for a stop: INFO "the service is stopping", the start-up failure unsaid."""
    factory = NeverBuilt()

    class BrokenPool:
        def submit(self, *_args: object) -> Future[None]:
            pipeline._drop_pool(2, factory, self)  # type: ignore[arg-type]  # the upload's
            future: Future[None] = Future()
            future.set_exception(BrokenProcessPool("a child process terminated abruptly"))
            return future

        def shutdown(self, **_options: object) -> None:
            pass

    use_pool(monkeypatch, BrokenPool())
    caplog.set_level(logging.DEBUG)
    intake(factory).warm_up()
    assert "warm-up stopped" not in caplog.text
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "could not start the photo-analysis processes early"]
    assert warnings[0].exc_info is not None
    assert warnings[0].exc_info[0] is BrokenProcessPool


def test_a_stop_before_the_warm_up_ran_starts_no_pool(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The service stopped right after its start, before the warm-up thread ran: the warm-up
    started a pool after ``shutdown_pools``, its worker processes starting during the stop."""
    made: list[int] = []

    def new_pool(workers: int, _factory: AnalyzerFactory) -> object:
        made.append(workers)
        raise AssertionError("no pool should be made once the service stops")

    monkeypatch.setattr(pipeline, "_new_pool", new_pool)
    caplog.set_level(logging.DEBUG)
    service = intake(NeverBuilt())
    since = service.stop_count()  # read where the service starts (the app's lifespan)
    pipeline.shutdown_pools()  # the stop, before the warm-up thread got going
    service.warm_up(since=since)
    assert made == []
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert "warm-up stopped" in caplog.text


class StoppedAsAsked:
    """A pool that records how it was shut down."""

    def __init__(self) -> None:
        self.shutdowns: list[dict[str, object]] = []

    def shutdown(self, **options: object) -> None:
        self.shutdowns.append(options)


class Renamed(StoppedAsAsked):
    """A pool of a Python whose ProcessPoolExecutor keeps its processes under other names:
    none of the private attributes the stop of a pool no intake used reads."""


class FailsToStop(StoppedAsAsked):
    _processes: ClassVar[dict[int, object]] = {}
    _executor_manager_thread = None

    def shutdown(self, **options: object) -> None:
        super().shutdown(**options)
        raise OSError("a pipe of the pool is broken")


def test_a_pool_that_cannot_be_stopped_as_planned_does_not_stop_the_stop(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The stop of a pool no intake used reads ``_processes`` and ``_executor_manager_thread``,
    CPython's private names: on a Python without them it raised AttributeError, out of the
    app's stop (the services then left unclosed), and the pools after it were not stopped at
    all. Now such a pool is stopped as before that change (waited for), each pool is stopped
    on its own, and a failure is logged, not raised."""
    failing, renamed = FailsToStop(), Renamed()
    first, second = NeverBuilt(), NeverBuilt()
    monkeypatch.setattr(pipeline, "_pools", {(2, first): failing, (2, second): renamed})
    caplog.set_level(logging.DEBUG)
    pipeline.shutdown_pools()  # raises nothing
    assert failing.shutdowns == [{"wait": False, "cancel_futures": True}]
    assert renamed.shutdowns == [{"wait": True, "cancel_futures": True}]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert errors[0].exc_info[0] is OSError


class Stubborn:
    """A worker process that outlives SIGTERM (a handler of its own, a read stuck in the
    kernel): only SIGKILL ends it."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.killed = False

    def terminate(self) -> None:
        self.calls.append("terminate")

    def kill(self) -> None:
        self.calls.append("kill")
        self.killed = True

    def join(self, timeout: float | None = None) -> None:
        self.calls.append(f"join {timeout}")
        assert timeout is not None or self.killed, "a join that would never return"

    def is_alive(self) -> bool:
        return not self.killed


def test_a_process_that_outlives_its_sigterm_is_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stop waited without a bound for each process it had SIGTERMed."""
    process = Stubborn()

    class Unused(StoppedAsAsked):
        _processes: ClassVar[dict[int, object]] = {1: process}
        _executor_manager_thread = None

    pool = Unused()
    monkeypatch.setattr(pipeline, "_pools", {(2, NeverBuilt()): pool})
    pipeline.shutdown_pools()
    assert pool.shutdowns == [{"wait": False, "cancel_futures": True}]
    assert process.calls[0] == "terminate"
    assert process.calls[1].startswith("join ")
    assert process.calls[1] != "join None"  # a bounded wait
    assert process.calls[2:] == ["kill", "join None"]


def test_the_processes_of_a_pool_whose_shutdown_raised_are_ended_all_the_same(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A pool no intake used whose shutdown raised kept its processes running (the stop went
    on to the next pool): they are SIGTERMed all the same, and the failure logged."""
    process = Stubborn()

    class Failing(FailsToStop):
        _processes: ClassVar[dict[int, object]] = {1: process}

    monkeypatch.setattr(pipeline, "_pools", {(2, NeverBuilt()): Failing()})
    pipeline.shutdown_pools()
    assert process.calls[0] == "terminate"
    assert process.killed  # it outlived the SIGTERM here
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [OSError]
