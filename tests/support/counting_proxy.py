"""A TCP relay that counts the bytes its upstream sends: put in front of the S3 server, it says
how much a call pulled from the bucket."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class CountingProxy:
    endpoint: str
    _received: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, count: int) -> None:
        with self._lock:
            self._received += count

    @property
    def received(self) -> int:
        """Bytes the upstream has sent so far (responses: headers and bodies)."""
        with self._lock:
            return self._received


def _pipe(source: socket.socket, sink: socket.socket, count: CountingProxy | None) -> None:
    with suppress(OSError):
        while data := source.recv(65536):
            if count is not None:
                count.add(len(data))
            sink.sendall(data)
    with suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


@contextmanager
def counting_proxy(upstream: str) -> Iterator[CountingProxy]:
    parts = urlsplit(upstream)
    target = (parts.hostname or "127.0.0.1", parts.port or 80)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.1)
    proxy = CountingProxy(endpoint=f"http://127.0.0.1:{server.getsockname()[1]}")
    stop = threading.Event()
    opened: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                client = server.accept()[0]
            except TimeoutError:
                continue
            remote = socket.create_connection(target)
            opened.extend((client, remote))
            threading.Thread(target=_pipe, args=(client, remote, None), daemon=True).start()
            threading.Thread(target=_pipe, args=(remote, client, proxy), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        stop.set()
        thread.join()
        for sock in opened:
            with suppress(OSError):
                sock.close()
        server.close()
