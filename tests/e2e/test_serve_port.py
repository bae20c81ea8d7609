"""The address ``selfie-lora serve`` says is the one it listens on: a port that is taken is one
line and exit status 1 before anything starts, and ``--port 0`` says the port it was given
(one port for all of ``--processes N``)."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

from tests.e2e.conftest import clean_env, selfie_lora_exe

DEADLINE_S = 60.0


def start(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], Path]:
    """``selfie-lora serve ARGS`` on 127.0.0.1 on the tiny model, its stdout and stderr in one
    file."""
    # No upload: photo-analysis processes started at each start (each process's, with
    # --processes 2) would be started for nothing.
    env = clean_env(tmp_path / "home", SELFIE_LORA_TRAINER="local",
                    SELFIE_LORA_BASE_MODEL="tiny", SELFIE_LORA_PROBE_COUNT="1",
                    SELFIE_LORA_INTAKE_WARM_UP="false")
    log = tmp_path / "serve.log"
    with log.open("w") as out:  # the child has its own copy
        proc = subprocess.Popen([selfie_lora_exe(), "serve", "--host", "127.0.0.1", *args],
                                env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True)
    return proc, log


def wait_for(proc: subprocess.Popen[str], log: Path, pattern: str) -> re.Match[str]:
    deadline = time.monotonic() + DEADLINE_S
    while (found := re.search(pattern, log.read_text(errors="replace"))) is None:
        assert proc.poll() is None, log.read_text(errors="replace")
        assert time.monotonic() < deadline, log.read_text(errors="replace")
        time.sleep(0.1)
    return found


def healthy(port: int) -> bool:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2.0).status_code == 200
        except httpx.TransportError:
            time.sleep(0.1)
    return False


def test_a_taken_port_is_one_line_and_exit_1_before_anything_starts(tmp_path: Path) -> None:
    # uvicorn bound the port only after the app's start and after 'open http://...:P/' was
    # printed, which pointed at the other program's server; then it exited 3.
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        proc, log = start(tmp_path, "--port", str(port))
        assert proc.wait(timeout=DEADLINE_S) == 1
    output = log.read_text(errors="replace")
    assert f"error: cannot listen on 127.0.0.1:{port}: Address already in use" in output
    assert "http://" not in output, output
    assert "startup complete" not in output, output  # the app did not start
    assert "Traceback" not in output, output


def test_port_0_with_two_processes_gives_them_one_port(tmp_path: Path) -> None:
    # Each process bound a port of its own, and none was said (the log said :0).
    proc, log = start(tmp_path, "--port", "0", "--processes", "2")
    try:
        port = int(wait_for(proc, log, r"2 API processes on 127\.0\.0\.1:(\d+) ").group(1))
        assert port != 0
        for _ in range(10):  # new connections, spread by the kernel over both processes
            assert healthy(port), log.read_text(errors="replace")
        listening = subprocess.run(["ss", "-Htln", f"sport = :{port}"], capture_output=True,
                                   text=True, check=False).stdout
        assert len(listening.splitlines()) == 2, listening  # both processes on it
    finally:
        proc.terminate()
        proc.wait(timeout=DEADLINE_S)


# One server for both: the port it says (a start and stop of a server cost seconds of CPU, and
# the port test stopped it with the same SIGTERM).
def test_port_0_says_the_port_it_listens_on_and_sigterm_stops_it_with_exit_status_0(
        tmp_path: Path) -> None:
    # uvicorn raised SIGTERM again after its graceful shutdown: status 143 (-15 here), where
    # `worker` and `serve --processes N` end with 0.
    proc, log = start(tmp_path, "--port", "0")
    try:
        port = int(wait_for(proc, log, r"open http://127\.0\.0\.1:(\d+)/").group(1))
        assert port != 0
        assert healthy(port), log.read_text(errors="replace")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=DEADLINE_S)
    assert code == 0, log.read_text(errors="replace")
    assert "Shutting down" in log.read_text(errors="replace")  # it stopped gracefully
