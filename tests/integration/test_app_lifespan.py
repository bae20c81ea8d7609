"""What the app builds it closes when it stops; what it is given stays its caller's."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from selfie_lora.api.app import create_app
from selfie_lora.errors import DeploymentMismatchError, QueueClosedError
from selfie_lora.wiring import build_services
from tests.conftest import make_settings


def test_the_services_the_app_built_are_closed_when_it_stops(tmp_path: Path) -> None:
    """``serve`` never closed them: the generation executor was never shut down."""
    app = create_app(make_settings(tmp_path))
    executor = app.state.services.generation._executor
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        assert executor.submit(lambda: 1).result() == 1
    with pytest.raises(RuntimeError, match="shutdown"):
        executor.submit(lambda: 1)
    with pytest.raises(QueueClosedError):  # and the job queue (huey's SQLite connection)
        app.state.services.queue.pending()


def test_the_services_the_app_built_are_closed_when_its_start_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its worker's start refused (the storage another deployment's): the lifespan ended before
    its ``try``, so the services it had built stayed open, the queue's connection too."""
    app = create_app(make_settings(tmp_path), run_worker=True, reconcile=True)
    services = app.state.services

    def refuse() -> None:
        raise DeploymentMismatchError("the storage is another deployment's")

    monkeypatch.setattr(services.operations, "bind_deployment", refuse)
    with pytest.raises(DeploymentMismatchError), TestClient(app):
        pass
    with pytest.raises(RuntimeError, match="shutdown"):
        services.generation._executor.submit(lambda: 1)
    with pytest.raises(QueueClosedError):
        services.queue.pending()


def test_services_given_to_the_app_are_left_open(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    services = build_services(settings, trainers={}, generators={})
    try:
        with TestClient(create_app(settings, services=services)) as client:
            assert client.get("/healthz").status_code == 200
        assert services.generation._executor.submit(lambda: 1).result() == 1
    finally:
        services.close()


def test_the_warm_up_is_given_the_stop_count_of_the_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop right after the start, before the warm-up thread ran: the thread read the count
    only then, saw no stop, and started worker processes during the stop. It is given the
    count the start read, so the stop that came meanwhile is seen."""
    settings = make_settings(tmp_path)
    services = build_services(settings, trainers={}, generators={})
    let_run = threading.Event()
    given: list[int | None] = []
    ran = threading.Event()

    def warm_up(*, since: int | None = None) -> None:
        let_run.wait(10)  # the thread is slow to get going: the stop comes first
        given.append(since)
        ran.set()

    monkeypatch.setattr(services.intake, "warm_up", warm_up)
    try:
        at_start = services.intake.stop_count()
        with TestClient(create_app(settings, services=services, warm_up=True)) as client:
            assert client.get("/healthz").status_code == 200
        assert services.intake.stop_count() == at_start + 1  # the app's stop
        let_run.set()
        assert ran.wait(10)
        assert given == [at_start]
    finally:
        let_run.set()
        services.close()


@pytest.mark.parametrize("warm", [True, False])
def test_the_warm_up_follows_the_setting_and_the_stop_always_stops_the_processes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, warm: bool) -> None:
    """SELFIE_LORA_INTAKE_WARM_UP: a server that takes no uploads (a small box, a reconcile-only
    ``serve --no-worker``) need not start the photo-analysis processes at every start (~1 s of
    CPU, their memory). Off, nothing starts them with the app; its stop still stops any that an
    upload started meanwhile. On (the default), the app's start starts them."""
    settings = make_settings(tmp_path, intake_warm_up=warm)
    services = build_services(settings, trainers={}, generators={})
    warmed = threading.Event()
    stops: list[int] = []
    monkeypatch.setattr(services.intake, "warm_up",
                        lambda *, since=None: warmed.set())
    monkeypatch.setattr(services.intake, "shut_down", lambda: stops.append(1))
    try:
        with TestClient(create_app(settings, services=services, warm_up=True)) as client:
            assert client.get("/healthz").status_code == 200
        # The thread is started before the app serves: by its stop it ran, or never will.
        assert warmed.wait(10 if warm else 0.5) is warm
        assert stops == [1]
    finally:
        services.close()


# What the README's row of SELFIE_LORA_INTAKE_WARM_UP says a boolean is (pydantic's reading).
WARM_UP_VALUES = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False,
                  "on": True, "off": False, "y": True, "n": False, "t": True, "f": False,
                  "TRUE": True, "Off": False, "": True}


@pytest.mark.parametrize(("value", "meant"), WARM_UP_VALUES.items())
def test_the_warm_up_setting_takes_the_booleans_the_readme_lists(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str, meant: bool) -> None:
    from selfie_lora.config import Settings

    monkeypatch.setenv("SELFIE_LORA_INTAKE_WARM_UP", value)
    assert Settings(home=tmp_path).intake_warm_up is meant


@pytest.mark.parametrize("value", ["sometimes", "2", " true", "false ", "enabled"])
def test_the_warm_up_setting_refuses_anything_else_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    from pydantic import ValidationError

    from selfie_lora.config import Settings, settings_errors

    assert Settings(home=tmp_path).intake_warm_up is True  # today's behaviour, by default
    monkeypatch.setenv("SELFIE_LORA_INTAKE_WARM_UP", value)
    with pytest.raises(ValidationError) as caught:
        Settings(home=tmp_path)
    [line] = settings_errors(caught.value)
    assert line.startswith("SELFIE_LORA_INTAKE_WARM_UP: "), line
    assert value.strip() not in line  # a value is never printed
