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
from multiprocessing.connection import wait
from multiprocessing.synchronize import Event as EventType
from types import FrameType
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from selfie_lora.config import Settings
from selfie_lora.errors import SelfieLoraError

logger = logging.getLogger(__name__)

# How long a stopping server waits for open requests before it closes them.
GRACEFUL_SHUTDOWN_S = 10
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


def run_server(app: Any, settings: Settings, *, host: str, port: int) -> None:
    """Serve ``app`` until SIGINT or SIGTERM (both stop it gracefully: the app's shutdown hands
    running trainings back)."""
    # JSON logs: uvicorn keeps the handler setup_logging made (its own config is text).
    log_config = None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG
    settle_garbage_collector()
    uvicorn.run(app, host=host, port=port, log_level="info", log_config=log_config,
                http=guarded_protocol(settings.header_timeout),
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)


def _listening_socket(host: str, port: int) -> socket.socket:
    """A socket on ``host:port`` that other processes may bind too (``SO_REUSEPORT``): the
    kernel spreads new connections over them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
    log_config = None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG
    config = uvicorn.Config(app, log_level="info", log_config=log_config,
                            http=guarded_protocol(settings.header_timeout),
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    settle_garbage_collector()
    _ReadyServer(config, ready=ready).run(sockets=[sock])


def run_server_processes(settings: Settings, *, host: str, port: int, processes: int,
                         worker: bool) -> None:
    """``serve --processes N``: N processes on one port, so a machine's cores all serve
    requests (one Python process keeps to one core: its GIL); the first also runs the worker
    unless ``--no-worker``. Their figures are one view: prometheus-client's multiprocess mode,
    in HOME/metrics. SIGINT or SIGTERM stops them all gracefully. ``SelfieLoraError`` when a
    process ends before it serves (its own log says why): the others are stopped first."""
    metrics_dir = settings.home / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)  # figures of processes that are gone
    metrics_dir.mkdir(parents=True)
    # Read by prometheus-client when the children import it.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    _listening_socket(host, port).close()  # the address is free: fail here, not N times
    context = multiprocessing.get_context("spawn")
    ready = [context.Event() for _ in range(processes)]
    children = [context.Process(target=_serve_one,
                                args=(host, port, i, worker, os.getpid(), ready[i]),
                                name=f"api-{i}")
                for i in range(processes)]
    stopping = False

    def stop_all() -> None:
        for child in children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signal.SIGTERM)

    def stop(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        stop_all()

    # Before the first start: a stop asked for while they start is not taken for a failure.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for child in children:
        child.start()
    # A process that ends before it serves (its app refused to start: the first one's worker
    # on another deployment's storage) would leave the others serving, ready, without it:
    # all stop, and the command fails.
    while not stopping and not all(event.is_set() for event in ready):
        failed = next((c for c, event in zip(children, ready, strict=True)
                       if not c.is_alive() and not event.is_set()), None)
        if failed is not None:
            stop_all()
            for child in children:
                child.join()
            raise SelfieLoraError(
                f"API process {failed.name} ended while it started (exit status "
                f"{failed.exitcode}; its log above says why): every process was stopped")
        wait([c.sentinel for c in children], timeout=0.5)
    if not stopping:
        logger.info("%d API processes on %s:%d", processes, host, port)
    for child in children:
        child.join()
