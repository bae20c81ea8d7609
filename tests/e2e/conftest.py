"""Helpers for end-to-end tests: the real ``selfie-lora`` executable in subprocesses (the CLI and
``selfie-lora serve``), with a clean ``SELFIE_LORA_*`` environment (every setting stripped but
the run's model cache, ``outside_env``) and its own HOME."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from unittest import mock
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from sqlalchemy import create_engine, text

from selfie_lora.config import Settings
from selfie_lora.services.users import UserService
from selfie_lora.wiring import build_services
from tests.support.backends import POSTGRES_ENV, REDIS_ENV, _xdist_worker, redis_database

HEALTH_DEADLINE_S = 60.0
STOP_DEADLINE_S = 30.0
CLI_TIMEOUT_S = 120.0
TERMINAL = frozenset({"succeeded", "failed", "canceled"})


def selfie_lora_exe() -> str:
    """The ``selfie-lora`` console script of this interpreter's environment."""
    beside = Path(sys.executable).parent / "selfie-lora"
    if beside.exists():
        return str(beside)
    found = shutil.which("selfie-lora")
    if found is None:
        pytest.fail("the selfie-lora executable is not installed (pip install -e .)")
    return found


def ignores_sigterm(pid: int) -> bool:
    """Whether process ``pid`` ignores SIGTERM: a training child runs its own code (its signal
    settings are made first thing), and has yet to load the model. Not "has torch loaded": the
    child is forked from a fork server that imported torch already."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigIgn:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    except (FileNotFoundError, ProcessLookupError):
        return False
    return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# The run's one folder of built base models (tests/conftest.py's shared_model_cache): the only
# SELFIE_LORA_* setting a started process keeps, so it loads the tiny FLUX built once for the run
# instead of building it (~1 s of CPU) into its own HOME.
SHARED_CACHE_VAR = "SELFIE_LORA_CACHE_DIR"


def outside_env(*, cold_cache: bool = False) -> dict[str, str]:
    """This process's environment without any selfie-lora setting but the run's shared model
    cache; ``cold_cache`` drops that too, for a test whose processes must build or keep their
    models in their own HOME (a first run, a process that shares no disk)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("SELFIE_LORA_") or (k == SHARED_CACHE_VAR and not cold_cache)}


def clean_env(home: Path, *, cold_cache: bool = False, **extra: str) -> dict[str, str]:
    """This process's environment without any selfie-lora or Replicate setting but the run's
    shared model cache (none with ``cold_cache``: see ``outside_env``), plus ``extra``."""
    env = {k: v for k, v in outside_env(cold_cache=cold_cache).items()
           if k != "REPLICATE_API_TOKEN"}
    env.update({
        "SELFIE_LORA_HOME": str(home),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "COLUMNS": "200",  # rich wraps tables at 80 columns without a terminal
        # The fixtures hold three photos of one person (tests/support/photos.py).
        "SELFIE_LORA_MIN_PHOTOS": "3",
    })
    env.update(extra)
    return env


def run_cli(args: list[str], env: dict[str, str], *,
            timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([selfie_lora_exe(), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def create_user(env: dict[str, str], name: str) -> dict[str, str]:
    """``selfie-lora users create NAME --json`` -> the auth headers of the new user."""
    done = run_cli(["users", "create", name, "--json"], env)
    assert done.returncode == 0, f"users create {name} failed:\n{done.stdout}\n{done.stderr}"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"--json must print one JSON line on stdout, got {done.stdout!r}"
    created = json.loads(lines[0])
    assert created["user"] == name
    assert isinstance(created["api_key"], str)
    assert len(created["api_key"]) >= 16
    return {"Authorization": f"Bearer {created['api_key']}"}


def settings_of(env: dict[str, str]) -> Settings:
    """The settings that a process started with ``env`` reads, read as it reads them: from
    ``env`` alone. Not ``Settings(**values)``: the environment source would still fill every
    setting ``env`` leaves out from this process's own ``SELFIE_LORA_*`` (a developer's
    ``SELFIE_LORA_DATABASE_URL`` would get the test users, not the server's HOME), and an empty
    value or an unprefixed alias (``AWS_*``) would not be read as the process reads it."""
    with mock.patch.dict(os.environ, env, clear=True):
        return Settings()


@contextlib.contextmanager
def user_service(env: dict[str, str]) -> Iterator[UserService]:
    """The service that ``selfie-lora users create`` calls, in this process, on the database of
    the processes started with ``env`` (made and migrated here first, as the command does): for
    users that are a test's set-up only. A ``users create`` process took ~2 s of CPU each, its
    imports mostly; the command itself is run by ``create_user``."""
    services = build_services(settings_of(env), trainers={}, generators={})
    try:
        yield services.users
    finally:
        services.close()


def make_users(env: dict[str, str], *names: str,
               password: str | None = None) -> dict[str, dict[str, str]]:
    """Each name's auth headers, for users made by ``user_service`` (the set-up of tests that are
    not about ``users create``), with ``password`` if given."""
    made = {}
    with user_service(env) as users:
        for name in names:
            user, key = users.create(name=name, password=password)
            assert user.name == name
            made[name] = {"Authorization": f"Bearer {key}"}
    return made


@dataclass
class ServeProcess:
    """A running ``selfie-lora serve``, its output in ``log_path``."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    env: dict[str, str]
    log_file: IO[bytes]
    exit_codes: list[int] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tail(self, chars: int = 6000) -> str:
        if not self.log_file.closed:
            self.log_file.flush()
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no server output: {exc})"
        # the polling of progress, health and the Train page's figures drowns everything else
        # in the access log
        lines = [line for line in text.splitlines()
                 if not any(poll in line for poll in ("GET /api/training/progress", "GET /healthz",
                                                      "GET /train/status"))]
        return "\n".join(lines)[-chars:]

    def why(self, message: str) -> str:
        """``message`` with the server's recent output, for assertion messages."""
        state = "running" if self.proc.poll() is None else f"exited with {self.proc.returncode}"
        return f"{message}\n--- selfie-lora serve ({state}), last output ---\n{self.tail()}"

    def wait_healthy(self, deadline_s: float = HEALTH_DEADLINE_S) -> None:
        deadline = time.monotonic() + deadline_s
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(self.why("the server exited before it was healthy"))
            try:
                r = httpx.get(f"{self.base_url}/healthz", timeout=2.0)
                if r.status_code == 200:
                    return
                last = f"{r.status_code} {r.text[:200]}"
            except httpx.TransportError as exc:
                last = repr(exc)
            time.sleep(0.1)
        raise AssertionError(self.why(f"/healthz not 200 within {deadline_s:.0f}s ({last})"))

    def stop(self, deadline_s: float = STOP_DEADLINE_S) -> int | None:
        """SIGINT, then SIGTERM, then SIGKILL, each after ``deadline_s``. Returns the exit code
        after SIGINT, or None when SIGINT did not stop it."""
        graceful: int | None = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                graceful = self.proc.wait(timeout=deadline_s)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=deadline_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=deadline_s)
        else:
            graceful = self.proc.returncode
        self.log_file.close()
        return graceful


@contextlib.contextmanager
def servers(folder: Path) -> Iterator[Callable[..., ServeProcess]]:
    """``start(env, name="serve", args=()) -> ServeProcess``: a healthy server on a free port
    (``args``: more options of ``serve``), its output in ``folder``. Whatever is left running is
    stopped when the block ends."""
    started: list[ServeProcess] = []

    def start(env: dict[str, str], *, name: str = "serve", port: int | None = None,
              args: tuple[str, ...] = ()) -> ServeProcess:
        port = port or free_port()
        log_path = folder / f"{name}.log"
        log_file = log_path.open("wb")
        proc = subprocess.Popen(
            [selfie_lora_exe(), "serve", "--host", "127.0.0.1", "--port", str(port), *args],
            env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        server = ServeProcess(proc=proc, port=port, log_path=log_path, env=env, log_file=log_file)
        started.append(server)
        server.wait_healthy()
        return server

    try:
        yield start
    finally:
        for server in started:
            with contextlib.suppress(Exception):
                server.stop(deadline_s=10.0)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """``servers`` for one test, its output in the test's ``tmp_path``."""
    with servers(tmp_path) as start:
        yield start


def wait_training(client: httpx.Client, headers: dict[str, str], training_id: str,
                  server: ServeProcess, *, deadline_s: float) -> tuple[dict[str, Any],
                                                                       list[dict[str, Any]]]:
    """Poll ``/api/training/progress`` until the training ends. Returns the last body and every
    training snapshot seen (in order)."""
    deadline = time.monotonic() + deadline_s
    seen: list[dict[str, Any]] = []
    while True:
        r = client.get("/api/training/progress", params={"training_id": training_id},
                       headers=headers)
        assert r.status_code == 200, server.why(f"progress: {r.status_code} {r.text}")
        body: dict[str, Any] = r.json()
        seen.append(body["training"])
        if body["training"]["status"] in TERMINAL:
            return body, seen
        if server.proc.poll() is not None:
            raise AssertionError(server.why("the server died during the training"))
        if time.monotonic() > deadline:
            raise AssertionError(server.why(
                f"training {training_id} did not end within {deadline_s:.0f}s: {body['training']}"))
        time.sleep(0.2)


# --------------------------------------------------------------------------- the scale path


@pytest.fixture
def postgres_database() -> Iterator[str]:
    """A database of its own on the test server (the other tests share ``test``)."""
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"the scale path's end-to-end tests need {POSTGRES_ENV}; .ci/run sets it")
    name = f"selfie_e2e_{uuid.uuid4().hex[:10]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    parts = urlsplit(url)
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def redis_queue() -> Iterator[str]:
    url = os.environ.get(REDIS_ENV)
    if not url:
        pytest.skip(f"the scale path's end-to-end tests need {REDIS_ENV}; .ci/run sets it")
    # A database number of its own, emptied before and after: 13, and one more below it for each
    # further pytest-xdist worker (12, 11, ...; the contract tests count up from 2, and past 6
    # workers the two would meet: tests/support/backends.redis_database). The flush empties the
    # whole database, whatever SELFIE_LORA_QUEUE_NAME each test's processes use, so two of these
    # tests on one number, one on each worker, would wipe each other's jobs.
    queue = urlunsplit(urlsplit(url)._replace(
        path=f"/{redis_database('e2e', _xdist_worker() or 0)}"))
    import redis

    client = redis.Redis.from_url(queue)
    client.flushdb()
    yield queue
    client.flushdb()
    client.close()
