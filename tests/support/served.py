"""The app under a real uvicorn in a thread, on a loopback port: for what a TestClient cannot
show (a client that closes its connection, requests in flight when the server stops)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn

from selfie_lora.api.server import guarded_protocol


@dataclass
class Served:
    server: uvicorn.Server
    thread: threading.Thread
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """As SIGTERM does: open requests get the graceful shutdown's time, then are cancelled."""
        self.server.should_exit = True
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the server did not stop"


@contextmanager
def served(app: Any, *, graceful_s: float = 10.0, root_path: str = "") -> Iterator[Served]:
    """``app`` served as ``api.server`` serves it (the guarded protocol), with ``graceful_s`` of
    graceful shutdown, under ``root_path`` (uvicorn's --root-path: the path a proxy stripped);
    stopped after the block unless the block stopped it."""
    # uvicorn.Config sets its loggers' levels (WARNING here) for the whole process: put back
    # after, or a later test in this process that logs as uvicorn at INFO sees nothing.
    loggers = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.error", "uvicorn.access")]
    levels = [logger.level for logger in loggers]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    # log_config None: uvicorn's lines reach the root logger, so pytest's caplog sees them.
    config = uvicorn.Config(app, log_level="warning", log_config=None,
                            http=guarded_protocol(10.0), timeout_graceful_shutdown=graceful_s,
                            root_path=root_path)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.02)
    assert server.started, "the server did not start"
    running = Served(server=server, thread=thread, port=sock.getsockname()[1])
    try:
        yield running
    finally:
        if thread.is_alive():
            running.stop()
        sock.close()
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
