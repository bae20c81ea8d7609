"""``selfie-lora generations list`` and ``generations delete``: the gallery and its Delete button
from the command line, through the same service calls as ``GET /api/generations`` and
``DELETE /api/generations/{id}``, refusing what they refuse with their words."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from selfie_lora import console as console_module
from selfie_lora.wiring import Services
from tests.conftest import auth
from tests.integration.test_cli_model import ann_headers, as_json, run
from tests.integration.test_cli_out import settings as settings  # the fixtures, re-exported:
from tests.integration.test_cli_out import trained as trained  # ann's two trainings run once
from tests.integration.test_cli_out import trained_home as trained_home  # for the module


def generated(client: TestClient, headers: dict[str, str], prompt: str, *,
              version: int | None = None, n: int = 1) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, "num_outputs": n, "lora_scale": 0.7}
    if version is not None:
        body["version_id"] = version
    r = client.post("/api/generate", headers=headers, json=body)
    assert r.status_code == 200, r.text
    return dict(r.json()["generation"])


def rows(said: str) -> list[tuple[list[str], str]]:
    """The table's rows: each generation's facts (its id first), a line each, and its prompt
    (its lines joined by a space)."""
    found: list[tuple[list[str], list[str]]] = []
    fresh = True
    for line in said.splitlines():
        if line.startswith(("├", "┡")):
            fresh = True
            continue
        if not line.startswith("│"):
            continue
        facts, prompt = (cell.strip() for cell in line.split("│")[1:-1])
        if fresh:
            found.append(([], []))
            fresh = False
        found[-1][0].append(facts)
        found[-1][1].append(prompt)
    return [([f for f in facts if f], " ".join(p for p in prompt if p))
            for facts, prompt in found]


@pytest.mark.parametrize("width", [80, 120])
def test_generations_lists_newest_first_as_the_api(trained: Services, client: TestClient,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    width: int) -> None:
    # At 80 columns (a pipe's, a script's) the whole id and seed left the prompt 3 letters:
    # 'a' 'pho' 'to' 'of' ..., and the time 'ma' 'de' over 9 lines; at 120 it wrapped too.
    # (The consoles' width: COLUMNS is read once, when they are made.)
    monkeypatch.setattr(console_module.console, "_width", width)
    monkeypatch.setattr(console_module.err_console, "_width", width)
    h = ann_headers(trained)
    first = generated(client, h, "on a beach at dawn", version=1, n=2)
    second = generated(client, h, "in a forest " + "with tall trees " * 10)
    code, said = run("generations", "list", "--user", "ann")
    assert code == 0, said
    assert max(len(line) for line in said.splitlines()) <= width, said
    assert "a photo of" in said, said  # not 'a' 'pho' 'to' 'of'
    found = rows(said)
    assert [facts[0] for facts, _ in found] == [second["id"], first["id"]], said
    made = [f"made {g['created_at'][:10]} {g['created_at'][11:16]} UTC" for g in (second, first)]
    assert [facts[1] for facts, _ in found] == made, said
    # The version numbers, as the Generate page; the batch's seed (a drawn one was only in
    # --json), whole on its line; the pictures.
    assert [facts[2:] for facts, _ in found] == [
        ["version 2, LoRA scale 0.7", f"seed {second['seed']}, 1 picture"],
        ["version 1, LoRA scale 0.7", f"seed {first['seed']}, 2 pictures"]], said
    # The trigger word comes first; a long prompt is shortened, its words whole.
    assert found[1][1].endswith(", on a beach at dawn"), said
    assert found[0][1].startswith("a photo of ")
    assert ", in a forest with tall trees with tall trees" in found[0][1], said
    assert found[0][1].endswith("...")
    api = client.get("/api/generations", headers=h)
    assert api.status_code == 200
    assert as_json("generations", "list", "--user", "ann") == api.json()
    # A page at a time, as the API's limit and before.
    page = as_json("generations", "list", "--user", "ann", "--limit", "1")
    assert [g["id"] for g in page["generations"]] == [second["id"]]
    code, said = run("generations", "list", "--user", "ann", "--limit", "1")
    assert code == 0, said
    assert said.strip().splitlines()[-1] == f"older ones: add --before {page['older']}"
    older = as_json("generations", "list", "--user", "ann", "--before", page["older"])
    assert [g["id"] for g in older["generations"]] == [first["id"]]
    assert older == client.get("/api/generations", params={"before": page["older"]},
                               headers=h).json()


def test_generations_of_a_user_with_none_or_unknown(trained: Services) -> None:
    trained.users.create(name="cy")
    code, said = run("generations", "list", "--user", "cy")
    assert code == 0, said
    assert said.strip() == "cy has no generations"
    code, said = run("generations", "list", "--user", "nobody")
    assert code == 1, said
    assert said.strip() == ("error: no user named 'nobody'; create one with 'selfie-lora "
                            "users create'")
    code, said = run("generations", "list", "--user", "ann", "--limit", "0")
    assert code == 1, said
    assert said.strip() == "error: limit must be 1 to 200"


def test_generations_delete_deletes_one_as_the_api(trained: Services,
                                                   client: TestClient) -> None:
    h = ann_headers(trained)
    kept = generated(client, h, "on a beach")
    gone = generated(client, h, "on a hike", n=2)
    code, said = run("generations", "delete", gone["id"], "--user", "ann")
    assert code == 0, said
    # After the service's log line.
    assert said.strip().splitlines()[-1] == (f"deleted generation {gone['id']} of ann and its "
                                             "2 picture(s)")
    listed = as_json("generations", "list", "--user", "ann")["generations"]
    assert [g["id"] for g in listed] == [kept["id"]]
    assert client.get(f"/api/generations/{gone['id']}/images/0", headers=h).status_code == 404
    # Again, or another user's: the API's 404 and its words, and nothing deleted.
    bob = auth(trained, "bob")
    api = client.delete(f"/api/generations/{kept['id']}", headers=bob)
    assert api.status_code == 404
    for generation_id, name in ((gone["id"], "ann"), (kept["id"], "bob"), ("nope", "ann")):
        code, said = run("generations", "delete", generation_id, "--user", name)
        assert code == 1, said
        assert said.strip() == f"error: {api.json()['error']['message']}" == (
            "error: no such generation")
    assert [g["id"] for g in as_json("generations", "list", "--user", "ann")["generations"]] \
        == [kept["id"]]
    code, said = run("generations", "delete", kept["id"], "--user", "nobody")
    assert code == 1, said
    assert said.startswith("error: no user named 'nobody'")
