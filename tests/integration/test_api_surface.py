"""The API as its users' tools see it: API keys (list, create, revoke, rotate), the OpenAPI
document (the bearer scheme, the error answers), docs that work offline, one rule for naming
versions, WWW-Authenticate on 401, and a set-up error that is not blamed on the photos."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from selfie_lora.api.app import create_app
from selfie_lora.api.server import uvicorn_options
from selfie_lora.config import Settings
from selfie_lora.errors import ConfigError
from selfie_lora.testing.fakes import FakeFaceAnalyzer, FakeGenerator, FakeTrainer
from selfie_lora.wiring import Services, build_services
from tests.conftest import auth, make_settings, one_person_analyzer, wait_terminal
from tests.support.photos import photo_zip
from tests.support.served import served


def trained(client: TestClient, headers: dict[str, str]) -> dict[str, Any]:
    r = client.post("/api/training/upload-zip", headers=headers,
                    files={"file": ("p.zip", photo_zip(4), "application/zip")})
    assert r.status_code == 202, r.text
    return wait_terminal(client, headers, r.json()["training"]["id"])


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def test_api_keys_are_listed_created_revoked_and_rotated(client: TestClient,
                                                         services: Services) -> None:
    first = auth(services, "ann")
    listed = client.get("/api/keys", headers=first).json()["keys"]
    assert [(k["name"], k["active"]) for k in listed] == [("default", True)]
    assert set(listed[0]) == {"id", "name", "prefix", "created_at", "revoked_at", "replaced_by",
                              "active"}

    r = client.post("/api/keys", headers=first, json={"name": "ci"})
    assert r.status_code == 201, r.text
    ci, ci_secret = r.json()["key"], r.json()["secret"]
    assert ci_secret.startswith(ci["prefix"])
    assert client.get("/api/model", headers=bearer(ci_secret)).status_code == 404  # it works

    r = client.post(f"/api/keys/{ci['id']}/rotate", headers=first)
    assert r.status_code == 201, r.text
    rotated_secret = r.json()["secret"]
    assert r.json()["key"]["name"] == "ci"
    assert client.get("/api/model", headers=bearer(rotated_secret)).status_code == 404
    old = next(k for k in client.get("/api/keys", headers=first).json()["keys"]
               if k["id"] == ci["id"])
    # The old key works until the rotation's grace ends, unless revoked: then it stops at once.
    assert (old["active"], old["replaced_by"]) == (True, r.json()["key"]["id"])
    assert old["revoked_at"] > r.json()["key"]["created_at"]
    assert client.get("/api/model", headers=bearer(ci_secret)).status_code == 404
    assert client.delete(f"/api/keys/{ci['id']}", headers=first).status_code == 200
    assert client.get("/api/model", headers=bearer(ci_secret)).status_code == 401

    default_id = listed[0]["id"]
    r = client.delete(f"/api/keys/{default_id}", headers=bearer(rotated_secret))
    assert r.status_code == 200
    assert r.json()["key"]["active"] is False
    denied = client.get("/api/keys", headers=first)
    assert denied.status_code == 401
    assert denied.headers["www-authenticate"] == "Bearer"
    keys = client.get("/api/keys", headers=bearer(rotated_secret)).json()["keys"]
    assert [k["active"] for k in keys] == [False, False, True]


# Old code: 401 to the retry, and to every other call, of a client whose rotation answer was lost.
def test_a_rotation_asked_again_with_the_old_key_answers_a_key_that_works(
        client: TestClient, services: Services) -> None:
    held = auth(services, "ann")  # all an API-only user has
    key_id = client.get("/api/keys", headers=held).json()["keys"][0]["id"]
    lost = client.post(f"/api/keys/{key_id}/rotate", headers=held)  # its answer never arrives
    assert lost.status_code == 201
    r = client.post(f"/api/keys/{key_id}/rotate", headers=held)
    assert r.status_code == 201, r.text
    secret = r.json()["secret"]
    assert client.get("/api/model", headers=bearer(secret)).status_code == 404  # it works
    assert client.get("/api/model", headers=bearer(lost.json()["secret"])).status_code == 401
    keys = {k["id"]: k for k in client.get("/api/keys", headers=bearer(secret)).json()["keys"]}
    assert keys[key_id]["replaced_by"] == r.json()["key"]["id"]
    assert [k["active"] for k in keys.values()] == [True, False, True]


def test_a_rotated_key_rotated_again_by_another_caller_is_refused_and_its_successor_works(
        client: TestClient, services: Services) -> None:
    """Any rotation of a key in its grace was taken for the lost answer's retry, and revoked the
    successor at once (found in review): a deploy script that had received it and switched to
    it got 401, when its user rotated the old key again from another key. Only a request made
    with the rotated key itself now asks again; another caller is told where the key went."""
    deploy = auth(services, "ann")
    key_id = client.get("/api/keys", headers=deploy).json()["keys"][0]["id"]
    laptop = bearer(client.post("/api/keys", headers=deploy, json={"name": "laptop"}
                                ).json()["secret"])
    r = client.post(f"/api/keys/{key_id}/rotate", headers=deploy)
    assert r.status_code == 201, r.text
    successor, delivered = r.json()["key"], bearer(r.json()["secret"])
    r = client.post(f"/api/keys/{key_id}/rotate", headers=laptop)
    assert r.status_code == 422, r.text  # it was 201, and the delivered successor revoked
    until = datetime.fromisoformat(client.get("/api/keys", headers=laptop).json()["keys"][0][
        "revoked_at"])
    [details] = r.json()["error"]["details"]
    assert details["replaced_by"] == successor["id"]
    assert datetime.fromisoformat(details["works_until"]) == until
    assert r.json()["error"]["message"].startswith(
        f"that key was rotated already, to key {successor['id']}, and works until "
        f"{until.astimezone(UTC):%Y-%m-%d %H:%M} UTC: rotate or revoke that key instead")
    assert client.get("/api/model", headers=delivered).status_code == 404  # it still works


def test_another_users_key_is_404_and_unknown_fields_422(client: TestClient,
                                                        services: Services) -> None:
    ann, bob = auth(services, "ann"), auth(services, "bob")
    bobs = client.get("/api/keys", headers=bob).json()["keys"][0]["id"]
    assert client.delete(f"/api/keys/{bobs}", headers=ann).status_code == 404
    assert client.post(f"/api/keys/{bobs}/rotate", headers=ann).status_code == 404
    assert client.post("/api/keys", headers=ann, json={"name": "x", "admin": True}
                       ).status_code == 422


def test_the_openapi_document_declares_the_bearer_scheme_and_the_error_answers(
        client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer",
        "description": "an API key from `selfie-lora users create`"}
    upload = doc["paths"]["/api/training/upload-zip"]["post"]
    assert upload["security"] == [{"apiKey": []}]
    assert {"401", "409", "413", "422"} <= set(upload["responses"])
    error = upload["responses"]["409"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorAnswer"}
    assert set(doc["components"]["schemas"]["ErrorDetail"]["properties"]) == {
        "code", "message", "details"}
    for path, operations in doc["paths"].items():
        for operation in operations.values():
            if path.startswith("/api/") and not path.startswith("/api/webhooks/"):
                assert operation.get("security") == [{"apiKey": []}], path
                assert "401" in operation["responses"], path
    assert "security" not in doc["paths"]["/api/webhooks/replicate"]["post"]


def test_the_docs_pages_load_their_assets_from_this_server(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    assert "cdn" not in page.text.lower()
    import re

    assets = re.findall(r'(?:src|href)="(/[^"]+\.(?:js|css))"', page.text)
    assert assets, page.text[:500]
    for asset in assets:
        r = client.get(asset)
        assert r.status_code == 200, asset
        assert len(r.content) > 10_000


def test_the_docs_page_s_urls_all_carry_the_root_path(settings: Settings, services: Services) -> None:
    """Behind a proxy that mounts the app under a root_path, /docs prefixed its document and
    assets but not Swagger UI's OAuth2 redirect URL, which pointed outside the app (FastAPI's
    own /docs prefixes it too)."""
    app = create_app(settings, services=services, run_worker=False)
    with TestClient(app, root_path="/selfie") as c:
        page = c.get("/docs").text
    assert "'/selfie/openapi.json'" in page
    assert "window.location.origin + '/selfie/docs/oauth2-redirect'" in page


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/docs/oauth2-redirect"])
def test_the_docs_pages_are_sent_with_the_pages_security_headers(client: TestClient,
                                                                  path: str) -> None:
    """/docs and /redoc (FastAPI's pages, served by fastapi_offline) came with none of the
    headers every page gets: no CSP, no frame protection, no nosniff, and no lang on <html>
    (a11y and headers review). They have them now; the CSP allows each inline script of the
    page by its hash, never 'unsafe-inline' for scripts (tests/browser/test_forms.py:
    the pages still work under it)."""
    page = client.get(path)
    assert page.status_code == 200
    assert page.headers["x-frame-options"] == "DENY"  # old code: KeyError
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "same-origin"
    policy = dict(part.strip().split(" ", 1) for part in
                  page.headers["content-security-policy"].split(";"))
    assert policy["frame-ancestors"] == "'none'"
    assert policy["object-src"] == "'none'"
    scripts = policy["script-src"].split()
    assert "'unsafe-inline'" not in scripts
    assert "'unsafe-eval'" not in scripts
    inline = re.findall(r"<script>(.*?)</script>", page.text, re.S)
    assert [s for s in scripts if s.startswith("'sha256-")] == [
        "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
        for script in inline]
    if path != "/docs/oauth2-redirect":  # its own page says lang="en-US"
        assert '<html lang="en">' in page.text


@pytest.mark.parametrize("asset", ["swagger-ui-bundle.js", "swagger-ui.css", "favicon.png",
                                   "redoc.standalone.js"])
def test_the_docs_pages_files_are_sent_with_nosniff_as_every_static_file(
        client: TestClient, asset: str) -> None:
    """The files of /docs and /redoc (fastapi_offline's, under /static-offline-docs) were the
    only static files sent without X-Content-Type-Options: nosniff (they live under the API's
    paths, which SecurityHeaders skipped). Now they have it, and still no page's CSP."""
    served = client.get(f"/static-offline-docs/{asset}")
    assert served.status_code == 200
    assert served.headers.get("x-content-type-options") == "nosniff"  # old code: None
    assert "content-security-policy" not in served.headers  # a file, not a page
    ours = client.get("/static/style.css")
    assert ours.status_code == 200
    assert ours.headers["x-content-type-options"] == "nosniff"  # as the pages' own files


def test_versions_are_named_by_id_or_number_everywhere(client: TestClient,
                                                       services: Services) -> None:
    h = auth(services, "ann")
    v1 = trained(client, h)["model"]["active_version"]
    trained(client, h)
    for ref in ("1", "v1", v1["id"]):
        r = client.post(f"/api/model/versions/{ref}/activate", headers=h)
        assert r.status_code == 200, r.text
        assert r.json()["active_version"]["number"] == 1
        assert client.get(f"/api/model/versions/{ref}/quality", headers=h).status_code == 200
        assert client.get(f"/api/model/versions/{ref}/weights", headers=h).status_code == 200
        gen = client.post("/api/generate", headers=h, json={"prompt": "x", "version_id": ref})
        assert gen.json()["generation"]["version_id"] == v1["id"]
    # b is the first version: a is the newest other one, not "no other version".
    r = client.get("/api/model/compare", params={"b": "1"}, headers=h)
    assert r.status_code == 200, r.text
    assert (r.json()["a"]["number"], r.json()["b"]["number"]) == (2, 1)
    assert client.post("/api/model/versions/v9/activate", headers=h).status_code == 404


class NotInstalled(FakeFaceAnalyzer):
    def ready(self) -> None:
        raise ConfigError("face checks need dlib: pip install 'selfie-lora[faces]'")


@pytest.fixture
def no_face_tools(tmp_path: Path) -> Iterator[tuple[TestClient, Services]]:
    settings = make_settings(tmp_path)
    services = build_services(settings, trainers={"local": FakeTrainer()},
                              generators={"local": FakeGenerator()},
                              face_analyzer=NotInstalled(embed=lambda _image: None))
    with TestClient(create_app(settings, services=services),
                    raise_server_exceptions=False) as client:
        yield client, services
    services.close()


def test_missing_face_tools_are_one_setup_error_not_a_finding_per_photo(
        no_face_tools: tuple[TestClient, Services], caplog: pytest.LogCaptureFixture) -> None:
    client, services = no_face_tools
    h = auth(services, "ann")
    r = client.post("/api/training/upload-zip", headers=h,
                    files={"file": ("p.zip", photo_zip(4), "application/zip")})
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["code"] == "config_error"
    # What to install is the operator's to read, in the log: the client is told it is not set up.
    assert error["message"] == "this service is not set up for that yet; please tell the operator"
    assert [set(d) for d in error["details"]] == [{"reference"}]  # no per-photo findings
    assert "pip install" in caplog.text


def test_an_api_405_names_every_method_its_address_takes(client: TestClient,
                                                          services: Services) -> None:
    # HTTP's 405 must carry Allow; the JSON answer had none (the pages' had), and Starlette's
    # own names the first route's methods alone (GET for /api/model, whose PATCH is another).
    h = auth(services, "ann")
    wrong = client.delete("/api/model", headers=h)
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "method_not_allowed"
    assert set(wrong.headers["Allow"].split(", ")) >= {"GET", "PATCH"}
    assert client.put("/api/keys", headers=h).headers["Allow"] == "GET, HEAD, POST"


@pytest.mark.parametrize("root", ["", "/selfie"])
def test_a_trailing_slash_is_redirected_to_the_same_host_and_root_path(
        settings: Settings, services: Services, root: str) -> None:
    """/api/model/ was answered 307 to an absolute URL made of the request's Host header and
    the connection's scheme (Starlette's redirect_slashes): behind a proxy sending its upstream's
    Host, or ending TLS, that led to the internal host, or from https to http, where clients
    drop the API key (found in review). Now the Location is relative (root path and query
    kept), for every method (307 keeps a POST's method and body); a path with no route
    slashless is 404 as before, and a redirect never leads to "//" (another host)."""
    headers = {**auth(services, "ann"), "Host": "internal:8000"}
    with TestClient(create_app(settings, services=services, run_worker=False),
                    root_path=root, base_url="https://selfie.example",
                    raise_server_exceptions=False) as c:
        for method, path, query in (("GET", "/api/model/", "?x=1"), ("HEAD", "/api/model//", ""),
                                    ("PATCH", "/api/model/", ""), ("POST", "/api/keys/", ""),
                                    ("GET", "/signin/", "?next=/versions"),
                                    ("GET", "/healthz/", "")):
            r = c.request(method, f"{root}{path}{query}", headers=headers,
                          follow_redirects=False)
            assert r.status_code == 307, (method, path)
            # old code: https://internal:8000... with a Host of another, http://... behind TLS
            assert r.headers["location"] == f"{root}{path.rstrip('/')}{query}", (method, path)
        created = c.post(f"{root}/api/keys/", json={"name": "ci"}, headers=headers,
                         follow_redirects=True)
        assert created.status_code == 201  # its body went with the POST sent again
        assert created.url == f"https://selfie.example{root}/api/keys"
        for path in ("//api/model", "/nothing/", "//nothing/", f"/{'%2F'}nothing/"):
            r = c.get(f"https://selfie.example{root}{path}", headers=headers,
                      follow_redirects=False)
            assert r.status_code == 404, path


def test_the_api_answers_under_a_root_path(settings: Settings, services: Services) -> None:
    """Served under a prefix (uvicorn --root-path /sl), GET /sl/api/keys with a valid key was a
    401 HTML page: the guard and is_page read the path with the root path on, so every API call
    was taken for a page and its key never read (found in review). Now every decision by path
    reads it without the root path (api.paths.app_path), as the router matches it."""
    headers = auth(services, "ann")
    with TestClient(create_app(settings, services=services, run_worker=False),
                    root_path="/sl", raise_server_exceptions=False) as c:
        keys = c.get("/sl/api/keys", headers=headers)
        assert keys.status_code == 200, keys.text  # old code: 401 text/html
        assert [k["name"] for k in keys.json()["keys"]] == ["default"]
        refused = c.get("/sl/api/keys")
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "unauthorized"
        assert refused.headers["www-authenticate"] == "Bearer"
        missing = c.get("/sl/api/model", headers=headers)
        assert (missing.status_code, missing.json()["error"]["code"]) == (404, "not_found")
        wrong = c.delete("/sl/api/model", headers=headers)
        assert wrong.status_code == 405
        assert wrong.headers["allow"] == "GET, HEAD, PATCH"
        assert wrong.json()["error"]["code"] == "method_not_allowed"
        assert "content-security-policy" not in keys.headers  # the pages' headers, not JSON's
        assert c.get("/sl/healthz").json() == {"status": "ok"}
        assert c.get("/sl/openapi.json").json()["info"]["title"] == "selfie-lora"
        style = c.get("/sl/static/style.css")
        assert style.status_code == 200
        assert style.headers["content-type"].startswith("text/css")
        assert c.get("/sl/static/nothing.css").status_code == 404


def test_the_urls_of_answers_carry_the_root_path(settings: Settings,
                                                 services: Services) -> None:
    """Without SELFIE_LORA_PUBLIC_URL the URLs in answers are paths: /api/... led outside an
    app served under /sl. They start with the root path now, and lead to what they name."""
    headers = auth(services, "ann")
    with TestClient(create_app(settings, services=services, run_worker=True),
                    root_path="/sl", raise_server_exceptions=False) as c:
        r = c.post("/sl/api/training/upload-zip", headers=headers,
                   files={"file": ("p.zip", photo_zip(4), "application/zip")})
        assert r.status_code == 202, r.text
        wait_terminal(c, headers, r.json()["training"]["id"])
        active = c.get("/sl/api/model", headers=headers).json()["active_version"]
        assert active["weights_url"].startswith("/sl/api/model/versions/")  # old code: /api/...
        assert c.get(active["weights_url"], headers=headers).status_code == 200


@pytest.mark.parametrize("path", ["//api/model", "///api/keys", "//api//model"])
def test_a_path_under_api_with_doubled_slashes_gets_the_api_s_json_404(
        client: TestClient, services: Services, path: str) -> None:
    """//api/model was answered with the pages' HTML 404 (is_page read it as a page: it does
    not start with /api/), where an API client expects the API's JSON error (found in review).
    Its runs of slashes are read as one now; no route takes it, so it stays a 404."""
    for headers in ({}, auth(services, "ann")):
        r = client.get(f"http://testserver{path}", headers=headers)
        assert r.status_code == 404
        assert r.headers["content-type"] == "application/json"  # old code: text/html
        assert r.json()["error"]["code"] == "not_found"
        assert "content-security-policy" not in r.headers
    page = client.get("http://testserver//nothing")
    assert page.status_code == 404
    assert page.headers["content-type"].startswith("text/html")


@pytest.mark.parametrize(("public_url", "root", "given"), [
    ("https://lora.example/sl/", "/sl", None),
    # Another ASGI server's (or uvicorn --root-path's) root path may end in a slash: the
    # guard read '//api/keys' and refused the key (found in review: 401, the router matched).
    ("https://lora.example/sl/", "/sl", "/sl/"),
    # uvicorn writes the root path in ASCII: '/sélfie' dropped every request (UnicodeEncodeError
    # in h11_impl, the client: 'Server disconnected without sending a response').
    ("https://lora.example/s\u00e9lfie", "/s%C3%A9lfie", None),
])
def test_served_under_the_public_url_s_path_the_api_answers(
        tmp_path: Path, public_url: str, root: str, given: str | None) -> None:
    """`selfie-lora serve` had no way to be served under a prefix. SELFIE_LORA_PUBLIC_URL's path
    is uvicorn's root path now (api.server.uvicorn_options): behind a proxy that strips /sl, a
    request for /api/keys is the app's /sl/api/keys, and is answered as the API."""
    settings = make_settings(tmp_path, public_url=public_url)
    options = uvicorn_options(settings)
    assert options["root_path"] == root  # old code: KeyError; then '/s\u00e9lfie'
    svc = build_services(settings, trainers={"local": FakeTrainer()},
                         face_analyzer=one_person_analyzer(),
                         generators={"local": FakeGenerator()})
    try:
        headers = auth(svc, "ann")
        app = create_app(settings, services=svc, run_worker=False)
        with served(app, root_path=given or options["root_path"]) as running, \
                httpx.Client(base_url=running.base_url) as http:
            keys = http.get("/api/keys", headers=headers)  # the proxy took /sl off
            assert keys.status_code == 200, keys.text
            assert http.get("/api/keys").json()["error"]["code"] == "unauthorized"
            assert http.get("/static/style.css").status_code == 200
    finally:
        svc.close()


def test_an_app_s_routes_are_those_built_at_import_not_built_again(tmp_path: Path) -> None:
    """FastAPI's ``include_router`` built every API route and page route again for each app, at
    its first request (~0.1 s of CPU each: in every test's app). An app holds the routes its
    modules built, in the order they are matched (the API's before the pages'), and answers on
    them."""
    from selfie_lora.api import account, generation, keys, likeness, model, training, webhooks
    from selfie_lora.web import pages

    declared = [route for module in (training, model, likeness, generation, keys, account,
                                     webhooks, pages) for route in module.router.routes]
    settings = make_settings(tmp_path)
    svc = build_services(settings, trainers={"local": FakeTrainer()},
                         face_analyzer=one_person_analyzer(), generators={"local": FakeGenerator()})
    try:
        for _ in range(2):
            app = create_app(settings, services=svc)
            # By identity: Starlette's routes compare equal by path, endpoint and methods, so a
            # route built again would pass an equality.
            held = [route for route in app.router.routes
                    if any(route is mine for mine in declared)]
            assert len(held) == len(declared)
            assert all(a is b for a, b in zip(held, declared, strict=True))
            with TestClient(app) as client:
                assert client.get("/api/keys", headers=auth(svc, f"u{id(app)}")).status_code == 200
                assert client.get("/signin").status_code == 200
    finally:
        svc.close()


@pytest.mark.parametrize("options", [
    {"on_startup": [lambda: None]}, {"on_shutdown": [lambda: None]},
])
def test_add_routes_refuses_a_router_with_options_it_would_drop(options: dict[str, Any]) -> None:
    """``add_routes`` puts routes into an app as built; a router's start-up or shutdown
    handlers, which ``include_router`` would add to the app, are refused, not silently dropped."""
    from fastapi import APIRouter, FastAPI

    from selfie_lora.api.routes import add_routes

    router = APIRouter(**options)
    app = FastAPI()
    before = list(app.router.routes)
    with pytest.raises(ValueError, match=r"include it with app\.include_router"):
        add_routes(app, router)
    assert app.router.routes == before
