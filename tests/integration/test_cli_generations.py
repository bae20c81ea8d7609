"""``selfie-lora generations list`` and ``generations delete``: the gallery and its Delete button
from the command line, through the same service calls as ``GET /api/generations`` and
``DELETE /api/generations/{id}``, refusing what they refuse with their words."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from selfie_lora.wiring import Services
from tests.conftest import auth
from tests.integration.test_cli_model import ann_headers, as_json, run
from tests.integration.test_cli_out import trained as trained  # the fixture, re-exported


def generated(client: TestClient, headers: dict[str, str], prompt: str, *,
              version: int | None = None, n: int = 1) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, "num_outputs": n, "lora_scale": 0.7}
    if version is not None:
        body["version_id"] = version
    r = client.post("/api/generate", headers=headers, json=body)
    assert r.status_code == 200, r.text
    return dict(r.json()["generation"])


def rows(said: str) -> list[list[str]]:
    """The table's rows, each cell's lines joined by a space (the test terminal is 80 wide: a
    cell wraps, and the id, never wrapped, starts each row)."""
    found: list[list[str]] = []
    for line in said.splitlines():
        if not line.startswith("│"):
            continue
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if cells[0]:
            found.append(cells)
        else:
            found[-1] = [f"{a} {b}".strip() for a, b in zip(found[-1], cells, strict=True)]
    return found


def test_generations_lists_newest_first_as_the_api(trained: Services,
                                                    client: TestClient) -> None:
    h = ann_headers(trained)
    first = generated(client, h, "on a beach at dawn", version=1, n=2)
    second = generated(client, h, "in a forest " + "with tall trees " * 10)
    code, said = run("generations", "list", "--user", "ann")
    assert code == 0, said
    found = rows(said)
    assert [row[0] for row in found] == [second["id"], first["id"]], said
    assert [row[3] for row in found] == ["2", "1"]  # version numbers, as the Generate page
    assert [row[4] for row in found] == ["0.7", "0.7"]
    # The batch's seed (a drawn one was only in --json), as the Generate page shows it.
    assert [row[5] for row in found] == [str(second["seed"]), str(first["seed"])]
    assert [row[6] for row in found] == ["1", "2"]  # pictures
    # The trigger word comes first; a long prompt is shortened (a word may wrap inside).
    assert found[1][2].replace(" ", "").endswith("onabeachatdawn")
    assert found[0][2].endswith("...")
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
