"""``selfie-lora users list [--json]``, ``users disable NAME`` and ``users enable NAME``: an
operator sees every account and can lock one out (its keys, sessions and sign-in refused with a
403) without losing its data."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from selfie_lora import cli
from selfie_lora.config import Settings
from selfie_lora.errors import ForbiddenError
from selfie_lora.services.users import API_KEY_CACHE_TTL, DISABLED
from selfie_lora.wiring import Services
from tests.support.passwords import fast_password_hashing

PASSWORD = "a long enough password"


@pytest.fixture(autouse=True)
def _fast_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    """Accounts, not the hash's cost, are under test here (``tests.support.passwords``)."""
    fast_password_hashing(monkeypatch)


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli.app, list(args))
    assert "Traceback" not in result.output
    return result.exit_code, result.output


@pytest.fixture
def on_services(services: Services, settings: Settings,
                monkeypatch: pytest.MonkeyPatch) -> Services:
    monkeypatch.setattr(cli, "_settings", lambda: settings)
    return services


def test_users_are_listed(on_services: Services) -> None:
    on_services.users.create(name="alice", password=PASSWORD)
    bob, _key = on_services.users.create(name="bob")
    on_services.users.create_key(user=bob, name="laptop")
    code, said = run("users", "list", "--json")
    assert code == 0, said
    listed = json.loads(said)
    assert [(u["name"], u["keys"], u["password_set"], u["disabled_at"]) for u in listed] == [
        ("alice", 1, True, None), ("bob", 2, False, None)]
    assert listed[0]["created_at"]
    code, said = run("users", "list")
    assert code == 0, said
    assert "alice" in said
    assert "bob" in said


def test_a_disabled_user_is_refused_everywhere_and_keeps_its_data(
        on_services: Services, client: TestClient) -> None:
    alice, key = on_services.users.create(name="alice", password=PASSWORD)
    signed = on_services.users.sign_in(name="alice", password=PASSWORD, client="10.0.0.1")
    h = {"Authorization": f"Bearer {key}"}
    assert client.get("/api/model", headers=h).status_code in (200, 404)

    code, said = run("users", "disable", "alice")
    assert code == 0, said
    # Another process (this command) disabled her: the server's memory of the key runs out.
    time.sleep(API_KEY_CACHE_TTL.total_seconds() + 0.1)
    r = client.get("/api/model", headers=h)
    assert r.status_code == 403
    assert r.json()["error"]["message"] == DISABLED
    with pytest.raises(ForbiddenError, match="disabled"):
        on_services.users.sign_in(name="alice", password=PASSWORD, client="10.0.0.2")
    # The session is gone; one opened before would be refused too.
    with pytest.raises(Exception, match="sign in first"):
        on_services.users.session(token=signed.token)
    assert json.loads(run("users", "list", "--json")[1])[0]["disabled_at"]
    assert [k.id for k in on_services.users.keys(user=alice)]  # kept

    code, said = run("users", "enable", "alice")
    assert code == 0, said
    assert client.get("/api/model", headers=h).status_code in (200, 404)
    assert on_services.users.sign_in(name="alice", password=PASSWORD, client="10.0.0.3")
    code, said = run("users", "disable", "nobody")
    assert code == 1
    assert said.startswith("error: no user named 'nobody'")
