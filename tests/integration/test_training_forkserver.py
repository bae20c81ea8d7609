"""The training children's fork server (``adapters/flux/forkserver.py``): children forked with
torch already imported, and a server that outlives a SIGTERM sent to the service's group."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from selfie_lora.adapters.flux import forkserver
from selfie_lora.adapters.flux.trainer import LocalTrainer, _Keeper, _Keepers, _Reporter
from selfie_lora.errors import (
    TrainingCanceledError,
    TrainingFailedError,
    TrainingInterruptedError,
)

pytest.importorskip("torch")


def _report(results: Any) -> None:
    results.put(("torch" in sys.modules, "diffusers" in sys.modules,
                 signal.getsignal(signal.SIGTERM) is signal.SIG_DFL,
                 signal.getsignal(signal.SIGINT) is signal.default_int_handler))


def test_training_children_are_forked_with_torch_loaded_by_a_server_that_outlives_sigterm(
) -> None:
    """A spawned child imported torch, diffusers, peft and transformers itself at every training
    (35-45 s on a loaded 2-core machine). And systemd's stop signals the whole group: a fork
    server killed by it made multiprocessing read a live training child as exited (255)."""
    results: Any = multiprocessing.get_context("forkserver").Queue()
    for round_ in range(2):
        child = forkserver.TrainingProcess(target=_report, args=(results,))
        child.start()
        # Loaded before the child's own code ran; SIGTERM the default again in the child (the
        # training child ignores it on purpose, in its own code).
        assert results.get(timeout=180) == (True, True, True, True), round_
        child.join(timeout=60)
        assert child.exitcode == 0
        if round_ == 0:
            server_pid = forkserver._server._forkserver_pid  # type: ignore[attr-defined]
            assert server_pid
            os.kill(server_pid, signal.SIGTERM)
    # The same server forked the second child: SIGTERM left it running.
    assert forkserver._server._forkserver_pid == server_pid  # type: ignore[attr-defined]
    os.kill(server_pid, 0)


def test_only_cpu_trainings_under_linux_come_from_the_fork_server(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA child forked from a process that imported torch is unchecked: it is spawned."""
    from selfie_lora.adapters.flux.trainer import _fork_server_fits

    assert not _fork_server_fits("cuda")
    assert not _fork_server_fits("cuda:1")
    assert not _fork_server_fits("mps")
    monkeypatch.setattr(sys, "platform", "linux")
    assert _fork_server_fits("cpu")
    monkeypatch.setattr(sys, "platform", "darwin")
    assert not _fork_server_fits("cpu")


@pytest.mark.parametrize("node", ["nvidia0", "nvidia3", "kfd", "dxg"])
def test_device_auto_comes_from_the_fork_server_only_without_a_gpu(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, node: str) -> None:
    """``auto`` trains on a GPU when there is one, and a forked child cannot use CUDA: NVIDIA's
    /dev/nvidia<N>, ROCm's /dev/kfd, and WSL2's /dev/dxg (CUDA under WSL2) all mean a GPU."""
    from selfie_lora.adapters.flux import trainer

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(trainer, "_DEV", tmp_path)
    (tmp_path / "null").touch()
    (tmp_path / "nvidiactl").touch()  # not a GPU: NVIDIA's control node
    assert trainer._fork_server_fits("auto")
    (tmp_path / node).touch()
    assert not trainer._fork_server_fits("auto")
    assert trainer._fork_server_fits("cpu")


def test_importing_the_preload_elsewhere_changes_nothing() -> None:
    """Importing ``preload`` anywhere (a REPL, a test importing every module) made that process
    ignore SIGTERM for good, and imported torch and the rest."""
    code = ("import signal, sys; import selfie_lora.adapters.flux.preload; "
            "print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "
            "signal.getsignal(signal.SIGINT) is signal.default_int_handler, "
            "'torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300, check=True)
    assert done.stdout.split() == ["True", "True", "False"], done.stderr


def _environment(results: Any) -> None:
    results.put((os.environ.get("SELFIE_LORA_FORKSERVER_PROBE"), os.environ.get("HOME")))


def test_each_training_child_has_the_environment_of_its_start(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The server is started once, by a process's first training, and every child it forked
    had the environment of that moment (a test's monkeypatched HOME and HF_*, for the whole
    run), where a spawned child had the one of its own start."""
    results: Any = multiprocessing.get_context("forkserver").Queue()
    for value in ("first", "second", None):
        if value is None:
            monkeypatch.delenv("SELFIE_LORA_FORKSERVER_PROBE")
        else:
            monkeypatch.setenv("SELFIE_LORA_FORKSERVER_PROBE", value)
        monkeypatch.setenv("HOME", str(tmp_path / str(value)))
        child = forkserver.TrainingProcess(target=_environment, args=(results,))
        child.start()
        assert results.get(timeout=180) == (value, str(tmp_path / str(value)))
        child.join(timeout=60)
        assert child.exitcode == 0


def _numpy_draw(results: Any) -> None:
    import numpy

    results.put(numpy.random.rand())


def test_each_training_child_draws_its_own_numpy_numbers() -> None:
    """numpy's global generator was seeded once, at its import in the server: every child drew
    the same numbers."""
    results: Any = multiprocessing.get_context("forkserver").Queue()
    draws = []
    for _ in range(2):
        child = forkserver.TrainingProcess(target=_numpy_draw, args=(results,))
        child.start()
        draws.append(results.get(timeout=180))
        child.join(timeout=60)
    assert draws[0] != draws[1]


FREEZE_PROBE = """
import atexit, gc, json
from selfie_lora.adapters.flux import preload
preload._load = lambda: None  # the server's set-up without its imports
preload._serve()
before = gc.get_freeze_count()
atexit._run_exitfuncs()  # what its exit runs first
print(json.dumps([before, gc.get_freeze_count()]))
"""


@pytest.mark.parametrize("dev", [False, True])
def test_the_server_skips_the_last_collections_of_its_exit(dev: bool) -> None:
    """The server ends with its service, and its last garbage collections walked every torch
    object (~1.3 s of CPU) as the service stopped: it freezes them at exit. (Its children never
    run it: they inherit its atexit handlers, but end through os._exit.)"""
    flags = ["-X", "dev"] if dev else []  # not there: its last warnings and finalizers wanted
    done = subprocess.run([sys.executable, *flags, "-c", FREEZE_PROBE], capture_output=True,
                          text=True, timeout=120, check=True)
    before, after = json.loads(done.stdout.strip().splitlines()[-1])
    assert before == 0
    if dev:
        assert after == 0
    else:
        assert after > 1000  # the modules and everything they built


def _fork_and_wait(results: Any) -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    results.put(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))


def test_a_training_child_can_fork_children_of_its_own() -> None:
    """The server's at-fork hook, inherited by its children, also ran in every fork a training
    child made (DataLoader workers, a multiprocessing "fork" Process): its parent was not the
    server, and it exited with status 1 at birth."""
    results: Any = multiprocessing.get_context("forkserver").Queue()
    child = forkserver.TrainingProcess(target=_fork_and_wait, args=(results,))
    child.start()
    assert results.get(timeout=180) == 0
    child.join(timeout=60)
    assert child.exitcode == 0


def _ignores_sigint(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    return False


@pytest.fixture
def own_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A training fork server of the test's own, stopped at the end (the module's server is
    left to the other tests)."""
    server: Any = forkserver.forkserver.ForkServer()
    monkeypatch.setattr(forkserver, "_server", server)
    yield server
    with contextlib.suppress(ProcessLookupError):
        os.kill(server._forkserver_pid, signal.SIGKILL)
    server._stop()


def test_a_ctrl_c_during_the_fork_servers_preload_is_ignored(own_server: Any) -> None:
    """A terminal's Ctrl-C reaches the server in the tens of seconds of its imports: it killed
    the server, and the training failed as an internal error (EOFError from start())."""
    own_server.set_forkserver_preload([forkserver._PRELOAD])
    own_server.ensure_running()
    pid = own_server._forkserver_pid
    deadline = time.monotonic() + 5  # the server's python and its first imports, at most
    while not _ignores_sigint(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(pid, signal.SIGINT)  # the preload imports torch for tens of seconds yet
    results: Any = multiprocessing.get_context("forkserver").Queue()
    child = forkserver.TrainingProcess(target=_report, args=(results,))
    child.start()
    assert results.get(timeout=180) == (True, True, True, True)
    child.join(timeout=60)
    assert child.exitcode == 0


@pytest.mark.parametrize("stopping", [False, True])
def test_a_fork_server_killed_during_its_preload_is_a_dead_child(
        own_server: Any, stopping: bool, tmp_path: Path) -> None:
    """A server killed during its preload (the OOM killer, a native crash) made start() raise
    a bare EOFError: the training failed as an internal error instead of as a child that died
    (stopped unexpectedly; handed back while the worker stops)."""
    own_server.set_forkserver_preload(["tests.integration.slow_preload"])
    own_server.ensure_running()
    sink = _Sink(stopping=False)

    def kill() -> None:
        os.kill(own_server._forkserver_pid, signal.SIGKILL)
        sink.stopping = stopping  # the worker's stop, once the server is dead

    killer = threading.Timer(1.0, kill)
    killer.start()
    trainer = LocalTrainer(base_model="tiny", cache_dir=tmp_path, isolation="process", device="cpu")
    request: Any = SimpleNamespace(checkpoint_dir=None, resume_from=None)
    keep = _Keepers(_Keeper(None), _Keeper(None))
    expected = TrainingInterruptedError if stopping else TrainingFailedError
    with pytest.raises(expected) as caught:
        trainer._train_restarting(request, _Reporter(sink, interval=0.0), keep, job_id="tr_1")
    killer.join()
    if not stopping:  # a stop is seen as it comes, whether before the server's death or after
        assert str(-signal.SIGKILL) in str(caught.value)


@pytest.mark.parametrize("what", ["stop", "cancel", "stall"])
def test_a_start_waiting_for_the_fork_servers_preload_still_stops(
        own_server: Any, tmp_path: Path, what: str) -> None:
    """The fork server's first start waits for its preload (tens of seconds; for ever, should an
    import hang): a worker's stop, a cancel or the stall timeout went unseen meanwhile."""
    own_server.set_forkserver_preload(["tests.integration.slow_preload"])
    own_server.ensure_running()
    # Without the watch, the start ends only when this kills the server (EOF: a dead child).
    backstop = threading.Timer(30.0, os.kill, (own_server._forkserver_pid, signal.SIGKILL))
    backstop.start()
    sink = _Sink(stopping=what == "stop", canceled=what == "cancel")
    trainer = LocalTrainer(base_model="tiny", cache_dir=tmp_path, isolation="process",
                           device="cpu", stall_timeout_s=2.0 if what == "stall" else 600.0)
    request: Any = SimpleNamespace(checkpoint_dir=None, resume_from=None)
    keep = _Keepers(_Keeper(None), _Keeper(None))
    expected = {"stop": TrainingInterruptedError, "cancel": TrainingCanceledError,
                "stall": TrainingFailedError}[what]
    try:
        with pytest.raises(expected) as caught:
            trainer._train_restarting(request, _Reporter(sink, interval=0.0), keep,
                                      job_id="tr_1")
    finally:
        backstop.cancel()
    assert "exit code" not in str(caught.value)  # not the backstop's kill
    if what == "stall":
        assert "did not start within 2 s" in str(caught.value)


class _Sink:
    def __init__(self, *, stopping: bool, canceled: bool = False) -> None:
        self.stopping = stopping
        self.canceled = canceled

    def interrupted(self) -> bool:
        return self.stopping

    def cancel_requested(self) -> bool:
        return self.canceled


def _gone(pid: int) -> bool:
    """Whether ``pid`` no longer runs (ended, or a zombie its new parent has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_a_training_child_dies_with_its_fork_server() -> None:
    """A server killed mid-training (SIGKILL, the OOM killer) made multiprocessing read its live
    child as exited (255): the worker never killed it, and a restart started a second child on
    the same job beside it."""
    child = forkserver.TrainingProcess(target=time.sleep, args=(600,), daemon=True)
    child.start()
    assert child.pid
    server_pid = forkserver._server._forkserver_pid  # type: ignore[attr-defined]
    os.kill(server_pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not _gone(child.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        assert _gone(child.pid)
        assert not child.is_alive()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGKILL)


def _train_in_thread(trainer: LocalTrainer, sink: _Sink, job_id: str) -> tuple[
        threading.Thread, list[BaseException]]:
    raised: list[BaseException] = []
    request: Any = SimpleNamespace(checkpoint_dir=None, resume_from=None)
    keep = _Keepers(_Keeper(None), _Keeper(None))

    def train() -> None:
        try:
            trainer._train_restarting(request, _Reporter(sink, interval=0.0), keep,
                                      job_id=job_id)
        except BaseException as exc:  # checked by the test
            raised.append(exc)

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    return thread, raised


def test_canceling_one_start_leaves_the_other_trainings_shared_server_alone(
        own_server: Any, tmp_path: Path) -> None:
    """The fork server is shared by every CPU training of the process (two per worker by
    default), and its children die with it: canceling one training while it waited for the
    preload killed the server, and the other user's training failed ("exit code -9")."""
    own_server.set_forkserver_preload(["tests.integration.slow_preload"])
    own_server.ensure_running()
    server_pid = own_server._forkserver_pid
    backstop = threading.Timer(60.0, os.kill, (server_pid, signal.SIGKILL))
    backstop.start()
    trainer = LocalTrainer(base_model="tiny", cache_dir=tmp_path, isolation="process",
                           device="cpu")
    first, second = _Sink(stopping=False), _Sink(stopping=False)
    try:
        first_thread, first_raised = _train_in_thread(trainer, first, "tr_1")
        second_thread, second_raised = _train_in_thread(trainer, second, "tr_2")
        time.sleep(1.0)
        second.canceled = True
        second_thread.join(timeout=20)
        assert not second_thread.is_alive()
        assert len(second_raised) == 1
        assert isinstance(second_raised[0], TrainingCanceledError)
        time.sleep(1.0)
        # The first is still waiting for the preload, on the same server.
        assert first_thread.is_alive(), first_raised
        os.kill(server_pid, 0)
        # Alone now (the canceled one's start is left to end on its own): its cancel kills.
        first.canceled = True
        first_thread.join(timeout=20)
        assert not first_thread.is_alive()
        assert len(first_raised) == 1
        assert isinstance(first_raised[0], TrainingCanceledError)
        assert "exit code" not in str(first_raised[0])
    finally:
        backstop.cancel()


def test_a_start_stalled_on_a_shared_hung_preload_tells_the_others_why(
        own_server: Any, tmp_path: Path) -> None:
    """A hung preload holds every start: the first to stall kills the server, and the others
    failed as a dead child ("exit code -9") instead of as a start that made no progress."""
    own_server.set_forkserver_preload(["tests.integration.slow_preload"])
    own_server.ensure_running()
    backstop = threading.Timer(60.0, os.kill, (own_server._forkserver_pid, signal.SIGKILL))
    backstop.start()
    stalling = LocalTrainer(base_model="tiny", cache_dir=tmp_path, isolation="process",
                            device="cpu", stall_timeout_s=2.0)
    patient = LocalTrainer(base_model="tiny", cache_dir=tmp_path, isolation="process",
                           device="cpu")
    try:
        threads = [_train_in_thread(stalling, _Sink(stopping=False), "tr_1"),
                   _train_in_thread(patient, _Sink(stopping=False), "tr_2")]
        for thread, _ in threads:
            thread.join(timeout=30)
            assert not thread.is_alive()
    finally:
        backstop.cancel()
    for _, raised in threads:
        assert len(raised) == 1
        assert isinstance(raised[0], TrainingFailedError)
        assert "exit code" not in str(raised[0])
        assert "did not start within 2 s" in str(raised[0])


def test_a_cancel_before_the_start_started_the_server_still_ends_the_start(
        own_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The start's watch killed the server once: a cancel seen before the start had started it
    (no server yet, or one being replaced) missed it, and the start then waited for the whole
    preload (for ever, should an import hang)."""
    own_server.set_forkserver_preload(["tests.integration.slow_preload"])
    started = own_server.ensure_running
    backstop_fired = threading.Event()

    def backstop_kill() -> None:
        backstop_fired.set()
        os.kill(own_server._forkserver_pid, signal.SIGKILL)

    backstop = threading.Timer(30.0, backstop_kill)

    def slow_ensure_running() -> None:
        time.sleep(1.0)  # the cancel is seen, and the server killed, before it is started
        started()
        backstop.start()

    monkeypatch.setattr(own_server, "ensure_running", slow_ensure_running)
    trainer = LocalTrainer(base_model="tiny", cache_dir=tmp_path, isolation="process",
                           device="cpu")
    request: Any = SimpleNamespace(checkpoint_dir=None, resume_from=None)
    keep = _Keepers(_Keeper(None), _Keeper(None))
    try:
        with pytest.raises(TrainingCanceledError):
            trainer._train_restarting(request, _Reporter(_Sink(stopping=False, canceled=True),
                                                         interval=0.0), keep, job_id="tr_1")
    finally:
        backstop.cancel()
    assert not backstop_fired.is_set()


def test_canceling_a_start_leaves_the_other_trainings_running_child_alone(
        own_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the server warm and another training's child running, a start slower than a poll (a
    fork of a process of hundreds of MB on a loaded machine) that was canceled meanwhile killed
    the server, and the running child died with it (PDEATHSIG)."""
    own_server.set_forkserver_preload([forkserver._PRELOAD])
    running = forkserver.ServerUse()  # the other training, as _train_in_child holds it
    child = forkserver.TrainingProcess(target=time.sleep, args=(600,), daemon=True)
    try:
        child.start()
        running.started()
        launch = forkserver._TrainingPopen._launch
        launched: list[Any] = []

        def slow_launch(self: Any, process_obj: Any) -> None:
            time.sleep(2.0)  # canceled meanwhile
            launch(self, process_obj)
            launched.append(self)

        monkeypatch.setattr(forkserver._TrainingPopen, "_launch", slow_launch)
        trainer = LocalTrainer(base_model="tiny", cache_dir=tmp_path, isolation="process",
                               device="cpu")
        request: Any = SimpleNamespace(checkpoint_dir=None, resume_from=None)
        keep = _Keepers(_Keeper(None), _Keeper(None))
        with pytest.raises(TrainingCanceledError):
            trainer._train_restarting(request, _Reporter(_Sink(stopping=False, canceled=True),
                                                         interval=0.0), keep, job_id="tr_2")
        time.sleep(4.0)  # the canceled one's start ends in the background, its child stopped
        assert not _gone(child.pid)
        assert child.is_alive()
        assert len(launched) == 1
        assert _gone(launched[0].pid)  # the canceled one's
    finally:
        running.release()
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]


class _BrokenSink(_Sink):
    def cancel_requested(self) -> bool:
        raise RuntimeError("the database is gone")


def test_an_error_while_a_start_is_watched_leaves_no_use_of_the_server_behind(
        own_server: Any, tmp_path: Path) -> None:
    """An error raised while the start was watched (the cancel check's database read) left the
    training's use of the server counted for ever: no later cancel could kill the server."""
    own_server.set_forkserver_preload(["tests.integration.slow_preload"])
    own_server.ensure_running()
    trainer = LocalTrainer(base_model="tiny", cache_dir=tmp_path, isolation="process",
                           device="cpu")
    request: Any = SimpleNamespace(checkpoint_dir=None, resume_from=None)
    keep = _Keepers(_Keeper(None), _Keeper(None))
    with pytest.raises(RuntimeError, match="the database is gone"):
        trainer._train_restarting(request, _Reporter(_BrokenSink(stopping=False),
                                                     interval=0.0), keep, job_id="tr_1")
    os.kill(own_server._forkserver_pid, signal.SIGKILL)  # the start left behind ends (EOF)
    deadline = time.monotonic() + 30
    while forkserver._users and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not forkserver._users


def _ends_before_the_end_of_its_preload(server_pid: int, trace: Path) -> None:
    # A state, not a time: the watcher may wait a second or more for the GIL on a loaded
    # machine (held through dlopen and extension init); a server that went on wrote ``trace``.
    deadline = time.monotonic() + 120
    while not _gone(server_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(server_pid)
    assert not trace.exists(), "the server went on with its preload"


def _end(service: subprocess.Popen[str], server_pid: int) -> None:
    service.kill()
    service.wait()
    for stream in (service.stdout, service.stderr):
        if stream is not None:
            stream.close()
    if server_pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server_pid, signal.SIGKILL)


def test_a_fork_server_whose_service_dies_during_its_preload_ends_at_once(
        tmp_path: Path) -> None:
    """Multiprocessing's server sees its service gone only in its loop, after the preload: a
    service killed during the tens of seconds of imports (SIGKILL, the OOM killer) left its
    server importing torch on beside the restarted service's own server, then forking a child
    for the dead service's start. A state, not a time: the server must be gone before the end
    of its preload, where the module after the real one leaves its trace."""
    trace = tmp_path / "preloaded"
    service = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from selfie_lora.adapters.flux import forkserver\n"
         "forkserver._server.set_forkserver_preload(\n"
         "    [forkserver._PRELOAD, 'tests.integration.preload_trace'])\n"
         "forkserver._server.ensure_running()\n"
         "print(forkserver._server._forkserver_pid, flush=True)\n"
         "time.sleep(600)\n"], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PRELOAD_TRACE": str(trace)})
    server_pid = 0
    try:
        assert service.stdout is not None
        server_pid = int(service.stdout.readline())
        deadline = time.monotonic() + 30  # the server's python and its first imports, at most
        while not _ignores_sigint(server_pid):
            assert time.monotonic() < deadline, "the server's preload did not begin"
            time.sleep(0.02)
        time.sleep(0.2)  # into the imports of torch, diffusers, peft (seconds, on any machine)
        service.kill()
        service.wait()
        _ends_before_the_end_of_its_preload(server_pid, trace)
    finally:
        _end(service, server_pid)


def test_a_fork_server_whose_service_died_before_its_preload_began_ends_at_once(
        tmp_path: Path) -> None:
    """Read when the preload began, the server's parent was already init's (or a subreaper's)
    when the service died while the server's interpreter started: the server watched that, and
    imported torch on to the end for a dead service. A module before the real one holds the
    server until the service is gone."""
    gate, trace = tmp_path / "gate", tmp_path / "preloaded"
    service = subprocess.Popen(
        [sys.executable, "-c", "from selfie_lora.adapters.flux import forkserver\n"
         "forkserver._server.set_forkserver_preload(['tests.integration.preload_gate',\n"
         "    forkserver._PRELOAD, 'tests.integration.preload_trace'])\n"
         "forkserver._server.ensure_running()\n"
         "print(forkserver._server._forkserver_pid, flush=True)\n"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PRELOAD_GATE": str(gate), "PRELOAD_TRACE": str(trace)})
    server_pid = 0
    try:
        assert service.stdout is not None
        server_pid = int(service.stdout.readline())
        assert service.wait(timeout=60) == 0  # gone, the server still in the module before
        assert not _ignores_sigint(server_pid)  # the real preload has not begun
        gate.touch()
        _ends_before_the_end_of_its_preload(server_pid, trace)
        assert service.stderr is not None
        os.set_blocking(service.stderr.fileno(), False)  # what the server wrote before its end
        said = ""
        with contextlib.suppress(BlockingIOError):  # nothing written, writers still open
            said = os.read(service.stderr.fileno(), 1 << 16).decode(errors="replace")
        assert f"service {service.pid} is gone" in said  # one line says why
    finally:
        _end(service, server_pid)
