"""``selfie-lora model``, ``versions`` and ``activate``: the model page, the versions list and
rollback from the command line, through the same service calls as ``GET /api/model``,
``GET /api/model/versions`` and ``POST /api/model/versions/{id}/activate``, refusing what they
refuse with their words."""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient
from typer.testing import CliRunner

from selfie_lora import cli
from selfie_lora.wiring import Services
from tests.conftest import auth
from tests.integration.test_api import upload
from tests.integration.test_cli_out import trained as trained  # the fixture, re-exported


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli.app, list(args))
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def as_json(*args: str) -> Any:
    code, said = run(*args, "--json")
    assert code == 0, said
    return json.loads(said)


def ann_headers(services: Services) -> dict[str, str]:
    _key, secret = services.users.create_key(user=services.users.get_by_name(name="ann"),
                                             name="test")
    return {"Authorization": f"Bearer {secret}"}


def test_versions_lists_newest_first_with_the_active_one(trained: Services) -> None:
    code, said = run("versions", "--user", "ann")
    assert code == 0, said
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in said.splitlines()
            if line.startswith("│")]
    assert [row[0] for row in rows] == ["2", "1"], said
    assert [row[3] for row in rows] == ["passed", "passed"]
    assert [row[4] for row in rows] == ["active", ""]


def test_versions_json_is_what_the_api_answers(trained: Services, client: TestClient) -> None:
    api = client.get("/api/model/versions", headers=ann_headers(trained))
    assert api.status_code == 200
    assert as_json("versions", "--user", "ann") == api.json()


def test_model_shows_the_model_and_its_active_version(trained: Services,
                                                      client: TestClient) -> None:
    code, said = run("model", "--user", "ann")
    assert code == 0, said
    model = trained.models.get(user=trained.users.get_by_name(name="ann"))
    assert f"trigger word: {model.trigger_word}" in said
    assert f"trainer version: {model.trainer_version} (pinned: every training uses it)" in said
    assert f"LoRA scale: {model.lora_scale:g} (the default)" in said
    assert "active version: version 2 (sha256 " in said
    api = client.get("/api/model", headers=ann_headers(trained)).json()
    shown = as_json("model", "--user", "ann")
    assert shown.pop("next_training") == {
        "backend": model.backend, "trainer_version": model.trainer_version,
        "destination": model.destination, "pinned": True, "chosen": False}
    assert shown == api


def test_model_before_the_first_training_shows_the_pin_it_will_take(
        trained: Services, client: TestClient) -> None:
    upload(client, auth(trained, "bob"), start=False)
    bob = trained.users.get_by_name(name="bob")
    pin = trained.training.next_pin(user=bob)
    assert pin is not None
    assert not pin.fixed
    code, said = run("model", "--user", "bob")
    assert code == 0, said
    assert (f"trainer version: {pin.model.trainer_version} (what the first training uses: "
            "the server's trainer version, until that training pins it)") in said.replace(
        "\n", " ")
    assert "active version: none yet" in said
    assert as_json("model", "--user", "bob")["next_training"]["pinned"] is False
    code, said = run("versions", "--user", "bob")
    assert code == 0, said
    assert "bob's model has no version yet" in said


def test_an_unknown_user_or_no_model_is_one_line(trained: Services) -> None:
    trained.users.create(name="cy")
    for command in ("model", "versions"):
        code, said = run(command, "--user", "nobody")
        assert code == 1, said
        assert said.strip() == ("error: no user named 'nobody'; create one with 'selfie-lora "
                                "users create'")
        code, said = run(command, "--user", "cy")
        assert code == 1, said
        assert said.strip() == ("error: cy has no model yet: run 'selfie-lora train PATH "
                                "--user cy' to start one")
