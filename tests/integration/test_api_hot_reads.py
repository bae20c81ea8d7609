"""What the API's most frequent read costs: ``GET /api/model`` is one query and one trip to the
thread pool once the key is remembered, two of each for a key seen for the first time
(``bench/api_load.py`` measures what that buys; no timings here)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import anyio.to_thread
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from selfie_lora.wiring import Services
from tests.conftest import wait_terminal
from tests.support.photos import photo_zip


class Costs:
    """The SQL statements and trips to anyio's thread pool of the requests (not the worker's or
    the reconciler's own work, which runs in threads of its own)."""

    def __init__(self) -> None:
        self.statements: list[str] = []
        self.trips = 0
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self.statements.clear()
            self.trips = 0


@pytest.fixture
def costs(services: Services, monkeypatch: pytest.MonkeyPatch) -> Iterator[Costs]:
    # The door remembers a key for a second (API_KEY_CACHE_TTL): on a loaded machine two
    # requests can be further apart, and the second would take a trip to check the key again.
    # What is counted here is the requests' own trips, not that second.
    from selfie_lora.services import users

    monkeypatch.setattr(users, "API_KEY_CACHE_TTL", timedelta(minutes=10))
    found = Costs()
    run_sync = anyio.to_thread.run_sync

    async def counted(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with found._lock:
            found.trips += 1
        return await run_sync(func, *args, **kwargs)

    def statement(_conn: Any, _cursor: Any, sql: str, *_args: Any) -> None:
        if threading.current_thread().name.startswith("AnyIO worker thread"):
            with found._lock:
                found.statements.append(sql)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counted)
    event.listen(services.engine, "before_cursor_execute", statement)
    yield found
    event.remove(services.engine, "before_cursor_execute", statement)


def trained_user(client: TestClient, services: Services, name: str) -> tuple[str, str]:
    """A user with a model whose first version is active: (their key, the version's id)."""
    _user, key = services.users.create(name=name)
    headers = {"Authorization": f"Bearer {key}"}
    r = client.post("/api/training/upload-zip", headers=headers,
                    files={"file": ("p.zip", photo_zip(4), "application/zip")})
    assert r.status_code == 202, r.text
    done = wait_terminal(client, headers, r.json()["training"]["id"])
    assert done["training"]["status"] == "succeeded", done
    return key, done["model"]["active_version"]["id"]


def test_a_model_read_is_one_query_and_one_trip_to_the_thread_pool(
        client: TestClient, services: Services, costs: Costs) -> None:
    key, version_id = trained_user(client, services, "ann")
    # Every request of the training's polling used ``key``: a key not remembered yet.
    _created, fresh = services.users.create_key(user=services.users.get_by_name(name="ann"),
                                                name="fresh")
    costs.reset()
    r = client.get("/api/model", headers={"Authorization": f"Bearer {fresh}"})
    assert r.status_code == 200, r.text
    assert r.json()["active_version"]["id"] == version_id
    assert r.json()["active_version"]["quality"] is not None  # the likeness record came too
    # A key seen for the first time: its lookup, then the model with its version and record.
    assert len(costs.statements) == 2, costs.statements
    assert costs.trips == 2

    costs.reset()
    for _ in range(3):
        r = client.get("/api/model", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
    # Remembered: the guard answers on the event loop, the route reads once in the pool.
    assert len(costs.statements) == 3, costs.statements
    assert costs.trips == 3
    assert all(not s.lstrip().upper().startswith(("BEGIN", "UPDATE", "INSERT", "DELETE"))
               for s in costs.statements), costs.statements


def test_a_progress_poll_is_two_queries_and_one_trip_to_the_thread_pool(
        client: TestClient, services: Services, costs: Costs) -> None:
    key, version_id = trained_user(client, services, "cy")
    headers = {"Authorization": f"Bearer {key}"}
    training_id = client.get("/api/training/progress", headers=headers).json()["training"]["id"]
    for params in ({}, {"training_id": training_id}):
        costs.reset()
        r = client.get("/api/training/progress", headers=headers, params=params)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["training"]["id"] == training_id
        assert body["training"]["version_id"] == version_id
        assert body["training"]["gate"]["status"] == "passed"  # read from the version itself
        assert body["model"]["active_version"]["id"] == version_id
        # The training with its version, then the model's overview.
        assert len(costs.statements) == 2, costs.statements
        assert costs.trips == 1
    costs.reset()
    r = client.get("/api/training/progress", headers=headers, params={"training_id": "nope"})
    assert r.status_code == 404
    assert "no such training" in r.text


def test_dependencies_never_take_a_trip_to_the_thread_pool(
        client: TestClient, services: Services, costs: Costs) -> None:
    # FastAPI runs a plain ``def`` dependency in the thread pool: the user and the services
    # every route asks for must stay ``async``.
    _user, key = services.users.create(name="bob")
    headers = {"Authorization": f"Bearer {key}"}
    assert client.get("/api/model", headers=headers).status_code == 404
    costs.reset()
    r = client.get("/api/model", headers=headers)
    assert r.status_code == 404
    assert costs.trips == 1  # the route's read, nothing else
