"""The training children's own fork server: started by a process's first training child, it
imports torch, diffusers, peft and transformers once (``preload``), then forks every training
child of that process with them loaded. A spawned child imported them itself, tens of seconds
(35-45 s each on a loaded 2-core machine) at every training and again at every retry.

Not multiprocessing's own fork server, which the photo-analysis processes come from: that one
is started at every service start (the intake's warm-up), and with torch in its preload every
``serve``, and every API process of ``serve --processes``, would import torch (seconds of CPU,
hundreds of MB) whether it ever trains or not. This one starts only with a training.

The server is multiprocessing's (``multiprocessing.forkserver.ForkServer``), a second instance;
``Popen._launch`` is the standard library's, with this server where it names the global one.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import threading
import time
from multiprocessing import forkserver, popen_forkserver, reduction, spawn, util
from multiprocessing.context import ForkServerProcess, set_spawning_popen
from typing import Any

_PRELOAD = "selfie_lora.adapters.flux.preload"
# A preload entry that names the service (``preload._service_pid``): the server reads it from
# its command line; multiprocessing's import of it fails (``preload`` is no package), ignored.
_SERVICE_MARK = f"{_PRELOAD}.service_"


class _Server(forkserver.ForkServer):
    def ensure_running(self) -> None:
        # Spawned here, by this process: the server watches it during its preload. Read in the
        # server, os.getppid() is already init's (or a subreaper's) when the service died while
        # the server's interpreter started, and the server watched that for ever. Set at each
        # call, not at import: a forked or spawned process is a service of its own. Every
        # thread of a process writes the same list.
        modules = [name for name in self._preload_modules  # type: ignore[attr-defined]
                   if not name.startswith(_SERVICE_MARK)]
        self.set_forkserver_preload([*modules, f"{_SERVICE_MARK}{os.getpid()}"])
        super().ensure_running()


_server = _Server()
_server.set_forkserver_preload([_PRELOAD])


def _close_fds(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


class _TrainingPopen(popen_forkserver.Popen):
    def _launch(self, process_obj: Any) -> None:
        prep_data = spawn.get_preparation_data(process_obj._name)
        buf = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            set_spawning_popen(None)
        self.sentinel, w = _server.connect_to_new_process(self._fds)  # type: ignore[attr-defined]
        # A duplicate of the data pipe's write end: the child's sentinel of this process.
        parent_w = os.dup(w)
        self.finalizer = util.Finalize(self, _close_fds, (parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


def server_exit_code(*, wait_s: float = 1.0) -> int | None:
    """How the training fork server ended, as a process's ``exitcode`` says it (``-N``: killed
    by signal N), once a start read its end (EOF); None when that cannot be told within
    ``wait_s``. The server is left unreaped: the next start sees it gone and starts another."""
    pid = _server._forkserver_pid  # type: ignore[attr-defined]
    if pid is None:
        return None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return None
        if info is not None:
            killed = info.si_code in (os.CLD_KILLED, os.CLD_DUMPED)
            return -info.si_status if killed else info.si_status
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


class ServerUse:
    """One training's use of the training fork server, from before its start until its child
    is stopped (``release``). The server is shared by every CPU training of the process (a
    worker runs two at once by default) and its children die with it (``preload``): one
    training's cancel or stop killed the other's start or running child with it."""

    def __init__(self) -> None:
        self.starting = True  # its start has not returned yet
        self.killed_for: str | None = None  # why another training killed the server it waited on
        self.abandoned = False  # its training ended: its start ends unwatched, its child killed
        with _users_lock:
            _users.add(self)

    def started(self) -> None:
        with _users_lock:
            self.starting = False

    def abandon(self) -> None:
        with _users_lock:
            self.abandoned = True

    def release(self) -> None:
        with _users_lock:
            _users.discard(self)


_users_lock = threading.Lock()
_users: set[ServerUse] = set()


def kill_server_for(use: ServerUse, *, stalled: str | None = None) -> bool:
    """Kill the training fork server for ``use``'s start, which a cancel, a stop or its stall
    ends (a start waiting for the preload then reads EOF), unless others need it: any other
    training for a cancel or a stop; a running child for a stall (``stalled``, the reason), as
    every start then waits on the same hung preload, and is told why (``killed_for``).

    Returns whether it is killed. Safe to call again while the start goes on: a kill that
    found no server yet (the start had not started it) or one being replaced is retried so."""
    with _users_lock:
        others = [other for other in _users if other is not use and not other.abandoned]
        if stalled is None and others:
            return False
        if any(not other.starting for other in others):
            return False
        for other in others:
            other.killed_for = stalled
        _kill_server()
        return True


def _kill_server() -> None:
    # Under the server's lock: ensure_running() replaces a dead server under it, so the pid read
    # is the current server's, not one reaped (its pid free for reuse) or about to be replaced.
    with _server._lock:  # type: ignore[attr-defined]
        pid = _server._forkserver_pid  # type: ignore[attr-defined]
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        # Until it is a zombie (left unreaped, for ensure_running): a start that follows at once
        # then starts a new server instead of connecting to the dying one (EOF: a dead child).
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                    return
            except ChildProcessError:
                return
            time.sleep(0.01)


class TrainingProcess(ForkServerProcess):
    """A ``multiprocessing`` process forked from the training fork server (its queues and
    events: the ``forkserver`` context's)."""

    _environ: dict[str, str] | None = None

    def start(self) -> None:
        # The environment of this start, not the server's: it is started once, with the
        # environment of the process's first training, and forks every later child.
        self._environ = dict(os.environ)
        super().start()

    def _bootstrap(self, parent_sentinel: Any = None) -> int:
        if self._environ is not None:
            os.environ.clear()
            os.environ.update(self._environ)
        # The server ignores SIGINT from its start (``preload``), and multiprocessing gives the
        # child the server's own handler back: the default instead, as a spawned child has it.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        code: int = super()._bootstrap(parent_sentinel)  # type: ignore[misc]
        return code

    @staticmethod
    def _Popen(process_obj: Any) -> _TrainingPopen:  # noqa: N802 - multiprocessing's name
        return _TrainingPopen(process_obj)
