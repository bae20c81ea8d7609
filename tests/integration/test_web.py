"""The web app through HTTP (the browser tests drive the same pages in Chromium): signing in and
out, CSRF on every form, the rate limit, session expiry, the upload's per-photo report, training,
versions, generation, API keys, the security headers, and another user's objects (404)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import html
import inspect
import io
import logging
import re
import threading
import time
import unicodedata
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import itsdangerous
import pytest
from fastapi.testclient import TestClient

from selfie_lora.adapters.db.repository import SqlRepository
from selfie_lora.adapters.passwords.argon2 import Argon2Hasher
from selfie_lora.api.app import create_app
from selfie_lora.api.server_errors import server_error_sentence
from selfie_lora.config import Settings
from selfie_lora.domain.entities import GateStatus, Recipe, Training, TrainingStatus, User, Version
from selfie_lora.domain.plan import (
    DEFAULT_LORA_SCALE,
    LORA_SCALE_MAX,
    LORA_SCALE_MIN,
    lora_scale_text,
)
from selfie_lora.errors import (
    ConflictError,
    DatabaseLockedError,
    DatabaseUnreachableError,
    ErrorCode,
    GenerationError,
    InvalidInputError,
    StorageError,
)
from selfie_lora.services.common import utcnow
from selfie_lora.services.layout import DEPLOYMENT_KEY, chart_key
from selfie_lora.services.likeness import grid_text
from selfie_lora.services.ports import BlobStream, ProgressSink, TrainingJob, TrainingResult
from selfie_lora.services.training import TrainingService
from selfie_lora.services.users import UserService
from selfie_lora.testing.fakes import FakeGenerator, FakeTrainer
from selfie_lora.web.app import WEB_ROOT
from selfie_lora.wiring import Services, build_services
from tests.conftest import make_settings, one_person_analyzer
from tests.integration.test_accounts import HookedHasher
from tests.support.asgi import multipart, traced_post_in_messages
from tests.support.clock import Clock
from tests.support.generations import held_generations
from tests.support.legacy import legacy_user
from tests.support.likeness import count_charts_drawn
from tests.support.owners import own_model
from tests.support.passwords import FAST_HASHER
from tests.support.photos import synthetic_photo
from tests.support.trainings import stepped_away_on_a_lock

PASSWORD = "a long password"


@pytest.fixture
def web_settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path, sign_in_max_failures=3)


def fake_services(settings: Settings, *, trainer: FakeTrainer | None = None,
                  generator: FakeGenerator | None = None,
                  password_hasher: Argon2Hasher = FAST_HASHER) -> Services:
    """The services the pages run on here: fakes for the trainer and the generator, one person's
    faces, a fast password hash."""
    return build_services(settings,
                          trainers={"local": FakeTrainer() if trainer is None else trainer},
                          generators={"local": FakeGenerator() if generator is None else generator},
                          face_analyzer=one_person_analyzer(), password_hasher=password_hasher)


@pytest.fixture
def svc(web_settings: Settings, fake_generator: FakeGenerator) -> Iterator[Services]:
    services = fake_services(web_settings, generator=fake_generator)
    services.users.create(name="ann", password=PASSWORD)
    services.users.create(name="bob", password=PASSWORD)
    yield services
    services.close()


def browser(settings: Settings, services: Services) -> TestClient:
    return TestClient(create_app(settings, services=services, run_worker=True),
                      raise_server_exceptions=False)


@pytest.fixture
def ann(web_settings: Settings, svc: Services) -> Iterator[TestClient]:
    with browser(web_settings, svc) as client:
        sign_in(client, "ann")
        yield client


def form_token(client: TestClient) -> str:
    """A sign-in form's token, as shown to this browser signed out (a signed-in browser is sent
    on from /signin: the form of a tab opened before, or of Back to it)."""
    sessions = [c for c in client.cookies.jar if c.name == "sl_session"]
    for cookie in sessions:
        client.cookies.jar.clear(cookie.domain, cookie.path, cookie.name)
    page = client.get("/signin")
    for cookie in sessions:
        client.cookies.jar.set_cookie(cookie)
    found = re.search(r'name="form_token" value="([^"]+)"', page.text)
    assert found, page.text
    return found.group(1)


def sign_in(client: TestClient, name: str, password: str = PASSWORD) -> None:
    r = client.post("/signin", data={"name": name, "password": password,
                                     "form_token": form_token(client), "next": "/photos"},
                    follow_redirects=False)
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/photos"


def sign_up(client: TestClient, name: str) -> httpx.Response:
    """The sign-up form sent as the page gives it, ``name`` with ``PASSWORD`` twice; its answer
    not followed."""
    return client.post("/signup", data={"name": name, "password": PASSWORD,
                                        "password_again": PASSWORD,
                                        "form_token": form_token(client)},
                       follow_redirects=False)


def csrf(client: TestClient, page: str = "/photos") -> str:
    found = re.search(r'name="csrf-token" content="([^"]+)"', client.get(page).text)
    assert found
    return found.group(1)


def key_form(client: TestClient, name: str) -> dict[str, str]:
    """The settings page's create-key form as the page gives it (its CSRF token and one-time
    nonce), with ``name``."""
    page = client.get("/settings").text
    nonce = re.search(r'name="form_nonce" value="([^"]+)"', page)
    token = re.search(r'name="csrf-token" content="([^"]+)"', page)
    assert nonce
    assert token
    return {"csrf_token": token.group(1), "form_nonce": nonce.group(1), "name": name}


def upload(client: TestClient, count: int = 4, *, extra: list[tuple[str, bytes]] = (),
           size: int = 128) -> tuple[int, str]:
    files = [("files", (f"p{i}.jpg", synthetic_photo(i, size=size), "image/jpeg"))
             for i in range(count)]
    files += [("files", (name, data, "image/jpeg")) for name, data in extra]
    r = client.post("/photos/upload", files=files, headers={"X-CSRF-Token": csrf(client)})
    return r.status_code, r.text


def train(client: TestClient) -> str:
    r = client.post("/train/start", data={"csrf_token": csrf(client)}, follow_redirects=False)
    assert r.status_code == 303, r.text
    deadline = time.monotonic() + 60
    while True:
        status = client.get("/train/status").text
        if 'id="ended"' in status:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.05)


def queue_a_training(services: Services, name: str) -> None:
    """A training of the user's latest photos queued in the database only (no worker is sent
    it), as one waiting its turn is."""
    user = services.users.get_by_name(name=name)
    model = services.repo.get_model_for_user(user.id)
    dataset = services.repo.latest_accepted_dataset(user.id)
    assert model is not None
    assert dataset is not None
    services.repo.add_training(Training(
        id="queued-one", model_id=model.id, dataset_id=dataset.id, backend="local",
        status=TrainingStatus.QUEUED, is_retraining=False, trigger_word=model.trigger_word,
        destination=model.destination, trainer_version=model.trainer_version,
        recipe=Recipe(name="local-tiny-v1", steps=4, lora_rank=4, learning_rate=1e-2,
                      resolution=64),
        preserved={}, created_at=utcnow()))


# ---------------------------------------------------------------------------- signing in


def test_pages_send_a_signed_out_browser_to_sign_in_and_back(web_settings: Settings,
                                                              svc: Services) -> None:
    with browser(web_settings, svc) as client:
        # The whole query comes back: "next" was encoded with its "&" left as it was, so the
        # sign-in page read /versions?a=1&b=2 as next=/versions?a=1 (found in review).
        r = client.get("/versions?a=1&b=2", follow_redirects=False)
        assert r.status_code == 303
        assert r.headers["location"] == "/signin?next=/versions%3Fa%3D1%26b%3D2"
        page = client.get(r.headers["location"])
        found = re.search(r'name="next" value="([^"]+)"', page.text)
        assert found
        assert html.unescape(found.group(1)) == "/versions?a=1&b=2"
        r = client.post("/signin", data={"name": "ann", "password": PASSWORD,
                                         "form_token": form_token(client),
                                         "next": html.unescape(found.group(1))},
                        follow_redirects=False)
        assert r.headers["location"] == "/versions?a=1&b=2"
        cookie = r.headers["set-cookie"]
        assert "sl_session=" in cookie
        assert "HttpOnly" in cookie
        assert "SameSite=lax" in cookie
        assert client.get("/versions").status_code == 200
        # After signing in, "next" never leads to another site.
        for target in ("https://evil.example/", "//evil.example/", "javascript:alert(1)",
                       "/\t/evil.example/", "evil.example"):
            r = client.post("/signin", data={"name": "ann", "password": PASSWORD,
                                             "form_token": form_token(client), "next": target},
                            follow_redirects=False)
            assert r.headers["location"] == "/photos", target
        # A backslash is refused: a browser reads a Location's "/\" as "//", another host.
        r = client.post("/signin", data={"name": "ann", "password": PASSWORD,
                                         "form_token": form_token(client),
                                         "next": "/\\evil.example"}, follow_redirects=False)
        assert r.headers["location"] == "/photos"


def test_a_wrong_password_and_an_unknown_name_look_the_same(web_settings: Settings,
                                                            svc: Services) -> None:
    with browser(web_settings, svc) as client:
        answers = []
        for name, password in (("ann", "not the password"), ("nobody", PASSWORD)):
            r = client.post("/signin", data={"name": name, "password": password,
                                             "form_token": form_token(client)})
            answers.append((r.status_code, re.search(r'role="alert">([^<]*)<', r.text)))
        assert [(s, m.group(1) if m else None) for s, m in answers] == [
            (401, "wrong name or password")] * 2
        assert "sl_session" not in client.cookies


def test_sign_in_is_rate_limited(web_settings: Settings, svc: Services) -> None:
    with browser(web_settings, svc) as client:
        for _ in range(3):
            r = client.post("/signin", data={"name": "ann", "password": "guess guess guess",
                                             "form_token": form_token(client)})
            assert r.status_code == 401
        r = client.post("/signin", data={"name": "ann", "password": PASSWORD,
                                         "form_token": form_token(client)})
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) > 0
        assert "too many failed sign-ins" in r.text
        assert "sl_session" not in client.cookies


def test_a_sign_in_form_can_be_sent_whichever_sign_in_page_was_shown_last(
        web_settings: Settings, svc: Services) -> None:
    """Each sign-in or sign-up page replaced the one form cookie: a second tab, or Back from
    "Create one", left a form whose sign-in was a 403 page (found in review)."""
    with browser(web_settings, svc) as client:
        first = form_token(client)  # a tab sent to sign in, on its way to /versions
        second = form_token(client)  # another tab
        client.get("/signup")  # "Create one", then Back
        r = client.post("/signin", data={"name": "ann", "password": PASSWORD,
                                         "form_token": first, "next": "/versions"},
                        follow_redirects=False)
        assert (r.status_code, r.headers.get("location")) == (303, "/versions"), r.text
        r = client.post("/signin", data={"name": "ann", "password": PASSWORD,
                                         "form_token": second, "next": "/generate"},
                        follow_redirects=False)
        assert (r.status_code, r.headers.get("location")) == (303, "/generate"), r.text


def test_a_head_of_the_sign_in_pages_sets_no_cookie(web_settings: Settings,
                                                   svc: Services) -> None:
    """HEAD /signin (a link checker, an uptime monitor, curl -I) ran as its GET and set the
    sign-in form's cookie (Set-Cookie: sl_form=...), though no form was shown to anyone. Now a
    HEAD answers the GET's status and other headers without it; the GET still sets it (the
    forms' double-submit token needs it)."""
    with browser(web_settings, svc) as client:
        for path in ("/signin", "/signup"):
            got = client.get(path)
            client.cookies.clear()
            head = client.head(path)
            assert head.status_code == got.status_code
            if got.status_code == 200:
                assert "sl_form=" in got.headers.get("set-cookie", ""), path
            assert "set-cookie" not in head.headers, (path, head.headers)  # old code: sl_form
            assert client.cookies.get("sl_form") is None


def test_an_expired_sign_in_form_is_shown_again_with_the_name_and_next_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A form left open too long was a bare 403 page that lost the name and where to go."""
    from itsdangerous.timed import TimestampSigner

    settings = make_settings(tmp_path, signup=True)
    services = fake_services(settings)
    services.users.create(name="ann", password=PASSWORD)
    with closing(services), browser(settings, services) as client:
        token = form_token(client)
        # Two days later (a form is good for one).
        later = int(time.time()) + 2 * 86400
        monkeypatch.setattr(TimestampSigner, "get_timestamp", lambda self: later)
        r = client.post("/signin", data={"name": "ann", "password": PASSWORD,
                                         "form_token": token, "next": "/versions"},
                        follow_redirects=False)
        assert r.status_code == 403
        assert "sl_session" not in client.cookies
        assert "this page was open too long" in r.text
        assert 'value="ann"' in r.text
        assert 'name="next" value="/versions"' in r.text
        fresh = re.search(r'name="form_token" value="([^"]+)"', r.text)
        assert fresh
        r = client.post("/signin", data={"name": "ann", "password": PASSWORD,
                                         "form_token": fresh.group(1), "next": "/versions"},
                        follow_redirects=False)
        assert (r.status_code, r.headers.get("location")) == (303, "/versions"), r.text
        # The browser's cookie gone (cleared): the same, for sign-up too.
        client.cookies.delete("sl_form")
        r = client.post("/signin", data={"name": "ann", "password": PASSWORD,
                                         "form_token": fresh.group(1), "next": "/versions"},
                        follow_redirects=False)
        assert r.status_code == 403
        assert 'name="next" value="/versions"' in r.text
        client.cookies.delete("sl_form")
        r = client.post("/signup", data={"name": "cat", "password": PASSWORD,
                                         "password_again": PASSWORD,
                                         "form_token": fresh.group(1)})
        assert r.status_code == 403
        assert "create the account again" in r.text
        assert 'value="cat"' in r.text


def test_forms_without_their_csrf_token_are_refused(ann: TestClient, svc: Services) -> None:
    token = csrf(ann)
    attempts = [
        ("/train/start", {}), ("/train/start", {"csrf_token": "forged"}),
        ("/settings/keys", {"name": "x"}), ("/signout", {"csrf_token": token[:-1] + "x"}),
        ("/model/scale", {"lora_scale": "0.5"}), ("/generate", {"prompt": "p"}),
        ("/model/scale/default", {}),
    ]
    for path, data in attempts:
        r = ann.post(path, data=data, follow_redirects=False)
        assert r.status_code in (403, 422), (path, r.status_code)
        if r.status_code == 403:
            assert 'data-code="csrf_rejected"' in r.text
    # The upload needs its token too (the script's header, or the form's field without scripts).
    r = ann.post("/photos/upload", files=[("files", ("p.jpg", synthetic_photo(1), "image/jpeg"))])
    assert r.status_code == 403
    # Nothing happened: no training, no key, still signed in.
    assert svc.models.find(user=svc.users.get_by_name(name="ann")) is None
    assert len(svc.users.keys(user=svc.users.get_by_name(name="ann"))) == 1
    assert ann.get("/photos", follow_redirects=False).status_code == 200
    # The sign-in form has its own token (there is no session yet).
    r = ann.post("/signin", data={"name": "ann", "password": PASSWORD, "form_token": "x"})
    assert r.status_code == 403


def test_the_upload_form_works_without_scripts_and_offers_avif(
        ann: TestClient, svc: Services) -> None:
    """The upload form had no csrf_token field and the route read the token only from the
    script's header: without scripts every upload was 403 'reload the page and try again',
    which never helped. And the picker greyed out a phone's .avif, which the service takes."""
    page = ann.get("/photos").text
    form = page[page.index('<form id="upload"'):]
    form = form[:form.index("</form>")]
    token = re.search(r'name="csrf_token" value="([^"]+)"', form)
    assert token, form
    accept = re.search(r'accept="([^"]+)"', form)
    assert accept
    assert {"image/avif", ".avif"} <= set(accept.group(1).split(","))
    photos = [("files", (f"p{i}.jpg", synthetic_photo(i), "image/jpeg")) for i in range(4)]
    # What the browser sends from the form alone: the field among the files, no header.
    r = ann.post("/photos/upload", data={"csrf_token": "forged"}, files=photos)
    assert r.status_code == 403
    assert svc.models.find(user=svc.users.get_by_name(name="ann")) is None
    r = ann.post("/photos/upload", data={"csrf_token": token.group(1)}, files=photos)
    assert r.status_code == 200, r.text
    assert report_rows(r.text) == {f"p{i}.jpg": "kept" for i in range(4)}


def test_sign_out_ends_the_session(ann: TestClient) -> None:
    cookie = ann.cookies.get("sl_session")
    r = ann.post("/signout", data={"csrf_token": csrf(ann)}, follow_redirects=False)
    assert r.headers["location"] == "/signin"
    assert ann.get("/photos", follow_redirects=False).status_code == 303
    # The old cookie, replayed, is no session either.
    ann.cookies.set("sl_session", cookie or "")
    assert ann.get("/photos", follow_redirects=False).status_code == 303


def test_a_signed_in_browser_is_sent_on_from_the_sign_in_and_sign_up_pages(
        web_settings: Settings, svc: Services) -> None:
    """Signed in, /signin and /signup still showed their forms (Back after signing up showed an
    empty sign-up form that made a second account), and signing in again left this browser's
    old session valid in the database (found in review)."""
    with browser(web_settings, svc) as client, browser(web_settings, svc) as other:
        sign_in(other, "ann")  # another browser's session stays valid throughout
        token = form_token(client)  # the form as shown before signing in (Back to it, a tab)
        sign_in(client, "ann")
        for page, target in (("/signin", "/photos"), ("/signin?next=/versions", "/versions"),
                             ("/signin?next=//example.com", "/photos"), ("/signup", "/photos")):
            r = client.get(page, follow_redirects=False)
            assert (r.status_code, r.headers.get("location")) == (303, target), page
        old = client.cookies.get("sl_session")
        r = client.post("/signin", data={"name": "bob", "password": PASSWORD,
                                         "form_token": token, "next": "/photos"},
                        follow_redirects=False)
        assert r.status_code == 303, r.text
        assert "bob" in client.get("/photos").text  # the new session
        client.cookies.clear()
        client.cookies.set("sl_session", old or "")  # this browser's old session: ended
        assert client.get("/photos", follow_redirects=False).status_code == 303
        assert other.get("/photos", follow_redirects=False).status_code == 200


@pytest.mark.parametrize(("path", "page"), [
    ("/train/start", "/train"), ("/train/cancel", "/train"), ("/versions/v1/activate", "/versions"),
    ("/generate", "/generate"), ("/model/scale", "/generate"), ("/model/trainer-version", "/model"),
    ("/settings/keys", "/settings"), ("/settings/keys/k1/revoke", "/settings"),
    ("/signout", None),  # (the upload is the guard's: it answers its script 401)
])
def test_a_form_posted_after_its_session_ended_leads_back_to_its_page(
        web_settings: Settings, svc: Services, path: str, page: str | None) -> None:
    """POST /train/start with an ended session led to /signin?next=/train/start, and after
    signing in the browser was sent to GET /train/start: a 405 page (found in review)."""
    with browser(web_settings, svc) as client:
        client.cookies.set("sl_session", "an ended session")
        r = client.post(path, data={"csrf_token": "any"}, follow_redirects=False)
        assert r.status_code == 303
        assert r.headers["location"] == (f"/signin?next={page}" if page else "/signin")
        # Said there, once (nojs review 6): the sign-in page said nothing of why.
        said = "Your session had ended, so what you sent was not done"
        assert (said in client.get(r.headers["location"]).text) is (page is not None)
        assert said not in client.get(r.headers["location"]).text
        r = client.post("/signin", data={"name": "ann", "password": PASSWORD,
                                         "form_token": form_token(client),
                                         **({"next": page} if page else {})},
                        follow_redirects=False)
        assert r.headers["location"] == (page or "/photos")
        assert client.get(r.headers["location"], follow_redirects=False).status_code == 200


@pytest.mark.parametrize(("method", "path", "page"), [
    ("GET", "/train/start", "/train"),  # a form's address opened as a page: 405
    ("GET", "/generations/g1/delete", "/generate"),
    ("GET", "/no-such-page", None),  # 404: the default page after signing in
    ("POST", "/photos", "/photos"),  # a page sent a form: 405, the page itself
])
def test_a_signed_out_error_page_signs_in_to_a_page_not_back_to_the_error(
        web_settings: Settings, svc: Services, method: str, path: str,
        page: str | None) -> None:
    """Signed out, GET /train/start (a form's address opened as a page) answered its 405 page,
    whose "Sign in again" led to /signin?next=/train/start: signed in, the same 405 again (and
    a 404's, the same 404). Signed in, their Back leads to the form's page and to /photos."""
    with browser(web_settings, svc) as client:
        r = client.request(method, path, follow_redirects=False)
        assert r.status_code in (404, 405), r.text
        link = re.search(r'<a href="([^"]*)">Sign in again</a>', r.text)
        assert link is not None, r.text
        assert html.unescape(link.group(1)) == (f"/signin?next={page}" if page else "/signin")


def test_htmx_is_told_to_load_the_sign_in_page_once_the_session_ends(ann: TestClient) -> None:
    # The training status htmx polls answered a 303 to the sign-in page, which htmx follows
    # and would put inside the status section (found in review).
    ann.post("/signout", data={"csrf_token": csrf(ann)})
    polled = {"HX-Request": "true", "HX-Current-URL": "http://testserver/train"}
    r = ann.get("/train/status", headers=polled, follow_redirects=False)
    assert r.status_code == 200
    assert r.headers["hx-redirect"] == "/signin?next=/train"  # back to the page, after
    assert r.text == ""
    # A page loaded by the browser is still redirected.
    r = ann.get("/train/status", follow_redirects=False)
    assert r.status_code == 303
    assert "hx-redirect" not in r.headers


def test_an_expired_session_sends_the_browser_to_sign_in(web_settings: Settings,
                                                         svc: Services) -> None:
    clock = Clock()
    svc.users = UserService(repo=svc.repo, hasher=FAST_HASHER, clock=clock,
                            policy=web_settings.sign_in_policy)
    with browser(web_settings, svc) as client:
        sign_in(client, "ann")
        assert client.get("/photos", follow_redirects=False).status_code == 200
        clock.now += timedelta(days=web_settings.session_days, seconds=1)
        r = client.get("/photos", follow_redirects=False)
        assert r.status_code == 303
        assert r.headers["location"].startswith("/signin")


def test_a_forged_session_cookie_is_no_session(web_settings: Settings, svc: Services) -> None:
    with browser(web_settings, svc) as client:
        client.cookies.set("sl_session", "eyJ0b2tlbiI6ImZvcmdlZCJ9.abc.def")
        assert client.get("/photos", follow_redirects=False).status_code == 303


def test_cookies_are_secure_when_the_service_is_served_over_https(tmp_path: Path) -> None:
    """Behind a proxy whose X-Forwarded-Proto uvicorn does not believe, every request is http:
    the session and form cookies were set without Secure, free to leak over a plain-http
    request (found in the security review). An https PUBLIC_URL makes them Secure."""
    for public_url, secure in ((None, False), ("https://selfie.example.com", True)):
        settings = make_settings(tmp_path / str(secure), public_url=public_url)
        services = fake_services(settings)
        services.users.create(name="ann", password=PASSWORD)
        try:
            with browser(settings, services) as client:  # http://testserver
                page = client.get("/signin")
                form_cookie = page.headers["set-cookie"]
                assert form_cookie.startswith("sl_form=")
                token = re.search(r'name="form_token" value="([^"]+)"', page.text)
                assert token
                client.cookies.clear()  # a Secure cookie is not sent back over http: by hand
                r = client.post("/signin", follow_redirects=False,
                                headers={"cookie": form_cookie.split(";")[0]},
                                data={"name": "ann", "password": PASSWORD,
                                      "form_token": token.group(1), "next": "/photos"})
                assert r.status_code == 303, r.text
                session_cookie = r.headers["set-cookie"]
                assert session_cookie.startswith("sl_session=")
                for cookie in (form_cookie, session_cookie):
                    assert ("; secure" in cookie.lower()) is secure, cookie
                # The sign-in form's cookie was set by hand in its route, the session's by the
                # pages' one helper: both now by the helper, with the same flags.
                flags = [_cookie_flags(c) for c in (form_cookie, session_cookie)]
                assert flags[0] == flags[1], flags
                assert {"httponly", "path=/", "samesite=lax"} <= flags[0], flags
        finally:
            services.close()


def _cookie_flags(set_cookie: str) -> set[str]:
    """A Set-Cookie's attributes but its value and lifetime (each cookie has its own)."""
    return {part.strip().lower() for part in set_cookie.split(";")[1:]
            if not part.strip().lower().startswith(("max-age=", "expires="))}


def test_sign_up_is_closed_unless_the_setting_opens_it(tmp_path: Path) -> None:
    for open_ in (False, True):
        settings = make_settings(tmp_path / str(open_), signup=open_)
        services = fake_services(settings)
        try:
            with browser(settings, services) as client:
                page = client.get("/signup").text
                # Closed is the page's standing state, not an event: no role=alert.
                assert ('id="signup-closed"' in page) is not open_
                assert 'role="alert"' not in page
                token = re.search(r'name="form_token" value="([^"]+)"', page)
                data = {"name": "cat", "password": PASSWORD, "password_again": PASSWORD,
                        "form_token": token.group(1) if token else form_token(client)}
                r = client.post("/signup", data=data, follow_redirects=False)
                if open_:
                    assert r.status_code == 303
                    assert client.get("/photos").status_code == 200
                else:
                    assert r.status_code == 403
                    assert services.repo.get_user_by_name("cat") is None
        finally:
            services.close()


def test_a_web_sign_up_makes_no_api_key(tmp_path: Path) -> None:
    """Sign-up made the first key ``users create`` makes and threw its secret away: a working
    key nobody held, listed in Settings as one the user never made. Keys are made there."""
    settings = make_settings(tmp_path, signup=True)
    services = fake_services(settings)
    try:
        with browser(settings, services) as client:
            assert sign_up(client, "cat").status_code == 303
            user = services.users.get_by_name(name="cat")
            assert list(services.users.keys(user=user)) == []
            page = client.get("/settings").text
            assert "No keys." in page
            assert ">default<" not in page
            made = client.post("/settings/keys", data=key_form(client, "laptop"))
            assert made.status_code == 200
            assert [k.name for k in services.users.keys(user=user)] == ["laptop"]
    finally:
        services.close()


def visible_text(page: str) -> str:
    """``page``'s text as a screen reader reads it (hidden text too): tags gone, spaces one."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


def test_sign_up_and_sign_out_say_they_were_done_and_the_header_says_who_is_signed_in(
        tmp_path: Path) -> None:
    """Signing up led to the photos page and signing out to the sign-in page without a word
    (the sign-in page looked as after a session that merely expired), and the header's name
    was read as a bare word beside "Sign out" (a11y review). Each says what it did once, in a
    notice that takes the focus, as the other forms do; the header says "Signed in as NAME"."""
    settings = make_settings(tmp_path, signup=True)
    services = fake_services(settings)
    try:
        with browser(settings, services) as client:
            made = sign_up(client, "cat")
            assert made.status_code == 303
            page = client.get(made.headers["location"]).text
            notice = re.search(r'<p class="notice done" id="done-notice"[^>]*>(.*?)</p>', page)
            assert notice, page  # old code: no notice
            assert " autofocus" in notice.group(0)
            assert notice.group(1) == "Your account cat was created and you are signed in."
            header = page.split("<header", 1)[1].split("</header>", 1)[0]
            assert "Signed in as cat Sign out" in visible_text(header), header
            assert 'id="done-notice"' not in client.get("/photos").text  # once

            gone = client.post("/signout", data={"csrf_token": csrf(client)},
                               follow_redirects=False)
            assert gone.headers["location"] == "/signin"
            page = client.get("/signin").text
            note = re.search(r'<p class="notice" id="signed-out-note"[^>]*>(.*?)</p>', page)
            assert note, page  # old code: nothing said
            assert " autofocus" in note.group(0)
            assert note.group(1) == "You signed out."
            assert "autofocus" not in _field(page, "name")  # the notice has the focus
            again = client.get("/signin").text
            assert 'id="signed-out-note"' not in again  # once
            assert "autofocus" in _field(again, "name")
    finally:
        services.close()


def _field(page: str, field_id: str) -> str:
    found = re.search(rf'<input id="{field_id}"[^>]*>', page)
    assert found, (field_id, page)
    return found.group(0)


def _at_fault(page: str, field_id: str) -> bool:
    """Whether the field is marked invalid and described by the form's message."""
    field = _field(page, field_id)
    return 'aria-invalid="true"' in field and 'aria-describedby="form-error"' in field


def test_a_refused_sign_in_or_sign_up_marks_the_field_at_fault_and_focuses_it(
        tmp_path: Path) -> None:
    """A failed sign-in put the focus in Name ("Name, edit, ann": nothing said it failed), and
    a sign-up whose passwords differed emptied them unmarked; the message was a role=alert
    present at load, which screen readers often do not read (a11y review 5). The field at fault
    is now aria-invalid, described by the message, and focused, as on the settings page."""
    settings = make_settings(tmp_path, signup=True)
    services = fake_services(settings)
    try:
        services.users.create(name="ann", password=PASSWORD)
        with browser(settings, services) as client:
            failed = client.post("/signin", data={"name": "ann", "password": "wrong one!",
                                                  "form_token": form_token(client)}).text
            assert 'id="form-error"' in failed
            assert _at_fault(failed, "password")
            assert " autofocus" in _field(failed, "password")
            assert not _at_fault(failed, "name")
            assert " autofocus" not in _field(failed, "name")
            assert " autofocus" in _field(client.get("/signin").text, "name")  # a fresh form

            data = {"name": "carl", "password": PASSWORD, "password_again": PASSWORD + "x",
                    "form_token": form_token(client)}
            differ = client.post("/signup", data=data).text
            assert _at_fault(differ, "password")
            assert _at_fault(differ, "password_again")
            assert " autofocus" in _field(differ, "password")
            assert " autofocus" not in _field(differ, "password_again") + _field(differ, "name")

            data.update(name="Ann", password_again=PASSWORD, form_token=form_token(client))
            taken = client.post("/signup", data=data).text
            assert "already exists" in taken
            assert _at_fault(taken, "name")
            assert " autofocus" in _field(taken, "name")
            assert not _at_fault(taken, "password")
    finally:
        services.close()


def test_sign_up_is_rate_limited_per_client(tmp_path: Path) -> None:
    """One client made 60 accounts in a row, and asked about a taken name as often as it
    liked (found in review): past SIGN_UP_MAX_ATTEMPTS the form answers 429."""
    settings = make_settings(tmp_path, signup=True, sign_up_max_attempts=2)
    services = fake_services(settings)
    services.users.create(name="ann", password=PASSWORD)
    try:
        with browser(settings, services) as client:
            def sign_up(name: str) -> httpx.Response:
                client.cookies.clear()
                token = re.search(r'name="form_token" value="([^"]+)"',
                                  client.get("/signup").text)
                assert token
                return client.post("/signup", data={
                    "name": name, "password": PASSWORD, "password_again": PASSWORD,
                    "form_token": token.group(1)}, follow_redirects=False)

            assert sign_up("cat").status_code == 303
            assert sign_up("ann").status_code == 409
            refused = sign_up("dog")
            assert refused.status_code == 429
            assert int(refused.headers["retry-after"]) > 0
            assert "too many sign-ups" in refused.text
            assert sign_up("ann").status_code == 429  # a taken name is not told apart either
            assert services.repo.get_user_by_name("dog") is None
    finally:
        services.close()


# ---------------------------------------------------------------------------- the journey


def test_an_unexpected_error_s_page_has_every_page_s_security_headers(
        ann: TestClient, svc: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 500 page is sent by Starlette's outermost middleware, around SecurityHeaders: it
    came without the CSP, X-Frame-Options and nosniff (found in review)."""
    names = ("content-security-policy", "x-frame-options", "x-content-type-options",
             "referrer-policy")
    normal = ann.get("/settings")
    assert normal.status_code == 200

    def broken(**_kwargs: object) -> None:
        raise RuntimeError("a bug in a service a page calls")

    monkeypatch.setattr(svc.users, "keys_by_state", broken)
    failed = ann.get("/settings")
    assert failed.status_code == 500
    assert 'data-code="internal_error"' in failed.text
    assert "a bug" not in failed.text
    assert {n: failed.headers.get_list(n) for n in names} == {
        n: normal.headers.get_list(n) for n in names}


def test_every_page_is_served_with_a_policy_that_forbids_inline_scripts(ann: TestClient) -> None:
    for path in ("/photos", "/train", "/versions", "/generate", "/model", "/settings",
                 "/signin", "/no-such-page"):
        r = ann.get(path)
        assert r.status_code == (404 if path == "/no-such-page" else 200), path
        policy = r.headers["content-security-policy"]
        assert "script-src 'self'" in policy
        assert "unsafe-inline" not in policy
        assert r.headers["x-frame-options"] == "DENY"
        assert not re.search(r"<script(?![^>]*\bsrc=)", r.text), path  # no inline script
        assert " style=" not in r.text, path  # no inline style either
        assert 'href="https://' not in r.text  # no CDN
        assert 'src="https://' not in r.text
    assert ann.get("/static/vendor/htmx-2.0.11/htmx.min.js").status_code == 200
    # The API keeps answering JSON.
    assert ann.get("/api/model").json()["error"]["code"] == "unauthorized"


def page_title(page: str) -> str:
    found = re.findall(r"<title>(.*?)</title>", page, re.S)
    assert len(found) == 1, page
    return found[0]


TEMPLATES = WEB_ROOT / "templates"


def test_no_page_has_markup_in_its_title(tmp_path: Path, ann: TestClient) -> None:
    """A <title> is shown as text (the tab, the window list, history and bookmarks): markup
    pasted into a template's title block showed as is, a form's CSRF token with it."""
    blocks = {path.name: re.findall(r"\{%-?\s*block title\s*-?%\}(.*?)\{%-?\s*endblock",
                                    path.read_text(), re.S)
              for path in sorted(TEMPLATES.glob("*.html"))}
    titled = {name: found for name, found in blocks.items() if found}
    assert {"settings.html", "photos.html", "error.html", "signin.html"} <= set(titled)
    for name, found in titled.items():
        assert len(found) == 1, name
        assert not re.search("[<>]", found[0]), (name, found[0])
    # And as served, signed in and out (the error page included).
    settings = make_settings(tmp_path / "open", signup=True)
    with closing(fake_services(settings)) as services, browser(settings, services) as anon:
        served = [ann.get(path) for path in ("/photos", "/train", "/versions", "/generate",
                                             "/model", "/settings", "/no-such-page")]
        served += [anon.get(path) for path in ("/signin", "/signup")]
    for r in served:
        title = page_title(r.text)
        assert not re.search("[<>]", title), (r.url, title)
        assert title.endswith(" · selfie-lora"), (r.url, title)


def test_an_upload_sent_without_photos_is_stopped_and_error_titles_say_what_failed(
        ann: TestClient) -> None:
    """Without scripts, "Check and upload" with no file chosen was sent, and answered by a page
    titled "422 · selfie-lora" saying "files: Field required"; every error page's title was its
    status number alone (a11y review 8). The file input is required (the browser stops the
    form), and an error page's title names what was refused, or else what went wrong."""
    page = ann.get("/photos").text
    files = re.search(r'<input id="files"[^>]*>', page)
    assert files, page
    assert " required" in files.group(0)
    r = ann.post("/photos/upload", data={"csrf_token": csrf(ann)})
    assert r.status_code == 422
    assert page_title(r.text) == "Upload refused · selfie-lora"
    assert page_title(ann.get("/no-such-page").text) == "Not found · selfie-lora"
    r = ann.post("/generate", data={"csrf_token": csrf(ann), "prompt": "p", "seed": "x"})
    assert r.status_code == 422
    assert page_title(r.text) == "Generate refused · selfie-lora"


def test_error_pages_say_in_plain_words_what_a_form_lacks_and_what_a_form_address_is(
        ann: TestClient, svc: Services) -> None:
    """The general error page said FastAPI's words with the form's field names ("the form is
    not complete: lora_scale: Input should be a valid number, unable to parse string as a
    number"), Starlette's "Method Not Allowed" for a form's address opened as a page, and "this
    one is succeeded" for a resume of a finished training (webhostile review 6)."""
    r = ann.post("/generate", data={"csrf_token": csrf(ann), "prompt": "p", "lora_scale": "x"})
    assert r.status_code == 422
    said = html.unescape(r.text)
    # The scale is read by the text fronts' parser (the pictures' and the seed's too), which
    # says the range and what was typed.
    assert "the LoRA scale must be a number from -1.0 to 3.0 (not 'x')" in said
    # Not the field's name in the words shown (the error's code is in an attribute).
    assert "lora_scale" not in re.sub(r"<[^>]*>", "", said.split("<main", 1)[1].split("<form", 1)[0])
    r = ann.post("/signin", data={"name": "ann"})
    assert "Password is missing" in html.unescape(r.text)
    r = ann.get("/train/start")
    assert r.status_code == 405
    assert "Method Not Allowed" not in r.text
    assert "this address only takes what its form sends" in r.text
    assert 'href="/train"' in r.text.split("<main", 1)[1]  # Back: the form's page
    assert upload(ann)[0] == 200
    train(ann)
    model = svc.repo.get_model_for_user(svc.users.get_by_name(name="ann").id)
    assert model is not None
    succeeded = svc.repo.list_trainings(model.id)[0]
    r = ann.post("/train/resume", data={"csrf_token": csrf(ann), "training_id": succeeded.id})
    assert r.status_code == 409
    assert "only a canceled training can be resumed; this one succeeded" in html.unescape(r.text)


@pytest.mark.parametrize(("method", "path", "said"), [
    ("POST", "/photos", "this page is only opened, not sent to: open it again"),
    ("POST", "/model", "this page is only opened, not sent to: open it again"),
    ("POST", "/settings", "this page is only opened, not sent to: open it again"),
    ("PUT", "/generate", "this page is opened, or takes what its own form sends"),
    ("GET", "/settings/keys", "this address only takes what its form sends"),
])
def test_a_wrong_method_page_says_what_its_address_takes(
        ann: TestClient, method: str, path: str, said: str) -> None:
    """POST to a page that takes only GET was told "this address only takes what a form of the
    site sends", the reverse of what is true for a page (diffweb review 2): the 405 page is
    worded by the route's Allow header, which it now sends, and its Back link leads to the page
    itself."""
    r = ann.request(method, path, data={"csrf_token": csrf(ann)})
    assert r.status_code == 405
    assert said in html.unescape(r.text)  # old code: "what a form of the site sends"
    assert "GET" in r.headers["allow"] or path == "/settings/keys"
    page = path if "GET" in r.headers["allow"] else "/settings"
    assert f'href="{page}"' in r.text.split("<main", 1)[1]


def test_more_files_than_the_form_parser_takes_get_the_refused_upload_page(
        ann: TestClient) -> None:
    """1001 files on the photos page (past Starlette's 1000): a page saying too many files, as
    201 get, not one saying the form parser's "Too many files. Maximum number..." with 400."""
    files = [("files", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(1001)]
    r = ann.post("/photos/upload", files=files, headers={"X-CSRF-Token": csrf(ann)})
    assert r.status_code == 422, r.text
    assert page_title(r.text) == "Upload refused · selfie-lora"
    assert "more than 1000 files sent; at most 200 files are accepted" in r.text


def test_upload_reports_each_photo_and_a_bad_set_stores_nothing(ann: TestClient,
                                                                svc: Services) -> None:
    tiny = synthetic_photo(99, size=24)
    status, html = upload(ann, 0, extra=[("tiny.jpg", tiny)])
    assert status == 422
    assert "nothing was stored" in html
    assert 'data-photo-name="tiny.jpg"' in html
    assert svc.intake.latest(user=svc.users.get_by_name(name="ann")) is None

    status, html = upload(ann, 4, extra=[("tiny.jpg", tiny)])
    assert status == 200, html
    assert 'data-trainable="true"' in html
    assert "Judged for tiny training at 64 px." in html  # the configured default's
    found = {name: state for state, name in re.findall(
        r'class="photo (kept|left-out)" data-photo-name="([^"]+)"', html)}
    assert found == {"p0.jpg": "kept", "p1.jpg": "kept", "p2.jpg": "kept", "p3.jpg": "kept",
                     "tiny.jpg": "left-out"}
    tiny_row = next(chunk for chunk in html.split('<li class="photo ')
                    if 'data-photo-name="tiny.jpg"' in chunk)
    assert 'class="reject"' in tiny_row
    assert 'class="advice"' in tiny_row
    # The face box of a kept photo, as percentages of the photo.
    assert re.search(r'data-photo-name="p0.jpg"[^>]*>\s*<div class="thumb" data-box="[\d.]+,'
                     r'[\d.]+,[\d.]+,[\d.]+"', html)
    # Each kept photo's stored picture is named in the report (a zip's photos have no other).
    assert re.search(r'data-stored="/photos/[^"]+/0\.jpg"', html)
    assert 'data-stored' not in tiny_row
    # The kept photos are on the page, to their owner only.
    page = ann.get("/photos").text
    thumbs = re.findall(r'src="(/photos/[^"]+\.jpg)"', page)
    assert len(thumbs) == 4
    assert ann.get(thumbs[0]).headers["content-type"] == "image/jpeg"


def test_the_upload_report_s_link_to_the_train_page_says_where_it_goes(ann: TestClient) -> None:
    """The report of a set that can be trained linked to the Train page as "Train now", which
    starts nothing (the page's form does): it says what it does, as the current set's link."""
    status, html = upload(ann, 4)
    assert status == 200, html
    report = html.split('data-trainable="true"', 1)[1]
    assert re.search(r'<a class="button" href="/train">Go to training</a>', report)
    assert "Train now" not in html
    page = ann.get("/photos").text  # the current set's link, in the same words
    assert '<a class="button" href="/train">Go to training</a>' in page
    assert "Train now" not in page


def test_the_photos_page_keeps_the_stored_set_s_advice_after_the_upload(ann: TestClient,
                                                                        svc: Services) -> None:
    """The upload's report (why a photo was left out, what to add) was only in the upload's
    answer: the photos page, opened again (a reload, back from "Go to training"), showed only the
    counts and the thumbnails (found in review). It shows the advice stored with the set."""
    status, html = upload(ann, 4, extra=[("tiny.jpg", synthetic_photo(99, size=24))])
    assert status == 200, html
    dataset = svc.intake.latest(user=svc.users.get_by_name(name="ann"))
    assert dataset is not None
    set_findings = [f for f in dataset.findings if f.photo is None]
    assert set_findings  # 4 photos: fewer than work best
    page = ann.get("/photos").text
    advice = page.split('id="set-advice"', 1)[1].split("Go to training", 1)[0]
    for finding in dataset.findings:
        assert html_escape(finding.message) in advice
        assert html_escape(finding.advice) in advice
    assert report_rows(advice) == {"tiny.jpg": "left-out"}


def test_a_finding_says_in_words_whether_it_must_change_or_is_advice(ann: TestClient) -> None:
    """The finding that left a photo out and one that is only advice differed by their colour
    alone, two colours 1.1:1 apart, and a screen reader heard nothing of it (a11y review 1).
    Each finding now starts with "Must change:" or "Advice:", in the upload's report and in the
    advice stored with the set."""
    status, html = upload(ann, 4, extra=[("tiny.jpg", synthetic_photo(99, size=24))])
    assert status == 200, html
    page = ann.get("/photos").text
    for where in (html.split('id="current-set"', 1)[0], page.split('id="set-advice"', 1)[1]):
        assert '<li class="reject"><span class="severity">Must change:</span>' in where, where
        assert '<li class="warn"><span class="severity">Advice:</span>' in where, where
        tiny = where.split('data-photo-name="tiny.jpg"', 1)[1].split("</ul>", 1)[0]
        assert "Must change:" in tiny, tiny


def finding_texts(page: str) -> list[str]:
    """Each finding of ``page`` as a screen reader reads it: its text, tags gone."""
    return [" ".join(html.unescape(re.sub(r"<[^>]+>", "", item)).split())
            for item in re.findall(r'<li class="(?:reject|warn|info)">(.*?)</li>', page, re.S)]


def test_a_finding_s_problem_and_its_advice_are_two_sentences(ann: TestClient,
                                                              svc: Services) -> None:
    """A finding's problem and its advice were read as one run-on sentence ("no face was found
    in a.jpg use a photo where your face...": nothing between them but a space; a11y review).
    The problem ends with a full stop and the advice is its own sentence, in its own element,
    on every page that lists findings: the upload's report, the photos page, a refused
    upload."""
    status, report = upload(ann, 4, extra=[("tiny.jpg", synthetic_photo(99, size=24))])
    assert status == 200, report
    dataset = svc.intake.latest(user=svc.users.get_by_name(name="ann"))
    assert dataset is not None
    assert dataset.findings
    status, refused = upload(ann, 0, extra=[("tiny.jpg", synthetic_photo(99, size=24))])
    assert status == 422, refused
    for page in (report, ann.get("/photos").text, refused):
        said = finding_texts(page)
        assert said, page
        for text in said:
            # "Must change: PROBLEM. ADVICE." (old code: "Must change: PROBLEM ADVICE")
            assert re.fullmatch(r"(Must change|Advice|Note): [^ ].*[.!?] [^ ].*[.!?]", text), text
        assert page.count('<span class="advice">') == len(said)
    for page in (report, ann.get("/photos").text):  # the stored set's findings, each said
        said = finding_texts(page)
        for finding in dataset.findings:
            assert any(f"{finding.message}. {finding.advice}." in text for text in said), said


def test_the_upload_report_says_each_finding_of_the_set_once(ann: TestClient) -> None:
    """Each set finding was printed twice: as a verdict reason and in the findings list ("4
    usable photos: 15-25 work best" above "4 usable photos; 15-25 work best"); a refused set's
    alert listed every finding that the list then repeated (found in review)."""
    status, html = upload(ann, 4)
    assert status == 200, html
    report = html.split('id="current-set"', 1)[0]
    assert report.count("usable photos") == 1, report
    assert "add 11 or more photos" in report  # the finding, with its advice

    status, html = upload(ann, 0, extra=[("tiny.jpg", synthetic_photo(99, size=24))])
    assert status == 422, html
    assert html.count("usable photo") == 1, html
    assert "at least" in html.split('class="findings"', 1)[1]  # in the list, with its advice


def html_escape(text: str) -> str:
    return html.escape(text, quote=True)


def report_rows(html: str) -> dict[str, str]:
    return {name: state for state, name in re.findall(
        r'class="photo (kept|left-out|not-stored|skipped)" data-photo-name="([^"]+)"', html)}


def test_takeout_side_files_the_intake_skipped_are_notes_not_photos(tmp_path: Path) -> None:
    """A Takeout .json the intake skipped (an info ignored_file note, not counted) was a photo
    row: "left out" with an empty red-outlined picture box under "4 of 4 photos kept", or
    "usable, but not stored with the set" in a refused set, and first in the stored advice
    (browser review 1). Now it is "skipped: not a photo", with no picture box, after the
    photos, in the report, the refused set's report and the stored advice alike."""
    settings = make_settings(tmp_path, min_photos=3)
    services = fake_services(settings)
    services.users.create(name="ann", password=PASSWORD)
    side = [("p0.jpg.json", b'{"title": "p0.jpg"}'), ("metadata.json", b'{"title": "x"}')]
    with closing(services), browser(settings, services) as client:
        sign_in(client, "ann")
        status, html = upload(client, 4, extra=side)
        assert status == 200, html
        page = client.get("/photos").text
        status, refused = upload(client, 2, extra=side)
    assert status == 422, refused
    for text in (html, page.split('id="set-advice"', 1)[1], refused):
        rows = report_rows(text)
        assert rows["p0.jpg.json"] == rows["metadata.json"] == "skipped", rows
        assert "<strong>metadata.json</strong>: skipped: not a photo" in text
        assert "was skipped: a Google Takeout metadata file" in text
        # After the photos, and no empty picture box for a file that is no photo.
        photo_rows = [name for name, state in rows.items() if state != "skipped"]
        assert list(rows)[:len(photo_rows)] == photo_rows, rows
        for chunk in text.split('<li class="photo ')[1:]:
            if chunk.startswith("skipped"):
                assert 'class="thumb"' not in chunk.split("</li>", 1)[0]


def test_a_set_refused_as_a_whole_marks_only_its_bad_photos_left_out(tmp_path: Path) -> None:
    """Every photo of a refused set read "left out" in a red frame, those with nothing wrong
    too: the user could not tell which to change (found in review)."""
    settings = make_settings(tmp_path, min_photos=3)
    services = fake_services(settings)
    services.users.create(name="ann", password=PASSWORD)
    with closing(services), browser(settings, services) as client:
        sign_in(client, "ann")
        status, html = upload(client, 2, extra=[("tiny.jpg", synthetic_photo(99, size=24))])
    assert status == 422, html
    assert "This set as a whole cannot be trained" in html
    assert report_rows(html) == {"p0.jpg": "not-stored", "p1.jpg": "not-stored",
                                 "tiny.jpg": "left-out"}
    assert "<strong>p0.jpg</strong>: usable, but not stored with the set" in html
    assert "<strong>tiny.jpg</strong>: left out" in html


def test_a_zip_is_reported_by_the_photos_inside_it(ann: TestClient) -> None:
    # The rows came from the multipart names: the zip itself was a left-out photo and its kept
    # photos with no finding had no row (found in review).
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as archive:
        for i in range(4):
            archive.writestr(f"photo{i}.jpg", synthetic_photo(i))
        archive.writestr("tiny.jpg", synthetic_photo(99, size=24))
    r = ann.post("/photos/upload", headers={"X-CSRF-Token": csrf(ann)},
                 files=[("files", ("selfies.zip", data.getvalue(), "application/zip"))])
    assert r.status_code == 200, r.text
    assert report_rows(r.text) == {"photo0.jpg": "kept", "photo1.jpg": "kept",
                                   "photo2.jpg": "kept", "photo3.jpg": "kept",
                                   "tiny.jpg": "left-out"}
    # A zip that cannot be trained: its findings' photos, never the zip.
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as archive:
        archive.writestr("tiny.jpg", synthetic_photo(99, size=24))
    r = ann.post("/photos/upload", headers={"X-CSRF-Token": csrf(ann)},
                 files=[("files", ("selfies.zip", data.getvalue(), "application/zip"))])
    assert r.status_code == 422
    assert report_rows(r.text) == {"tiny.jpg": "left-out"}


def test_an_oversized_photo_and_a_zip_inside_are_rows_left_out_with_advice(
        ann: TestClient) -> None:
    """A 51 MB DNG or a zip inside the uploaded zip refused the whole upload with one message:
    now the good photos are kept and each bad file is a row of its own, saying what to do."""
    from tests.support.hostile import Raw, raw_zip, stored

    photos = [stored(f"photo{i}.jpg", synthetic_photo(i)) for i in range(4)]
    dng = Raw(name=b"IMG_0042.DNG", payload=bytes(300 * 1024), size=51 * 1024 * 1024, crc=0,
              method=8)  # never decompressed: no deflate stream at all
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as archive:
        archive.writestr("more.jpg", synthetic_photo(9))
    data = raw_zip([*photos, dng, stored("x.zip", inner.getvalue())])
    r = ann.post("/photos/upload", headers={"X-CSRF-Token": csrf(ann)},
                 files=[("files", ("selfies.zip", data, "application/zip"))])
    assert r.status_code == 200, r.text
    assert report_rows(r.text) == {"photo0.jpg": "kept", "photo1.jpg": "kept",
                                   "photo2.jpg": "kept", "photo3.jpg": "kept",
                                   "IMG_0042.DNG": "left-out", "x.zip": "left-out"}
    page = html.unescape(r.text)
    assert "IMG_0042.DNG is 51 MB, over the 50 MB a photo may be" in page
    assert "x.zip is an archive inside the archive" in page
    assert "unpack it and upload its photos" in page


def test_a_photo_sent_larger_than_a_photo_may_be_is_a_row_left_out_unread(
        ann: TestClient) -> None:
    """A 51 MB DNG picked beside photos in the upload form was read whole into memory (the
    upload's peak: 51 MB and more) before it got its finding. Now its size, which the form
    parser counted, decides: a row left out saying why, and none of it is read."""
    sent = [(f"p{i}.jpg", synthetic_photo(i)) for i in range(3)]
    sent.append(("IMG_0042.DNG", bytes(51 * 1024 * 1024)))
    body, content_type = multipart(sent, {})
    del sent
    token = csrf(ann)
    status, answer, peak = traced_post_in_messages(ann, "/photos/upload",
                                                   {"X-CSRF-Token": token}, body, content_type)
    page = answer.decode()
    assert status == 200, page
    assert report_rows(page) == {"p0.jpg": "kept", "p1.jpg": "kept", "p2.jpg": "kept",
                                 "IMG_0042.DNG": "left-out"}
    assert "IMG_0042.DNG is 51 MB, over the 50 MB a photo may be" in html.unescape(page)
    assert peak < 10 * 1024 * 1024, f"peak {peak / 2**20:.1f} MB"


@pytest.mark.parametrize("name", ["selfies", "selfies.ZIP", "Selfies (1).zip.download"])
def test_a_zip_is_known_by_its_content_not_its_name(ann: TestClient, name: str) -> None:
    """A zip named "selfies" was sent among photos and refused as nested_archive."""
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as archive:
        for i in range(3):
            archive.writestr(f"photo{i}.jpg", synthetic_photo(i))
    r = ann.post("/photos/upload", headers={"X-CSRF-Token": csrf(ann)},
                 files=[("files", (name, data.getvalue(), "application/octet-stream"))])
    assert r.status_code == 200, r.text
    assert report_rows(r.text) == {f"photo{i}.jpg": "kept" for i in range(3)}


def test_a_photo_named_like_a_zip_is_read_as_the_photo_it_is(ann: TestClient) -> None:
    r = ann.post("/photos/upload", headers={"X-CSRF-Token": csrf(ann)},
                 files=[("files", ("selfie.zip", synthetic_photo(0), "application/zip"))])
    assert r.status_code == 200, r.text
    assert report_rows(r.text) == {"selfie.zip": "kept"}


def test_photos_stored_under_a_cleaned_name_are_reported_by_it(ann: TestClient) -> None:
    # The intake stores a photo under a cleaned name (NFC, at most 100 characters); the report
    # compared the browser's name, so such photos were "left out" though kept (found in review).
    decomposed = unicodedata.normalize("NFD", "José.jpg")  # as macOS browsers may send it
    long = "x" * 120 + ".jpg"
    sent = [decomposed, long, "p2.jpg", "p3.jpg"]
    files = [("files", (name, synthetic_photo(i), "image/jpeg")) for i, name in enumerate(sent)]
    r = ann.post("/photos/upload", files=files, headers={"X-CSRF-Token": csrf(ann)})
    assert r.status_code == 200, r.text
    rows = report_rows(r.text)
    assert len(rows) == 4
    assert set(rows.values()) == {"kept"}
    assert unicodedata.normalize("NFC", "José.jpg") in {html.unescape(n) for n in rows}
    # Each row names the file as sent: the page finds the file on the device by it.
    originals = [html.unescape(n) for n in re.findall(r'data-original-name="([^"]+)"', r.text)]
    assert sorted(originals) == sorted(sent)
    # A refused set: one row for a photo, under its cleaned name.
    tiny = synthetic_photo(99, size=24)
    r = ann.post("/photos/upload", headers={"X-CSRF-Token": csrf(ann)},
                 files=[("files", (decomposed, tiny, "image/jpeg"))])
    assert r.status_code == 422
    assert {html.unescape(n) for n in report_rows(r.text)} == {
        unicodedata.normalize("NFC", "José.jpg")}


def test_a_name_with_a_percent_sign_is_shown_as_the_file_is_named(ann: TestClient) -> None:
    """Browsers send a '"' in a filename as %22 but leave a '%' as it is, so a photo named
    '100%22off.jpg' arrived as '100"off.jpg' does, and was read back as that: its row named
    another file, and the page found no picture for it on the device. The page's script now
    sends each file's name beside it as a field (sent as it is), taken where it is what the
    filename says."""
    sent = ["100%22off.jpg", 'say "cheese".jpg', "p2.jpg", "p3.jpg"]
    # As Chromium writes the filenames: a '"' as %22.
    files = [("files", (name.replace('"', "%22"), synthetic_photo(i), "image/jpeg"))
             for i, name in enumerate(sent)]
    r = ann.post("/photos/upload", files=files, data={"names": sent},
                 headers={"X-CSRF-Token": csrf(ann)})
    assert r.status_code == 200, r.text
    assert {html.unescape(n): state for n, state in report_rows(r.text).items()} == \
        dict.fromkeys(sent, "kept")
    originals = [html.unescape(n) for n in re.findall(r'data-original-name="([^"]+)"', r.text)]
    assert sorted(originals) == sorted(sent)
    # The form without scripts (no names) reads a filename's %22 back, as before; names that
    # are not what the filenames say are not taken.
    for names in ([], ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]):
        files = [("files", (name.replace('"', "%22"), synthetic_photo(10 + i), "image/jpeg"))
                 for i, name in enumerate(['say "cheese".jpg', "x2.jpg", "x3.jpg", "x4.jpg"])]
        r = ann.post("/photos/upload", files=files, data={"names": names},
                     headers={"X-CSRF-Token": csrf(ann)})
        assert r.status_code == 200, r.text
        assert {html.unescape(n) for n in report_rows(r.text)} == {
            'say "cheese".jpg', "x2.jpg", "x3.jpg", "x4.jpg"}, names


def test_a_file_with_an_empty_filename_is_named_as_the_api_names_it(ann: TestClient) -> None:
    """A part with filename="" was named "photo-1" by the web page but "photo1" by the API
    (the intake's name for it): one name now, the intake's."""
    boundary = "selfie-lora-test-boundary"
    body = b"".join(
        (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename=""\r\n'
         "Content-Type: image/jpeg\r\n\r\n").encode() + synthetic_photo(i) + b"\r\n"
        for i in range(3)) + f"--{boundary}--\r\n".encode()
    r = ann.post("/photos/upload", content=body, headers={
        "X-CSRF-Token": csrf(ann), "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 200, r.text
    assert sorted(html.unescape(n) for n in report_rows(r.text)) == ["photo1", "photo2", "photo3"]


def test_train_watch_versions_generate_and_download(ann: TestClient, svc: Services) -> None:
    assert upload(ann)[0] == 200
    train_page = ann.get("/train").text
    # The upload made the model: its first training keeps the trigger word shown now.
    made = svc.models.get(user=svc.users.get_by_name(name="ann"))
    assert "Your first training: it trains your model" in train_page
    assert made.trigger_word in train_page
    # The destination is pinned by the first training (it moves with the backend until then),
    # not "fixed when you uploaded your first photos".
    assert "pins its destination and the trainer version configured now" in train_page
    assert "A retraining keeps" not in train_page
    assert ">Train</button>" in train_page
    status = train(ann)
    assert 'data-status="succeeded"' in status
    assert "Version 1 is active" in status
    assert "hx-trigger" not in status  # polling stops once it has ended
    # The page's poll that finds it ended is told to swap the whole panel: the Retrain button
    # is back without a reload.
    polled = ann.get("/train/status", headers={"HX-Request": "true"})
    assert (polled.headers["hx-retarget"], polled.headers["hx-reselect"]) == (
        "#train-panel", "#train-panel")
    assert 'id="train-panel"' in polled.text
    assert ">Retrain</button>" in polled.text
    assert re.search(r'<polyline points="[\d., ]+"', status)  # the loss, step by step

    # A retraining says what it keeps.
    model = svc.models.get(user=svc.users.get_by_name(name="ann"))
    page = ann.get("/train").text
    assert "A retraining keeps" in page
    assert model.trigger_word in page
    assert model.destination in page
    r = ann.post("/model/scale", data={"csrf_token": csrf(ann), "lora_scale": "0.8"},
                 follow_redirects=False)
    assert r.status_code == 303
    # What it did is said where it leads, focused, once (a11y review 3, finding 3).
    said = ann.get(r.headers["location"]).text
    assert re.search(r'<p class="notice done" id="done-notice" tabindex="-1" autofocus>'
                     r'Scale 0.8 saved', said), said
    assert 'id="done-notice"' not in ann.get(r.headers["location"]).text
    assert "0.8 (yours)" in ann.get("/train").text
    assert 'data-status="succeeded"' in train(ann)

    versions = ann.get("/versions").text
    assert re.findall(r'<tr id="(v\d)"', versions) == ["v2", "v1"]
    assert re.search(r'<tr id="v1"[^>]*>\s*<th scope="row">v1[^<]*(<span[^>]*>active</span>)?'
                     r'</th>\s*<td>[^<]+</td>\s*<td>4</td>', versions)  # photos used
    assert 'id="grid"' in versions
    grid = re.search(r'id="grid" src="([^"]+)"', versions)
    assert grid
    assert ann.get(grid.group(1).replace("&amp;", "&")).headers["content-type"] == "image/png"
    assert ann.get("/versions/chart.png").headers["content-type"] == "image/png"

    # Roll back to v1, and download its LoRA: the API's hash.
    v1 = svc.models.version(user=svc.users.get_by_name(name="ann"), version_id="1")
    r = ann.post(f"/versions/{v1.id}/activate", data={"csrf_token": csrf(ann)},
                 follow_redirects=False)
    assert r.status_code == 303
    assert "Version 1 is now active" in ann.get(r.headers["location"]).text
    assert svc.models.get(user=svc.users.get_by_name(name="ann")).active_version_id == v1.id
    weights = ann.get(f"/versions/{v1.id}/weights")
    assert hashlib.sha256(weights.content).hexdigest() == v1.weights_sha256
    assert "lora-v1.safetensors" in weights.headers["content-disposition"]

    r = ann.post("/generate", data={"csrf_token": csrf(ann), "prompt": "on a beach",
                                    "num_outputs": "2", "seed": "7"}, follow_redirects=False)
    assert r.status_code == 303
    gallery = ann.get("/generate").text
    assert "2 pictures made with version 1: the newest under Your pictures." in gallery
    images = re.findall(r'<img src="(/generations/[^"]+\.png)"', gallery)
    assert len(images) == 2
    for shown in ("seed 7", "v1", "scale 0.8"):
        assert shown in gallery
    assert ann.get(images[0]).headers["content-type"] == "image/png"


def two_versions(client: TestClient) -> None:
    """Photos uploaded and two trainings: v1 and v2."""
    assert upload(client)[0] == 200
    assert 'data-status="succeeded"' in train(client)
    assert 'data-status="succeeded"' in train(client)


def select_tag(page: str, select: str) -> str:
    tag = re.search(rf'<select id="{select}" name="{select}"[^>]*>', page)
    assert tag, page
    return tag.group(0)


def test_with_one_version_the_page_says_where_the_comparison_comes(ann: TestClient) -> None:
    """With one version the Versions page had no comparison section at all, nothing saying
    that the next version is shown side by side with this one there (found in review)."""
    assert upload(ann)[0] == 200
    assert 'data-status="succeeded"' in train(ann)
    page = ann.get("/versions").text
    section = page.split('<section id="compare"', 1)[1].split("</section>", 1)[0]
    assert "Compare two versions" in section
    assert "shown here side by side with v1" in html.unescape(section)
    assert 'id="grid"' not in page


def test_choosing_one_version_twice_keeps_the_compare_form_and_says_so(ann: TestClient) -> None:
    """v1 with v1 took the Compare form and the grid away, leaving "compare two different
    versions" and no way to choose again (found in review)."""
    two_versions(ann)
    page = ann.get("/versions?a=1&b=1").text
    assert "you chose v1 twice: choose two different versions to compare" in page
    for select in ("a", "b"):
        chosen = re.search(rf'<select id="{select}" name="{select}"[^>]*>(.*?)</select>', page)
        assert chosen, page
        assert re.findall(r'<option value="(\d)"( selected)?>', chosen.group(1)) == [
            ("2", ""), ("1", " selected")]
    assert 'id="grid"' not in page
    # The form compares again from there.
    assert 'id="grid"' in ann.get("/versions?a=1&b=2").text


def test_a_refused_comparison_marks_the_choice_and_focuses_it(ann: TestClient) -> None:
    """v2 with v2: the page came back with a role=alert present at load, the focus on the body
    and the selects unmarked, so a screen reader said nothing (a11y review 9). Both selects are
    now aria-invalid, described by the message, and the second has the focus, as on the
    settings page; a comparison that works marks neither."""
    two_versions(ann)
    page = ann.get("/versions?a=2&b=2").text
    assert 'id="compare-error"' in page
    for select in ("a", "b"):
        tag = select_tag(page, select)
        assert 'aria-invalid="true"' in tag
        assert 'aria-describedby="compare-error"' in tag
        assert (" autofocus" in tag) == (select == "b"), tag
    fine = ann.get("/versions?a=1&b=2").text
    assert "aria-invalid" not in fine
    assert "autofocus" not in fine
    # A version there is none of (an edited or stale link): that select alone is marked and
    # focused, not v1, which exists (a11y pre-merge review 2).
    page = ann.get("/versions?a=9&b=1").text
    assert 'id="compare-error"' in page
    assert 'aria-invalid="true"' in select_tag(page, "a")
    assert " autofocus" in select_tag(page, "a")
    assert "aria-invalid" not in select_tag(page, "b")
    assert "autofocus" not in select_tag(page, "b")


def test_the_grid_and_the_chart_say_in_words_what_their_pictures_show(
        ann: TestClient, svc: Services) -> None:
    """The grid's alt was "the probes of v1 and v2, side by side" and the chart's "identity
    score of every version": which version was in which column, each probe's result and the
    chart's other lines were in the pictures alone (a11y review 6). The grid's alt names each
    column's version, a list under it gives each probe's prompt and results, and the chart's
    alt names every line it draws."""
    two_versions(ann)
    page = ann.get("/versions?a=1&b=2").text
    alt = re.search(r'id="grid" src="[^"]+" alt="([^"]+)"', page)
    assert alt, page
    assert "column A: version 1 (" in alt.group(1)
    assert "column B: version 2 (" in alt.group(1)
    assert alt.group(1).endswith("each probe's result is listed below the picture")  # no table
    user = svc.users.get_by_name(name="ann")
    comparison = svc.likeness.compare(user=user, a="1", b="2")
    assert comparison.probes
    listed = page.split('id="grid-text"', 1)[1].split("</ol>", 1)[0]
    rows = re.findall(r'<li><strong class="probe">([^<]+)</strong>: <span class="prompt">'
                      r'([^<]*)</span>. A \(v1\): <span class="a">[^<]+</span>; B \(v2\): '
                      r'<span class="b">[^<]+</span></li>', listed)
    assert [(label, html.unescape(prompt)) for label, prompt in rows] == [
        (f"probe {row.probe.index}, seed {row.probe.seed}", row.probe.prompt)
        for row in comparison.probes]
    chart = re.search(r'id="chart" src="[^"]+" alt="([^"]+)"', page)
    assert chart, page
    for line in ("identity (mean of the photos)", "identity (nearest photo)",
                 "share of probes with a face", "share of sane images", "active version"):
        assert line in chart.group(1), chart.group(1)


def test_the_grid_says_whose_training_photos_its_identity_is_measured_on(
        ann: TestClient, svc: Services) -> None:
    """The grid's identity (each column's title, each probe's) is measured on the newer
    version's training photos, the Versions table's Likeness on each version's own: the page
    showed two numbers for one version (when they were trained on other photos) and said on
    neither which photos (found in review; ``selfie-lora compare`` says it). The grid's corner,
    its alt and its caption say it."""
    two_versions(ann)
    page = ann.get("/versions?a=1&b=2").text
    alt = re.search(r'id="grid" src="[^"]+" alt="([^"]+)"', page)
    assert alt, page
    assert "; identity on v2's training photos; " in html.unescape(alt.group(1))
    caption = re.search(r'<p class="muted" id="grid-measured-on">([^<]+)</p>', page)
    assert caption, page
    assert "identity on v2's training photos" in html.unescape(caption.group(1))
    user = svc.users.get_by_name(name="ann")
    # A before B: still the newer one's photos.
    assert grid_text(svc.likeness.compare(user=user, a="2", b="1")).measured_on == (
        "identity on v2's training photos")


def _grid_draws(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that gets a 1 each time the likeness service draws a grid (render_grid)."""
    import selfie_lora.services.likeness as likeness

    drawn: list[int] = []
    real = likeness.render_grid

    def counted(**kw: Any) -> bytes:
        drawn.append(1)
        return real(**kw)

    monkeypatch.setattr(likeness, "render_grid", counted)
    return drawn


def test_the_grid_is_drawn_again_only_when_what_it_shows_changed(
        ann: TestClient, svc: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every view of the Versions page drew the comparison grid again (its probe images read,
    decoded, scaled) and wrote it back to the storage, an upload per view on S3 (found in
    review; the chart was fixed so in 17b3514). The stored grid is sent while it shows what
    would be drawn now; one that does not (an older release's, or another comparison's
    words) is drawn again."""
    import selfie_lora.services.likeness as likeness
    from selfie_lora.likeness.grid import render_grid

    two_versions(ann)
    drawn = _grid_draws(monkeypatch)
    grid = re.search(r'id="grid" src="([^"]+)"', ann.get("/versions?a=1&b=2").text)
    assert grid
    url = grid.group(1).replace("&amp;", "&")
    first = ann.get(url)
    assert first.status_code == 200
    assert len(drawn) == 1
    again = ann.get(url)
    assert again.content == first.content
    assert len(drawn) == 1  # sent as stored, not drawn again
    user = svc.users.get_by_name(name="ann")
    comparison = svc.likeness.compare(user=user, a="1", b="2")
    # A grid stored by an older release (no inputs in it) is drawn again, and stored.
    old = likeness.grid_key(comparison.a.id, comparison.b.id)
    svc.blobs.put(old, render_grid(left_title="A", right_title="B", rows=[
        likeness.GridRow(label=["old"], left=None, right=None)]))
    assert ann.get(url).content == first.content
    assert len(drawn) == 2
    assert svc.blobs.get(old) == first.content


def test_the_grid_has_an_etag_and_a_browser_holding_it_gets_a_304(
        ann: TestClient, svc: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """The grid was sent whole at every view of the Versions page, with no ETag to revalidate
    with (found in review; the chart got one in 17b3514). Both grid routes send a weak ETag,
    the digest of what the grid shows, and answer an If-None-Match holding it with a 304,
    the grid neither read nor drawn."""

    two_versions(ann)
    user = svc.users.get_by_name(name="ann")
    _key, secret = svc.users.create_key(user=user, name="t")
    api = {"Authorization": f"Bearer {secret}"}
    comparison = svc.likeness.compare(user=user, a="1", b="2")
    query = f"a={comparison.a.id}&b={comparison.b.id}"
    drawn = _grid_draws(monkeypatch)
    for path, headers in ((f"/versions/compare/grid.png?{query}", {}),
                          (f"/api/model/compare/grid.png?{query}", api)):
        first = ann.get(path, headers=headers)
        assert first.status_code == 200, path
        etag = first.headers.get("etag")
        assert etag is not None, path
        assert etag.startswith('W/"'), etag
        before = len(drawn)
        held = ann.get(path, headers={**headers, "If-None-Match": etag})
        assert held.status_code == 304, path
        assert held.content == b""
        assert held.headers["etag"] == etag
        assert ann.get(path, headers={**headers, "If-None-Match": "*"}).status_code == 304
        assert len(drawn) == before
    # The other comparison's grid is another picture, another tag.
    other = ann.get(f"/versions/compare/grid.png?a={comparison.b.id}&b={comparison.a.id}",
                    headers={"If-None-Match": etag})
    assert other.status_code == 200
    assert other.headers["etag"] != etag


def test_a_grid_drawn_with_a_probe_image_missing_is_neither_stored_nor_tagged(
        ann: TestClient, svc: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """The grid's digest (its ETag, and the one stored in it) names the probe images' keys, not
    whether each image was there: a grid drawn with one missing (a blank cell) was stored and
    answered 304 for good, even after the image was written again under its key (found in
    review). Now such a grid is drawn at each view, not stored, and sent with no ETag and
    no-store; once the image is back, the whole grid is drawn, stored and tagged."""
    import selfie_lora.services.likeness as likeness

    two_versions(ann)
    user = svc.users.get_by_name(name="ann")
    _key, secret = svc.users.create_key(user=user, name="t")
    api = {"Authorization": f"Bearer {secret}"}
    comparison = svc.likeness.compare(user=user, a="1", b="2")
    query = f"a={comparison.a.id}&b={comparison.b.id}"
    stored = likeness.grid_key(comparison.a.id, comparison.b.id)
    image_key = comparison.probes[0].a.image_key if comparison.probes[0].a else None
    assert image_key is not None
    image = svc.blobs.get(image_key)
    svc.blobs.delete(image_key)
    drawn = _grid_draws(monkeypatch)
    paths = ((f"/versions/compare/grid.png?{query}", {}),
             (f"/api/model/compare/grid.png?{query}", api))
    blank = b""
    for path, headers in paths:
        for _ in range(2):
            got = ann.get(path, headers=headers)
            assert got.status_code == 200, path
            assert "etag" not in got.headers, path  # old code: W/"<digest>"
            assert got.headers["cache-control"] == "private, no-store"
            assert not svc.blobs.exists(stored), path  # old code: stored with its blank cell
            blank = got.content
    assert len(drawn) == 4  # drawn at each view
    svc.blobs.put(image_key, image)  # written again under its key
    for path, headers in paths:
        got = ann.get(path, headers=headers)
        assert got.status_code == 200, path
        assert got.content != blank, path  # old code: the stored blank grid
        etag = got.headers.get("etag")
        assert etag is not None, path
        assert etag.startswith('W/"'), etag
        assert got.headers["cache-control"] == "private"
        assert ann.get(path, headers={**headers, "If-None-Match": etag}).status_code == 304
    assert svc.blobs.exists(stored)
    assert len(drawn) == 5  # the whole grid drawn once, then sent as stored


def test_a_head_of_the_grid_neither_draws_nor_stores_it(
        ann: TestClient, svc: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """HEAD /versions/compare/grid.png and HEAD /api/model/compare/grid.png ran as their GET
    (api.head.HeadAsGet): a grid not stored yet, or stale, was read, drawn and written to the
    storage (an upload on S3) to send headers alone, where the chart's HEAD draws nothing
    (21c7303; found in review). Now a HEAD sends the GET's headers (its ETag, or none for a
    grid a probe image is missing from) with nothing drawn or stored."""
    import selfie_lora.services.likeness as likeness

    two_versions(ann)
    user = svc.users.get_by_name(name="ann")
    _key, secret = svc.users.create_key(user=user, name="t")
    api = {"Authorization": f"Bearer {secret}"}
    comparison = svc.likeness.compare(user=user, a="1", b="2")
    query = f"a={comparison.a.id}&b={comparison.b.id}"
    stored = likeness.grid_key(comparison.a.id, comparison.b.id)
    svc.blobs.delete(stored)  # drawn by nobody yet: the first view draws it
    drawn = _grid_draws(monkeypatch)
    paths = ((f"/versions/compare/grid.png?{query}", {}),
             (f"/api/model/compare/grid.png?{query}", api))
    heads = []
    for path, headers in paths:
        head = ann.head(path, headers=headers)
        assert head.status_code == 200, path
        assert head.content == b""
        assert head.headers["content-type"] == "image/png"
        assert "content-length" not in head.headers
        assert drawn == [], path  # old code: [1], drawn for the HEAD
        assert not svc.blobs.exists(stored), path  # old code: stored by the HEAD
        heads.append(head.headers)
    got = ann.get(paths[0][0])
    assert drawn == [1]
    for head in heads:
        assert (head["etag"], head["cache-control"]) == (got.headers["etag"], "private")
    # A probe image missing, no whole grid stored: no ETag, as its GET.
    svc.blobs.delete(stored)
    image_key = comparison.probes[0].b.image_key if comparison.probes[0].b else None
    assert image_key is not None
    svc.blobs.delete(image_key)
    for path, headers in paths:
        head = ann.head(path, headers=headers)
        assert head.status_code == 200, path
        assert "etag" not in head.headers, path
        assert head.headers["cache-control"] == "private, no-store"
        assert ann.get(path, headers=headers).headers["cache-control"] == "private, no-store"
    assert drawn == [1, 1, 1]  # by the GETs alone


def test_the_grid_says_a_version_s_scoring_failed_not_that_it_is_not_scored(
        ann: TestClient, svc: Services, fake_generator: FakeGenerator) -> None:
    """v2's scoring failed (the generator down): the grid's column B, its alt and every probe's
    words said "not scored", as of a version from before likeness tracking, or said nothing
    (found in review). They say its scoring failed, in the picture and in words."""
    assert upload(ann)[0] == 200
    assert 'data-status="succeeded"' in train(ann)
    fake_generator.fail_with = GenerationError("the generator is down")
    try:
        train(ann)
    finally:
        fake_generator.fail_with = None
    page = ann.get("/versions?a=1&b=2").text
    alt = re.search(r'id="grid" src="[^"]+" alt="([^"]+)"', page)
    assert alt, page
    assert "column B: version 2 (held), scoring failed;" in alt.group(1)
    listed = page.split('id="grid-text"', 1)[1].split("</ol>", 1)[0]
    words = re.findall(r'<span class="b">([^<]+)</span>', listed)
    assert words
    assert set(words) == {"scoring failed"}
    user = svc.users.get_by_name(name="ann")
    assert grid_text(svc.likeness.compare(user=user, a="1", b="2")).b == (
        "B: version 2 (held)\nscoring failed")


def test_the_chart_s_values_are_in_a_table_its_alt_points_to(
        ann: TestClient, svc: Services) -> None:
    """The chart's alt pointed to the versions table for each version's likeness, but that
    table had only the mean identity (or the face share): the nearest-photo identity and the
    share of sane images were in the picture alone (a11y review 4, f07_chart.py). A table
    under the chart gives its four series for each version, on the chart's photos."""
    two_versions(ann)
    page = ann.get("/versions").text
    chart = re.search(r'id="chart" src="[^"]+" alt="([^"]+)"', page)
    assert chart, page
    assert "the chart's values are in the table under it" in chart.group(1)
    values = page.split('<details class="chart-values">', 1)[1].split("</details>", 1)[0]
    heads = re.findall(r'<th scope="col">([^<]+)</th>', values)
    assert heads == ["Version", "identity (mean of the photos)", "identity (nearest photo)",
                     "share of probes with a face", "share of sane images", "Gate"]
    user = svc.users.get_by_name(name="ann")
    points = svc.likeness.chart_points(svc.models.get(user=user))

    def shown(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    rows = re.findall(r'<tr><th scope="row">([^<]+)</th>((?:<td>[^<]*</td>)+)</tr>', values)
    assert [(head, re.findall(r"<td>([^<]*)</td>", cells)) for head, cells in rows] == [
        (f"v{p.number}" + (" (active)" if p.active else ""),
         [shown(p.identity), shown(p.identity_nearest), shown(p.face_share),
          shown(p.sane_share), p.gate_status]) for p in points]
    assert any(p.identity_nearest is not None and p.sane_share is not None for p in points)


def test_the_chart_s_text_says_whose_training_photos_it_is_measured_on(
        ann: TestClient, svc: Services) -> None:
    """The chart's photos (the active version's training photos: "..., on version 2's training
    photos") were in its title, in the picture alone: its alt and the table of its values
    did not say them, and those values differ from the versions table's Likeness (each version
    on its own photos) for versions trained on other photos (found in review). Both say them."""
    two_versions(ann)
    page = html.unescape(ann.get("/versions").text)
    chart = re.search(r'id="chart" src="[^"]+" alt="([^"]+)"', page)
    assert chart, page
    assert ", measured on version 2's training photos, with the versions" in chart.group(1)
    caption = re.search(r'<caption id="chart-values-caption">([^<]+)</caption>', page)
    assert caption, page
    assert caption.group(1) == "The chart's values, by version, on version 2's training photos"
    user = svc.users.get_by_name(name="ann")
    values = svc.likeness.chart_values(svc.models.get(user=user))
    assert values.photos_of == 2
    assert values.points == svc.likeness.chart_points(svc.models.get(user=user))


def test_an_error_page_s_back_link_leads_to_the_refused_form_s_page(ann: TestClient) -> None:
    """Every error page's Back led to /photos: a refused prompt or trainer version was left
    behind on another page (found in review). With scripts, Back goes back in the history
    (data-back, tests/browser/test_forms.py)."""
    assert upload(ann)[0] == 200
    token = csrf(ann)
    refused = [  # (the form's path, what it sent, its page); the trainer-version form's
        # refusals are the Model page itself (test_a_refused_trainer_version_form_comes_back...)
        ("/generate", {"prompt": "a portrait", "seed": "not a number"}, "/generate"),
        ("/model/scale", {"lora_scale": "99"}, "/generate"),  # the slider is on /generate
    ]
    for path, data, page in refused:
        r = ann.post(path, data={"csrf_token": token, **data})
        assert r.status_code in (404, 409, 422), (path, r.status_code)
        back = re.search(r'<a href="([^"]+)" data-back>Back</a>', r.text)
        assert back, (path, r.text)
        assert back.group(1) == page, path
    # A page that is not found: its section's page (test_a_not_found_page_s_back_leads_...).
    r = ann.get("/versions/nope/weights")
    assert r.status_code == 404
    assert '<a href="/versions" data-back>Back</a>' in r.text


@pytest.mark.parametrize(("path", "back"), [
    ("/versions/nope/weights", "/versions"),  # a version's download: the Versions page
    ("/generations/nope/0.png", "/generate"),  # a picture: the Generate page's gallery
    ("/generate?before=nope", "/generate"),  # a gallery page after no generation: the newest
    ("/no-such-page", "/photos"),  # of no section: the default page
    ("/versions/foo/bar", "/versions"),  # any other address under a section: its page
    ("/settings/nope", "/settings"),
])
def test_a_not_found_page_s_back_leads_to_the_section_of_what_is_missing(
        ann: TestClient, path: str, back: str) -> None:
    """A Not found page's Back (without scripts, or opened from a bookmark or another site:
    nothing of this site in the history to go back to) led to /photos whatever was missing: a
    version's download, a picture of the gallery, a gallery page's stale link."""
    r = ann.get(path)
    assert r.status_code == 404, r.text
    assert "<h1>Not found</h1>" in r.text
    assert f'<a href="{back}" data-back>Back</a>' in r.text


@pytest.mark.parametrize(("path", "said"), [
    ("/photos/set/abc.jpg", "The picture's number must be a whole number"),
    ("/photos/set/" + "9" * 5000 + ".jpg", "The picture's number is not valid"),
    ("/generations/g/1.5.png", "The picture's number must be a whole number"),
    ("/train/t/samples/x.jpg", "The sample's step must be a whole number"),
])
def test_a_picture_s_address_edited_to_no_number_is_refused_as_an_address_not_a_form(
        ann: TestClient, path: str, said: str) -> None:
    # The 422 of an address whose number FastAPI could not read (the API's is its 422 too) said
    # the form's words: "The field index must be a whole number: go back to the page, fill the
    # form in and send it again", for an address no form sends.
    r = ann.get(path)
    assert r.status_code == 422
    assert (f'<p class="error" role="alert" data-code="invalid_request">{said} (in the '
            "address): go back to the page and follow its link again</p>") in html.unescape(r.text)


def test_a_not_found_page_s_back_and_the_nav_name_the_same_sections(ann: TestClient) -> None:
    """The nav (base.html) and the Not found page's Back (``section_page``) each listed the
    sections: one list now (``web.app.SECTIONS``). Each nav link's section, asked an address
    that is no page under it, leads Back to that link, the one the nav marks current; an
    address of no section leads to one of its links."""
    def nav(html: str) -> str:
        return html[html.index('<nav aria-label="Site">'):html.index("</nav>")]

    links = re.findall(r'<a href="([^"]+)"', nav(ann.get("/photos").text))
    assert links == ["/photos", "/train", "/versions", "/generate", "/model", "/settings"]
    for href in links:
        r = ann.get(f"{href}/no-such-page")
        assert r.status_code == 404, href
        assert f'<a href="{href}" data-back>Back</a>' in r.text, href
        assert re.findall(r'<a href="([^"]+)" aria-current="page">', nav(r.text)) == [href]
    back = re.search(r'<a href="([^"]+)" data-back>Back</a>', ann.get("/no-such-page").text)
    assert back
    assert back.group(1) in links


def test_the_nav_marks_the_section_a_not_found_page_s_back_leads_to(ann: TestClient) -> None:
    """The nav marked a link current when the address began with it (base.html's
    ``path.startswith(href)``), where the Not found page's Back goes to the section the address
    is under (``section_page``): /photosx marked Photos while Back went to the photos as to any
    address of no section, and a picture's /generations/... marked nothing while Back went to
    Generate (found in review). The nav takes ``section_page``'s answer now: for every 404 the
    link it marks is the Back's, or none where Back is the default."""
    def marked(html: str) -> list[str]:
        nav = html[html.index('<nav aria-label="Site">'):html.index("</nav>")]
        return re.findall(r'<a href="([^"]+)" aria-current="page">', nav)

    for path, section in (("/photosx", None), ("/photos/nope", "/photos"),
                          ("/generations/nope/0.png", "/generate"), ("/generationsx", None),
                          ("/versions/nope/weights", "/versions"), ("/settingsx/y", None),
                          ("/trainx", None), ("/train/nope/samples/0.jpg", "/train"),
                          ("/no-such-page", None)):
        r = ann.get(path)
        assert r.status_code == 404, path
        back = re.search(r'<a href="([^"]+)" data-back>Back</a>', r.text)
        assert back, path
        assert (marked(r.text), back.group(1)) == (
            [section] if section else [], section or "/photos"), path


@contextmanager
def held_training(tmp_path: Path) -> Iterator[tuple[TestClient, FakeTrainer]]:
    """Ann signed in on the pages, her photos uploaded and a training started there, held in
    ``processing`` at the trainer's gate (set it to let the training end)."""
    settings = make_settings(tmp_path)
    trainer = FakeTrainer(gate=threading.Event())
    services = fake_services(settings, trainer=trainer)
    try:
        services.users.create(name="ann", password=PASSWORD)
        with browser(settings, services) as client:
            sign_in(client, "ann")
            assert upload(client)[0] == 200
            r = client.post("/train/start", data={"csrf_token": csrf(client)},
                            follow_redirects=False)
            assert r.status_code == 303, r.text
            yield client, trainer
            assert trainer.gate is not None
            trainer.gate.set()  # or the worker waits on it as the app shuts down
    finally:
        services.close()


def test_the_train_page_speaks_of_a_retraining_only_once_the_model_has_had_a_training(
        tmp_path: Path) -> None:
    # While the first training ran (no version yet) the page said "A retraining keeps" (found
    # in review): a retraining is a training of a model that has had one (the domain's
    # is_retraining), and this one is the first.
    with held_training(tmp_path) as (client, trainer):
        running = client.get("/train").text
        assert 'id="ended"' not in running  # held at the trainer's gate
        assert "First training" in running
        assert "Your first training: it trains your model" in running
        assert "A retraining keeps" not in running
        assert "Retrain" not in running
        trainer.gate.set()
        deadline = time.monotonic() + 60
        while 'id="ended"' not in client.get("/train/status").text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ended = client.get("/train").text
        assert "A retraining keeps" in ended
        assert ">Retrain</button>" in ended
        # A retraining under way is one: the page says what it keeps.
        trainer.gate.clear()
        r = client.post("/train/start", data={"csrf_token": csrf(client)},
                        follow_redirects=False)
        assert r.status_code == 303, r.text
        retraining = client.get("/train").text
        assert 'id="ended"' not in retraining
        assert "A retraining keeps" in retraining
        trainer.gate.set()


def test_the_cancel_form_asks_first_and_a_canceled_training_is_told_once(
        tmp_path: Path) -> None:
    """Cancel had no confirmation (activate and revoke have one), though focus stays on it; the
    ended text said "The training was canceled." twice (found in review)."""
    with held_training(tmp_path) as (client, _trainer):
        running = client.get("/train").text
        form = re.search(r'<form method="post" action="/train/cancel"[^>]*>', running)
        assert form, running
        assert 'class="confirm"' in form.group(0)
        assert 'data-confirm="Cancel the training?' in form.group(0)
        training_id = re.search(r'name="training_id" value="([^"]+)"', running)
        assert training_id
        r = client.post("/train/cancel", data={"csrf_token": csrf(client),
                                               "training_id": training_id.group(1)},
                        follow_redirects=False)
        assert r.status_code == 303, r.text
        ended = train_ended(client)
        assert ended.count("was canceled") == 1, ended
        assert "Start a new training when you are ready." in ended


def test_a_cancel_sent_after_the_training_ended_says_it_had_already_ended(
        ann: TestClient, svc: Services) -> None:
    """Without scripts the Train page does not update: a Cancel sent from the page loaded while
    the training ran, once it had succeeded, said "Training canceled." above "The training
    succeeded" (nojs review 1)."""
    assert upload(ann)[0] == 200
    train(ann)
    model = svc.repo.get_model_for_user(svc.users.get_by_name(name="ann").id)
    assert model is not None
    succeeded = svc.repo.list_trainings(model.id)[0]
    r = ann.post("/train/cancel", data={"csrf_token": csrf(ann), "training_id": succeeded.id,
                                         "sure": "1"})
    page = html.unescape(r.text)
    assert "Training canceled." not in page
    assert "The training had already ended (succeeded): nothing to cancel." in page


def test_the_started_notice_does_not_say_the_page_follows_the_training(
        tmp_path: Path) -> None:
    """"Training started: this page follows it." stood above the no-script note saying the page
    does not update by itself (nojs review 8): worded so it is true for both."""
    with held_training(tmp_path) as (client, _trainer):
        page = client.get("/train").text  # the page the Start led to, its notice once
        assert "Training started: its status is below." in page
        assert "follows it" not in page


def test_a_running_training_s_page_says_how_to_update_it_without_scripts(
        tmp_path: Path) -> None:
    """Without JavaScript nothing polls: the page said "queued" long after the training ended,
    and nothing said to reload it (a11y review 3). While a training is active, a <noscript>
    line says so and links to the Train page; an ended one's page has no such line."""
    with held_training(tmp_path) as (client, trainer):
        running = client.get("/train").text
        noscript = re.search(r"<noscript>(.*?)</noscript>", running, re.S)
        assert noscript, running
        assert "does not update by itself without JavaScript" in noscript.group(1)
        assert '<a href="/train">refresh the status</a>' in noscript.group(1)
        assert trainer.gate is not None
        trainer.gate.set()
        assert "<noscript>" not in train_ended(client)
        assert "<noscript>" not in client.get("/train").text


def _asks_without_scripts(page: str, action: str) -> str:
    """The label of the required tick box that the form posting to ``action`` has for a
    browser without scripts (its window.confirm never runs there)."""
    form = re.search(rf'<form method="post" action="{re.escape(action)}"[^>]*>(.*?)</form>',
                     page, re.S)
    assert form, (action, page)
    noscript = re.search(r"<noscript>(.*?)</noscript>", form.group(1), re.S)
    assert noscript, form.group(0)
    assert re.search(r'<input type="checkbox" id="[^"]+" name="sure" value="1" required>',
                     noscript.group(1)), noscript.group(1)
    return re.sub(r"<[^>]+>", "", noscript.group(1)).strip()


def test_destructive_forms_ask_before_they_act_without_scripts(ann: TestClient, svc: Services,
                                                               tmp_path: Path) -> None:
    """Their confirmation was window.confirm alone: without JavaScript one Enter revoked a key,
    deleted a generation, switched the version or ended a training at once (a11y review 4).
    Each one now has, for a browser without scripts, a required box to tick first."""
    assert upload(ann)[0] == 200
    train(ann)
    train(ann)
    r = ann.post("/generate", data={"csrf_token": csrf(ann), "prompt": "p", "num_outputs": "1"},
                 follow_redirects=False)
    assert r.status_code == 303, r.text
    user = svc.users.get_by_name(name="ann")
    key = svc.users.keys(user=user)[0]
    assert _asks_without_scripts(ann.get("/settings").text,
                                 f"/settings/keys/{key.id}/revoke").startswith("Yes, revoke")
    generation = svc.generation.history(user=user)[0]
    assert _asks_without_scripts(ann.get("/generate").text,
                                 f"/generations/{generation.id}/delete") == (
        "Yes, delete it for good")
    v1 = svc.models.version(user=user, version_id="1")
    assert _asks_without_scripts(ann.get("/versions").text,
                                 f"/versions/{v1.id}/activate") == "Yes, use version 1"
    with held_training(tmp_path / "held") as (client, _trainer):
        assert _asks_without_scripts(client.get("/train").text, "/train/cancel") == (
            "Yes, cancel it: it stops now")


def test_after_a_canceled_first_training_the_next_is_still_the_first(tmp_path: Path) -> None:
    """After a first training was canceled (no version made), the page offered to "Retrain",
    said "the version you use now stays active" beside "No version is active yet", and the
    next training, which made v1, was headed and logged "Retraining" (browser review 2): any
    ended training counted. A training is a retraining once the model has a version."""
    with held_training(tmp_path) as (client, trainer):
        running = client.get("/train").text
        training_id = re.search(r'name="training_id" value="([^"]+)"', running)
        assert training_id
        r = client.post("/train/cancel", data={"csrf_token": csrf(client),
                                               "training_id": training_id.group(1)},
                        follow_redirects=False)
        assert r.status_code == 303, r.text
        train_ended(client)
        page = client.get("/train").text
        assert ">Train</button>" in page
        assert ">Retrain</button>" not in page
        assert "A retraining keeps" not in page
        assert "stays active" not in page
        # The pin was taken by the canceled start: the page does not promise a new one.
        assert "Your first training (the one before made no version)" in page
        r = client.post("/train/start", data={"csrf_token": csrf(client)},
                        follow_redirects=False)
        assert r.status_code == 303, r.text
        second = client.get("/train").text
        assert "<h2>First training</h2>" in second, second
        assert "<h2>Retraining</h2>" not in second
        trainer.gate.set()
        train_ended(client)
        # v1 exists now: the next one is a retraining, of the version now active.
        after = client.get("/train").text
        assert ">Retrain</button>" in after
        log = client.get("/versions").text
        assert "retraining succeeded" not in log, log
        assert "first training succeeded: v1" in log, log


def train_ended(client: TestClient) -> str:
    """The #ended text of the training page, once the training has ended (spaces folded)."""
    deadline = time.monotonic() + 60
    while 'id="ended"' not in (page := client.get("/train").text):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return " ".join(re.split(r'id="ended"[^>]*>', page, maxsplit=1)[1].split("</p>", 1)[0]
                    .split())


def test_the_trainer_version_form_refuses_a_replicate_model_the_operator_did_not_choose(
        tmp_path: Path) -> None:
    # The form took any owner/name:<64 hex>: a model of the user's choosing then ran every
    # later training on the operator's Replicate account.
    settings = make_settings(tmp_path, trainer="replicate", replicate_api_token="r8_dummy",
                             replicate_owner="operator")
    services = fake_services(settings)
    services.users.create(name="ann", password=PASSWORD)
    try:
        with browser(settings, services) as client:
            sign_in(client, "ann")
            status, text = upload(client, size=1100)  # large enough for Replicate's 1024 px
            assert status == 200, text
            pinned = services.models.get(user=services.users.get_by_name(name="ann")).trainer_version
            r = client.post("/model/trainer-version", follow_redirects=False, data={
                "csrf_token": csrf(client), "reason": "because",
                "trainer_version": "attacker/anything-expensive:" + "ab" * 32})
            assert r.status_code == 403
            assert 'data-code="trainer_not_allowed"' in r.text
            assert page_title(r.text) == "Model · selfie-lora"  # the form's page, not an error's
            assert "ostris/flux-dev-lora-trainer" in html.unescape(r.text)
            assert f"<code>{pinned}</code>" in client.get("/model").text  # unchanged
            newer = "ostris/flux-dev-lora-trainer:" + "ab" * 32
            r = client.post("/model/trainer-version", follow_redirects=False, data={
                "csrf_token": csrf(client), "reason": "newer", "trainer_version": newer})
            assert r.status_code == 303, r.text
            assert f"<code>{newer}</code>" in client.get("/model").text
    finally:
        services.close()


def test_a_refused_trainer_version_form_comes_back_on_the_model_page_with_what_was_typed(
        ann: TestClient) -> None:
    """A typo in the trainer version (or no reason) went to the general error page: without
    scripts Back led to an empty form, both values lost (webhostile review 3). Now the Model
    page comes back with the message beside the form, the values kept, the field at fault
    marked and focused, as the Settings key form does."""
    assert upload(ann)[0] == 200
    before = ann.get("/model").text
    for sent, status, field in (
            ({"trainer_version": "local", "reason": "try the new one"}, 422, "trainer_version"),
            ({"trainer_version": "local-tiny-v1", "reason": "  "}, 422, "reason"),
            ({"trainer_version": "  ", "reason": "try the new one"}, 422, "trainer_version"),
            # Over the API's cap: refused by the service for the page too, at the reason.
            ({"trainer_version": "local-tiny-v1", "reason": "x" * 501}, 422, "reason")):
        r = ann.post("/model/trainer-version", data={"csrf_token": csrf(ann), **sent},
                     follow_redirects=False)
        # Old code: the error page ("Model change refused"), or FastAPI's "Field required".
        assert r.status_code == status, r.text
        assert page_title(r.text) == "Model · selfie-lora", r.text
        assert '<details open>' in r.text
        assert re.search(r'<p class="error" role="alert" id="repin-error"[^>]*>[^<]+</p>',
                         r.text)
        typed = _field(r.text, field)
        assert 'aria-invalid="true"' in typed
        assert 'aria-describedby="repin-error"' in typed
        assert "autofocus" in typed
        assert r.text.count("autofocus") == 1
        for name in ("trainer_version", "reason"):
            assert f'value="{html.escape(sent[name])}"' in _field(r.text, name)
    assert "not a local trainer version" in ann.post(
        "/model/trainer-version", data={"csrf_token": csrf(ann), "trainer_version": "local",
                                        "reason": "x"}).text
    # Nothing changed.
    assert re.search(r"<dt>Trainer version</dt><dd><code>[^<]+", before).group(0) in ann.get(
        "/model").text


def test_a_refused_generate_comes_back_on_the_generate_page_with_the_field_marked(
        ann: TestClient, svc: Services) -> None:
    """A Generate the server refused (a prompt of spaces passes the textarea's required) went to
    the general error page, focus on <body>, no field marked, and its Back without scripts
    lost the prompt, seed and count (a11y review 3, f02_generate_refused.py). Now the Generate
    page comes back, 422, the field at fault marked, described and focused, what was typed
    kept, as "Save the scale" does; nothing is made."""
    two_versions(ann)
    for sent, at_fault, said in (
            ({"prompt": "   ", "seed": "42", "num_outputs": "3"}, "prompt", "the prompt is empty"),
            ({"prompt": "a hike", "seed": "1.5", "num_outputs": "2"}, "seed", "(not '1.5')"),
            ({"prompt": "a hike", "seed": "", "num_outputs": "9"}, "num_outputs", "1 to 4")):
        r = ann.post("/generate", data={"csrf_token": csrf(ann), "version": "1",
                                        "lora_scale": "0.7", **sent}, follow_redirects=False)
        assert r.status_code == 422, r.text
        assert page_title(r.text) == "Generate · selfie-lora", r.text  # old: the error page
        error = re.search(rf'<p class="error" role="alert" id="{at_fault}-error">([^<]+)</p>',
                          r.text)
        assert error, r.text
        assert said in html.unescape(error.group(1))
        field = (re.search(r'<textarea id="prompt"[^>]*>', r.text).group(0)  # type: ignore[union-attr]
                 if at_fault == "prompt" else _field(r.text, at_fault))
        assert 'aria-invalid="true"' in field
        assert f'aria-describedby="{at_fault}-error"' in field
        assert "autofocus" in field
        assert r.text.count("autofocus") == 1
        assert f'>{html.escape(sent["prompt"])}</textarea>' in r.text
        assert f'value="{sent["num_outputs"]}"' in _field(r.text, "num_outputs")
        assert f'value="{sent["seed"]}"' in _field(r.text, "seed")
        assert 'value="0.7"' in _field(r.text, "lora_scale")
        assert '<option value="1" selected>v1</option>' in r.text
        assert "No pictures yet." in r.text  # nothing was made


def test_a_refused_scale_comes_back_on_the_generate_page_with_what_was_typed(
        ann: TestClient, svc: Services) -> None:
    """"Save the scale" skips the browser's checks (formnovalidate, so that an empty prompt does
    not block it), the number field's range too: an empty or out-of-range scale led to the
    general error page, a dead end whose Back without scripts lost the form (diff2 review
    finding 3). Now the Generate page comes back with the message beside the field, marked
    and focused, what was typed kept, as the Model page's re-pin does; nothing is saved."""
    two_versions(ann)
    user = svc.users.get_by_name(name="ann")
    saved = svc.models.get(user=user).lora_scale
    for scale, said in (("", "type the scale to save: a number from -1.0 to 3.0"),
                        ("5", "the LoRA scale must be a number from -1.0 to 3.0 (not '5')"),
                        ("-1.5", "(not '-1.5')"), ("abc", "(not 'abc')"), ("inf", "(not 'inf')"),
                        ("0_1", "(not '0_1')"), ("1e999", "(not '1e999')")):
        sent = {"prompt": "a <hike> & more", "num_outputs": "3", "seed": "42", "version": "1",
                "lora_scale": scale}
        r = ann.post("/model/scale", data={"csrf_token": csrf(ann), **sent},
                     follow_redirects=False)
        # Old code: the error page ("That did not work"), or FastAPI's "is missing".
        assert r.status_code == 422, r.text
        assert page_title(r.text) == "Generate · selfie-lora", r.text
        error = re.search(r'<p class="error" role="alert" id="scale-error">([^<]+)</p>', r.text)
        assert error, r.text
        assert said in html.unescape(error.group(1))
        field = _field(r.text, "lora_scale")
        assert 'aria-invalid="true"' in field
        assert 'aria-describedby="scale-error"' in field
        assert "autofocus" in field
        assert r.text.count("autofocus") == 1
        assert f'value="{scale}"' in field
        assert 'value="3"' in _field(r.text, "num_outputs")
        assert 'value="42"' in _field(r.text, "seed")
        assert ">a &lt;hike&gt; &amp; more</textarea>" in r.text
        assert '<option value="1" selected>v1</option>' in r.text
        assert '<option value="2">v2 (active)</option>' in r.text
        assert svc.models.get(user=user).lora_scale == saved
    # Sent again right, it is saved (the prompt may be empty: Save needs none).
    r = ann.post("/model/scale", data={"csrf_token": csrf(ann), "prompt": "", "lora_scale": "0.5"},
                 follow_redirects=False)
    assert r.status_code == 303, r.text
    assert svc.models.get(user=user).lora_scale == 0.5


@contextlib.contextmanager
def _on_flux_v1_with_photos(tmp_path: Path) -> Iterator[TestClient]:
    """Ann signed in on a FLUX.1 server, her model pinned to local-flux-v1 (512 px), her photos
    uploaded big enough for 1024 px (prepared at 512 px)."""
    flux = tmp_path / "FLUX.1-dev"
    flux.mkdir()
    settings = make_settings(tmp_path, base_model=str(flux), trainer_version="local-flux-v1")
    services = fake_services(settings)
    services.users.create(name="ann", password=PASSWORD)
    try:
        with browser(settings, services) as client:
            sign_in(client, "ann")
            assert upload(client, 2, size=1400)[0] == 200  # big enough for 1024 px
            yield client
    finally:
        services.close()


def _repin_to_flux_v2(client: TestClient) -> str:
    """The model page's re-pin to local-flux-v2 (1024 px): where it sends the browser."""
    r = client.post("/model/trainer-version", follow_redirects=False, data={
        "csrf_token": csrf(client), "reason": "v2", "trainer_version": "local-flux-v2"})
    assert r.status_code == 303, r.text
    return r.headers["location"]


def test_the_model_page_shows_the_trainer_version_the_first_training_uses(
        tmp_path: Path) -> None:
    # The page said the version was "fixed when the model was made, by your first upload of
    # photos", showing the one configured at that upload: the first training pins it, and until
    # then it takes the configured one, so a user had no reason to re-pin; and the page's re-pin
    # to the version shown was recorded nowhere, so the first training took the configured one.
    made = make_settings(tmp_path, trainer_version="local-tiny-v2")
    services = fake_services(made)
    services.users.create(name="ann", password=PASSWORD)
    try:
        with browser(made, services) as client:
            sign_in(client, "ann")
            assert upload(client)[0] == 200  # makes the model, trains nothing
    finally:
        services.close()
    settings = make_settings(tmp_path, trainer_version="local-tiny-v1")  # the default moved
    services = fake_services(settings)
    try:
        with browser(settings, services) as client:
            sign_in(client, "ann")
            page = client.get("/model").text
            assert "fixed when" not in page
            assert '<code>local-tiny-v1</code>' in page
            assert "(what your first training uses: the server's trainer version" in page
            assert "Your first training pins the trainer version" in page
            r = client.post("/model/trainer-version", follow_redirects=False, data={
                "csrf_token": csrf(client), "reason": "keep v2",
                "trainer_version": "local-tiny-v2"})
            assert r.status_code == 303, r.text
            page = client.get("/model").text
            assert '<code>local-tiny-v2</code>' in page
            assert "(your choice: your first training uses it)" in page
            assert 'data-status="succeeded"' in train(client)
            page = client.get("/model").text
            assert '<code>local-tiny-v2</code>' in page
            assert "(pinned: every training uses it)" in page
    finally:
        services.close()


def test_a_repin_to_more_pixels_says_on_the_model_page_to_upload_the_photos_again(
        tmp_path: Path) -> None:
    # The re-pin form came back to the model page without a word: the stored photos, cropped
    # at 512 px for local-flux-v1, then trained local-flux-v2 at 1024 px, each upscaled.
    with _on_flux_v1_with_photos(tmp_path) as client:
        assert 'id="photos-notice"' not in client.get("/model").text
        page = html.unescape(client.get(_repin_to_flux_v2(client)).text)
        assert 'id="photos-notice"' in page
        assert ("Your stored photos were prepared at 512 px, and local-flux-v2 trains at "
                "1024 px: upload your photos again") in page
        started = client.post("/train/start", data={"csrf_token": csrf(client)},
                              follow_redirects=False)
        assert started.status_code == 409, started.text
        assert 'data-code="photos_need_upload_again"' in started.text


def test_the_train_page_says_before_the_submit_what_the_start_would_refuse(
        tmp_path: Path) -> None:
    # The train page showed its Train button as for any training, and only the 409 page after
    # the submit said the photos must be uploaded again, or the model re-pinned: the page
    # says it at once, with the 409's own words (the 409 stays for a change meanwhile).
    with _on_flux_v1_with_photos(tmp_path) as client:
        assert 'id="start-refused"' not in client.get("/train").text
        _repin_to_flux_v2(client)
        page = html.unescape(client.get("/train").text)
        refused = client.post("/train/start", data={"csrf_token": csrf(client)},
                              follow_redirects=False)
        assert refused.status_code == 409, refused.text
        said = re.search(r'data-code="photos_need_upload_again">([^<]+)<', refused.text)
        assert said, refused.text
        assert 'id="start-refused" data-code="photos_need_upload_again"' in page
        # A standing state, shown at every visit, not an event: no role=alert (which some
        # screen readers read out at each load, others never); the button points at it.
        assert 'role="alert" id="start-refused"' not in page
        assert 'id="start" aria-describedby="start-refused"' in page
        message = html.unescape(said.group(1)).strip()
        assert message[:1].upper() + message[1:] in page
        assert '<a href="/photos">Upload photos</a>' in page
        # Photos prepared for the new recipe: nothing to say, the Train button as before.
        assert upload(client, 2, size=1400)[0] == 200
        assert 'id="start-refused"' not in client.get("/train").text
    # The server moved to another base model than the one the model is pinned for.
    tiny = fake_services(make_settings(tmp_path, base_model="tiny"))
    try:
        with browser(tiny.settings, tiny) as client:
            sign_in(client, "ann")
            page = html.unescape(client.get("/train").text)
            assert 'id="start-refused" data-code="base_model_mismatch"' in page
            assert "Your model is pinned to local-flux-v2, " in page
            assert '<a href="/model">Your model</a>' in page
            refused = client.post("/train/start", data={"csrf_token": csrf(client)},
                                  follow_redirects=False)
            assert 'data-code="base_model_mismatch"' in refused.text
    finally:
        tiny.close()


def test_the_scale_slider_shows_every_scale_the_model_allows(ann: TestClient,
                                                           svc: Services) -> None:
    # The slider spanned 0..2 in steps of 0.05 while -1..3 is allowed: a stored 2.5 showed as
    # 2, and "Save the scale" overwrote it (found in review).
    assert upload(ann)[0] == 200
    train(ann)
    user = svc.users.get_by_name(name="ann")
    for scale in (2.5, -0.5, 0.833, 3.0, -1.0):
        svc.models.set_lora_scale(user=user, lora_scale=scale)
        slider = re.search(r'<input id="lora_scale"[^>]*>', ann.get("/generate").text)
        assert slider
        found = dict(re.findall(r'(min|max|step|value)="([^"]+)"', slider.group(0)))
        assert float(found["min"]) == LORA_SCALE_MIN
        assert float(found["max"]) == LORA_SCALE_MAX
        assert found["step"] == "any"  # a browser snaps a value off the step to it
        assert float(found["value"]) == scale
        # The slider beside the field (steps of 0.05 the keyboard reaches) sends nothing.
        slider = re.search(r'<input id="scale-slider"[^>]*>', ann.get("/generate").text)
        assert slider
        assert 'step="0.05"' in slider.group(0)
        assert "name=" not in slider.group(0)


def test_every_page_writes_the_model_s_lora_scale_as_the_others_do(ann: TestClient,
                                                                    svc: Services) -> None:
    """The Generate page (its field, slider, note and each picture's line), the Model page and
    the Train page showed the stored scale as Python writes it, "1.0", where the CLI, the
    notices ("Scale 1 saved") and the pictures' own data write "1" (a11y review). Each page
    now writes it with lora_scale_text, as they do."""
    assert upload(ann)[0] == 200
    train(ann)
    user = svc.users.get_by_name(name="ann")
    for scale in (1.0, 2.0, -1.0, 0.25):
        svc.models.set_lora_scale(user=user, lora_scale=scale)
        r = ann.post("/generate", data={"csrf_token": csrf(ann), "prompt": "p",
                                        "num_outputs": "1"}, follow_redirects=False)
        assert r.status_code == 303, r.text
        written = lora_scale_text(scale)
        generate = ann.get("/generate").text
        assert f'value="{written}"' in _field(generate, "lora_scale")  # old code: "1.0"
        slider = re.search(r'<input id="scale-slider"[^>]*>', generate)
        assert slider
        assert f'value="{written}"' in slider.group(0)
        assert f"Your saved scale is {written};" in generate
        newest = re.search(r'<li id="g-.*?</li>', generate, re.S)
        assert newest
        assert f"· scale {written} ·" in newest.group(0)
        for page in ("/model", "/train"):
            shown = re.search(r"<dt>LoRA scale</dt><dd>([^<]*)</dd>", ann.get(page).text)
            assert shown, page
            assert shown.group(1).split(" (")[0] == written, (page, shown.group(1))


def test_generate_uses_the_slider_s_scale_for_its_pictures_only(ann: TestClient,
                                                                 svc: Services) -> None:
    """The slider was in a form of its own, so Generate used the saved scale whatever it showed
    (found in review; tests/browser/test_page_actions.py drags it). The scale sent with
    Generate is that request's; the saved one is unchanged, and the slider stays at it."""
    assert upload(ann)[0] == 200
    train(ann)
    r = ann.post("/generate", data={"csrf_token": csrf(ann), "prompt": "p", "num_outputs": "1",
                                    "lora_scale": "2.5"}, follow_redirects=False)
    assert r.headers["location"] == "/generate?lora_scale=2.5"
    page = ann.get(r.headers["location"]).text
    assert "scale 2.5" in page
    assert re.search(r'<input id="lora_scale"[^>]* value="2.5"', page)
    assert svc.models.get(user=svc.users.get_by_name(name="ann")).lora_scale == \
        DEFAULT_LORA_SCALE
    for wrong in ("99", "nan", "x", ""):  # an address edited by hand: the saved scale
        page = ann.get(f"/generate?lora_scale={wrong}").text
        assert re.search(rf'<input id="lora_scale"[^>]* value="{lora_scale_text(DEFAULT_LORA_SCALE)}"', page)
    # The scale exactly, not ':g''s 0.123457, which makes another picture (found in review).
    r = ann.post("/generate", data={"csrf_token": csrf(ann), "prompt": "p", "num_outputs": "1",
                                    "lora_scale": "0.123456789"}, follow_redirects=False)
    assert r.headers["location"] == "/generate?lora_scale=0.123456789"
    assert 'name="lora_scale" value="0.123456789"' in ann.get(r.headers["location"]).text


def test_generate_reads_its_scale_as_save_the_scale_and_the_cli_do(ann: TestClient,
                                                                   svc: Services) -> None:
    """Generate's scale went through pydantic's float, which took "0.2_5" (0.25) and "infinity",
    and the page's address (and a Delete's) through float(), which took "0.2_5" and the
    Arabic-Indic "٣" too, where Save the scale refused them: one parser now, the domain's."""
    assert upload(ann)[0] == 200
    train(ann)
    for wrong in ("0.2_5", "\u0660.\u0665", "infinity", "1,5"):
        r = ann.post("/generate", data={"csrf_token": csrf(ann), "prompt": "p",
                                        "num_outputs": "1", "lora_scale": wrong},
                     follow_redirects=False)
        assert r.status_code == 422, (wrong, r.headers.get("location"))
        assert page_title(r.text) == "Generate refused · selfie-lora"
        assert (f"the LoRA scale must be a number from -1.0 to 3.0 (not {wrong!r})"
                in html.unescape(r.text))
        page = ann.get("/generate", params={"lora_scale": wrong}).text
        assert re.search(rf'<input id="lora_scale"[^>]* value="{lora_scale_text(DEFAULT_LORA_SCALE)}"', page)
    assert svc.generation.history(user=svc.users.get_by_name(name="ann")) == []


def test_a_scale_of_minus_zero_is_used_and_shown_as_zero(ann: TestClient, svc: Services) -> None:
    """Generate at "-0" led to /generate?lora_scale=-0 and stored the pictures' scale as -0.0."""
    assert upload(ann)[0] == 200
    train(ann)
    r = ann.post("/generate", data={"csrf_token": csrf(ann), "prompt": "p", "num_outputs": "1",
                                    "lora_scale": "-0"}, follow_redirects=False)
    assert r.headers["location"] == "/generate?lora_scale=0"
    [made] = svc.generation.history(user=svc.users.get_by_name(name="ann"))
    assert repr(made.lora_scale) == "0.0"


def test_a_delete_and_the_paging_links_keep_the_scale_chosen(ann: TestClient) -> None:
    """After a Generate at 0.5 (/generate?lora_scale=0.5), a Delete or Older/Newest pictures
    went to /generate without it: the slider and the next picture went back to the saved
    scale (browser review 3). The scale chosen is carried with them."""
    assert upload(ann)[0] == 200
    train(ann)
    for _ in range(2):
        r = ann.post("/generate", data={"csrf_token": csrf(ann), "prompt": "p",
                                        "num_outputs": "1", "lora_scale": "0.5"},
                     follow_redirects=False)
        assert r.headers["location"] == "/generate?lora_scale=0.5"
    page = ann.get("/generate?lora_scale=0.5").text
    forms = re.findall(r'<form method="post" action="/generations/([^"/]+)/delete".*?</form>',
                       page, re.S)
    assert len(forms) == 2, page
    assert page.count('<input type="hidden" name="lora_scale" value="0.5">') == 2
    newest, older = re.findall(r'action="/generations/([^"/]+)/delete"', page)
    r = ann.post(f"/generations/{newest}/delete",
                 data={"csrf_token": csrf(ann), "lora_scale": "0.5", "before": older},
                 follow_redirects=False)
    assert r.status_code == 303, r.text
    # Old code: /generate?before=<id>, the scale dropped.
    assert r.headers["location"] == f"/generate?before={older}&lora_scale=0.5#pictures"
    paged = ann.get(r.headers["location"]).text
    assert '<a href="/generate?lora_scale=0.5" id="newest">' in paged
    assert re.search(r'<input id="lora_scale"[^>]* value="0.5"', paged)
    # Without a scale chosen the saved one stays the default: nothing added.
    plain = ann.get("/generate?before=" + older).text
    assert '<a href="/generate" id="newest">' in plain
    r = ann.post(f"/generations/{older}/delete", data={"csrf_token": csrf(ann)},
                 follow_redirects=False)
    assert r.headers["location"] == "/generate#pictures"


def test_the_generate_form_refuses_a_prompt_with_a_bidi_isolate(ann: TestClient) -> None:
    """Taken and shown raw in the gallery, its alt text and the Delete button's label, where it
    reordered what followed it (the date too)."""
    assert upload(ann)[0] == 200
    train(ann)
    r = ann.post("/generate", data={"csrf_token": csrf(ann), "prompt": "hi \u2067evil",
                                    "num_outputs": "1"})
    assert "U+2067 (RIGHT-TO-LEFT ISOLATE)" in r.text, r.text
    assert '<p class="prompt">' not in ann.get("/generate").text  # nothing generated


def test_a_long_prompt_is_clamped_in_the_gallery_with_a_short_alt(ann: TestClient) -> None:
    """The gallery printed the whole 2000-character prompt in its cell and as every picture's
    alt text, read out for each picture (browser review 5). The cell shows it clamped
    (style.css) with the whole of it under "Whole prompt", and the alt is "picture N of" its
    first 100 characters."""
    assert upload(ann)[0] == 200
    train(ann)
    prompt = "word " * 399 + "end"
    ann.post("/generate", data={"csrf_token": csrf(ann), "prompt": prompt, "num_outputs": "2"})
    page = ann.get("/generate").text
    shown = re.search(r'<p class="prompt">([^<]*)</p>', page)
    assert shown, page
    assert shown.group(1).endswith(prompt)  # the trigger word added before it
    stored = shown.group(1)
    alts = re.findall(r'<img src="/generations/[^"]+" alt="([^"]*)"', page)
    # Old code: the whole prompt, for each picture.
    assert alts == [f"picture {n} of {stored[:100]}…" for n in (1, 2)], alts
    assert f"<summary>Whole prompt</summary><p>{stored}</p>" in page
    ann.post("/generate", data={"csrf_token": csrf(ann), "prompt": "short", "num_outputs": "1"})
    page = ann.get("/generate").text
    assert re.search(r'alt="picture 1 of [^"]*short"', page)
    assert page.count("Whole prompt") == 1  # only the long one's
    css = ann.get("/static/style.css").text
    assert re.search(r"\.gallery \.prompt[^{]*\{[^}]*overflow-wrap: anywhere", css)


def test_the_seed_rule_under_a_batch_says_it_wraps_when_it_does(ann: TestClient) -> None:
    """At seed 4294967295 a batch of 2 read "picture 2 · seed 0" over "seed 4294967295
    (picture n: seed + n - 1)", which gives 4294967296, no seed at all (browser review 6). The
    rule says it counts on from 0 where the batch wraps, and only there."""
    assert upload(ann)[0] == 200
    train(ann)
    for seed in ("4294967295", "7"):
        ann.post("/generate", data={"csrf_token": csrf(ann), "prompt": "p", "num_outputs": "2",
                                    "seed": seed})
    page = ann.get("/generate").text
    assert "picture 2 · seed 0" in page
    rule = "picture n: seed + n \N{MINUS SIGN} 1"
    assert f"seed 4294967295 ({rule}, counting on from 0 after 4294967295)" in page
    assert f"seed 7 ({rule}) ·" in page


def test_save_the_scale_keeps_what_was_typed_and_generate_keeps_the_version_chosen(
        ann: TestClient) -> None:
    """"Save the scale", a button of the Generate form, came back with the prompt, the seed and
    the count empty (nojs review 5); a Generate with another version than the active one came
    back with the active one chosen, and so the next Generate used it. Both come back as sent,
    the version through the paging links and a Delete too."""
    two_versions(ann)
    r = ann.post("/model/scale", data={"csrf_token": csrf(ann, "/generate"), "lora_scale": "0.9",
                                       "prompt": "a hat & a coat", "seed": "7",
                                       "num_outputs": "3", "version": "1"})
    page = r.text
    assert "Scale 0.9 saved" in page
    assert '>a hat &amp; a coat</textarea>' in page
    assert re.search(r'<input id="seed" name="seed" type="number"[^>]* value="7">', page)
    assert re.search(r'<input id="num_outputs"[^>]* value="3">', page)
    assert '<option value="1" selected>v1</option>' in page
    r = ann.post("/generate", data={"csrf_token": csrf(ann, "/generate"), "prompt": "p",
                                    "num_outputs": "1", "version": "1"},
                 follow_redirects=False)
    assert r.headers["location"] == "/generate?version=1"
    page = ann.get(r.headers["location"]).text
    assert '<option value="1" selected>v1</option>' in page
    assert '<input type="hidden" name="version" value="1">' in page  # the Delete's form
    # An address edited by hand to a version there is not: the active one.
    assert '<option value="2" selected>v2 (active)</option>' in ann.get(
        "/generate?version=9").text


def test_save_the_scale_keeps_what_was_typed_out_of_the_address_and_the_logs(
        ann: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    """"Save the scale" carried the prompt, seed and count back in the address
    (/generate?prompt=...): the access log and the browser's history kept the prompt (review:
    "No prompt text in the logs"). They come back in a signed one-time cookie, shown once as
    the notice is; the version, not private, stays in the address. A prompt too long for a
    cookie is not kept, and the notice says so."""
    two_versions(ann)
    prompt = "my secret birthday wish 8d1f"
    with caplog.at_level(logging.DEBUG):
        r = ann.post("/model/scale", data={"csrf_token": csrf(ann, "/generate"),
                                           "lora_scale": "0.9", "prompt": prompt, "seed": "7",
                                           "num_outputs": "3", "version": "1"},
                     follow_redirects=False)
        assert r.status_code == 303
        location = r.headers["location"]
        assert location == "/generate?version=1"
        cookie = r.headers.get_list("set-cookie")
        assert all(len(c) <= 4096 for c in cookie)
        assert not any("secret" in c for c in cookie)  # signed and encoded, not plain
        page = ann.get(location).text
    assert f">{prompt}</textarea>" in page
    assert re.search(r'<input id="seed" name="seed" type="number"[^>]* value="7">', page)
    assert re.search(r'<input id="num_outputs"[^>]* value="3">', page)
    assert '<option value="1" selected>v1</option>' in page
    logged = [rec.getMessage() + repr(rec.args) for rec in caplog.records]
    assert logged  # the capture works: the requests log something
    assert not [line for line in logged if "secret birthday" in line]
    # Once: a reload shows the form empty (the version still chosen), as the notice is gone.
    again = ann.get(location).text
    assert prompt not in again
    assert "Scale 0.9 saved" not in again
    assert re.search(r'<input id="seed" name="seed" type="number"[^>]*>', again)
    assert not re.search(r'<input id="seed" name="seed" type="number"[^>]* value="7">', again)
    assert '<option value="1" selected>v1</option>' in again
    # An address that says a prompt (an old bookmark) is not a way in either.
    assert "bookmarked" not in ann.get("/generate?prompt=bookmarked").text
    # 2,000 letters of CJK (the API's limit) do not fit a cookie: the seed is kept, the prompt
    # not, and the notice says to type it again.
    long_prompt = "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(2000))
    r = ann.post("/model/scale", data={"csrf_token": csrf(ann, "/generate"),
                                       "lora_scale": "0.8", "prompt": long_prompt, "seed": "9",
                                       "num_outputs": "1"}, follow_redirects=False)
    assert all(len(c) <= 4096 for c in r.headers.get_list("set-cookie"))
    page = ann.get(r.headers["location"]).text
    assert "Your prompt was too long to keep here: type or paste it again." in page
    assert long_prompt not in page
    assert re.search(r'<input id="seed" name="seed" type="number"[^>]* value="9">', page)


def test_what_save_the_scale_kept_outlives_a_generate_page_that_failed(
        ann: TestClient, svc: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """The typed fields are shown once by the page that shows them: an error page in its place
    (the storage away) does not use them up, and the reload once it is back shows them."""
    two_versions(ann)
    r = ann.post("/model/scale", data={"csrf_token": csrf(ann, "/generate"), "lora_scale": "0.9",
                                       "prompt": "a hat and a coat", "seed": "7"},
                 follow_redirects=False)
    assert r.status_code == 303

    def away(**_kwargs: object) -> None:
        raise StorageError("database error: connection failed: Connection refused")

    monkeypatch.setattr(svc.generation, "page", away)
    failed = ann.get(r.headers["location"])
    assert failed.status_code == 500
    assert "sl_typed" not in failed.headers.get("set-cookie", "")
    monkeypatch.undo()
    assert ">a hat and a coat</textarea>" in ann.get(r.headers["location"]).text


def _button_names(page: str, text: str) -> list[str]:
    """The accessible names of the page's buttons and links that read ``text``: the
    aria-label where there is one, else the text."""
    names = []
    for attrs, inner in re.findall(r'<(?:button|a)\b([^>]*)>([^<]*)</(?:button|a)>', page):
        if inner.strip() == text:
            label = re.search(r'aria-label="([^"]*)"', attrs)
            names.append(html.unescape(label.group(1)) if label else inner.strip())
    return names


def test_each_row_s_delete_revoke_use_and_download_says_what_it_acts_on(
        ann: TestClient) -> None:
    """Every generation's button was named "Delete", every key's "Revoke", every version's
    "Use this version" and "Download LoRA": a screen reader's list of buttons said "Delete,
    Delete, Delete" (a11y review). Each is named for its row now, the visible word first."""
    two_versions(ann)
    for prompt in ("a red hat", "a blue coat"):
        ann.post("/generate", data={"csrf_token": csrf(ann), "prompt": prompt,
                                    "num_outputs": "1"})
    deletes = _button_names(ann.get("/generate").text, "Delete")
    assert len(deletes) == 2
    assert all(name.startswith("Delete the 1 picture of") for name in deletes), deletes
    assert "a blue coat" in deletes[0], deletes
    assert "a red hat" in deletes[1], deletes
    for name in ("laptop", "phone"):
        assert ann.post("/settings/keys", data=key_form(ann, name)).status_code == 200
    revokes = _button_names(ann.get("/settings").text, "Revoke")
    assert len(revokes) >= 2
    assert len(set(revokes)) == len(revokes), revokes
    assert any(name.startswith("Revoke the key laptop (") for name in revokes), revokes
    versions = ann.get("/versions").text
    assert _button_names(versions, "Use this version") == ["Use this version, v1"]
    assert _button_names(versions, "Download LoRA") == ["Download LoRA of v2",
                                                        "Download LoRA of v1"]


def test_a_delete_comes_back_at_the_next_generation_and_says_so(ann: TestClient) -> None:
    """A Delete came back to the top of /generate, focus on the body, and nothing said the
    generation was deleted (browser review 4). It comes back at the generation after it (or
    before it, or the gallery's heading), which takes the focus (app.js), with "Generation
    deleted" in a status line."""
    assert upload(ann)[0] == 200
    train(ann)
    for _ in range(3):
        ann.post("/generate", data={"csrf_token": csrf(ann), "prompt": "p", "num_outputs": "1"})
    page = ann.get("/generate").text
    assert "Generation deleted" not in page
    ids = re.findall(r'<li id="g-([^"]+)" tabindex="-1">', page)
    assert len(ids) == 3, page
    assert '<h2 id="pictures" tabindex="-1">' in page
    focus = re.findall(r'name="focus" value="([^"]+)"', page)
    assert focus == [f"g-{ids[1]}", f"g-{ids[2]}", f"g-{ids[1]}"]
    r = ann.post(f"/generations/{ids[1]}/delete",
                 data={"csrf_token": csrf(ann), "focus": focus[1]}, follow_redirects=False)
    # Old code: /generate, no fragment, no word of the deletion.
    assert r.headers["location"] == f"/generate#g-{ids[2]}"
    after = ann.get(r.headers["location"]).text
    assert '<p class="notice" role="status" id="deleted-note">Generation deleted.</p>' in after
    # Once, as every form's notice: it was in the address (&deleted=1), said again on a reload
    # (nojs review 7); and at the gallery, not again at the top.
    assert "Generation deleted" not in after.split('id="pictures"')[0]
    assert "Generation deleted" not in ann.get(r.headers["location"]).text
    assert f'id="g-{ids[2]}"' in after
    # A fragment that is no gallery item's (a forged form) goes to the heading.
    r = ann.post(f"/generations/{ids[0]}/delete",
                 data={"csrf_token": csrf(ann), "focus": "x\r\nSet-Cookie: a=b"},
                 follow_redirects=False)
    assert r.headers["location"] == "/generate#pictures"


def test_the_page_s_weights_download_answers_a_range_and_head(ann: TestClient,
                                                             svc: Services) -> None:
    """The Versions page's download said Accept-Ranges and ETag, as the API's does, but answered
    a browser's resume (Range, If-Range) with the whole file and HEAD with 405 (found in
    review)."""
    assert upload(ann)[0] == 200
    train(ann)
    v1 = svc.models.version(user=svc.users.get_by_name(name="ann"), version_id="1")
    url = f"/versions/{v1.id}/weights"
    whole = ann.get(url)
    assert whole.status_code == 200
    assert whole.headers["accept-ranges"] == "bytes"
    etag = whole.headers["etag"]

    part = ann.get(url, headers={"Range": "bytes=10-", "If-Range": etag})
    assert part.status_code == 206  # old code: 200, the whole file
    assert part.content == whole.content[10:]
    assert part.headers["content-range"] == f"bytes 10-{len(whole.content) - 1}/{len(whole.content)}"
    # A file that changed since (another ETag): the whole of it.
    assert ann.get(url, headers={"Range": "bytes=10-", "If-Range": '"other"'}).status_code == 200

    head = ann.head(url)
    assert head.status_code == 200  # old code: 405
    assert head.content == b""
    assert head.headers["content-length"] == str(len(whole.content))
    assert head.headers["etag"] == etag
    held = ann.get(url, headers={"If-None-Match": etag})  # the browser holds it
    assert held.status_code == 304  # before the If-None-Match fix: 200, the whole file
    assert held.content == b""


def test_the_page_s_weights_range_with_a_very_long_number_is_not_a_500(ann: TestClient,
                                                                         svc: Services) -> None:
    """As the API's: a Range whose number had over 4300 digits was a 500 page (int() refuses
    such a string, found in review). Past the file's size it is past the end: 416 for a start,
    the whole file for a last byte or a suffix."""
    assert upload(ann)[0] == 200
    train(ann)
    v1 = svc.models.version(user=svc.users.get_by_name(name="ann"), version_id="1")
    url = f"/versions/{v1.id}/weights"
    whole = ann.get(url).content
    size = len(whole)
    nines = "9" * 5000
    beyond = ann.get(url, headers={"Range": f"bytes={nines}-"})
    assert (beyond.status_code, beyond.headers.get("content-range")) == (
        416, f"bytes */{size}")  # old code: 500
    for asked in (f"bytes=-{nines}", f"bytes=0-{nines}"):
        part = ann.get(url, headers={"Range": asked})
        assert (part.status_code, part.headers.get("content-range")) == (
            206, f"bytes 0-{size - 1}/{size}")
        assert part.content == whole


def test_the_scale_goes_back_to_the_default_from_the_generate_page(ann: TestClient,
                                                                  svc: Services) -> None:
    """A scale saved from the page stayed custom for ever there: only the API's
    {"lora_scale": null} gave the model the default back (found in review)."""
    assert upload(ann)[0] == 200
    train(ann)
    assert 'id="default-scale"' not in ann.get("/generate").text  # not custom: nothing to undo
    r = ann.post("/model/scale", data={"csrf_token": csrf(ann), "lora_scale": "0.7"},
                 follow_redirects=False)
    assert r.status_code == 303
    assert 'id="default-scale"' in ann.get("/generate").text

    r = ann.post("/model/scale/default", data={"csrf_token": csrf(ann)},
                 follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (303, "/generate")  # old code: 404
    model = svc.models.get(user=svc.users.get_by_name(name="ann"))
    assert not model.lora_scale_is_custom
    assert model.lora_scale == DEFAULT_LORA_SCALE
    assert [e["kind"] for e in svc.repo.list_events(model.id)
            if e["kind"].startswith("lora_scale")][-1] == "lora_scale_reset"
    assert 'id="default-scale"' not in ann.get("/generate").text


def _two_versions_the_first_active(ann: TestClient, svc: Services
                                   ) -> tuple[User, Version, Version]:
    """ann trained twice, her first version made active again: she, v1 and v2."""
    assert upload(ann)[0] == 200
    train(ann)
    train(ann)
    user = svc.users.get_by_name(name="ann")
    v2, v1 = svc.models.versions(user=user)
    svc.models.activate(user=user, version_id=v1.id)
    return user, v1, v2


def test_using_a_held_or_pending_version_says_which_it_is(ann: TestClient,
                                                         svc: Services) -> None:
    # A version still being scored was "held back (None)" (found in review): pending and held
    # are worded apart, and a reason is printed only when there is one.
    user, v1, v2 = _two_versions_the_first_active(ann, svc)

    def confirm() -> str:
        found = re.search(r'data-confirm="(Use version 2[^"]*)"', ann.get("/versions").text)
        assert found
        return html.unescape(found.group(1))

    def tick_box() -> str:
        """The words of the box that stands for the dialog without scripts."""
        found = re.search(r'id="sure-use-2"[^>]*> ([^<]*)</label>', ann.get("/versions").text)
        assert found
        return html.unescape(found.group(1))

    svc.repo.set_version_gate(v2.id, status=GateStatus.PENDING, reason=None, details={})
    assert "still being scored" in confirm()
    # Without scripts too (a11y pre-merge review 4: the box warned of held versions alone).
    assert tick_box() == "Yes, use version 2 although its likeness is still being scored"
    assert "held" not in confirm()
    assert "None" not in confirm()
    svc.repo.set_version_gate(v2.id, status=GateStatus.HELD, reason=None, details={})
    assert "the likeness gate held it back. " in confirm()
    svc.repo.set_version_gate(v2.id, status=GateStatus.HELD, reason="likeness dropped",
                              details={})
    assert "held it back (likeness dropped)" in confirm()
    assert tick_box() == "Yes, use version 2 although the gate held it back"
    # Activated against the gate: its cell said 'held' alone, as if it were not in use
    # (diffcli review 5c).
    assert "held, activated anyway" not in ann.get("/versions").text
    svc.models.activate(user=user, version_id=v2.id)
    assert ('<td>held, activated anyway: <span class="muted">likeness dropped</span></td>'
            in ann.get("/versions").text)
    svc.models.activate(user=user, version_id=v1.id)
    svc.repo.set_version_gate(v2.id, status=GateStatus.PASSED, reason=None, details={})
    assert "although" not in confirm()


def test_a_version_whose_scoring_a_lock_stopped_says_the_database_was_busy(
        ann: TestClient, svc: Services) -> None:
    """A version whose scoring stepped away on a database lock (its training's row says
    ``SCORING_LOCKED`` until the next attempt) is said to wait for the database on the Versions
    page, in its Gate cell and when it is used; "still being scored" read as work going on. Once
    the row no longer says so, it is worded as any pending version again."""
    _, _, v2 = _two_versions_the_first_active(ann, svc)
    # The attempt that stepped away on the lock noted, as ``_step_away`` does; its likeness
    # not scored (one scored is not scored again).
    stepped_away = stepped_away_on_a_lock(svc, v2, scored=False)
    page, dialog, box = _use_words(ann, 2)
    assert ('<td>pending: <span class="muted">its likeness could not be scored yet: the '
            "database was busy; it is scored again shortly</span></td>") in page
    assert "could not be scored yet (the database was busy)" in dialog, dialog
    assert "still being scored" not in dialog, dialog
    assert box == "Yes, use version 2 although its likeness could not be scored yet"
    # Its next attempt claims it and scores it: the row's words stay until it ends.
    svc.repo.save_training(replace(stepped_away, attempt=stepped_away.attempt + 1))
    page, dialog, box = _use_words(ann, 2)
    assert "the database was busy" not in page
    assert "still being scored" in dialog, dialog
    assert box == "Yes, use version 2 although its likeness is still being scored"


def _use_words(client: TestClient, number: int) -> tuple[str, str, str]:
    """The Versions page, and the words of version ``number``'s use dialog and of the box
    standing for it."""
    page = client.get("/versions").text
    dialog = re.search(rf'data-confirm="(Use version {number}[^"]*)"', page)
    box = re.search(rf'id="sure-use-{number}"[^>]*> ([^<]*)</label>', page)
    assert dialog
    assert box
    return page, html.unescape(dialog.group(1)), html.unescape(box.group(1))


def test_a_version_a_lock_left_undecided_is_worded_as_such_wherever_it_is_listed(
        ann: TestClient, svc: Services) -> None:
    """The Generate page's version list said "its likeness still being scored" of a version
    whose scoring a database lock stopped, and the Versions page (its use dialog, the box
    standing for it, its Gate cell) said it, or nothing, of one whose likeness was scored and
    whose gate decision's write the lock stopped: each says what the lock left
    (``TrainingService.undecided``); once the next attempt claims it, the usual words."""
    _, _, v2 = _two_versions_the_first_active(ann, svc)

    def option() -> str:
        """The words of v2's option in the Generate page's version list."""
        found = re.search(r'<option value="2"[^>]*>([^<]*)</option>', ann.get("/generate").text)
        assert found
        return html.unescape(found.group(1))

    stepped_away_on_a_lock(svc, v2, scored=False)
    assert option() == "v2 (its likeness could not be scored yet: the database was busy)"
    # Scored, the lock on its judging (the Gate cell said "pending" alone): not "the gate's
    # decision could not be saved", as a lock before the gate decided leaves the same.
    stepped_away = stepped_away_on_a_lock(svc, v2, scored=True)
    page, dialog, box = _use_words(ann, 2)
    assert ("<td>pending: <span class=\"muted\">its likeness is scored, but the gate could not "
            "decide yet: the database was busy; it is tried again shortly</span>"
            "</td>") in html.unescape(page)
    assert "still being scored" not in dialog, dialog
    assert ("although the likeness gate could not decide on it yet (the database was busy; its "
            "likeness is scored)") in dialog, dialog
    assert box == "Yes, use version 2 although the gate has not decided yet"
    assert option() == "v2 (the likeness gate could not decide yet: the database was busy)"
    # Its next attempt claims it (the row's words stay until it ends): the usual words again.
    svc.repo.save_training(replace(stepped_away, attempt=stepped_away.attempt + 1))
    assert option() == "v2 (its likeness still being scored)"
    page, dialog, box = _use_words(ann, 2)
    assert "the database was busy" not in page
    assert box == "Yes, use version 2 although its likeness is still being scored"


def test_what_the_next_attempt_does_with_a_version_a_lock_left_is_said_not_still_scored(
        ann: TestClient, svc: Services) -> None:
    """Where the next attempt after a lock's step-away does not score the version (its scoring's
    attempts spent: judged without scores; its stops at the judging's cut-off: held back
    unjudged; a cancel asked meanwhile: canceled), the pages fell back to "its likeness still
    being scored", work that no worker was doing nor would do (found in review)."""
    _, _, v2 = _two_versions_the_first_active(ann, svc)
    attempts = svc.training.lease.max_attempts

    def said() -> tuple[str, str, str, str]:
        """v2's option in the Generate page's list, its Gate cell, use dialog and box."""
        found = re.search(r'<option value="2"[^>]*>([^<]*)</option>', ann.get("/generate").text)
        assert found
        page, dialog, box = _use_words(ann, 2)
        cell = re.search(r'<td>pending: <span class="muted">([^<]*)</span></td>', page)
        assert cell
        return (html.unescape(found.group(1)), html.unescape(cell.group(1)), dialog, box)

    # The step-away counts as a stop at the next claim: ``recoveries`` stops before it.
    for scored, recoveries, option, cell, against, box in [
            (False, attempts - 1,
             "v2 (its likeness could not be scored: the database was busy; the gate decides "
             "without its scores)",
             "its likeness could not be scored: the database was busy; the gate decides "
             "without its scores next",
             ", although its likeness could not be scored (the database was busy): the gate has "
             "not decided yet",
             "Yes, use version 2 although its likeness could not be scored"),
            (True, 2 * attempts - 1,
             "v2 (the likeness gate could not decide: the database was busy; it is held back "
             "unjudged)",
             "the gate could not decide on it: the database was busy; it is held back "
             "unjudged next",
             ", although the likeness gate could not decide on it (the database was busy): it "
             "is held back unjudged next",
             "Yes, use version 2 although the gate has not decided")]:
        stepped_away = stepped_away_on_a_lock(svc, v2, scored=scored)
        svc.repo.save_training(replace(stepped_away, recoveries=recoveries))
        assert said() == (option, cell, "Use version 2 from now on? New pictures will use "
                          f"it{against}. You can switch back at any time.", box)
    # A cancel asked while its worker was at it: the next attempt cancels.
    stepped_away = stepped_away_on_a_lock(svc, v2, scored=False)
    svc.repo.request_cancel(stepped_away.id)
    assert said() == (
        "v2 (its training is being canceled: the gate will not decide on it)",
        "its training is being canceled: the gate will not decide on it (the database was "
        "busy; the cancel is done shortly)",
        "Use version 2 from now on? New pictures will use it, although its training is being "
        "canceled: the gate will not decide on it. You can switch back at any time.",
        "Yes, use version 2 although its training is being canceled")


def test_the_generate_page_is_shown_when_what_a_lock_left_cannot_be_read(
        ann: TestClient, svc: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """Why the gate has not decided on a pending version is a note in the version list: its
    read failing (a lock or a statement timeout, the situation it words) turned the whole
    Generate page into an error page (review 3 N2). Now the list shows the usual words."""
    _, _, v2 = _two_versions_the_first_active(ann, svc)
    stepped_away_on_a_lock(svc, v2, scored=False)

    def locked(self: TrainingService, *, versions: object) -> None:
        raise DatabaseLockedError("database error: database is locked", lock=True)

    monkeypatch.setattr(TrainingService, "undecided_of", locked)
    r = ann.get("/generate")
    assert r.status_code == 200, r.text
    found = re.search(r'<option value="2"[^>]*>([^<]*)</option>', r.text)
    assert found
    assert html.unescape(found.group(1)) == "v2 (its likeness still being scored)"


def test_a_version_without_its_weights_is_refused_on_the_pages_not_a_500(
        ann: TestClient, svc: Services) -> None:
    # Its weights file gone from the storage, the version's pictures failed with "something
    # went wrong on our side" (a 500 storage_error), and its activation was accepted.
    assert upload(ann)[0] == 200
    train(ann)
    train(ann)
    user = svc.users.get_by_name(name="ann")
    v2, v1 = svc.models.versions(user=user)
    svc.blobs.delete(v2.weights_key)
    r = ann.post("/generate", data={"csrf_token": csrf(ann), "prompt": "p", "num_outputs": "1"})
    assert r.status_code == 409
    assert "version 2&#39;s weights are missing from the storage" in r.text
    assert "activate another version" in r.text
    assert "something went wrong" not in r.text
    assert ann.post(f"/versions/{v1.id}/activate", data={"csrf_token": csrf(ann)},
                    follow_redirects=False).status_code == 303
    r = ann.post(f"/versions/{v2.id}/activate", data={"csrf_token": csrf(ann)},
                 follow_redirects=False)
    assert r.status_code == 409
    assert "version 2&#39;s weights are missing from the storage" in r.text
    assert svc.models.get(user=user).active_version_id == v1.id


def test_a_server_side_error_s_page_says_a_sentence_and_a_reference_not_the_error(
        ann: TestClient, fake_generator: FakeGenerator,
        caplog: pytest.LogCaptureFixture) -> None:
    """A storage error's page showed its words: the server's paths and the S3 endpoint's
    request URL (found in review). The page says a fixed sentence and the reference of the log
    line that has them."""
    assert upload(ann)[0] == 200
    train(ann)
    leaky = ("/srv/selfie/blobs/weights/0f.safetensors",
             "http://minio.internal:9000/selfie-prod/weights/0f.safetensors")
    fake_generator.fail_with = StorageError(f"cannot load LoRA weights {leaky[0]}: Error performing "
                                       f"GET {leaky[1]} - HTTP error")
    r = ann.post("/generate", data={"csrf_token": csrf(ann), "prompt": "p", "num_outputs": "1"})
    assert r.status_code == 500
    assert 'data-code="storage_error"' in r.text
    assert "the files or records could not be read or written just now" in r.text
    found = re.search(r"<code data-reference>([0-9a-f]+)</code>", r.text)
    assert found, r.text
    for words in leaky:
        assert words not in r.text
    [logged] = [rec.getMessage() for rec in caplog.records
                if rec.levelno == logging.ERROR and found.group(1) in rec.getMessage()]
    assert all(words in logged for words in leaky)


def test_the_generate_page_keeps_the_pictures_that_came_and_names_the_withheld_one(
        ann: TestClient, fake_generator: FakeGenerator) -> None:
    """A picture withheld by Replicate's safety checker failed the whole generation (a 502
    page): the other pictures, paid for, were lost. The gallery shows them and names the
    withheld picture and its seed."""
    assert upload(ann)[0] == 200
    train(ann)
    fake_generator.withhold = frozenset({2})
    r = ann.post("/generate", data={"csrf_token": csrf(ann, "/generate"), "prompt": "p",
                                    "num_outputs": "3", "seed": "10"})
    assert r.status_code == 200, r.text
    assert "safety checker withheld picture 3 (seed 12) of 3" in r.text
    gallery = r.text[r.text.index('class="gallery"'):]
    assert len(re.findall(r'<img src="/generations/[^/]+/\d\.png"', gallery)) == 2


def test_a_third_generation_at_once_is_a_page_that_says_to_wait(
        ann: TestClient, fake_generator: FakeGenerator) -> None:
    """The pages generate within the same per-user limit as the API: a third at once is a 429
    page that says why and when to retry."""
    assert upload(ann)[0] == 200
    train(ann)
    token = csrf(ann, "/generate")

    def generate() -> httpx.Response:
        return ann.post("/generate", data={"csrf_token": token, "prompt": "p",
                                           "num_outputs": "1"}, follow_redirects=False)

    with held_generations(fake_generator, generate):
        refused: list[httpx.Response] = []
        third = threading.Thread(target=lambda: refused.append(generate()), daemon=True)
        third.start()
        third.join(timeout=5)
        assert refused, "the third generation waited, not refused"
        assert refused[0].status_code == 429
        assert 'data-code="too_many_generations"' in refused[0].text
        assert "you already have 2 generations in progress" in refused[0].text
        assert int(refused[0].headers["Retry-After"]) >= 1
    assert generate().status_code == 303


def test_downloading_a_version_without_its_weights_is_a_409_page_not_a_500(
        ann: TestClient, svc: Services) -> None:
    # Its weights file gone from the storage, the version's download was "something went wrong
    # on our side" (a 500), where its generation and activation say what is wrong (409).
    assert upload(ann)[0] == 200
    train(ann)
    (version,) = svc.models.versions(user=svc.users.get_by_name(name="ann"))
    svc.blobs.delete(version.weights_key)
    r = ann.get(f"/versions/{version.id}/weights")
    assert r.status_code == 409
    assert "version 1&#39;s weights are missing from the storage" in r.text
    assert "something went wrong" not in r.text


def test_the_weights_and_picture_links_let_the_browser_show_a_sign_in_or_error_page(
        ann: TestClient, svc: Services) -> None:
    """Every weights and picture link had the ``download`` attribute: Chromium saved the answer
    as the file whatever it was, so an ended session's 303 saved signin.html, and a 409
    (weights missing) or 404 showed nothing at all (found in review). Without it the browser
    follows the 303 and shows the 409 page; the 200's Content-Disposition still downloads."""
    assert upload(ann)[0] == 200
    train(ann)
    ann.post("/generate", data={"csrf_token": csrf(ann), "prompt": "p", "num_outputs": "1"})
    links = {page: re.findall(r'<a [^>]*href="/(?:versions/[^"]+/weights|generations/)[^>]*>',
                              ann.get(page).text)
             for page in ("/versions", "/model", "/generate")}
    assert all(links.values()), links
    for page, tags in links.items():
        for tag in tags:
            assert not re.search(r"\sdownload[\s=>]", tag), (page, tag)
    (version,) = svc.models.versions(user=svc.users.get_by_name(name="ann"))
    assert "attachment" in ann.get(f"/versions/{version.id}/weights").headers[
        "content-disposition"]


def test_another_user_sees_none_of_it(ann: TestClient, web_settings: Settings,
                                      svc: Services) -> None:
    assert upload(ann)[0] == 200
    train(ann)
    ann.post("/generate", data={"csrf_token": csrf(ann), "prompt": "p", "num_outputs": "1"})
    user = svc.users.get_by_name(name="ann")
    version = svc.models.versions(user=user)[0]
    dataset = svc.intake.latest(user=user)
    assert dataset is not None
    generation = svc.generation.history(user=user)[0]
    owned = [f"/versions/{version.id}/weights", f"/photos/{dataset.id}/0.jpg",
             f"/generations/{generation.id}/0.png",
             f"/versions/compare/grid.png?a={version.id}&b={version.id}"]
    for path in owned:
        assert ann.get(path).status_code in (200, 422), path
    with browser(web_settings, svc) as bob:
        # Bob has two versions of his own: past "you have no model yet", only lookups scoped
        # to his model refuse Ann's version (and his versions page compares, as Ann's does).
        bobs = own_model(bob, svc, "bob", versions=2)
        assert bobs.version is not None
        sign_in(bob, "bob")
        # Ann's version against Bob's own version 2.
        for path in [*owned, f"/versions/compare/grid.png?a={version.id}&b=2"]:
            r = bob.get(path)
            assert r.status_code == 404, (path, r.status_code)
            assert version.weights_sha256 not in r.text
        r = bob.post(f"/versions/{version.id}/activate", data={"csrf_token": csrf(bob)})
        assert r.status_code == 404
        bob_user = svc.users.get_by_name(name="bob")
        assert svc.models.get(user=bob_user).active_version_id == bobs.version["id"]
        for page in ("/versions", f"/versions?a={version.id}", f"/versions?b={version.id}",
                     "/generate", "/model", "/photos"):
            text = bob.get(page).text
            assert version.id not in text.replace(f"no such version: {version.id}", ""), page
            assert dataset.id not in text, page
            assert version.weights_sha256 not in text, page


def test_api_keys_from_the_settings_page_work_and_can_be_revoked(ann: TestClient) -> None:
    r = ann.post("/settings/keys", data=key_form(ann, "laptop"))
    assert r.status_code == 200
    secret = re.search(r'id="new-key">([^<]+)<', r.text)
    assert secret
    key = secret.group(1)
    # The one answer with the secret, like every signed-in page, is kept by no cache (it was
    # sent without Cache-Control: found in review).
    assert r.headers["cache-control"] == "no-store"
    for page in ("/photos", "/train", "/train/status", "/versions", "/generate", "/model",
                 "/settings"):
        assert ann.get(page).headers["cache-control"] == "no-store", page
    assert "cache-control" not in ann.get("/static/app.js").headers
    assert ann.get("/settings").text.count(key) == 0  # shown once
    headers = {"Authorization": f"Bearer {key}"}
    assert ann.get("/api/keys", headers=headers).status_code == 200
    key_id = re.findall(r'action="/settings/keys/([^"/]+)/revoke"', r.text)[0]  # newest first
    r = ann.post(f"/settings/keys/{key_id}/revoke", data={"csrf_token": csrf(ann)},
                 follow_redirects=False)
    assert r.status_code == 303
    assert ann.get("/api/keys", headers=headers).status_code == 401


def test_every_column_of_the_keys_table_has_a_header(ann: TestClient) -> None:
    """The column of Revoke buttons had an empty header cell, so a screen reader moving
    through the table read those cells under no column name (a11y review). It is "Actions",
    visually hidden as the page showed it."""
    page = ann.get("/settings").text
    head = re.search(r'<table class="keys">.*?<thead>(.*?)</thead>', page, re.S)
    assert head, page
    cells = re.findall(r'<th scope="col">(.*?)</th>', head.group(1))
    assert len(cells) == 5, cells
    assert all(re.sub(r"<[^>]+>", "", cell).strip() for cell in cells), cells
    assert cells[-1] == '<span class="visually-hidden">Actions</span>'


def _decoded(value: str) -> str:
    """A cookie value as anyone who sees it reads it: each "."-separated part base64-decoded,
    and inflated where it is zlib (what an itsdangerous value is: signed, not encrypted)."""
    seen = [value]
    for part in value.strip('"').lstrip(".").split("."):
        with contextlib.suppress(ValueError):
            raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
            seen.append(raw.decode("latin-1"))
            with contextlib.suppress(zlib.error):
                seen.append(zlib.decompress(raw).decode("latin-1"))
    return "\n".join(seen)


def _focused_notice(page: str) -> bool:
    """Whether the settings page's key notice is the one thing focused on the page."""
    notice = re.search(r'<p class="error" role="alert" id="key-notice"[^>]*>', page)
    return (notice is not None and 'tabindex="-1"' in notice.group(0)
            and "autofocus" in notice.group(0) and page.count("autofocus") == 1)


def test_a_new_key_s_secret_is_in_its_page_alone_and_the_form_sent_again_makes_no_key(
        ann: TestClient, svc: Services) -> None:
    """The secret went from the POST to the GET it redirected to in a signed cookie with a
    Max-Age: readable by anyone who saw it (base64 and zlib, not encrypted), and written to the
    browser's cookie store (found in review). The POST answers the page with the secret now,
    and nothing else carries it; the form's one-time nonce, stored hashed with the key, makes a
    reload or Back (the POST sent again) make no other key (found in an earlier review: 2 keys
    named deploy after one reload)."""
    form = key_form(ann, "deploy")
    r = ann.post("/settings/keys", data=form)
    secret = re.search(r'id="new-key">([^<]+)<', r.text)
    assert secret, r.text[:300]
    assert r.headers["cache-control"] == "no-store"
    for answer in [*r.history, r]:
        for cookie in answer.headers.get_list("set-cookie"):
            assert secret.group(1) not in _decoded(cookie.split(";")[0].partition("=")[2]), cookie
    assert 'id="new-key"' not in ann.get("/settings").text  # shown once
    again = ann.post("/settings/keys", data=form)  # a reload of that page, or Back to it
    assert again.status_code == 409
    assert "this key was already made; its secret was shown once" in again.text
    # The message takes the focus (webhostile review 5; old code: an alert nothing focused).
    assert _focused_notice(again.text)
    assert secret.group(1) not in again.text
    assert 'id="new-key"' not in again.text
    ann_user = svc.users.get_by_name(name="ann")
    keys = svc.users.keys(user=ann_user)
    assert [key.name for key in keys].count("deploy") == 1
    # What is stored: the secret's SHA-256 and the nonce's, never the secret.
    made = next(key for key in keys if key.name == "deploy")
    assert made.form_nonce_hash == hashlib.sha256(form["form_nonce"].encode()).hexdigest()
    assert ann.get("/api/keys", headers={"Authorization": f"Bearer {secret.group(1)}"}
                   ).status_code == 200
    # Another form of the page makes another key; one without a nonce (a page from before it)
    # makes none.
    assert ann.post("/settings/keys", data=key_form(ann, "deploy")).status_code == 200
    r = ann.post("/settings/keys", data={"csrf_token": csrf(ann), "name": "deploy"})
    assert (r.status_code, 'id="new-key"' in r.text) == (422, False)
    assert "this page was out of date" in r.text
    assert _focused_notice(r.text)
    assert [key.name for key in svc.users.keys(user=ann_user)].count("deploy") == 2


def test_a_key_name_of_spaces_alone_is_refused_beside_the_form(ann: TestClient,
                                                                svc: Services) -> None:
    """A name of spaces was taken: the table showed an empty name and the Revoke confirmation
    read "Revoke the key    ?" (found in review). The page says why beside the form, keeping
    what was typed; the API and the CLI, through the same service, refuse it too."""
    ann_user = svc.users.get_by_name(name="ann")
    before = len(svc.users.keys(user=ann_user))
    r = ann.post("/settings/keys", data=key_form(ann, "   "), follow_redirects=False)
    assert r.status_code == 422
    assert 'id="key-name-error"' in r.text
    assert "not only spaces" in r.text
    assert 'value="   "' in r.text
    assert len(svc.users.keys(user=ann_user)) == before
    key, secret = svc.users.create_key(user=ann_user, name=" a key ")  # spaces and more: fine
    assert key.name == " a key "
    r = ann.post("/api/keys", json={"name": "\u00a0 "},
                 headers={"Authorization": f"Bearer {secret}"})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_name")


@pytest.mark.parametrize("name", ["\u200b", "\ufeff", "\u2800", "\u3164 ", "\u202eyek-ruoy",
                                  "ci\u2066x", "\x9b31m", "a\u2028b", "\u0301"])
def test_a_key_name_that_is_invisible_or_reorders_text_is_refused(ann: TestClient, svc: Services,
                                                                  name: str) -> None:
    """Zero-width spaces, a BOM, the braille blank, a bidi override or a C1 control were taken
    as key names though the refusal promises printable characters: the table showed nothing,
    and "Revoke the key ?" (or the sentence reversed) asked which (webhostile review 4). The
    service refuses them, so the page, the API and the CLI do."""
    ann_user = svc.users.get_by_name(name="ann")
    before = len(svc.users.keys(user=ann_user))
    r = ann.post("/settings/keys", data=key_form(ann, name), follow_redirects=False)
    assert r.status_code == 422  # old code: 200, the secret shown
    assert 'id="key-name-error"' in r.text
    assert "printable characters" in r.text
    assert len(svc.users.keys(user=ann_user)) == before


@pytest.mark.parametrize("name", [
    "deploy 🚀", "👩\u200d💻 laptop", "猫", "café", "a\u0301",
    "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",  # Persian, its zero-width non-joiner
    "مفتاح 1", "מפתח", "कुंजी", "சாவி", "กุญแจ", "열쇠", "ключ", "κλειδί", "🇫🇷", "🏳️\u200d🌈",
])
def test_a_key_name_in_any_script_or_with_emoji_is_taken(svc: Services, name: str) -> None:
    key, _secret = svc.users.create_key(user=svc.users.get_by_name(name="ann"), name=name)
    assert key.name == name


ENGLAND = "\U0001f3f4\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f"
SCOTLAND = "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"
WALES = "\U0001f3f4\U000e0067\U000e0062\U000e0077\U000e006c\U000e0073\U000e007f"


@pytest.mark.parametrize("name", [
    ENGLAND, f"{SCOTLAND} scotland", f"{WALES} Wales {ENGLAND}",
    "\u0645\u0641\u062a\u0627\u062d\u061c 1",  # Arabic with the Arabic letter mark
    "\u05de\u05e4\u05ea\u05d7\u200f 2", "key \u200eA",  # right-to-left and left-to-right marks
])
def test_a_key_name_with_a_subdivision_flag_or_a_direction_mark_is_taken(
        svc: Services, name: str) -> None:
    """The England, Scotland and Wales flags (tag characters after the black flag) and the
    direction marks pasted Hebrew or Arabic carries were refused as format characters, with a
    message promising printable characters (diffweb review 1)."""
    key, _secret = svc.users.create_key(user=svc.users.get_by_name(name="ann"), name=name)
    assert key.name == name  # old code: InvalidInputError invalid_name


@pytest.mark.parametrize(("name", "said"), [
    ("\u202eyek-ruoy", "U+202E (RIGHT-TO-LEFT OVERRIDE)"),
    ("a\u202ab", "U+202A (LEFT-TO-RIGHT EMBEDDING)"),
    ("ci\u2066x", "U+2066 (LEFT-TO-RIGHT ISOLATE)"),
    ("ci\u2069", "U+2069 (POP DIRECTIONAL ISOLATE)"),
    ("a\u200bb", "U+200B (ZERO WIDTH SPACE)"),
    ("\x9b31m", "U+009B (a control character)"),
    ("tag \U000e0067\U000e007f", "U+E0067 (TAG LATIN SMALL LETTER G)"),  # tags with no flag
    ("\U0001f3f4\U000e0067\U000e0062 open", "U+E0067 (TAG LATIN SMALL LETTER G)"),  # no end
])
def test_a_refused_key_name_says_which_character_is_refused(
        svc: Services, name: str, said: str) -> None:
    """The refusal said only "1-100 printable characters" of a name that looked printable
    (diffweb review 1): it names the character at fault."""
    with pytest.raises(InvalidInputError) as refused:
        svc.users.create_key(user=svc.users.get_by_name(name="ann"), name=name)
    assert refused.value.code is ErrorCode.INVALID_NAME
    assert f"{said} is not taken" in str(refused.value)  # old code: the rule alone


def test_a_key_name_of_the_invisible_null_notehead_is_refused(svc: Services) -> None:
    """U+1D159 (MUSICAL SYMBOL NULL NOTEHEAD) is a symbol that fonts draw blank: a name of it
    alone looked empty and was taken (diffweb review 1)."""
    with pytest.raises(InvalidInputError):
        svc.users.create_key(user=svc.users.get_by_name(name="ann"), name="\U0001d159 ")
    key, _secret = svc.users.create_key(user=svc.users.get_by_name(name="ann"),
                                        name="\U0001d159 a")
    assert key.name == "\U0001d159 a"


def test_a_key_rotated_through_the_api_shows_its_grace_and_can_be_revoked_at_once(
        ann: TestClient) -> None:
    r = ann.post("/settings/keys", data=key_form(ann, "ci"))
    secret = re.search(r'id="new-key">([^<]+)<', r.text)
    assert secret
    headers = {"Authorization": f"Bearer {secret.group(1)}"}
    key_id = re.findall(r'action="/settings/keys/([^"/]+)/revoke"', r.text)[0]  # newest first
    assert ann.post(f"/api/keys/{key_id}/rotate", headers=headers).status_code == 201
    page = ann.get("/settings").text
    assert "rotated: works until" in page
    assert f'action="/settings/keys/{key_id}/revoke"' in page  # still works: still revocable
    ann.post(f"/settings/keys/{key_id}/revoke", data={"csrf_token": csrf(ann)})
    assert ann.get("/api/keys", headers=headers).status_code == 401
    assert "rotated: works until" not in ann.get("/settings").text


def test_the_page_upload_is_guarded_like_the_api_upload(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_upload_bytes=64 * 1024)
    services = fake_services(settings)
    services.users.create(name="ann", password=PASSWORD)
    try:
        with browser(settings, services) as client:
            photo = [("files", ("p.jpg", synthetic_photo(1), "image/jpeg"))]
            r = client.post("/photos/upload", files=photo)
            assert r.status_code == 401  # no session: refused before the body is read
            assert "www-authenticate" not in r.headers
            # Said as the script says it, with the way back (nojs review 4): it said "sign in
            # first", its Back to a bare /signin.
            assert ("Your session has ended: nothing was stored. Sign in again, then send the "
                    "photos.") in r.text
            assert '<a href="/signin?next=/photos">Sign in again</a>' in r.text
            sign_in(client, "ann")
            # Over the limit (and the room left for multipart headers): 413, as on the API.
            big = [("files", ("big.jpg", b"\xff" * (1_200_000 + 64 * 1024), "image/jpeg"))]
            r = client.post("/photos/upload", files=big, headers={"X-CSRF-Token": csrf(client)})
            assert r.status_code == 413
            # A page, not the API's JSON: without scripts the browser shows the answer itself.
            assert r.headers["content-type"].startswith("text/html")
            assert 'data-code="upload_too_large"' in r.text
            assert "the upload is larger than" in r.text
    finally:
        services.close()


SECURITY_HEADER_NAMES = ("content-security-policy", "x-frame-options", "x-content-type-options",
                         "referrer-policy")


def test_a_form_of_the_longest_allowed_text_fits_and_one_over_the_cap_gets_a_page(
        ann: TestClient) -> None:
    """A 2000-character prompt of CJK or emoji (allowed: 2000 characters) is 18-24 KB once
    urlencoded: the guard refused it 413 with the API's JSON body, over its 16 KB JSON cap, and
    the browser showed that JSON (webhostile review 1). The pages' forms have a cap their longest
    fields fit, and a form over it, a slow one or an oversized upload, gets an HTML page with
    the pages' security headers."""
    assert upload(ann)[0] == 200
    train(ann)
    for letter in ("猫", "😀"):
        r = ann.post("/generate", data={"csrf_token": csrf(ann), "prompt": letter * 2000,
                                        "num_outputs": "1"}, follow_redirects=False)
        assert r.status_code == 303, r.text[:300]  # old code: 413 application/json
    normal = ann.get("/generate")
    r = ann.post("/generate", data={"csrf_token": csrf(ann), "prompt": "😀" * 4000})
    assert r.status_code == 413
    assert r.headers["content-type"].startswith("text/html")
    assert 'data-code="body_too_large"' in r.text
    assert "shorten what you typed" in r.text
    assert "<title>Generate refused" in r.text
    assert {n: r.headers.get_list(n) for n in SECURITY_HEADER_NAMES} == {
        n: normal.headers.get_list(n) for n in SECURITY_HEADER_NAMES}


@pytest.mark.parametrize("other", ["theme=dark mode", 'prefs={"a":1,"b":2}', 'q="quoted"',
                                   "odd=a;b", "broken"])
def test_the_page_upload_finds_the_session_beside_any_other_cookie(ann: TestClient,
                                                                   other: str) -> None:
    # The guard read the Cookie header with the standard library's parser, which drops every
    # cookie once one has a space, a quote or a JSON value: the pages let the user in, the
    # upload answered 401 (found in review). Both now read it as Starlette does.
    session = ann.cookies.get("sl_session")
    assert session
    token = csrf(ann)
    ann.cookies.clear()
    for header in (f"{other}; sl_session={session}", f"sl_session={session}; {other}"):
        assert ann.get("/photos", headers={"Cookie": header}).status_code == 200, header
        photo = [("files", ("p.jpg", synthetic_photo(1), "image/jpeg"))]
        r = ann.post("/photos/upload", files=photo,
                     headers={"Cookie": header, "X-CSRF-Token": token})
        assert r.status_code != 401, (header, r.text)
        assert "data-trainable" in r.text, (header, r.text)
    r = ann.post("/photos/upload", files=[("files", ("p.jpg", synthetic_photo(1), "image/jpeg"))],
                 headers={"Cookie": f"{other}; sl_session=forged", "X-CSRF-Token": token})
    assert r.status_code == 401


def test_a_refused_page_upload_answers_a_report_not_a_page(ann: TestClient,
                                                        svc: Services) -> None:
    # A tab's token gone stale (signed in again elsewhere): the 403 was the whole error page,
    # which the page's script put inside its report (found in review). It is the report
    # fragment now, saying why; the script puts only that fragment in the report.
    stale = csrf(ann)
    sign_in(ann, "ann")
    r = ann.post("/photos/upload", headers={"X-CSRF-Token": stale},
                 files=[("files", ("p.jpg", synthetic_photo(1), "image/jpeg"))])
    assert r.status_code == 403
    assert r.text.lstrip().startswith('<div class="report bad" data-trainable="false">')
    assert "<!doctype" not in r.text.lower()
    assert "this form has expired" in r.text
    assert svc.intake.latest(user=svc.users.get_by_name(name="ann")) is None


def test_the_training_status_shows_the_newest_sample_to_its_owner_only(tmp_path: Path) -> None:
    # A recipe that samples (local-tiny-v2); the fake trainer makes one at steps 1, 2 and 3.
    settings = make_settings(tmp_path, trainer_version="local-tiny-v2")
    services = fake_services(settings, trainer=FakeTrainer(sample_every=1))
    try:
        services.users.create(name="ann", password=PASSWORD)
        services.users.create(name="bob", password=PASSWORD)
        with browser(settings, services) as client:
            sign_in(client, "ann")
            assert upload(client)[0] == 200
            status = train(client)
            user = services.users.get_by_name(name="ann")
            training = services.training.progress(user=user).training
            newest = f"/train/{training.id}/samples/3.jpg"
            assert f'src="{newest}"' in status
            assert "Sample at step 3" in status
            # The caption says what it is: the alt repeated it (a11y review).
            assert f'<img src="{newest}" alt=""' in status
            assert "samples/2.jpg" not in status  # the newest only
            image = client.get(newest)
            assert image.status_code == 200
            assert image.headers["content-type"] == "image/jpeg"
            assert image.content.startswith(b"\xff\xd8")
            assert client.get(f"/train/{training.id}/samples/4.jpg").status_code == 404
        with browser(settings, services) as bob:
            # A model of his own: past "you have no model yet", only the training lookup
            # scoped to his model refuses Ann's sample.
            own_model(bob, services, "bob", versions=0)
            sign_in(bob, "bob")
            refused = bob.get(newest)
            assert refused.status_code == 404
            assert "no such training" in refused.text
            assert newest not in bob.get("/train").text
    finally:
        services.close()


def test_a_disabled_user_s_browser_is_signed_out_and_its_sign_in_refused(
        web_settings: Settings, svc: Services) -> None:
    with browser(web_settings, svc) as client:
        sign_in(client, "ann")
        svc.users.disable(name="ann")
        r = client.get("/photos", follow_redirects=False)
        assert r.status_code == 303  # the session ended: sent to sign in
        r = client.post("/signin", data={"name": "ann", "password": PASSWORD,
                                         "form_token": form_token(client)})
        assert r.status_code == 403
        assert "this account is disabled" in r.text
        assert "sl_session" not in r.cookies  # no new session
        svc.users.enable(name="ann")
        sign_in(client, "ann")


def test_a_sign_in_overtaken_by_a_disable_leaves_the_browser_signed_out(
        web_settings: Settings) -> None:
    """``users disable`` committed while the password was checked: the session was stored all
    the same, every page then a bare 500, and the browser signed in again after ``enable``."""
    hasher = HookedHasher()
    services = fake_services(web_settings, password_hasher=hasher)
    try:
        services.users.create(name="ann", password=PASSWORD)

        def disable() -> None:
            services.users.disable(name="ann")

        hasher.during_verify = disable
        with browser(web_settings, services) as client:
            r = client.post("/signin", data={"name": "ann", "password": PASSWORD,
                                             "form_token": form_token(client)},
                            follow_redirects=False)
            assert r.status_code == 403
            assert "this account is disabled" in r.text
            assert "sl_session" not in r.cookies
            assert client.get("/photos", follow_redirects=False).status_code == 303
            hasher.during_verify = lambda: None
            services.users.enable(name="ann")
            assert client.get("/photos", follow_redirects=False).status_code == 303
    finally:
        services.close()


def test_a_disabled_account_s_session_gets_the_403_page_not_a_500(
        web_settings: Settings, svc: Services, ann: TestClient) -> None:
    """A session of a disabled account (one a sign-in racing ``users disable`` left before
    this release): finding the viewer is refused (403), and the error page, which looked for the
    viewer again, let that refusal escape as a bare 500."""
    user = svc.users.get_by_name(name="ann")
    svc.repo.set_user_disabled(user.id, at=utcnow())  # the row only: her session is kept
    r = ann.get("/photos", follow_redirects=False)
    assert r.status_code == 403
    assert "this account is disabled" in r.text
    assert 'action="/signout"' not in r.text  # rendered signed out


def test_the_settings_page_deletes_the_account_once_its_name_is_typed(
        ann: TestClient, svc: Services) -> None:
    """The page's button: a wrong name deletes nothing (422, said beside the form); the name
    typed deletes the account, ends the session and leads to the sign-in page."""
    page = ann.get("/settings").text
    # Once, in the page's main: a copy in the <title> showed its markup and CSRF token as the
    # tab's title and wrote them into the browser's history.
    assert page.count('action="/settings/delete"') == 1
    assert page.count('name="confirm"') == 1
    assert page_title(page) == "Settings · selfie-lora"
    assert 'class="confirm inline"' in page
    r = ann.post("/settings/delete", data={"csrf_token": csrf(ann), "confirm": "bob"},
                 follow_redirects=False)
    assert r.status_code == 422
    assert "type your name to confirm" in r.text
    # The refused field has the focus (a new page's alert is not reliably read out), and names
    # the expected value, so the script can skip the "cannot be undone" question for it.
    field = re.search(r'<input id="delete-confirm"[^>]*>', r.text[r.text.index("<main"):])
    assert field
    assert "autofocus" in field.group(0)
    assert 'aria-invalid="true"' in field.group(0)
    assert 'data-expect="ann"' in field.group(0)
    assert svc.repo.get_user_by_name("ann") is not None
    # Without scripts a box to tick, as every other destructive button has (nojs review 9).
    assert _asks_without_scripts(ann.get("/settings").text, "/settings/delete").startswith(
        "Yes, delete my account")
    # The name in another case is the name, as it is to sign in (nojs review 10).
    r = ann.post("/settings/delete", data={"csrf_token": csrf(ann, "/settings"),
                                           "confirm": "ANN", "sure": "1"}, follow_redirects=False)
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/signin"
    # Said there, or a deletion would look like a session that merely ended; once.
    landed = ann.get(r.headers["location"]).text
    assert "Your account and everything it held were deleted." in landed
    assert "were deleted" not in ann.get("/signin").text
    assert svc.repo.get_user_by_name("ann") is None
    assert svc.repo.get_user_by_name("bob") is not None
    assert ann.get("/settings", follow_redirects=False).status_code in (302, 303)


def test_the_settings_page_refuses_a_deletion_on_another_deployments_storage(
        ann: TestClient, svc: Services) -> None:
    """The page's deletion deleted her blobs by key from a storage whose marker names another
    deployment, where that deployment's lie under the same keys; now a 503 that says nothing
    was deleted, the account as it was (the operator's words are in the log). On the Settings
    page, beside its form, as its other refusals are: it was the general error page, which
    said neither that it was the deletion that was refused nor who must act."""
    svc.blobs.put(DEPLOYMENT_KEY, b'{"deployment_id": "another-deployment"}')
    r = ann.post("/settings/delete", data={"csrf_token": csrf(ann, "/settings"),
                                           "confirm": "ann"}, follow_redirects=False)
    assert r.status_code == 503, r.text
    assert page_title(r.text) == "Settings · selfie-lora"
    refusal = re.search(r'<p class="error" role="alert" id="delete-error"[^>]*>([^<]*)</p>',
                        r.text)
    assert refusal, r.text
    assert "nothing was deleted" in refusal.group(1)
    assert "The operator must fix the storage configuration" in refusal.group(1)
    assert "reference " in refusal.group(1)
    assert "another-deployment" not in r.text
    user = svc.repo.get_user_by_name("ann")
    assert user is not None
    assert user.disabled_at is None


def test_the_sign_in_page_says_an_account_was_deleted_only_to_the_browser_that_deleted_it(
        web_settings: Settings, svc: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """/signin?deleted=1 told anyone who opened it (a link in a phishing mail) that their
    account and everything it held were deleted (daydiff2 review finding 4). The notice is a
    signed one-time cookie now, set by the deletion itself."""
    deleted = "were deleted"
    with browser(web_settings, svc) as stranger:
        assert deleted not in stranger.get("/signin?deleted=1").text  # old code: said
        stranger.cookies.set("sl_notice", "account-deleted")  # forged: not signed
        assert deleted not in stranger.get("/signin").text
    with browser(web_settings, svc) as bob:
        sign_in(bob, "bob")
        r = bob.post("/settings/delete", data={"csrf_token": csrf(bob, "/settings"),
                                               "confirm": "bob"}, follow_redirects=False)
        assert r.status_code == 303, r.text
        notice = bob.cookies.get("sl_notice")
        assert notice
        page = bob.get("/signin").text
        assert deleted in page
        # The notice takes the focus, not the Name field: a notice present as the page loads
        # is often not read out, and nothing pointed the focused field at it (webhostile
        # review 2; old code: role=status, Name autofocused).
        note = re.search(r'<p class="notice" id="deleted-note"[^>]*>', page)
        assert note, page
        assert 'tabindex="-1"' in note.group(0)
        assert "autofocus" in note.group(0)
        assert "autofocus" not in _field(page, "name")
        assert page.count("autofocus") == 1
        assert deleted not in bob.get("/signin").text  # once
        # Too old: two minutes after the deletion (by the signatures' clock) it says nothing.
        later = int(time.time()) + 120
        monkeypatch.setattr(itsdangerous.TimestampSigner, "get_timestamp", lambda _self: later)
        bob.cookies.set("sl_notice", notice)
        assert deleted not in bob.get("/signin").text


def test_the_generate_page_says_in_its_own_words_why_it_cannot_generate(
        ann: TestClient, svc: Services, web_settings: Settings) -> None:
    """The page had one fixed sentence, "No trained version yet: train your model first",
    while a training was queued (wait) or every version was held (activate one); then the
    API's no_version message, which told web users 'POST /api/training/start or selfie-lora
    train' and 'POST /api/model/versions/{id}/activate' (daydiff2 review finding 3). It words
    the generation service's reason itself now, linking the page that helps."""

    def said(client: TestClient) -> str:
        page = client.get("/generate").text
        status = re.search(r'<p class="empty" role="status">(.*?)</p>', page, re.S)
        assert status, page
        return html.unescape(status.group(1))

    assert said(ann) == ('You have no model yet: upload photos on the <a href="/photos">Photos'
                         '</a> page to start one.')
    assert upload(ann)[0] == 200
    train_it = ('Your model has no trained version yet: train it on the <a href="/train">Train'
                '</a> page.')
    assert said(ann) == train_it
    queue_a_training(svc, "ann")
    assert said(ann) == ("Your model has no trained version yet: its training is queued; wait "
                         'for it to finish (follow it on the <a href="/train">Train</a> page).')
    assert "/api/" not in ann.get("/generate").text
    # The API and the CLI keep the service's words.
    reason = svc.generation.not_ready(user=svc.users.get_by_name(name="ann"))
    assert reason is not None
    assert reason.reason == "wait"
    assert reason.message == ("your model has no trained version yet: its training is queued; "
                              "wait for it to finish")
    with browser(web_settings, svc) as bob:
        own_model(bob, svc, "bob")
        sign_in(bob, "bob")
        model = svc.repo.get_model_for_user(svc.users.get_by_name(name="bob").id)
        assert model is not None
        svc.repo.set_model_active_version(model.id, None)  # held back, as the likeness gate does
        assert said(bob) == ('Your model has no active version: activate one on the <a href='
                             '"/versions">Versions</a> page, or train again on the <a href='
                             '"/train">Train</a> page.')
        assert "/api/" not in bob.get("/generate").text
        # The Model page said 'none yet', as if there were no version (diffcli review 5).
        assert ('<dt>Active version</dt><dd>none active (1 version: activate one on the <a '
                'href="/versions">Versions</a> page)</dd>') in bob.get("/model").text


def test_deleting_the_account_while_a_training_is_queued_says_what_to_do_on_the_page(
        ann: TestClient, svc: Services) -> None:
    """The page said "pass --force to cancel it and delete", which the form has no way to do
    (web3 review finding 2): it says to cancel the training on the Train page, linked."""
    assert upload(ann)[0] == 200
    queue_a_training(svc, "ann")
    r = ann.post("/settings/delete", data={"csrf_token": csrf(ann, "/settings"),
                                           "confirm": "ann"}, follow_redirects=False)
    assert r.status_code == 409, r.text
    error = re.search(r'<p class="error" role="alert" id="delete-error"[^>]*>(.*?)</p>',
                      r.text[r.text.index("<main"):])
    assert error, r.text
    assert "nothing was deleted; cancel it on the Train page first" in error.group(1)
    assert '<a href="/train">' in error.group(1)
    # The name typed was right: the message has the focus, the field is not called invalid
    # (day review 2: "invalid entry" read out for her right name).
    page = r.text[r.text.index("<main"):]
    message = re.search(r'<p class="error" role="alert" id="delete-error"[^>]*>', page)
    assert message
    assert 'tabindex="-1" autofocus' in message.group(0)
    field = re.search(r'<input id="delete-confirm"[^>]*>', page)
    assert field
    assert "aria-invalid" not in field.group(0)
    assert "autofocus" not in field.group(0)
    assert "--force" not in r.text
    assert svc.repo.get_user_by_name("ann") is not None


def test_an_upload_sent_without_scripts_is_answered_with_the_whole_photos_page(
        ann: TestClient, svc: Services) -> None:
    """Without scripts the form's answer was the report fragment alone: no title, styles or
    navigation, empty picture boxes (the script fills them) and, for a refused set, no way back
    (web3 review finding 4). It is the photos page now, the report in #report, each kept
    photo's stored crop as its picture; the script still gets the fragment."""
    page = ann.get("/photos").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert token
    photos = [("files", (f"p{i}.jpg", synthetic_photo(i), "image/jpeg")) for i in range(4)]
    r = ann.post("/photos/upload", data={"csrf_token": token.group(1)}, files=photos)
    assert r.status_code == 200, r.text
    assert "<title>Photos · selfie-lora</title>" in r.text
    assert 'href="/static/' in r.text  # styled
    assert '<nav aria-label="Site">' in r.text
    assert '<form id="upload"' in r.text  # the next upload from here
    report = r.text[r.text.index('<section id="report"'):r.text.index('<section id="current-set"')]
    assert "These photos can be trained on" in report
    pictures = re.findall(r'<img ([^>]*)>', report)
    assert len(pictures) == 4
    for picture in pictures:
        src = re.search(r'src="([^"]+)"', picture)
        assert src, picture
        assert ann.get(src.group(1)).headers["content-type"] == "image/jpeg"
    assert report_rows(r.text) == {f"p{i}.jpg": "kept" for i in range(4)}
    # A set refused as a whole: the page too, with the status, and no empty picture boxes.
    r = ann.post("/photos/upload", data={"csrf_token": token.group(1)},
                 files=[("files", ("a.jpg", b"not a photo", "image/jpeg"))])
    assert r.status_code == 422, r.text
    assert "<title>Photos · selfie-lora</title>" in r.text
    report = r.text[r.text.index('<section id="report"'):r.text.index('<section id="current-set"')]
    assert "cannot be trained" in report
    assert "<img" not in report
    # The page's script still gets the fragment it puts in its #report.
    status, fragment = upload(ann)
    assert status == 200
    assert "<html" not in fragment
    assert "data-stored=" in fragment


def test_an_upload_sent_without_scripts_redirects_and_its_report_is_shown_once(
        ann: TestClient, svc: Services) -> None:
    """Without scripts the upload's answer was the photos page itself, as the POST's answer: a
    reload asked to send the photos again (webflow review 1). A kept set is now answered with
    a redirect to /photos (POST-redirect-GET, as every other form), whose page shows that
    upload's report (from the set stored, by a one-time notice of this session's), once."""
    token = re.search(r'name="csrf_token" value="([^"]+)"', ann.get("/photos").text)
    assert token
    photos = [("files", (f"p{i}.jpg", synthetic_photo(i), "image/jpeg")) for i in range(4)]
    photos.append(("files", ("tiny.jpg", synthetic_photo(99, size=24), "image/jpeg")))
    r = ann.post("/photos/upload", data={"csrf_token": token.group(1)}, files=photos,
                 follow_redirects=False)
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/photos"
    page = ann.get("/photos").text
    report = page[page.index('<section id="report"'):page.index('<section id="current-set"')]
    assert "These photos can be trained on" in report
    assert report_rows(report) == {**{f"p{i}.jpg": "kept" for i in range(4)},
                                   "tiny.jpg": "left-out"}
    assert re.search(r'<p id="upload-kept"[^>]* autofocus>4 of 5 photos kept; 1 left out',
                     report), report
    assert len(re.findall(r'<img src="/photos/[^"]+\.jpg"', report)) == 4  # the stored crops
    assert 'id="set-advice"' not in page  # the report says it: not twice
    # Once: a reload shows the page with the stored advice, no report.
    again = ann.get("/photos").text
    assert "These photos can be trained on" not in again
    assert 'id="set-advice"' in again
    # Another session of the same user is not shown it.
    with TestClient(ann.app) as other:
        sign_in(other, "ann")
        r = ann.post("/photos/upload", data={"csrf_token": token.group(1)}, files=photos,
                     follow_redirects=False)
        assert r.status_code == 303
        for cookie in r.cookies.jar:
            other.cookies.jar.set_cookie(cookie)
        assert "These photos can be trained on" not in other.get("/photos").text
    # The page's script still gets the fragment.
    status, fragment = upload(ann)
    assert status == 200
    assert "<html" not in fragment


def test_a_photo_s_picture_does_not_repeat_the_name_beside_it(ann: TestClient) -> None:
    """Each thumbnail's alt was the photo's name, and its caption (the current set) or the
    report's line beside it said the name again: a screen reader read every name twice (a11y
    review). The pictures' alt is empty in the report, the page's and the script's, and in
    the current set."""
    def pictures(page: str, start: str, end: str) -> list[str]:
        begin = page.index(start)
        part = page[begin:page.index(end, begin)]
        return re.findall(r"<img ([^>]*)>", part)

    status, fragment = upload(ann)
    assert status == 200
    for where, found in (("report", pictures(fragment, '<ul class="photo-report">', "</ul>")),
                         ("set", pictures(ann.get("/photos").text, '<section id="current-set"',
                                          "</section>"))):
        assert len(found) == 4, (where, found)
        assert all(' alt=""' in f" {tag}" for tag in found), (where, found)
    token = re.search(r'name="csrf_token" value="([^"]+)"', ann.get("/photos").text)
    assert token
    photos = [("files", (f"p{i}.jpg", synthetic_photo(i), "image/jpeg")) for i in range(4)]
    page = ann.post("/photos/upload", data={"csrf_token": token.group(1)}, files=photos).text
    found = pictures(page, '<section id="report"', '<section id="current-set"')
    assert len(found) == 4, found
    assert all(' alt=""' in f" {tag}" for tag in found), found


def test_a_refused_upload_s_message_is_said_once(ann: TestClient) -> None:
    """A refused upload's message was a role=alert in the report, and the page's script wrote
    it (or "Some photos need changes.") in the #upload-status live region too: a screen
    reader said both (a11y review). The report's message is no live region now; the script
    finds it by its id. Without scripts, the page's message takes the focus instead (nothing
    else said it), once."""
    refused = [("files", ("a.jpg", b"not a photo", "image/jpeg"))]
    # The script's fragment: a set refused, and a form gone stale.
    r = ann.post("/photos/upload", headers={"X-CSRF-Token": csrf(ann)}, files=refused)
    assert r.status_code == 422, r.text
    assert 'role="alert"' not in r.text
    assert '<p class="error" id="upload-refused">' in r.text
    r = ann.post("/photos/upload", headers={"X-CSRF-Token": "stale"}, files=refused)
    assert r.status_code == 403, r.text
    assert 'role="alert"' not in r.text
    assert re.search(r'<p class="error" id="upload-refused">[^<]*this form has expired', r.text)
    # The whole page, for a form sent without scripts.
    token = re.search(r'name="csrf_token" value="([^"]+)"', ann.get("/photos").text)
    assert token
    for csrf_token, status in ((token.group(1), 422), ("stale", 403)):
        r = ann.post("/photos/upload", data={"csrf_token": csrf_token}, files=refused)
        assert r.status_code == status, r.text
        report = r.text[r.text.index('<section id="report"'):]
        assert 'role="alert"' not in report
        assert '<p class="error" id="upload-refused" tabindex="-1" autofocus>' in report
        assert r.text.count("autofocus") == 1


def test_a_refused_upload_without_scripts_reads_the_current_set_off_the_event_loop(
        ann: TestClient, svc: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused upload's page without scripts (a set refused as a whole, a stale token) reads
    the current set: the database and the storage's manifest (an S3 GET). It did so on the
    event loop, stalling every request of the server meanwhile (daydiff2 review finding 2);
    it runs in the thread pool now, as a kept set's report does."""
    assert upload(ann)[0] == 200  # a current set, whose manifest the page reads
    on_loop: list[bool] = []
    real = svc.intake.photos

    def photos(**kwargs: Any) -> Any:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            on_loop.append(False)
        else:
            on_loop.append(True)
        return real(**kwargs)

    monkeypatch.setattr(svc.intake, "photos", photos)
    token = re.search(r'name="csrf_token" value="([^"]+)"', ann.get("/photos").text)
    assert token
    on_loop.clear()
    refused = [("files", ("a.jpg", b"not a photo", "image/jpeg"))]
    for csrf_token, status in ((token.group(1), 422), ("stale", 403)):
        r = ann.post("/photos/upload", data={"csrf_token": csrf_token}, files=refused)
        assert r.status_code == status, r.text
        assert "<title>Photos · selfie-lora</title>" in r.text
        # Old code: [True], on the event loop.
        assert on_loop == [False], (status, on_loop)
        on_loop.clear()


def test_the_generate_form_makes_another_version_s_pictures_without_activating_it(
        ann: TestClient, svc: Services) -> None:
    """The API's version_id had no form field: remaking a v1 picture while v2 was active took
    activating v1, every client's default, and back (found in review). The form offers each
    version the API takes, the active one chosen."""
    two_versions(ann)
    user = svc.users.get_by_name(name="ann")
    v1, v2 = (svc.models.version(user=user, version_id=n) for n in ("1", "2"))
    page = ann.get("/generate").text
    select_tag(page, "version")
    assert '<option value="2" selected>v2 (active)</option>' in page
    assert '<option value="1">v1</option>' in page
    r = ann.post("/generate", data={"csrf_token": csrf(ann), "prompt": "p", "num_outputs": "1",
                                    "seed": "7", "version": "1"}, follow_redirects=False)
    assert r.status_code == 303, r.text
    r = ann.post("/generate", data={"csrf_token": csrf(ann), "prompt": "p", "num_outputs": "1",
                                    "seed": "7", "version": ""}, follow_redirects=False)
    assert r.status_code == 303, r.text
    assert [g.version_id for g in svc.generation.history(user=user)] == [v2.id, v1.id]
    assert svc.models.get(user=user).active_version_id == v2.id
    r = ann.post("/generate", data={"csrf_token": csrf(ann), "prompt": "p", "num_outputs": "1",
                                    "version": "3"}, follow_redirects=False)
    assert r.status_code == 404
    assert "no such version: 3" in r.text


def test_the_generate_form_makes_the_version_it_showed_though_another_was_activated_since(
        ann: TestClient, svc: Services) -> None:
    """The active version's option sent "" (whatever is active when the form arrives): a page
    showing "v2 (active)", v1 activated elsewhere meanwhile, and Generate made v1's pictures,
    its notice naming no version (diff2 review finding 1). The form sends the version it
    showed, the only one too (unseen), and the notice names the version that made them."""
    assert upload(ann)[0] == 200
    assert 'data-status="succeeded"' in train(ann)
    user = svc.users.get_by_name(name="ann")
    page = ann.get("/generate").text
    assert 'id="version"' not in page  # one version: no choice, but it is sent
    only = re.search(r'<input type="hidden" name="version" value="([^"]*)">', page)
    assert only, page
    assert only.group(1) == "1"
    assert 'data-status="succeeded"' in train(ann)  # v2, made active meanwhile
    v1, v2 = (svc.models.version(user=user, version_id=n) for n in ("1", "2"))
    assert svc.models.get(user=user).active_version_id == v2.id
    r = ann.post("/generate", data={"csrf_token": csrf(ann), "prompt": "p", "num_outputs": "1",
                                    "version": only.group(1)}, follow_redirects=False)
    assert r.status_code == 303, r.text
    assert ("1 picture made with version 1: the newest under Your pictures."
            in ann.get(r.headers["location"]).text)

    page = ann.get("/generate").text  # v2 active, so shown
    chosen = re.search(r'<option value="([^"]*)" selected>v2 \(active\)</option>', page)
    assert chosen, page
    svc.models.activate(user=user, version_id=v1.id)  # elsewhere, the page still open
    r = ann.post("/generate", data={"csrf_token": csrf(ann), "prompt": "p", "num_outputs": "2",
                                    "version": chosen.group(1)}, follow_redirects=False)
    assert r.status_code == 303, r.text
    # Old code: v1's pictures, "2 pictures made: the newest under Your pictures."
    assert [g.version_id for g in svc.generation.history(user=user)] == [v2.id, v1.id]
    assert ("2 pictures made with version 2: the newest under Your pictures."
            in ann.get(r.headers["location"]).text)
    assert svc.models.get(user=user).active_version_id == v1.id


@pytest.mark.parametrize(("field", "value"), [
    ("seed", "1.0"), ("seed", "1_0"), ("seed", "\u0663"), ("seed", "+5"), ("seed", "1e2"),
    ("num_outputs", "2.0"), ("num_outputs", "1_0"), ("num_outputs", "\u0662")])
def test_the_form_and_the_cli_read_a_number_alike_by_the_api_s_rules(
        ann: TestClient, svc: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        field: str, value: str) -> None:
    """The form took seed 1_0 (as 10) and Arabic-Indic digits, and num_outputs 2.0, where the
    CLI refused one and took "1.0", and the API refuses them all (found in review): one parser
    now, ASCII digits only, with the same words."""
    from typer.testing import CliRunner

    from selfie_lora import cli, wiring

    assert upload(ann)[0] == 200
    train(ann)
    data = {"csrf_token": csrf(ann), "prompt": "p", "num_outputs": "1", field: value}
    r = ann.post("/generate", data=data, follow_redirects=False)
    assert r.status_code == 422, r.text
    name = "the seed" if field == "seed" else "the number of pictures"
    high = "4294967295" if field == "seed" else "4"
    said = (f"{name} must be a whole number {'0' if field == 'seed' else '1'} to {high}, "
            f"written with the digits 0-9 only (not {value!r})")
    assert said[0].upper() + said[1:] in html.unescape(r.text) or said in html.unescape(r.text)
    assert svc.generation.history(user=svc.users.get_by_name(name="ann")) == []
    settings: Settings = svc.settings
    monkeypatch.setattr(cli, "_settings", lambda: settings)
    monkeypatch.setattr(wiring, "build_services", lambda *_a, **_k: svc)
    option = "--seed" if field == "seed" else "-n"
    done = CliRunner().invoke(cli.app, ["generate", "p", "--user", "ann", option, value,
                                        "--out", str(tmp_path)])
    assert done.exit_code == 1, done.output
    assert " ".join(done.output.split()) == f"error: {said}"


def test_a_seed_and_a_count_with_thousands_of_zeros_in_front_are_read_as_without(
        ann: TestClient, svc: Services) -> None:
    """Zeros in front counted towards int()'s 4300 digits: a seed of 5000 zeros and a 7 was a
    ValueError, a 500, where "007" is 7 (found in review)."""
    assert upload(ann)[0] == 200
    train(ann)
    r = ann.post("/generate", data={"csrf_token": csrf(ann), "prompt": "p",
                                    "num_outputs": "0" * 5000 + "1", "seed": "0" * 5000 + "7"},
                 follow_redirects=False)
    assert r.status_code == 303, r.text[:300]
    made = svc.generation.history(user=svc.users.get_by_name(name="ann"))
    assert [(g.seed, len(g.image_keys)) for g in made] == [(7, 1)]


def test_buttons_only_a_script_works_are_hidden_without_scripts(ann: TestClient) -> None:
    """The presets and the Copy buttons were shown without JavaScript and did nothing (nojs
    review 3): they are hidden until app.js shows them."""
    assert upload(ann)[0] == 200
    train(ann)
    assert '<fieldset class="presets" data-needs-script hidden>' in ann.get("/generate").text
    assert ('<button type="button" class="copy secondary" data-needs-script hidden data-copy='
            in ann.get("/model").text)
    r = ann.post("/settings/keys", data=key_form(ann, "laptop"))
    assert ('<button type="button" class="copy secondary" data-needs-script hidden data-copy='
            in r.text)



def test_a_database_down_while_an_upload_s_session_is_checked_is_an_error_page(
        web_settings: Settings, svc: Services, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The upload's session is checked by the guard, outside FastAPI's handlers: with the
    database down the StorageError went on up to uvicorn (a traceback per request) and the
    page said ``internal_error``. It is the storage error's page, with every page's headers."""
    with TestClient(create_app(web_settings, services=svc)) as client:
        sign_in(client, "ann")
        token = csrf(client)
        normal = client.get("/photos")

        def down(self: object, *_args: object, **_kwargs: object) -> None:
            raise StorageError("database error: connection failed: Connection refused")

        monkeypatch.setattr(SqlRepository, "get_session", down)
        with caplog.at_level(logging.ERROR):
            r = client.post("/photos/upload", headers={"X-CSRF-Token": token},
                            files=[("files", ("p.jpg", synthetic_photo(1), "image/jpeg"))])
    assert r.status_code == 500
    assert 'data-code="storage_error"' in r.text
    assert "Connection refused" not in r.text
    assert r.headers["content-security-policy"] == normal.headers["content-security-policy"]
    assert len([rec for rec in caplog.records if rec.levelno >= logging.ERROR]) == 1


def test_a_page_s_503_sends_the_api_s_retry_after_for_the_same_outage(
        ann: TestClient, svc: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """The database or the object storage away (StorageUnavailableError): the API's 503 said
    when to ask again (Retry-After), the page's 503 for the same error sent none (a11y and
    headers review). Both now send the same seconds, decided in one place; a page whose session
    the guard could not look up too."""
    _key, secret = svc.users.create_key(user=svc.users.get_by_name(name="ann"), name="t")
    token = csrf(ann)

    def away(*_args: object, **_kwargs: object) -> None:
        raise DatabaseUnreachableError("database error: connection failed: Connection refused")

    monkeypatch.setattr(svc.generation, "page", away)
    api = ann.get("/api/generations", headers={"Authorization": f"Bearer {secret}"})
    page = ann.get("/generate")
    monkeypatch.setattr(SqlRepository, "get_session", away)
    upload = ann.post("/photos/upload", headers={"X-CSRF-Token": token},
                      files=[("files", ("p.jpg", synthetic_photo(1), "image/jpeg"))])
    monkeypatch.undo()
    assert api.status_code == 503, api.text
    assert api.headers["Retry-After"] == str(DatabaseUnreachableError.retry_after)
    for r in (page, upload):
        assert r.status_code == 503, r.text
        assert 'data-code="storage_unavailable"' in r.text
        assert r.headers.get("Retry-After") == api.headers["Retry-After"]  # old code: None


def test_a_page_s_503_says_the_wait_in_a_person_s_words_and_the_api_keeps_its_own(
        ann: TestClient, svc: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """The page's 503 for an outage said the API's sentence, "please retry after the
    Retry-After header's seconds": a person sees no header. The page now says the wait itself
    (the error's seconds); the API's sentence, for clients, is unchanged."""
    _key, secret = svc.users.create_key(user=svc.users.get_by_name(name="ann"), name="t")

    def away(*_args: object, **_kwargs: object) -> None:
        raise DatabaseUnreachableError("database error: connection failed: Connection refused")

    monkeypatch.setattr(svc.generation, "page", away)
    api = ann.get("/api/generations", headers={"Authorization": f"Bearer {secret}"})
    page = ann.get("/generate")
    monkeypatch.undo()
    assert page.status_code == 503, page.text
    said = visible_text(page.text)
    assert "Retry-After" not in said  # old code: "...after the Retry-After header's seconds"
    assert f"Try again in about {DatabaseUnreachableError.retry_after} seconds." in said
    assert "nothing is wrong with what you asked for" in said
    assert api.json()["error"]["message"] == server_error_sentence("storage_unavailable")
    assert "Retry-After header's seconds" in api.json()["error"]["message"]


# Old code: both pages said "Sign in again" (-> /signin?next=/train, /signin?next=/photos): the
# viewer the database could not look up was taken for one signed out.
def test_a_database_down_s_error_pages_do_not_say_the_session_ended(
        web_settings: Settings, svc: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    with TestClient(create_app(web_settings, services=svc)) as client:
        sign_in(client, "ann")
        token = csrf(client)

        def down(self: object, *_args: object, **_kwargs: object) -> None:
            raise StorageError("database error: connection failed: Connection refused")

        monkeypatch.setattr(SqlRepository, "get_session", down)
        page = client.get("/train")
        upload = client.post("/photos/upload", headers={"X-CSRF-Token": token},
                             files=[("files", ("p.jpg", synthetic_photo(1), "image/jpeg"))])
        monkeypatch.undo()
        assert client.get("/train").status_code == 200  # still signed in, once it answers
    for r, back in ((page, "/photos"), (upload, "/photos")):
        assert r.status_code == 500
        assert 'data-code="storage_error"' in r.text
        assert "Sign in again" not in r.text
        assert f'<a href="{back}" data-back>Back</a>' in r.text


def test_the_settings_page_deletes_the_signed_in_account_not_another_of_the_same_name(
        ann: TestClient, svc: Services) -> None:
    """An older process of a rolling upgrade from a release before 0013 made "ANN" before
    ann's account was made here. The page's deletion looked the account up by name, which
    finds the first made: ann deleted ANN's account and kept her own (sec review finding 1).
    Now it deletes the signed-in account, by its id."""
    own = svc.repo.get_user_by_name("ann")
    assert own is not None
    other_id, _secret = legacy_user(svc, "ANN", created_at=own.created_at - timedelta(days=1))
    r = ann.post("/settings/delete", data={"csrf_token": csrf(ann, "/settings"),
                                           "confirm": "ann", "sure": "1"},
                 follow_redirects=False)
    assert r.status_code == 303, r.text
    assert svc.repo.get_user(own.id) is None
    assert svc.repo.get_user(other_id) is not None  # old code: deleted


def test_a_done_notice_is_shown_only_to_the_session_that_did_it(
        ann: TestClient, web_settings: Settings, svc: Services) -> None:
    """The notice cookie of a form that succeeded ("The key ... was revoked") was bound to no
    one: sent with bob's session (a shared browser where the redirect was not followed), bob's
    page said what ann had done (sec review hardening 1). Now it is bound to the session that
    did it, as the typed cookie is to its user."""
    user = svc.repo.get_user_by_name("ann")
    assert user is not None
    key, _secret = svc.users.create_key(user=user, name="ann-laptop")
    r = ann.post(f"/settings/keys/{key.id}/revoke", data={"csrf_token": csrf(ann, "/settings")},
                 follow_redirects=False)
    assert r.status_code == 303, r.text
    notice = ann.cookies.get("sl_notice")
    assert notice
    with browser(web_settings, svc) as bob:
        sign_in(bob, "bob")
        bob.cookies.set("sl_notice", notice)
        assert "ann-laptop" not in bob.get("/settings").text  # old code: shown
    assert "The key ann-laptop was revoked" in ann.get("/settings").text


def test_a_face_photo_is_not_kept_by_the_browser(ann: TestClient, svc: Services) -> None:
    """The Photos page is no-store, but its face photos were sent ``Cache-Control: private``,
    which lets the browser keep them on disk after sign-out on a shared computer (sec review
    hardening 5). Now ``private, no-store``, as the page that shows them."""
    assert upload(ann)[0] == 200
    user = svc.users.get_by_name(name="ann")
    dataset = svc.intake.latest(user=user)
    assert dataset is not None
    r = ann.get(f"/photos/{dataset.id}/0.jpg")
    assert r.status_code == 200
    assert r.headers["cache-control"] == "private, no-store"  # old code: private
    assert r.headers["x-content-type-options"] == "nosniff"


def test_a_session_ending_while_the_train_page_polls_says_so_on_the_sign_in_page(
        ann: TestClient) -> None:
    """The Train page's poll of a session that ended (signed out in another tab) was answered
    HX-Redirect to the sign-in page, which said nothing of why it was there (a11y review 5,
    f05_session_ends_while_polling.py); a form's post said "Your session had ended". The
    sign-in page says the session ended, that notice taking the focus, once."""
    r = ann.post("/signout", data={"csrf_token": csrf(ann)}, follow_redirects=False)
    assert r.status_code == 303
    r = ann.get("/train/status", headers={"hx-request": "true",
                                          "hx-current-url": "http://testserver/train"})
    assert r.headers["HX-Redirect"] == "/signin?next=/train"
    page = ann.get("/signin?next=/train").text
    note = re.search(r'<p class="notice" id="not-done-note"[^>]*>([^<]+)</p>', page)
    assert note, page  # old code: no notice
    assert "autofocus" in note.group(0)
    assert note.group(1) == "Your session had ended: sign in to follow the training again."
    assert "not-done-note" not in ann.get("/signin?next=/train").text  # said once


def test_the_train_page_polls_a_running_training_at_the_interval_set(tmp_path: Path) -> None:
    """The Train page polled every second, fixed: the browser tests waited out a second for
    each poll they counted. SELFIE_LORA_PAGE_POLL_SECONDS sets it (1 by default, written as
    before)."""
    for seconds, trigger in ((None, 'hx-trigger="every 1s"'),
                             (0.25, 'hx-trigger="every 0.25s"')):
        settings = make_settings(tmp_path / str(seconds), **(
            {} if seconds is None else {"page_poll_seconds": seconds}))
        services = fake_services(settings)
        with closing(services), browser(settings, services) as client:
            services.users.create(name="ann", password=PASSWORD)
            sign_in(client, "ann")
            assert upload(client)[0] == 200
            queue_a_training(services, "ann")
            for page in ("/train", "/train/status"):
                figures = re.search(r'<div id="status-figures"[^>]*>', client.get(page).text)
                assert figures, page
                assert trigger in figures.group(0), (seconds, figures.group(0))


def test_the_generation_that_takes_the_focus_after_a_delete_is_described_by_the_notice(
        ann: TestClient) -> None:
    """Back from a Delete the next generation takes the focus, but "Generation deleted." was
    only a status region present as the page loaded, often not read out: the user heard the
    next generation and nothing of the deletion (a11y review 6, f04_delete_notice.py). The
    gallery's items are described by the notice on that page (whichever takes the focus), and
    not on a reload, which no longer says it."""
    assert upload(ann)[0] == 200
    train(ann)
    for _ in range(2):
        ann.post("/generate", data={"csrf_token": csrf(ann), "prompt": "p", "num_outputs": "1"})
    ids = re.findall(r'<li id="g-([^"]+)"', ann.get("/generate").text)
    r = ann.post(f"/generations/{ids[0]}/delete",
                 data={"csrf_token": csrf(ann), "focus": f"g-{ids[1]}"}, follow_redirects=False)
    page = ann.get(r.headers["location"]).text
    assert 'id="deleted-note"' in page
    item = re.search(rf'<li id="g-{ids[1]}"[^>]*>', page)
    assert item, page
    assert 'aria-describedby="deleted-note"' in item.group(0)  # old code: none
    again = ann.get(r.headers["location"]).text
    assert 'id="deleted-note"' not in again
    assert "aria-describedby=\"deleted-note\"" not in again


def test_a_prompt_the_gallery_s_three_lines_can_cut_offers_the_whole_prompt(
        ann: TestClient) -> None:
    """"Whole prompt" was offered only past 120 characters, but the gallery's cell (about 170 px
    wide) clamps a prompt to 3 lines, about 45 characters: one of 117 was shown cut off at
    "…golden hour…" with no way to read the rest (a11y review 7, f13_prompt_clamped.py). It
    is offered wherever the three lines can cut (past 40 characters, or over several lines);
    a short prompt still has none."""
    assert upload(ann)[0] == 200
    train(ann)
    prompts = ("a portrait by the lake at golden hour, soft light, wearing a blue jacket",
               "one\ntwo", "short")
    for prompt in prompts:
        ann.post("/generate", data={"csrf_token": csrf(ann), "prompt": prompt,
                                    "num_outputs": "1"})
    page = ann.get("/generate").text
    items = re.findall(r'<li id="g-.*?</li>', page, re.S)
    offered = ["<summary>Whole prompt</summary>" in item for item in items]
    assert offered == [False, True, True], offered  # newest first; old: [False, False, False]


def test_the_compare_selects_are_named_for_the_versions_they_choose(ann: TestClient) -> None:
    """The second Compare select was named just "with" (a screen reader: "with, combobox, v1";
    a11y review 13, f15_with_label.py). Each label keeps its visible word and says the
    version it chooses."""
    two_versions(ann)
    page = ann.get("/versions").text
    labels = {f: html.unescape(re.sub(r"<[^>]+>", "", m)) for f, m in
              re.findall(r'<label for="(a|b)">(.*?)</label>', page)}
    assert labels == {"a": "Compare version", "b": "with version"}, labels


def test_head_answers_as_get_on_pages_api_reads_and_file_downloads(
        ann: TestClient, svc: Services, web_settings: Settings) -> None:
    """RFC 9110 wants HEAD wherever GET works: a page, an API read and a photo file answered
    405 (only the probes and the weights took it). Now each answers GET's status and headers,
    the pages' security headers and a stream's Content-Length included, without the body."""
    assert upload(ann)[0] == 200
    photo = re.search(r'/photos/[^/"]+/0\.jpg', ann.get("/photos").text)
    assert photo
    _key, secret = svc.users.create_key(user=svc.users.get_by_name(name="ann"), name="head")
    api = {"Authorization": f"Bearer {secret}"}
    for path, headers in (("/model", {}), ("/api/keys", api), (photo.group(0), {})):
        got, head = ann.get(path, headers=headers), ann.head(path, headers=headers)
        assert got.status_code == 200, (path, got.text)
        assert head.status_code == 200, (path, head.status_code)  # old code: 405
        assert head.content == b""
        for name in ("content-type", "content-length", "cache-control",
                     "content-security-policy", "x-content-type-options"):
            assert head.headers.get(name) == got.headers.get(name), (path, name)
    assert ann.head("/model").headers["content-security-policy"]
    # Signed out: the GET's redirect to the sign-in page, as GET; a form's address: still 405.
    with browser(web_settings, svc) as anonymous:
        r = anonymous.head("/model", follow_redirects=False)
        assert r.status_code == anonymous.get("/model", follow_redirects=False).status_code
        assert r.headers["location"] == anonymous.get("/model", follow_redirects=False
                                                      ).headers["location"]
    r = ann.head("/train/start")
    assert r.status_code == 405
    assert ann.post("/photos", data={"csrf_token": csrf(ann)}).headers["allow"] == "GET, HEAD"


def test_a_head_leaves_a_page_s_one_time_notice_and_typed_fields_to_its_get(
        ann: TestClient) -> None:
    """HEAD ran as the page's GET (HeadAsGet), which used up the one-time cookies that GET
    shows (found in review): a HEAD of the page a form led to (a link checker's, curl -I) sent
    their clearing Set-Cookie, and the browser's GET then said nothing of what the form did
    nor showed what was typed. The HEAD clears none; the GET shows them, once."""
    two_versions(ann)
    r = ann.post("/model/scale", data={"csrf_token": csrf(ann, "/generate"), "lora_scale": "0.9",
                                       "prompt": "a hat and a coat", "seed": "7"},
                 follow_redirects=False)
    assert r.status_code == 303
    head = ann.head(r.headers["location"])
    assert head.status_code == 200
    assert "set-cookie" not in head.headers  # old code: sl_notice and sl_typed cleared
    page = ann.get(r.headers["location"]).text
    assert "Scale 0.9 saved" in page
    assert ">a hat and a coat</textarea>" in page
    again = ann.get(r.headers["location"]).text
    assert "Scale 0.9 saved" not in again  # once, as before
    assert ">a hat and a coat</textarea>" not in again

    gone = ann.post("/signout", data={"csrf_token": csrf(ann)}, follow_redirects=False)
    assert gone.headers["location"] == "/signin"
    head = ann.head("/signin")
    assert "sl_notice" not in head.headers.get("set-cookie", "")  # the form's cookie alone
    assert "You signed out." in ann.get("/signin").text
    assert "You signed out." not in ann.get("/signin").text


def test_a_head_of_a_photo_file_does_not_read_the_photo_from_the_storage(
        ann: TestClient, svc: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """HEAD ran as the path's GET (HeadAsGet): for a streamed answer, a photo from the
    storage, it read the whole stream and dropped it (found in review). The photo file has its
    own HEAD now: the headers, the stream closed unread; a GET reads it all."""
    assert upload(ann)[0] == 200
    photo = re.search(r'/photos/[^/"]+/0\.jpg', ann.get("/photos").text)
    assert photo
    reads: list[int] = []
    opened: list[Iterator[bytes]] = []
    chunk, count = b"\xff" * 1024, 20

    def counted() -> Iterator[bytes]:
        for i in range(count):
            reads.append(i)
            yield chunk

    def stream(*_args: object, **_kwargs: object) -> BlobStream:
        opened.append(counted())
        return BlobStream(size=len(chunk) * count, chunks=opened[-1])

    monkeypatch.setattr(svc.intake, "photo", stream)
    got = ann.get(photo.group(0))
    assert (got.status_code, len(got.content), len(reads)) == (200, len(chunk) * count, count)
    reads.clear()
    head = ann.head(photo.group(0))
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == str(len(chunk) * count)
    assert head.headers["content-type"] == got.headers["content-type"]
    assert reads == []  # old code: all 20 chunks read
    assert inspect.getgeneratorstate(opened[-1]) == inspect.GEN_CLOSED  # not left open


def _trained_with_an_api_key(ann: TestClient, svc: Services) -> tuple[User, dict[str, str]]:
    """ann's photos uploaded and trained on the web, and headers with an API key of hers."""
    assert upload(ann)[0] == 200
    assert 'data-status="succeeded"' in train(ann)
    user = svc.users.get_by_name(name="ann")
    _key, secret = svc.users.create_key(user=user, name="t")
    return user, {"Authorization": f"Bearer {secret}"}

def test_a_head_of_the_chart_neither_draws_nor_stores_it(
        ann: TestClient, svc: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """HEAD /versions/chart.png and HEAD /api/model/quality/chart.png ran as their GET
    (api.head.HeadAsGet): a chart not stored yet, or stale, was drawn (150-300 ms at 300
    versions) and written to the storage, to send headers alone (found in review). Now a HEAD
    reads what the chart shows, draws nothing and stores nothing; its GET draws it once."""
    user, api = _trained_with_an_api_key(ann, svc)
    key = chart_key(svc.models.get(user=user).id)
    svc.blobs.delete(key)  # drawn by nobody yet: the first view draws it
    drawn = count_charts_drawn(monkeypatch)
    for path, headers in (("/versions/chart.png", {}), ("/api/model/quality/chart.png", api)):
        head = ann.head(path, headers=headers)
        assert head.status_code == 200, path
        assert head.content == b""
        assert head.headers["content-type"] == "image/png"
        assert head.headers["cache-control"] == "private"
        assert drawn == [], path  # old code: [1], drawn for the HEAD
        assert not svc.blobs.exists(key), path  # old code: stored by the HEAD
    got = ann.get("/versions/chart.png")
    assert (got.status_code, got.headers["content-type"]) == (200, "image/png")
    assert drawn == [1]
    assert svc.blobs.exists(key)
    assert ann.get("/api/model/quality/chart.png", headers=api).content == got.content
    assert drawn == [1]  # stored, not drawn again


def test_the_chart_has_an_etag_and_a_browser_holding_it_gets_a_304(
        ann: TestClient, svc: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chart was sent whole at every view of the Versions page (no ETag, no
    Last-Modified: nothing for the browser to ask again with; found in review). Now its ETag
    names what it shows (chart_inputs, which every GET works out first), and an If-None-Match
    that holds it is answered 304, the stored picture neither read nor drawn."""
    user, api = _trained_with_an_api_key(ann, svc)
    chart = chart_key(svc.models.get(user=user).id)
    reads: list[str] = []
    real_get = svc.blobs.get

    def counted(key: str) -> bytes:
        reads.append(key)
        return real_get(key)

    monkeypatch.setattr(svc.blobs, "get", counted)
    for path, headers in (("/versions/chart.png", {}), ("/api/model/quality/chart.png", api)):
        got = ann.get(path, headers=headers)
        assert got.status_code == 200, path
        etag = got.headers.get("etag")
        assert etag is not None, path  # old code: no ETag
        assert etag == f'W/"{svc.likeness.chart(user=user, draw=False).inputs}"', path
        assert ann.head(path, headers=headers).headers["etag"] == etag
        reads.clear()
        for held in (etag, f'"other", {etag}', etag.removeprefix("W/"), "*"):
            again = ann.get(path, headers={**headers, "If-None-Match": held})
            assert again.status_code == 304, (path, held)
            assert again.content == b""
            assert again.headers["etag"] == etag
            assert again.headers["cache-control"] == "private"
            assert ann.head(path, headers={**headers, "If-None-Match": held}
                            ).status_code == 304
        assert chart not in reads, path  # neither read from the storage nor drawn
        other = ann.get(path, headers={**headers, "If-None-Match": 'W/"other"'})
        assert (other.status_code, other.content) == (200, got.content)
        assert chart in reads  # read for a 200: the count above is of that read


URL_ATTRIBUTE = re.compile(r'\b(?:href|src|action|formaction|hx-get|data-stored)="([^"#][^"]*)"')


def links_of(page: str) -> list[str]:
    return [html.unescape(url) for url in URL_ATTRIBUTE.findall(page)]


def test_the_pages_work_under_a_root_path(web_settings: Settings, svc: Services) -> None:
    """Served under a prefix (uvicorn --root-path /sl, SELFIE_LORA_PUBLIC_URL's path), the pages
    linked, redirected and set cookies as if at the host's root: /static/style.css, a sign-in's
    303 to /photos, forms posting to /signin, all outside the app (found in review). Now every
    link, form, redirect, htmx address and cookie path starts with the root path."""
    with TestClient(create_app(web_settings, services=svc, run_worker=True), root_path="/sl",
                    raise_server_exceptions=False) as c:
        first = c.get("/sl/photos", follow_redirects=False)
        assert first.headers["location"] == "/sl/signin?next=/photos"  # old code: /signin?...
        signin = c.get("/sl/signin?next=/photos")
        assert signin.status_code == 200
        assert 'data-root="/sl"' in signin.text
        assert links_of(signin.text)
        assert all(url.startswith("/sl/") for url in links_of(signin.text)), links_of(signin.text)
        assert "Path=/sl/" in signin.headers["set-cookie"]
        token = re.search(r'name="form_token" value="([^"]+)"', signin.text)
        assert token
        signed = c.post("/sl/signin", data={"name": "ann", "password": PASSWORD,
                                            "form_token": token.group(1), "next": "/photos"},
                        follow_redirects=False)
        assert signed.headers["location"] == "/sl/photos"
        # A next= holding the address the browser showed (a bookmark made under the prefix)
        # leads there, not to /sl/sl/versions (found in review).
        for next_path in ("/sl/versions", "/versions"):
            again = c.get(f"/sl/signin?next={next_path}", follow_redirects=False)
            assert again.headers["location"] == "/sl/versions", next_path
        photos = c.get("/sl/photos")
        assert photos.status_code == 200
        assert all(url.startswith("/sl/") for url in links_of(photos.text)), links_of(photos.text)
        for url in links_of(photos.text):
            if url.startswith("/sl/static/"):
                assert c.get(url).status_code == 200, url
        token = re.search(r'name="csrf-token" content="([^"]+)"', photos.text)
        assert token
        csrf_token = token.group(1)
        files = [("files", (f"p{i}.jpg", synthetic_photo(i), "image/jpeg")) for i in range(4)]
        uploaded = c.post("/sl/photos/upload", files=files, headers={"X-CSRF-Token": csrf_token})
        assert uploaded.status_code == 200, uploaded.text
        thumbs = [url for url in links_of(uploaded.text) if url.endswith(".jpg")]
        assert thumbs
        assert all(url.startswith("/sl/photos/") for url in thumbs), thumbs
        assert c.get(thumbs[0]).status_code == 200
        started = c.post("/sl/train/start", data={"csrf_token": csrf_token},
                         follow_redirects=False)
        assert started.headers["location"] == "/sl/train"
        deadline = time.monotonic() + 60
        while 'id="ended"' not in (status := c.get("/sl/train/status").text):
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        versions = c.get("/sl/versions")
        assert all(url.startswith("/sl/") for url in links_of(versions.text)), \
            links_of(versions.text)
        weights = next(url for url in links_of(versions.text) if url.endswith("/weights"))
        assert c.get(weights).status_code == 200
        missing = c.get("/sl/nothing")
        assert missing.status_code == 404
        assert all(url.startswith("/sl/") for url in links_of(missing.text))
        out = c.post("/sl/signout", data={"csrf_token": csrf_token}, follow_redirects=False)
        assert out.headers["location"] == "/sl/signin"
        polled = c.get("/sl/train/status", headers={
            "HX-Request": "true", "HX-Current-URL": "http://testserver/sl/train"})
        assert polled.headers["hx-redirect"] == "/sl/signin?next=/train"


@dataclass
class LaterMismatchTrainer(FakeTrainer):
    """Replicate publishing every training's LoRA after the first as another model's version
    (replicate-python #419): such a version is stored, flagged ``version_mismatch``."""

    trained: int = 0

    def train(self, job: TrainingJob, *, sink: ProgressSink) -> TrainingResult:
        result = super().train(job, sink=sink)
        self.trained += 1
        if self.trained == 1:
            return result
        return replace(result, version_mismatch=True,
                      remote_version="someone/elses-model:" + "c" * 64)


def test_the_versions_page_offers_no_use_for_a_version_published_to_another_model(
        web_settings: Settings) -> None:
    """Its activation is refused (409 version_mismatch), yet the Versions page offered "Use this
    version" on it, a button to a refusal. The page offers none for it and says why there."""
    services = fake_services(web_settings, trainer=LaterMismatchTrainer())
    services.users.create(name="ann", password=PASSWORD)
    try:
        with browser(web_settings, services) as client:
            sign_in(client, "ann")
            two_versions(client)
            user = services.users.get_by_name(name="ann")
            v2, v1 = services.models.versions(user=user)
            assert v2.version_mismatch
            assert not v1.version_mismatch
            assert services.models.get(user=user).active_version_id == v1.id
            page = client.get("/versions").text
            row = page[page.index('id="v2"'):page.index('id="v1"')]
            assert "Use this version" not in row
            assert f"/versions/{v2.id}/activate" not in row
            assert "Replicate published it to another model" in row
            assert _button_names(page, "Use this version") == []  # v1 is the active one
    finally:
        services.close()


@pytest.mark.parametrize("ref", ["\x00", "9\x00<b>", "\x1b[31mred", "v1\r\nX-Bad: 1", "\x7f"])
def test_a_compare_reference_with_control_characters_is_said_back_escaped(
        ann: TestClient, ref: str) -> None:
    """/versions?a=%00... put the reference's NUL (or ESC, CR, DEL) raw into the page's error
    ("no such version: \\x00"): a NUL in HTML is a parse error the browser shows as U+FFFD, an
    ESC a terminal's colour in the API's message printed by the CLI (found in review). The
    message escapes what is not printable, as the log lines do; a printable reference is said
    back as it was."""
    two_versions(ann)
    r = ann.get("/versions", params={"a": ref, "b": "1"})
    assert r.status_code == 200, r.text
    assert not any(c in r.text for c in "\x00\x1b\x7f\r"), r.text  # old code: ref raw
    escaped = ref.encode("unicode_escape").decode("ascii")
    assert f"no such version: {escaped}" in html.unescape(r.text)
    assert 'aria-invalid="true"' in select_tag(r.text, "a")
    assert "no such version: 9" in ann.get("/versions?a=9&b=1").text


@pytest.mark.parametrize(("path", "back"), [
    ("/generations/g/1.5.png", "/generate"),  # a picture of the gallery: the Generate page
    ("/train/t/samples/x.jpg", "/train"),  # a training's sample: the Train page
    ("/photos/set/abc.jpg", "/photos"),
])
def test_a_picture_s_address_edited_to_no_number_leads_back_to_its_section(
        ann: TestClient, path: str, back: str) -> None:
    """The 422 of a picture's address edited by hand (its number no number) said "go back to
    the page and follow its link again", and its Back (without scripts, or opened from a
    bookmark) led to /photos whatever the picture was: a gallery's or a sample's page was
    another section (found in review). It leads to the section of the address, as a 404's."""
    r = ann.get(path)
    assert r.status_code == 422, r.text
    assert f'<a href="{back}" data-back>Back</a>' in r.text  # old code: /photos for each


def _clashes(*_args: Any, **_kwargs: Any) -> Any:
    # The repository's words of a write that clashed with another made at the same moment.
    raise ConflictError("the change clashed with another one made at the same moment, so "
                        "nothing was changed; send the request again",
                        code=ErrorCode.WRITE_CONFLICT)


def test_a_form_whose_write_clashed_says_to_try_again_not_to_send_a_request(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write_conflict's message is the API's ("send the request again"), which the pages
    showed as it is: the sign-up form's refusal and the error page of another form."""
    settings = make_settings(tmp_path, signup=True)
    services = fake_services(settings)
    services.users.create(name="ann", password=PASSWORD)
    monkeypatch.setattr(services.users, "sign_up", _clashes)
    monkeypatch.setattr(services.users, "create_key", _clashes)
    try:
        with browser(settings, services) as client:
            refused = sign_up(client, "carl")
            assert refused.status_code == 409
            sign_in(client, "ann")
            page = client.post("/settings/keys", data=key_form(client, "laptop"))
            assert page.status_code == 409
    finally:
        services.close()
    for text in (refused.text, page.text):
        assert "clashed with another one made at the same moment" in text
        assert "please try again" in text
        assert "send the request again" not in text


def test_a_sign_up_whose_write_clashed_marks_no_field(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sign-up's write_conflict (two writes at the same moment) marked the Name field as at
    fault, as a taken name does, though nothing was wrong with the name: the form says to try
    again and marks no field; a taken name still marks Name."""
    settings = make_settings(tmp_path, signup=True)
    services = fake_services(settings)
    monkeypatch.setattr(services.users, "sign_up", _clashes)
    try:
        with browser(settings, services) as client:
            refused = sign_up(client, "carl")
    finally:
        services.close()
    assert refused.status_code == 409
    assert "please try again" in refused.text
    assert 'id="form-error"' in refused.text
    for field in ("name", "password", "password_again"):
        assert not _at_fault(refused.text, field), field  # old code: Name marked
    assert " autofocus" not in _field(refused.text, "name")
    assert 'id="form-error" tabindex="-1" autofocus' in refused.text  # the message has focus
