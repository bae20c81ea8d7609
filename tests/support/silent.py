"""A server that accepts TCP connections and never says a word."""

from __future__ import annotations

import socket
import threading


class SilentServer:
    """Accepts TCP connections and never says a word (a hung server, a half-dead fail-over)."""

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self._accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        try:
            while True:
                self._accepted.append(self._listener.accept()[0])
        except OSError:
            pass

    def close(self) -> None:
        self._listener.close()
        for conn in self._accepted:
            conn.close()
