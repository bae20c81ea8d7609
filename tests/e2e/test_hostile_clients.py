"""Against a real ``selfie-lora serve``: clients that send slowly or never, and a server stopped
with SIGTERM or SIGKILL, which must take its helper processes with it."""

from __future__ import annotations

import contextlib
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import ServeProcess, clean_env, make_users, servers

pytestmark = pytest.mark.slow

HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 2.0


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_response(s: socket.socket, *, timeout: float) -> bytes:
    """What the server sends until it closes the connection or ``timeout`` passes."""
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data and b'"error"' in data:
                break
    except TimeoutError:
        pass
    return data


def closed_by_server(s: socket.socket) -> bool:
    try:
        s.send(b"X")
        s.settimeout(0.5)
        return s.recv(1) == b""
    except TimeoutError:
        return False  # nothing came back, the connection is still open
    except OSError:
        return True  # reset: the server closed it


# One server for the file's three client tests, not one each: a start (with its photo-analysis
# processes) took seconds of CPU, and each test leaves it as it found it (its connections closed;
# the one user made by the last). A client test that left the server unable to serve fails the
# tests after it, as it should: the server must keep serving through them.
@pytest.fixture(scope="module")
def file_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    folder = tmp_path_factory.mktemp("hostile-serve")
    # No upload gets past its guard (401, 408, 413): its photo-analysis processes would be
    # started for nothing (test_a_stopped_server_leaves_no_process_behind starts them).
    env = clean_env(folder / "home", SELFIE_LORA_HEADER_TIMEOUT=str(HEADER_TIMEOUT),
                    SELFIE_LORA_BODY_TIMEOUT=str(BODY_TIMEOUT), SELFIE_LORA_MIN_BODY_RATE="1024",
                    SELFIE_LORA_INTAKE_WARM_UP="false")
    with servers(folder) as start:
        yield start(env)


@pytest.fixture
def server(file_server: ServeProcess) -> ServeProcess:
    """The file's server, still running when a test starts."""
    if file_server.proc.poll() is not None:
        pytest.fail(file_server.why("the file's server has exited"))
    return file_server


def test_slow_headers_are_cut_off_and_the_server_keeps_serving(server: ServeProcess) -> None:
    sockets = [connect(server.port) for _ in range(200)]
    try:
        started = time.monotonic()
        for s in sockets:
            s.send(b"GET /healthz HTTP/1.1\r\n")
        # A byte now and then, the way a slowloris keeps a connection open.
        for _ in range(int((HEADER_TIMEOUT + 2) / 0.5)):
            time.sleep(0.5)
            for s in sockets:
                with contextlib.suppress(OSError):
                    s.send(b"X")
        assert httpx.get(f"{server.base_url}/healthz", timeout=5).status_code == 200
        still_open = [s for s in sockets if not closed_by_server(s)]
        assert not still_open, server.why(
            f"{len(still_open)} of 200 slow connections still open after "
            f"{time.monotonic() - started:.1f} s")
    finally:
        for s in sockets:
            s.close()


def test_a_body_that_never_comes_is_answered_401_without_a_key(server: ServeProcess) -> None:
    for path, kind in (("/api/model", "application/json"),
                       ("/api/training/upload-zip", "multipart/form-data; boundary=x")):
        s = connect(server.port)
        try:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\n"
                      f"Content-Length: {1024 ** 3}\r\n\r\n".encode() + b"{" * 1024)
            started = time.monotonic()
            answer = read_response(s, timeout=10)
            assert answer.startswith(b"HTTP/1.1 401"), server.why(f"{path}: {answer[:200]!r}")
            assert time.monotonic() - started < 5
        finally:
            s.close()


def test_declared_and_trickled_bodies_over_their_limits(server: ServeProcess) -> None:
    # Made in this process (a `users create` process is ~2 s of CPU, its imports; the command is
    # tested in test_serve and test_cli_worker).
    headers = make_users(server.env, "ann")["ann"]
    key = headers["Authorization"]
    # Declared too big: 413 at once, nothing read.
    s = connect(server.port)
    try:
        s.sendall(f"PATCH /api/model HTTP/1.1\r\nHost: x\r\nAuthorization: {key}\r\n"
                  "Content-Type: application/json\r\n"
                  f"Content-Length: {50 * 1024 * 1024}\r\n\r\n".encode())
        answer = read_response(s, timeout=10)
        assert answer.startswith(b"HTTP/1.1 413"), server.why(repr(answer[:200]))
    finally:
        s.close()
    # Within the limit but a byte a second: 408 once it has stalled for BODY_TIMEOUT.
    s = connect(server.port)
    try:
        s.sendall(f"PATCH /api/model HTTP/1.1\r\nHost: x\r\nAuthorization: {key}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n".encode())
        started = time.monotonic()
        answer = b""
        s.settimeout(0.1)
        while time.monotonic() - started < 10 and not answer:
            try:
                s.send(b" ")
            except OSError:
                break
            try:
                answer = s.recv(65536)
            except TimeoutError:
                time.sleep(1.0)
        assert answer.startswith(b"HTTP/1.1 408"), server.why(repr(answer[:200]))
        assert time.monotonic() - started < BODY_TIMEOUT + 4
    finally:
        s.close()


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_server_leaves_no_process_behind(
        serve: Callable[..., ServeProcess], tmp_path: Path, sig: signal.Signals) -> None:
    server = serve(clean_env(tmp_path / "home"))
    deadline = time.monotonic() + 60
    # serve starts its photo-analysis processes at start-up (a fork server and two workers).
    while len(helpers := descendants(server.proc.pid)) < 3:
        assert time.monotonic() < deadline, server.why(f"helpers: {helpers}")
        time.sleep(0.2)
    server.proc.send_signal(sig)
    server.proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while left := {p for p in helpers if running(p)}:
        assert time.monotonic() < deadline, server.why(f"{sig.name}: still running: {left}")
        time.sleep(0.1)
