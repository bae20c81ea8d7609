"""Shared fixtures. Every test gets its own SELFIE_LORA_HOME under tmp_path."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import hypothesis
import pytest
import typer
import typer.testing
from fastapi.testclient import TestClient
from typer.main import get_command

from selfie_lora.api.app import create_app
from selfie_lora.config import Settings
from selfie_lora.testing.fakes import FakeFaceAnalyzer, FakeGenerator, FakeTrainer
from selfie_lora.wiring import Services, build_services
from tests.support.backends import copy_migrated_sqlite, database_url, fresh_engine
from tests.support.environment import outside_settings
from tests.support.s3 import S3Server, running_s3_server

_plugins = Path(__file__).with_name("conftest_replicate.py")
pytest_plugins = ["tests.conftest_replicate"] if _plugins.exists() else []

# Hypothesis: ``make test`` runs the default profile; ``make test-fast`` sets
# HYPOTHESIS_PROFILE=fast, fewer examples for the edit-test loop.
hypothesis.settings.register_profile("fast", max_examples=20)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# Torch on 2 cores under load is 60-100x slower with 2 threads (facts.md): one thread in tests.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _shape(app: typer.Typer) -> tuple[object, ...]:
    """What a Typer app's click command is built from: its callback, commands and groups."""
    return (app.registered_callback, *(command.callback for command in app.registered_commands),
            *((group.typer_instance and _shape(group.typer_instance))
              for group in app.registered_groups))


_COMMANDS: dict[int, tuple[typer.Typer, tuple[object, ...], click.Command]] = {}


def _command_built_once(app: typer.Typer) -> click.Command:
    """The click command of ``app`` for ``CliRunner.invoke``, built again only when the app
    changed: Typer builds it at every invoke, from every command's signature and type hints
    (~40 ms of CPU for selfie-lora's, in each of the CLI tests' hundreds of commands run). A
    command holds nothing of a run (click makes a context for each)."""
    shape = _shape(app)
    held = _COMMANDS.get(id(app))
    if held is None or held[0] is not app or held[1] != shape:
        held = _COMMANDS[id(app)] = (app, shape, get_command(app))
    return held[2]


# A private name of Typer's: were it renamed, the assignment would add an attribute nobody reads
# and the CLI tests would silently build the command at every invoke again.
assert hasattr(typer.testing, "_get_command"), "typer.testing._get_command is gone: see above"
typer.testing._get_command = _command_built_once  # type: ignore[attr-defined]

# The shell's selfie-lora settings, out of this process's environment while pytest runs.
_SHELL_SETTINGS = pytest.StashKey[dict[str, str]]()


def pytest_configure(config: pytest.Config) -> None:
    """``make test`` hands whole files to its two workers (``--dist loadfile``). pytest-xdist
    (3.6 and later) hands out the files with the most tests first, which leaves the end-to-end
    files, one to three tests of a minute or more each, to the very end, where one worker runs
    them while the other has nothing left. In the order they are collected (tests/browser and
    tests/e2e first) the long files start first and the many short ones fill in around them
    (``--loadscope-reorder`` on the command line asks for xdist's order)."""
    # The developer's shell may hold settings of its own (SELFIE_LORA_DATABASE_URL naming a real
    # database, SELFIE_LORA_STORAGE_URL a real bucket, REPLICATE_API_TOKEN, the AWS keys): every
    # Settings() built in a test, every command run in this process and every process a test
    # starts (they inherit this environment) read them, so that `make test` in such a shell
    # failed by the hundred, or made its users and photos there. Removed before any test module
    # is imported (tests.support.environment says which; the test knobs stay), put back at the
    # end for a caller of pytest.main. The xdist workers inherit the cleaned environment.
    config.stash[_SHELL_SETTINGS] = {name: os.environ.pop(name)
                                     for name in outside_settings(os.environ)}
    if (getattr(config.option, "loadscopereorder", None) is True
            and "--loadscope-reorder" not in config.invocation_params.args):
        config.option.loadscopereorder = False
    # A run started as a background job of a shell without job control (``cmd &`` in a script)
    # inherits SIGINT ignored, and Python keeps an ignored SIGINT: every test that sends a Ctrl-C
    # to this process or a forked child would see it ignored (exit 1 after its wait, not 130).
    # Handled, it is reset to the default across exec, so exec'd children and workers get it too.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_unconfigure(config: pytest.Config) -> None:
    os.environ.update(config.stash.get(_SHELL_SETTINGS, {}))


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """With the slow tests deselected (``-m "not slow"``), do not even import a module whose
    every test is slow: importing torch and diffusers alone costs seconds per process."""
    if config.option.markexpr != "not slow" or collection_path.suffix != ".py":
        return None
    if not collection_path.name.startswith("test_"):
        return None
    text = collection_path.read_text(encoding="utf-8")
    return True if "\npytestmark = pytest.mark.slow\n" in text else None


# What a command run in this process (CliRunner) may change for the rest of it: the demo quiets
# these loggers and sets these variables, as a process of its own may. Put back after each test,
# so that a later test in the same worker sees logging as it would alone (the demo tests before
# test_operations.py's left "selfie_lora" at WARNING: its INFO lines were never written). The
# root logger too: a command's setup_logging() puts a handler there on CliRunner's stderr, which
# is closed when the command returns, and sets the root's level and captureWarnings; left there,
# every later log line in that worker printed "--- Logging error --- ValueError: I/O operation
# on closed file" instead of reaching pytest. pytest adds and removes its own handlers around
# each phase: those are left to it.
_PROCESS_LOGGERS = ("selfie_lora", "transformers", "diffusers")
_PROCESS_VARIABLES = ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")


def _pytests(handler: logging.Handler) -> bool:
    return type(handler).__module__.startswith("_pytest.")


@pytest.fixture(autouse=True)
def _process_state_put_back() -> Iterator[None]:
    levels = {name: logging.getLogger(name).level for name in _PROCESS_LOGGERS}
    variables = {name: os.environ.get(name) for name in _PROCESS_VARIABLES}
    root = logging.getLogger()
    root_level, root_handlers = root.level, [h for h in root.handlers if not _pytests(h)]
    warnings_captured = logging._warnings_showwarning is not None  # type: ignore[attr-defined]
    yield
    for name, was in levels.items():
        logging.getLogger(name).setLevel(was)
    for handler in [h for h in root.handlers if not _pytests(h) and h not in root_handlers]:
        root.removeHandler(handler)
        handler.close()
    for handler in root_handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(root_level)
    logging.captureWarnings(warnings_captured)
    for name, value in variables.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session", autouse=True)
def shared_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One folder of built base models (the tiny FLUX, the face models) for each pytest process
    (each xdist worker has its own), in this process and in the servers and workers that tests
    start (they keep this one setting: tests/e2e/conftest.py's ``outside_env``): the tiny FLUX is
    built once, not once per test home. Building it is tested on its own in
    ``test_local_backend``."""
    folder = tmp_path_factory.mktemp("model-cache")
    before = os.environ.get("SELFIE_LORA_CACHE_DIR")
    os.environ["SELFIE_LORA_CACHE_DIR"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("SELFIE_LORA_CACHE_DIR", None)
    else:
        os.environ["SELFIE_LORA_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """An S3 server on loopback (moto), shared by the run; each test takes its own prefix."""
    with running_s3_server() as server:
        yield server


def one_person_analyzer() -> FakeFaceAnalyzer:
    """Every picture holds one face, centred, of the same person: for tests whose photos are
    drawings (the real dlib checks are tested on real photos)."""
    return FakeFaceAnalyzer(embed=lambda _image: (0.1,) * 128, box_fraction=0.5)


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "home": tmp_path / "home", "local_isolation": "inline", "worker_threads": 2,
        "database_url": None, "queue_url": None, "trainer": "local", "trainer_version": None,
        "base_model": "tiny", "replicate_poll_interval": 0.01, "min_photos": 1,
    }
    values.update(overrides)
    settings = Settings(**values)
    if settings.database_url is None:
        # A copy of a migrated database: the migrations are tested in test_migrations.
        copy_migrated_sqlite(settings.home / "selfie-lora.db")
    return settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def fake_trainer() -> FakeTrainer:
    return FakeTrainer()


@pytest.fixture
def fake_generator() -> FakeGenerator:
    return FakeGenerator()


@pytest.fixture
def services(settings: Settings, fake_trainer: FakeTrainer,
             fake_generator: FakeGenerator) -> Iterator[Services]:
    svc = build_services(settings, trainers={"local": fake_trainer},
                         face_analyzer=one_person_analyzer(),
                         generators={"local": fake_generator})
    yield svc
    svc.close()


@pytest.fixture
def client(settings: Settings, services: Services) -> Iterator[TestClient]:
    app = create_app(settings, services=services, run_worker=True)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def fake_services_on(database: str, tmp_path: Path) -> Services:
    """Services on fake backends over ``database`` ("sqlite", or "postgres" on an empty schema:
    ``tests.support.backends.DATABASES``); the caller closes them."""
    url = database_url(database, tmp_path)
    fresh_engine(url).dispose()  # PostgreSQL: an empty schema (build_services migrates it)
    return build_services(make_settings(tmp_path, database_url=url),
                          trainers={"local": FakeTrainer()}, face_analyzer=one_person_analyzer(),
                          generators={"local": FakeGenerator()})


@contextmanager
def serving(settings: Settings, *, run_worker: bool = False, trainer: FakeTrainer | None = None,
            **build: Any) -> Iterator[tuple[TestClient, Services]]:
    """The app on fake backends for ``settings`` (tests whose settings differ from the
    ``client`` fixture's), and its services; closed after the block. ``trainer``: the fake
    trainer to run (a fresh one by default), for a test that reads its jobs."""
    svc = build_services(settings, trainers={"local": trainer or FakeTrainer()},
                         face_analyzer=one_person_analyzer(),
                         generators={"local": FakeGenerator()}, **build)
    try:
        with TestClient(create_app(settings, services=svc, run_worker=run_worker),
                        raise_server_exceptions=False) as client:
            yield client, svc
    finally:
        svc.close()


def auth(services: Services, name: str) -> dict[str, str]:
    _user, key = services.users.create(name=name)
    return {"Authorization": f"Bearer {key}"}


def wait_terminal(client: TestClient, headers: dict[str, str], training_id: str,
                  *, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = client.get("/api/training/progress", params={"training_id": training_id},
                       headers=headers)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        if body["training"]["status"] in ("succeeded", "failed", "canceled"):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"training {training_id} did not end: {body['training']}")
        time.sleep(0.05)
