"""Serving the app with uvicorn, with the timeouts uvicorn lacks.

uvicorn closes a connection that sits idle between requests (``timeout_keep_alive``) but waits
forever for the headers of a request that trickle in a byte at a time (slowloris): every byte
resets its keep-alive timer. ``GuardedH11Protocol`` gives every request ``header_timeout`` seconds
from the end of the previous response (or the connection's start) to deliver its headers, and
closes the connection otherwise. Bodies are timed by ``api.guard``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.synchronize import Event as EventType
from types import FrameType
from typing import Any, Protocol

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from selfie_lora.config import Settings
from selfie_lora.errors import SelfieLoraError

logger = logging.getLogger(__name__)

# How long a stopping server waits for open requests before it closes them.
GRACEFUL_SHUTDOWN_S = 10
# ``serve --processes N``: a process that ends while it serves is started again after a pause
# (RESTART_PAUSE_S, doubled for each other end within RESTART_WINDOW_S, at most
# RESTART_MAX_PAUSE_S); more than RESTART_LIMIT ends within RESTART_WINDOW_S is a crash loop.
RESTART_LIMIT = 5
RESTART_WINDOW_S = 600.0
RESTART_PAUSE_S = 1.0
RESTART_MAX_PAUSE_S = 30.0
# Allocations between two collections of the youngest generation (Python's default: 700).
GC_YOUNGEST_THRESHOLD = 10_000


class GuardedH11Protocol(H11Protocol):
    header_timeout: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:
            self._cancel_header_timer()  # the request line and headers are in

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()  # the next request on this connection gets its own

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            logger.info("closed a connection from %s: no complete request headers in %g s",
                        self.client, self.header_timeout)
            self.transport.close()


def guarded_protocol(header_timeout: float) -> type[GuardedH11Protocol]:
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout": header_timeout})


def settle_garbage_collector() -> None:
    """Tune the cyclic garbage collector of a serving process, once its app is built.

    It paused every request for 70-180 ms several times a second under load
    (bench/api_load.py): each full collection walked every object of the process. Everything
    built so far (the modules, the app, the services, dlib's models) lives as long as the
    process: frozen, the collector no longer walks it. And with 200 requests in flight the
    youngest collection ran every 700 allocations, often enough to age the objects of requests
    still running into the oldest generation, whose growth is what sets off a full collection
    (that is how torch, imported later for generation and likeness scoring, was walked again and
    again); every ``GC_YOUNGEST_THRESHOLD`` allocations it frees the same garbage, less often,
    and full collections become rare. Not for tests: frozen objects are never freed."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNGEST_THRESHOLD, *gc.get_threshold()[1:])


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """What every serving process gives ``uvicorn.Config`` (or ``uvicorn.run``), its host and
    port aside."""
    return {
        "log_level": "info",
        # uvicorn's lines go through the handler setup_logging made, in the service's format
        # (text or JSON): uvicorn's own config has its own handlers and format, with neither
        # the time nor the logger's name.
        "log_config": None,
        "http": guarded_protocol(settings.header_timeout),
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
        # Whose X-Forwarded-For/-Proto are believed (None: uvicorn's FORWARDED_ALLOW_IPS, else
        # 127.0.0.1 and ::1): the client address the sign-in limits count, and the scheme.
        "forwarded_allow_ips": settings.forwarded_allow_ips,
        # Served under SELFIE_LORA_PUBLIC_URL's path (a proxy strips it): uvicorn puts it back
        # in front of each request's path and in the scope's root_path (api.paths).
        "root_path": settings.root_path,
    }


def run_server(app: Any, settings: Settings, *, sock: socket.socket) -> None:
    """Serve ``app`` on ``sock`` (``listening_socket``) until SIGINT or SIGTERM (both stop it
    gracefully: the app's shutdown hands running trainings back)."""
    settle_garbage_collector()
    _StoppedByTermServer(uvicorn.Config(app, **uvicorn_options(settings))).run(sockets=[sock])


class _StoppedByTermServer(uvicorn.Server):
    """Ends with exit status 0 after a graceful stop by SIGTERM, as ``worker`` and ``serve
    --processes N`` do: uvicorn raises the signal again after its shutdown, so the process died
    of it (status 143), which a supervisor or script checking ``$?`` took for a failure.
    SIGINT is left to uvicorn (Ctrl-C ends as it does)."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM:
            self.should_exit = True  # not recorded: uvicorn raises only what it recorded
            return
        super().handle_exit(sig, frame)


def listening_socket(host: str, port: int) -> socket.socket:
    """The socket single-process ``serve`` listens on, bound before the app starts: a port
    that is taken is an OSError here, before the address is announced or the app's start runs
    (uvicorn bound it only after both, and exited 3), and with port 0 its ``getsockname`` says
    the port that was chosen. Not shared with other processes (no ``SO_REUSEPORT``)."""
    return _listening_socket(host, port, shared=False)


def _listening_socket(host: str, port: int, *, shared: bool = True) -> socket.socket:
    """A socket on ``host:port``; ``shared``: that other processes may bind too
    (``SO_REUSEPORT``): the kernel spreads new connections over them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    # Accepted connections inherit it. Without it, a response's two writes (head, body) waited
    # for the client's delayed ACK: 44 ms a request instead of 0.4 ms (measured, one client).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _ReadyServer(uvicorn.Server):
    """Sets ``ready`` once the app has started and the socket is served: the parent knows
    that this process's start is behind it."""

    def __init__(self, config: uvicorn.Config, *, ready: EventType) -> None:
        super().__init__(config)
        self._ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._ready.set()


def _serve_one(host: str, port: int, index: int, worker: bool, parent_pid: int,
               ready: EventType) -> None:
    """One process of ``serve --processes N`` (a spawned child); the first runs the worker,
    when there is one. ``parent_pid``: the serving command's pid, as it read it; ``ready``:
    set once it serves."""
    from selfie_lora.api.app import create_app
    from selfie_lora.config import get_settings
    from selfie_lora.lifeline import exit_with
    from selfie_lora.logs import setup_logging

    exit_with(parent_pid)  # the parent killed with -9: this process stops too
    settings = get_settings()
    setup_logging(log_format=settings.log_format)
    sock = _listening_socket(host, port)
    # One worker, reconciler and collector for the machine's processes: the first one's.
    first = index == 0
    app = create_app(settings, warm_up=True, run_worker=worker and first, reconcile=first,
                     collect_garbage=worker and first)
    config = uvicorn.Config(app, **uvicorn_options(settings))
    settle_garbage_collector()
    _ReadyServer(config, ready=ready).run(sockets=[sock])


@dataclass(frozen=True)
class RestartPolicy:
    """How ``serve --processes N`` answers a process that ends while it serves (the OOM killer,
    a native crash in dlib or torch): it is started again after ``pause_s``, doubled for each
    other end within ``window_s`` (at most ``max_pause_s``); more than ``limit`` ends within
    ``window_s`` is a crash loop, which stops every process and fails the command."""

    limit: int = RESTART_LIMIT
    window_s: float = RESTART_WINDOW_S
    pause_s: float = RESTART_PAUSE_S
    max_pause_s: float = RESTART_MAX_PAUSE_S


class ServingProcess(Protocol):
    """What the supervisor uses of a ``multiprocessing.Process``."""

    @property
    def name(self) -> str: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def sentinel(self) -> int: ...
    @property
    def exitcode(self) -> int | None: ...
    def is_alive(self) -> bool: ...
    def terminate(self) -> None: ...
    def join(self, timeout: float | None = None) -> None: ...


class ReadyFlag(Protocol):
    def is_set(self) -> bool: ...


def ending(exitcode: int | None) -> str:
    """How a process ended, in words: the signal that killed it, or its exit status."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit status {exitcode}"


class Supervisor:
    """Starts ``processes`` processes (``start(index)``: the process, started, and the flag it
    sets once it serves) and keeps them running until ``stop``: see ``run``."""

    def __init__(self, start: Callable[[int], tuple[ServingProcess, ReadyFlag]], *,
                 processes: int, policy: RestartPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._start = start
        self._count = processes
        self._policy = policy or RestartPolicy()
        self._clock = clock
        self._children: list[ServingProcess | None] = [None] * processes
        self._ready: list[ReadyFlag | None] = [None] * processes
        self._announced: list[bool] = [False] * processes
        self._signalled: set[int] = set()  # pids sent SIGTERM: a second one would force them
        self._ends: deque[float] = deque()  # when processes ended while serving, recent first
        self._due: dict[int, float] = {}  # index -> when it starts again
        self.stopping = False

    def stop(self) -> None:
        """Every process stops gracefully (SIGTERM, once each); none is started again. Safe in a
        signal handler."""
        self.stopping = True
        self._terminate_all()

    def _terminate_all(self) -> None:
        for child in self._children:
            if (child is not None and child.pid is not None and child.pid not in self._signalled
                    and child.is_alive()):
                self._signalled.add(child.pid)
                child.terminate()

    def run(self, *, on_serving: Callable[[list[ServingProcess]], None]) -> None:
        """Start them all, call ``on_serving`` once every one serves, then keep them serving until
        ``stop``; return once all have ended.

        ``SelfieLoraError`` (every process stopped first) when one ends before the first start
        is behind them all (its log says why: the first one's worker refused another
        deployment's storage), or in a crash loop. One that ends later while serving is logged
        and started again with the same index, so the first one brings the worker and the
        reconciler back."""
        for index in range(self._count):
            if not self.stopping:
                self._launch(index)
        started = False
        try:
            while not self.stopping:
                if not started and all(flag is not None and flag.is_set()
                                       for flag in self._ready):
                    started = True
                    self._announced = [True] * self._count
                    on_serving([c for c in self._children if c is not None])
                if started:
                    self._announce_restarted()
                for index, child in enumerate(self._children):
                    if self.stopping or child is None or child.is_alive():
                        continue
                    flag = self._ready[index]
                    if not started and not (flag is not None and flag.is_set()):
                        raise SelfieLoraError(
                            f"API process {child.name} ended while it started (exit status "
                            f"{child.exitcode}; its log above says why): every process was "
                            "stopped")
                    self._ended(index, child)
                now = self._clock()
                for index, when in sorted(self._due.items()):
                    if when <= now and not self.stopping:
                        del self._due[index]
                        self._launch(index)
                self._wait(started)
        finally:
            self.stop()
            for child in self._children:
                if child is not None:
                    child.join()

    def _launch(self, index: int) -> None:
        self._children[index], self._ready[index] = self._start(index)
        self._announced[index] = False
        if self.stopping:  # a stop while it started: its handler did not see it
            self._terminate_all()

    def _announce_restarted(self) -> None:
        for index, (child, flag) in enumerate(zip(self._children, self._ready, strict=True)):
            if (child is not None and flag is not None and flag.is_set()
                    and not self._announced[index]):
                self._announced[index] = True
                logger.warning("API process %s (pid %s) serves again", child.name, child.pid)

    def _ended(self, index: int, child: ServingProcess) -> None:
        """``child`` ended while serving: start it again after its pause, or, in a crash loop,
        fail."""
        self._children[index] = None
        self._ready[index] = None
        now = self._clock()
        self._ends.appendleft(now)
        while self._ends and self._ends[-1] < now - self._policy.window_s:
            self._ends.pop()
        recent = len(self._ends)
        how = ending(child.exitcode)
        if recent > self._policy.limit:
            raise SelfieLoraError(
                f"API process {child.name} (pid {child.pid}) ended while serving ({how}): "
                f"{recent} ends of API processes within {self._policy.window_s:g} s, more than "
                f"the {self._policy.limit} restarts allowed (their logs above say why); every "
                "process was stopped")
        pause = min(self._policy.max_pause_s, self._policy.pause_s * 2 ** (recent - 1))
        logger.error("API process %s (pid %s) ended while serving (%s); starting it again in "
                     "%g s (restart %d of the %d allowed within %g s)", child.name, child.pid,
                     how, pause, recent, self._policy.limit, self._policy.window_s)
        self._due[index] = now + pause

    def _wait(self, started: bool) -> None:
        """Until a process ends, a pause is over, or (while a process starts) half a second."""
        timeouts = [when - self._clock() for when in self._due.values()]
        if not started or not all(self._announced):
            timeouts.append(0.5)  # starting processes: their flags are polled
        timeout = max(0.0, min(timeouts)) if timeouts else None
        wait([c.sentinel for c in self._children if c is not None], timeout=timeout)


# The warning multiprocessing's resource tracker prints at its exit for semaphores whose process
# never released them: an API process killed outright (kill -9, the OOM killer) leaves its
# photo-analysis pool's and a running training's queues (the tracker unlinks them all the same).
# Printed by the tracker's own process, as plain text on the service's standard error: two
# lines a JSON log shipper cannot parse, which read as a leak where the Supervisor already
# logged (ERROR) the process that was killed.
TRACKER_WARNING_FILTER = "ignore:resource_tracker:UserWarning"


def quiet_resource_tracker() -> None:
    """Start multiprocessing's resource tracker, if it is not running yet, with its warning
    about semaphores left by killed processes silenced (``TRACKER_WARNING_FILTER``): the
    tracker reads its warning filters from the environment it is started with. The filter is
    in the environment only while the tracker starts: the processes started after it (API
    processes, trainer children, photo-analysis pools) keep their warnings, the tracker's
    "relaunching" one of a parent included. (The filter cannot be narrower than the tracker's
    prefix: PYTHONWARNINGS splits on the colon that follows it.)"""
    from multiprocessing import resource_tracker

    before = os.environ.get("PYTHONWARNINGS")
    filters = [f for f in (before or "").split(",") if f]
    if TRACKER_WARNING_FILTER not in filters:
        os.environ["PYTHONWARNINGS"] = ",".join([*filters, TRACKER_WARNING_FILTER])
    try:
        resource_tracker.ensure_running()
    finally:
        if before is None:
            os.environ.pop("PYTHONWARNINGS", None)
        else:
            os.environ["PYTHONWARNINGS"] = before


def run_server_processes(settings: Settings, *, host: str, port: int, processes: int,
                         worker: bool, policy: RestartPolicy | None = None) -> None:
    """``serve --processes N``: N processes on one port, so a machine's cores all serve
    requests (one Python process keeps to one core: its GIL); the first also runs the worker
    unless ``--no-worker``. Their figures are one view: prometheus-client's multiprocess mode,
    in HOME/metrics. SIGINT or SIGTERM stops them all gracefully. A process that ends while it
    serves is started again (``RestartPolicy``). ``SelfieLoraError`` when a process ends before
    it serves (its own log says why), or in a crash loop: the others are stopped first."""
    metrics_dir = settings.home / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)  # figures of processes that are gone
    metrics_dir.mkdir(parents=True)
    # Read by prometheus-client when the children import it.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    # The address is free: fail here, not N times. With port 0 each process would bind a port
    # of its own, none of them said: they all get the one chosen here.
    with _listening_socket(host, port) as probe:
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    parent = os.getpid()
    # Before any child or flag: they all share the tracker started here.
    quiet_resource_tracker()

    def start(index: int) -> tuple[ServingProcess, ReadyFlag]:
        ready = context.Event()
        child = context.Process(target=_serve_one,
                                args=(host, port, index, worker, parent, ready),
                                name=f"api-{index}")
        child.start()
        return child, ready

    def serving(children: list[ServingProcess]) -> None:
        logger.info("%d API processes on %s:%d (%s)", processes, host, port,
                    ", ".join(f"{c.name} pid {c.pid}" for c in children))

    supervisor = Supervisor(start, processes=processes, policy=policy)

    def stop(_signum: int, _frame: FrameType | None) -> None:
        supervisor.stop()

    # Before the first start: a stop asked for while they start is not taken for a failure.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    supervisor.run(on_serving=serving)
