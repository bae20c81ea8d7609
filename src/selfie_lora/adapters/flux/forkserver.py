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
import time
from multiprocessing import forkserver, popen_forkserver, reduction, spawn, util
from multiprocessing.context import ForkServerProcess, set_spawning_popen
from typing import Any

_PRELOAD = "selfie_lora.adapters.flux.preload"
_server = forkserver.ForkServer()
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


def kill_server() -> None:
    """Kill the training fork server (a start waiting for its preload then reads EOF); the
    children it forked die with it (``preload``), and the next start starts another."""
    pid = _server._forkserver_pid  # type: ignore[attr-defined]
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


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
