"""Ctrl-C at a question the command line asks at a terminal (`users delete`'s name to confirm,
a new password): exit status 130, as Ctrl-C anywhere else, with one line saying that nothing
changed, not click's bare "Aborted!" and exit status 1, which scripts read as a refusal."""

from __future__ import annotations

import os
import pty
import select
import signal
import sys
import time
from pathlib import Path

import pytest

from selfie_lora.config import Settings
from selfie_lora.wiring import build_services

CLI = str(Path(sys.executable).parent / "selfie-lora")
SRC = str(Path(__file__).resolve().parents[2] / "src")


def _read_until(fd: int, wanted: bytes, said: bytearray, *, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while wanted not in said and time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                return wanted in said
            if not chunk:
                break
            said.extend(chunk)
    return wanted in said


def _ctrl_c_at(prompt: bytes, args: list[str], home: Path) -> tuple[int, str]:
    """Runs the command at a terminal, presses Ctrl-C once ``prompt`` shows: its exit status
    and what it wrote."""
    env = {**os.environ, "SELFIE_LORA_HOME": str(home), "COLUMNS": "200",
           "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    pid, fd = pty.fork()
    if pid == 0:  # the child: the command, its terminal the pty
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execve(sys.executable, [sys.executable, CLI, *args], env)
    said = bytearray()
    status = None
    try:
        assert _read_until(fd, prompt, said, seconds=60), said.decode(errors="replace")
        end = time.monotonic() + 30
        while status is None and time.monotonic() < end:
            if b"interrupted" not in said:
                # Ctrl-C: the terminal sends SIGINT to the command. Again if it was pressed
                # before the prompt read the terminal (getpass switching echo off), as a
                # person would; never once the command said it was interrupted.
                os.write(fd, b"\x03")
                _read_until(fd, b"interrupted", said, seconds=2)
            else:
                _read_until(fd, b"\x00never", said, seconds=0.2)
            done, waited = os.waitpid(pid, os.WNOHANG)
            status = waited if done else None
    finally:
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    assert status is not None, said.decode(errors="replace")
    return os.waitstatus_to_exitcode(status), said.decode(errors="replace")


@pytest.mark.parametrize(("args", "prompt", "nothing"), [
    (["users", "delete", "eve"], b"type the user's name to confirm", "nothing was deleted"),
    (["users", "password", "eve"], b"password", "nothing was changed"),
    (["users", "create", "fay", "--password"], b"password", "nothing was changed")])
def test_ctrl_c_at_a_question_exits_130_saying_nothing_changed(
        tmp_path: Path, args: list[str], prompt: bytes, nothing: str) -> None:
    home = tmp_path / "home"
    services = build_services(Settings(home=home), trainers={}, generators={})
    try:
        services.users.create(name="eve")
    finally:
        services.close()
    code, said = _ctrl_c_at(prompt, args, home)
    assert code == 130, said
    assert f"interrupted: {nothing}" in said, said
    assert "Aborted" not in said
    assert "Traceback" not in said
    services = build_services(Settings(home=home), trainers={}, generators={})
    try:
        assert [u.user.name for u in services.users.list_users()] == ["eve"]
    finally:
        services.close()
