"""The OpenAPI document declares every error answer an /api route gives, in the app's shape:
what every route can answer (the guard's 401, 403 for a disabled account, 408 and 413 for a
body; 500, 503), and each route's own codes, named in the status's description."""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient

from selfie_lora.wiring import Services
from tests.conftest import auth, wait_terminal
from tests.support.photos import photo_zip, synthetic_photo

ERROR = {"$ref": "#/components/schemas/ErrorAnswer"}
EVERY_ROUTE = {"401", "403", "500", "503"}
WITH_BODY = {"408", "413"}


def api_operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, operation) for path, operations in doc["paths"].items()
            for method, operation in operations.items()
            if path.startswith("/api/") and not path.startswith("/api/webhooks/")]


def test_every_api_operation_declares_the_errors_every_route_can_give(
        client: TestClient) -> None:
    doc = client.app.openapi()  # type: ignore[attr-defined]
    # FastAPI's {"detail": [...]} is never what the app answers: it is declared nowhere.
    assert "HTTPValidationError" not in json.dumps(doc)
    operations = api_operations(doc)
    assert len(operations) >= 25
    for path, method, operation in operations:
        responses = operation["responses"]
        wanted = EVERY_ROUTE | (WITH_BODY if method in ("post", "patch", "delete") else set())
        assert wanted <= set(responses), (method, path, sorted(responses))
        assert "disabled" in responses["403"]["description"], (method, path)
        assert "server_stopping" in responses["503"]["description"], (method, path)
        # Old code: no Retry-After declared on any 503.
        assert "Retry-After" in responses["503"]["headers"], (method, path)
        assert "reference" in responses["500"]["description"], (method, path)
        for status, answer in responses.items():
            if status[0] in "45" and status != "416":  # a Range past the end: no body
                assert answer["content"]["application/json"]["schema"] == ERROR, (path, status)
    paths = doc["paths"]
    assert "502" in paths["/api/generate"]["post"]["responses"]
    assert "server_short_of_memory" in (
        paths["/api/training/upload-zip"]["post"]["responses"]["503"]["description"])
    patch_403 = paths["/api/model"]["patch"]["responses"]["403"]["description"]
    assert "trainer_not_allowed" in patch_403
    assert "disabled" in patch_403
    conflicts = paths["/api/training/start"]["post"]["responses"]["409"]["description"]
    assert "user_exists" not in conflicts
    assert "webhook" not in conflicts
    for code in ("base_model_mismatch", "photos_need_upload_again", "upload_in_progress"):
        assert code in conflicts
    assert "not_resumable" in paths["/api/training/resume"]["post"]["responses"]["409"][
        "description"]
    # Old code: "ask again in a moment", which deletion_pending's own sentence refuses.
    assert "do not ask again" in paths["/api/me"]["delete"]["responses"]["503"]["description"]


def test_the_codes_the_routes_answer_are_in_their_declared_descriptions(
        client: TestClient, services: Services) -> None:
    doc = client.app.openapi()  # type: ignore[attr-defined]
    ann = auth(services, "ann")
    disabled = auth(services, "dan")
    services.users.disable(name="dan")
    big = {"dataset_id": "x" * (services.settings.max_json_bytes + 10)}
    asked = [
        ("get", "/api/model", "/api/model", disabled, None),
        ("post", "/api/keys/{key_id}/rotate", "/api/keys/k/rotate", disabled, None),
        ("post", "/api/training/start", "/api/training/start", ann, None),
        ("post", "/api/training/start", "/api/training/start", ann, big),
        ("patch", "/api/model", "/api/model", ann, {}),
        ("get", "/api/training/{training_id}/samples/{step}", "/api/training/t/samples/abc",
         ann, None),
        ("get", "/api/generations/{generation_id}/images/{index}",
         "/api/generations/g/images/abc", ann, None),
        ("post", "/api/keys", "/api/keys", ann, {"name": "   "}),
        ("post", "/api/generate", "/api/generate", ann, {"prompt": "   "}),
    ]
    seen = set()

    def declares(method: str, template: str, url: str, r: Any) -> None:
        code = r.json()["error"]["code"]
        seen.add(code)
        declared = doc["paths"][template][method]["responses"]
        assert str(r.status_code) in declared, (method, url, r.status_code, code)
        assert code in declared[str(r.status_code)]["description"], (method, url, code)

    for method, template, url, headers, body in asked:
        declares(method, template, url, client.request(method.upper(), url, headers=headers,
                                                       json=body))
    photo = synthetic_photo(1, size=32)
    sent = [  # photos sent one by one, refused as a whole before any is read
        [("files", ("a.jpg", photo, "image/jpeg")), ("files", ("a.jpg", photo, "image/jpeg"))],
        [("files", ("x" * 300 + ".jpg", photo, "image/jpeg"))],
        [("files", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(201)],
    ]
    for files in sent:
        declares("post", "/api/training/upload", "/api/training/upload",
                 client.post("/api/training/upload", headers=ann, files=files))
    assert {"forbidden", "no_dataset", "body_too_large", "empty_patch", "invalid_request",
            "invalid_name", "empty_prompt", "duplicate_member", "name_too_long",
            "too_many_members"} <= seen


def test_a_key_name_empty_or_too_long_is_invalid_name_as_documented(
        client: TestClient, services: Services) -> None:
    ann = auth(services, "ann")
    for name in ("", "a" * 101, "   ", "a\tb"):
        r = client.post("/api/keys", headers=ann, json={"name": name})
        assert r.status_code == 422, (name, r.text)
        assert r.json()["error"]["code"] == "invalid_name", name
    r = client.post("/api/keys", headers=ann, json={"name": "a" * 100})
    assert r.status_code == 201, r.text


def test_the_file_routes_declare_their_media_types_and_the_weights_their_ranges(
        client: TestClient) -> None:
    paths = client.app.openapi()["paths"]  # type: ignore[attr-defined]
    files = {"/api/training/{training_id}/samples/{step}": "image/jpeg",
             "/api/model/versions/{version_id}/quality/probes/{index}": "image/png",
             "/api/generations/{generation_id}/images/{index}": "image/png",
             "/api/model/compare/grid.png": "image/png",
             "/api/model/quality/chart.png": "image/png",
             "/api/model/versions/{version_id}/weights": "application/octet-stream"}
    for path, media_type in files.items():
        assert set(paths[path]["get"]["responses"]["200"]["content"]) == {media_type}, path
    for method in ("get", "head"):
        weights = paths["/api/model/versions/{version_id}/weights"][method]["responses"]
        assert {"206", "307", "416"} <= set(weights), method
        assert "Location" in weights["307"]["headers"]


def declared_fields(doc: dict[str, Any], schema: dict[str, Any]) -> set[str]:
    ref = schema["$ref"].rsplit("/", 1)[-1]
    return set(doc["components"]["schemas"][ref]["properties"])


def sub(doc: dict[str, Any], schema: dict[str, Any], field: str) -> dict[str, Any]:
    ref = schema["$ref"].rsplit("/", 1)[-1]
    prop = doc["components"]["schemas"][ref]["properties"][field]
    return next(p for p in prop.get("anyOf", [prop]) if "$ref" in p)


def test_the_most_used_answers_declare_the_fields_they_answer(
        client: TestClient, services: Services) -> None:
    doc = client.app.openapi()  # type: ignore[attr-defined]
    paths = doc["paths"]

    def schema(path: str, method: str) -> dict[str, Any]:
        return paths[path][method]["responses"]["200"]["content"]["application/json"]["schema"]

    ann = auth(services, "ann")
    for _ in range(2):  # two versions, to compare
        r = client.post("/api/training/upload-zip", headers=ann,
                        files={"file": ("p.zip", photo_zip(4), "application/zip")})
        assert r.status_code == 202, r.text
        wait_terminal(client, ann, r.json()["training"]["id"])
    progress = client.get("/api/training/progress", headers=ann).json()
    model = client.get("/api/model", headers=ann).json()
    patched = client.patch("/api/model", headers=ann, json={"lora_scale": 0.8}).json()
    generated = client.post("/api/generate", headers=ann, json={"prompt": "a hike"}).json()
    compared = client.get("/api/model/compare", headers=ann).json()

    got = schema("/api/training/progress", "get")
    assert declared_fields(doc, got) == set(progress)
    assert declared_fields(doc, sub(doc, got, "training")) == set(progress["training"])
    assert declared_fields(doc, schema("/api/model", "get")) == set(model)
    version = sub(doc, schema("/api/model", "get"), "active_version")
    assert declared_fields(doc, version) == set(model["active_version"])
    assert declared_fields(doc, schema("/api/model", "patch")) == set(patched)
    got = schema("/api/generate", "post")
    assert declared_fields(doc, sub(doc, got, "generation")) == set(generated["generation"])
    assert "withheld" in generated["generation"]
    got = schema("/api/model/compare", "get")
    assert declared_fields(doc, got) == set(compared)
    assert declared_fields(doc, sub(doc, got, "scores")) == set(compared["scores"])
    assert {"stale_a", "stale_b"} <= set(compared["scores"])


def test_the_training_and_version_routes_declare_their_success_answers(
        client: TestClient, services: Services) -> None:
    """Upload, start, resume, cancel, the versions and activate name their answer's schema for
    their success code (the old document: an untyped object, and no Dataset at all), with the
    fields the routes answer."""
    doc = client.app.openapi()  # type: ignore[attr-defined]
    paths = doc["paths"]

    def schema(path: str, status: str) -> dict[str, Any]:
        content = paths[path]["post" if path != "/api/model/versions" else "get"][
            "responses"][status]["content"]["application/json"]
        return content["schema"]  # type: ignore[no-any-return]

    expected = {"/api/training/upload-zip": ("202", "Uploaded"),
                "/api/training/upload": ("202", "Uploaded"),
                "/api/training/start": ("202", "Started"),
                "/api/training/resume": ("202", "Started"),
                "/api/training/cancel": ("200", "Canceled"),
                "/api/model/versions": ("200", "Versions"),
                "/api/model/versions/{version_id}/activate": ("200", "ModelAnswer")}
    for path, (status, name) in expected.items():
        # Old code: {"type": "object", "additionalProperties": true} and no $ref.
        assert schema(path, status).get("$ref") == f"#/components/schemas/{name}", path
    dataset = doc["components"]["schemas"]["DatasetAnswer"]["properties"]
    assert {"id", "images_total", "images_accepted", "findings"} <= set(dataset)
    assert set(doc["components"]["schemas"]["FindingAnswer"]["properties"]) >= {
        "severity", "code", "message", "advice", "photo"}

    # The real answers have the declared fields, no more and no fewer.
    ann = auth(services, "ann")
    r = client.post("/api/training/upload-zip", headers=ann,
                    files={"file": ("p.zip", photo_zip(4), "application/zip")})
    assert r.status_code == 202, r.text
    uploaded = r.json()
    got = schema("/api/training/upload-zip", "202")
    assert declared_fields(doc, got) == set(uploaded)
    assert declared_fields(doc, sub(doc, got, "dataset")) == set(uploaded["dataset"])
    assert declared_fields(doc, sub(doc, got, "training")) == set(uploaded["training"])
    assert declared_fields(doc, sub(doc, got, "model")) == set(uploaded["model"])
    wait_terminal(client, ann, uploaded["training"]["id"])
    r = client.post("/api/training/upload", headers=ann, data={"start": "false"},
                    files=[("files", (f"p{i}.jpg", synthetic_photo(i), "image/jpeg"))
                           for i in range(4)])
    assert r.status_code == 202, r.text
    assert declared_fields(doc, schema("/api/training/upload", "202")) == set(r.json())
    r = client.post("/api/training/start", headers=ann, json={})
    assert r.status_code == 202, r.text
    started = r.json()
    got = schema("/api/training/start", "202")
    assert declared_fields(doc, got) == set(started)
    assert declared_fields(doc, sub(doc, got, "training")) == set(started["training"])
    r = client.post("/api/training/cancel", headers=ann,
                    json={"training_id": started["training"]["id"]})
    assert r.status_code == 200, r.text
    assert declared_fields(doc, schema("/api/training/cancel", "200")) == set(r.json())
    versions = client.get("/api/model/versions", headers=ann).json()
    got = schema("/api/model/versions", "200")
    assert declared_fields(doc, got) == set(versions)
    item = doc["components"]["schemas"]["Versions"]["properties"]["versions"]["items"]
    assert declared_fields(doc, item) == set(versions["versions"][0])
    r = client.post("/api/model/versions/v1/activate", headers=ann)
    assert r.status_code == 200, r.text
    got = schema("/api/model/versions/{version_id}/activate", "200")
    assert declared_fields(doc, got) == set(r.json())
