"""What the app builds it closes when it stops; what it is given stays its caller's."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from selfie_lora.api.app import create_app
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


def test_services_given_to_the_app_are_left_open(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    services = build_services(settings, trainers={}, generators={})
    try:
        with TestClient(create_app(settings, services=services)) as client:
            assert client.get("/healthz").status_code == 200
        assert services.generation._executor.submit(lambda: 1).result() == 1
    finally:
        services.close()
