"""Wiring the web app into the FastAPI application: templates, static files, the session cookie,
CSRF, security headers and HTML error pages. The pages themselves are in ``web/pages.py``."""

from __future__ import annotations

import functools
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import cookie_parser
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from selfie_lora.api.head import ran_for_head
from selfie_lora.api.paths import app_path, root_path, without_root
from selfie_lora.api.routes import add_routes
from selfie_lora.api.server_errors import report_server_error, retry_after_header
from selfie_lora.domain.entities import User, WebSession
from selfie_lora.domain.plan import lora_scale_text
from selfie_lora.errors import (
    AuthError,
    ErrorCode,
    ForbiddenError,
    SelfieLoraError,
    StorageError,
)
from selfie_lora.services.users import hash_session_token
from selfie_lora.web.cookies import (
    FORM_COOKIE,
    FORM_MAX_AGE_SECONDS,
    NOTICE_COOKIE,
    NOTICE_MAX_AGE_SECONDS,
    SESSION_COOKIE,
    TYPED_COOKIE,
    CookieSigner,
)
from selfie_lora.wiring import Services, session_secret

# The notice cookie's value for a form that succeeded: this prefix, the id of the session that
# sent it, ":", then what it did (``Web.say_done``); the sign-in page's account-deleted notice is
# another value.
DONE_NOTICE = "done:"
# The notice cookie's value for a form sent after its session ended: the sign-in page says why
# it is there and that the form was not carried out.
FORM_NOT_DONE = "form-not-done"
# The Train page's poll found the session ended: the sign-in page says so (it said nothing).
POLL_SESSION_ENDED = "poll-session-ended"
# Signing out leads to the sign-in page, which says it was done (it said nothing: the same
# page as a session that merely expired).
SIGNED_OUT = "signed-out"
# The notice cookie's value for an upload sent without scripts: this prefix, the id of the
# session that sent it, ":", then the id of the photo set it stored (``Web.say_uploaded``).
UPLOADED_NOTICE = "uploaded:"

WEB_ROOT = Path(str(files("selfie_lora.web")))
# No inline script or style anywhere: every script and stylesheet is a file of ours.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
       "object-src 'none'")
# What every page is sent with (SecurityHeaders), its error pages included.
SECURITY_HEADERS = (
    ("content-security-policy", CSP),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "same-origin"),
    ("x-frame-options", "DENY"),
)
# Where fastapi_offline mounts the docs pages' files (Swagger UI's and ReDoc's: api.docs).
DOCS_STATIC = "/static-offline-docs"
# Paths the web app answers (everything else is the API, the docs or health).
API_PREFIXES = ("/api/", "/docs", "/redoc", "/openapi.json", "/healthz", "/readyz", "/metrics",
                DOCS_STATIC)


_NOSNIFF = (("x-content-type-options", "nosniff"),)
_SLASHES = re.compile("/{2,}")


def is_page(path: str) -> bool:
    """Whether ``path`` (without the root path: ``api.paths.app_path``) is the web app's. Read
    with its runs of slashes as one: no route takes ``//api/model``, and its 404 is the API's
    JSON, as for any other path an API client sends under /api (it was an HTML page)."""
    return not _SLASHES.sub("/", path).startswith(API_PREFIXES)


@dataclass(frozen=True)
class Viewer:
    """The signed-in user of a page request, and their session (for its CSRF token)."""

    user: User
    session: WebSession


class SignInRequired(Exception):  # noqa: N818 - a redirect, not an error a user sees
    """``next_path``: where to go after signing in (None: the default page)."""

    def __init__(self, next_path: str | None) -> None:
        super().__init__(next_path)
        self.next_path = next_path


# The page each form is on, by the path it posts to (the first that starts it). A form posted
# after its session ended must not lead back to its own path once the user signs in again: the
# browser then GETs it, and a form's path answers only POST (a 405 page).
FORM_PAGES = (
    ("/model/scale", "/generate"),  # the LoRA scale slider is on the generate page
    ("/model/", "/model"),
    ("/train/", "/train"),
    ("/versions/", "/versions"),
    ("/generate", "/generate"),
    ("/generations/", "/generate"),  # a picture's Delete is on the generate page
    ("/settings/", "/settings"),
    ("/photos/", "/photos"),
)


# The site's sections, in the order its navigation links them (base.html, given them as
# ``sections``): each one's page and its link's label. One list: the nav and the Not found
# page's Back (``section_page``) each kept their own, free to differ. The link the nav marks
# current is ``section_page``'s too (``Web.render``'s ``section``).
SECTIONS = (("/photos", "Photos"), ("/train", "Train"), ("/versions", "Versions"),
            ("/generate", "Generate"), ("/model", "Model"), ("/settings", "Settings"))
SECTION_PAGES = tuple(page for page, _label in SECTIONS)


def after_sign_in(method: str, path: str, query: str) -> str | None:
    """Where a request that found no session goes once the user has signed in: the page
    itself for a GET (or HEAD), the page its form is on for anything else, and nowhere in
    particular (None) for signing out, which is done."""
    if method in ("GET", "HEAD"):
        return path + (f"?{query}" if query else "")
    if path == "/signout":
        return None
    return next((page for prefix, page in FORM_PAGES if path.startswith(prefix)), "/photos")


@functools.cache
def page_templates() -> Environment:
    """The pages' templates, one environment for the process (built on the first call, not at
    import). Its configuration is the same for every app, and each template is compiled once
    per environment: one environment an app compiled the pages again for every app made (each
    test makes one; the first sign-in page of an app took ~0.13 s of CPU, later ones ~4 ms).
    Rendering from one environment in many threads is what Jinja is built for."""
    env = Environment(
        loader=FileSystemLoader(str(WEB_ROOT / "templates")),
        autoescape=select_autoescape(default=True, default_for_string=True),
    )
    # A LoRA scale in a page's text, form or address, exactly as stored and as every front
    # end writes it ("1", not Python's "1.0": see lora_scale_text).
    env.filters["lora_scale"] = lora_scale_text
    env.globals["sections"] = SECTIONS
    return env


class Web:
    """What page routes need: the services, templates, the cookie signer."""

    def __init__(self, services: Services) -> None:
        self.services = services
        # The page routes (mount_web sets them): what a page's address takes, for its 405.
        self.routes: list[BaseRoute] = []
        settings = services.settings
        self.signer = CookieSigner(session_secret(settings),
                                   max_age_seconds=int(settings.session_days * 86400))
        # Served at an https address, every cookie is Secure, whatever scheme the request came
        # in with: a proxy whose X-Forwarded-Proto is not believed (one not in
        # FORWARDED_ALLOW_IPS) left them without it, free to leak over plain http.
        self.https_only = urlsplit(settings.public_url or "").scheme == "https"
        self.env = page_templates()
        # htmx's interval for the Train page's poll ("1" for the default second, as it was): in
        # each page's context, not on the environment, which every app of the process shares.
        self.page_poll = f"{settings.page_poll_seconds:g}"

    # ------------------------------------------------------------------ sessions
    def viewer(self, request: Request) -> Viewer:
        """The page's user, or ``SignInRequired`` (a redirect to the sign-in page)."""
        token = self.signer.session_token(request.cookies.get(SESSION_COOKIE))
        try:
            user, session = self.services.users.session(token=token)
        except AuthError:
            raise SignInRequired(after_sign_in(request.method, app_path(request.scope),
                                               request.url.query)) from None
        return Viewer(user=user, session=session)

    def cookie_user(self, cookie_header: str | None) -> User:
        """For the guard: the user of a raw ``Cookie`` header (``AuthError`` if none)."""
        # Starlette's parser, the one ``request.cookies`` uses for every page: the standard
        # library's SimpleCookie drops the whole header when any cookie of it has a space, a
        # quote or a JSON value, so a signed-in browser was refused its uploads.
        token = self.signer.session_token(cookie_parser(cookie_header or "").get(SESSION_COOKIE))
        return self.services.users.session(token=token)[0]

    def check_csrf(self, request: Request, viewer: Viewer, form_token: str | None) -> None:
        """Every state-changing request of a page sends its session's CSRF token, in the form
        (``csrf_token``) or, from scripts, in the ``X-CSRF-Token`` header."""
        sent = form_token or request.headers.get("x-csrf-token") or ""
        if not hmac.compare_digest(sent.encode(), viewer.session.csrf_token.encode()):
            raise ForbiddenError("this form has expired or did not come from this site: reload "
                                 "the page and try again", code=ErrorCode.CSRF_REJECTED)

    def form_token_valid(self, request: Request, form_token: str | None) -> bool:
        """The sign-in and sign-up forms (no session yet): double submit of a signed cookie.
        False for a form shown too long ago, or to a browser whose cookie is gone: the page
        shows the form again, not an error page."""
        return self.signer.form_token_valid(request.cookies.get(FORM_COOKIE), form_token)

    def cookie_secure(self, request: Request) -> bool:
        return self.https_only or request.url.scheme == "https"

    def set_session_cookie(self, response: Response, request: Request, token: str) -> None:
        self._set_cookie(response, request, SESSION_COOKIE, self.signer.session_value(token),
                         max_age=self.signer.max_age_seconds)

    def set_form_cookie(self, response: Response, request: Request, value: str) -> None:
        """The sign-in and sign-up forms' nonce cookie (``CookieSigner.form_tokens``)."""
        self._set_cookie(response, request, FORM_COOKIE, value, max_age=FORM_MAX_AGE_SECONDS)

    def clear_session_cookie(self, response: Response, request: Request) -> None:
        self._clear_cookie(response, request, SESSION_COOKIE)

    def set_notice_cookie(self, response: Response, request: Request, notice: str) -> None:
        """``notice`` for the page ``response`` leads to, which shows it once
        (``take_notice``)."""
        self._set_cookie(response, request, NOTICE_COOKIE, self.signer.notice_value(notice),
                         max_age=NOTICE_MAX_AGE_SECONDS)

    def say_done(self, response: Response, request: Request, sentence: str, *,
                 new_session_token: str | None = None) -> None:
        """What a form that succeeded did (``sentence``), said by the page ``response`` leads
        to (``render``): a redirect after a POST otherwise landed with the focus on <body> and
        no word of what happened. A signed cookie, not the address: a reload or a shared link
        does not say it again. ``new_session_token``: the session the form itself started
        (signing up), which the page it leads to is read with."""
        # Bound to the session that sent the form, as the typed cookie is to its user: sent
        # with another session (a shared browser, the redirect not followed, someone else
        # signing in), it showed that user what this one did ("The key NAME was revoked").
        session_id = (hash_session_token(new_session_token) if new_session_token is not None
                      else self._session_id(request))
        self.set_notice_cookie(response, request, f"{DONE_NOTICE}{session_id}:{sentence}")

    def say_uploaded(self, response: Response, request: Request, dataset_id: str) -> None:
        """The photo set an upload sent without scripts stored, for the photos page
        ``response`` leads to, which shows its report once (``take_uploaded``): the report as
        the POST's own answer was sent again by a reload (the browser asked to resend the
        photos). Only the set's id: the report is made again from the set stored, as a
        cookie could not hold a report of hundreds of photos."""
        self.set_notice_cookie(response, request,
                               f"{UPLOADED_NOTICE}{self._session_id(request)}:{dataset_id}")

    def take_uploaded(self, request: Request, viewer: Viewer) -> str | None:
        """The id of the photo set ``say_uploaded`` named for this session, or None (none,
        another session's, forged, too old); shown once, as a notice."""
        notice = self.signer.notice(request.cookies.get(NOTICE_COOKIE))
        if notice is None or not notice.startswith(UPLOADED_NOTICE):
            return None
        session_id, _, dataset_id = notice[len(UPLOADED_NOTICE):].partition(":")
        # Another session's (a shared browser, someone else signing in): left to expire.
        if not hmac.compare_digest(session_id.encode(), viewer.session.id.encode()):
            return None
        _shown_once(request, NOTICE_COOKIE)
        return dataset_id

    def _session_id(self, request: Request) -> str:
        """The id of the session (``WebSession.id``) of the request's cookie, or "" (none)."""
        token = self.signer.session_token(request.cookies.get(SESSION_COOKIE))
        return hash_session_token(token) if token else ""

    def take_notice(self, request: Request) -> str | None:
        """The notice this browser was sent on with (``set_notice_cookie``), or None (none,
        forged, too old); shown once: the page ``render`` makes of this request clears it."""
        _shown_once(request, NOTICE_COOKIE)
        return self.signer.notice(request.cookies.get(NOTICE_COOKIE))

    def keep_typed(self, response: Response, request: Request, viewer: Viewer,
                   fields: Mapping[str, str]) -> bool:
        """``fields`` of a form, as typed, for the page ``response`` leads to, which shows them
        once (``take_typed``): a signed cookie, as a notice, not the address, which the access
        log and the browser's history keep. False (nothing kept) when they do not fit one."""
        value = self.signer.typed_value(viewer.user.id, fields)
        if value is None:
            return False
        self._set_cookie(response, request, TYPED_COOKIE, value, max_age=NOTICE_MAX_AGE_SECONDS)
        return True

    def take_typed(self, request: Request, viewer: Viewer) -> dict[str, str] | None:
        """The fields kept by ``keep_typed`` for this viewer, or None (none, forged, too old);
        shown once, as a notice: a reload shows the form empty, as after a Generate."""
        _shown_once(request, TYPED_COOKIE)
        return self.signer.typed(request.cookies.get(TYPED_COOKIE), user_id=viewer.user.id)

    def _set_cookie(self, response: Response, request: Request, name: str, value: str, *,
                    max_age: int) -> None:
        # Every cookie of the pages alike (the session, the sign-in form's, the notice, the
        # typed fields): scripts never read them, they go with a link from another site but
        # not with its forms, and Secure wherever https is. Set nowhere else, so none differs.
        response.set_cookie(name, value, max_age=max_age, httponly=True, samesite="lax",
                            secure=self.cookie_secure(request), path=_cookie_path(request))

    def _clear_cookie(self, response: Response, request: Request, name: str) -> None:
        # The attributes it was set with (``_set_cookie``).
        response.delete_cookie(name, path=_cookie_path(request), httponly=True, samesite="lax",
                               secure=self.cookie_secure(request))

    # ------------------------------------------------------------------ rendering
    def render(self, request: Request, template: str, *, viewer: Viewer | None = None,
               status_code: int = 200, **context: Any) -> HTMLResponse:
        # A page loaded after a form that succeeded says what it did (``say_done``), once: the
        # notice takes the focus (base.html). Not an htmx poll's fragment nor a form's answer.
        done = None
        if (viewer is not None and request.method == "GET"
                and request.headers.get("hx-request") != "true"):
            notice = self.signer.notice(request.cookies.get(NOTICE_COOKIE))
            if notice is not None and notice.startswith(DONE_NOTICE):
                session_id, _, sentence = notice[len(DONE_NOTICE):].partition(":")
                # Another session's is not this viewer's to read (``say_done``); left to expire.
                if hmac.compare_digest(session_id.encode(), viewer.session.id.encode()):
                    done = sentence
                    _shown_once(request, NOTICE_COOKIE)
        path = app_path(request.scope)
        html = self.env.get_template(template).render(
            # ``section``: the nav's link marked current, by the rule the Not found page's Back
            # follows (``section_page``): a prefix of the address alone marked Photos on
            # /photosx, and nothing on a picture's /generations/... whose Back is Generate.
            request=request, viewer=viewer, path=path, section=section_page(path),
            root=root_path(request.scope),
            csrf_token=viewer.session.csrf_token if viewer else None,
            signup=self.services.users.signup_enabled, done_notice=done,
            page_poll=self.page_poll, **context)
        response = HTMLResponse(html, status_code=status_code)
        # The one-time cookies this page showed (``take_notice``, ``take_typed``, the done
        # notice above): not again on a reload. One place, not each page clearing its own. Not
        # for a HEAD (run as this GET, api.head): it shows nothing, and a link checker's HEAD
        # used up what the browser's next GET of the page was to show.
        shown = set() if ran_for_head(request.scope) else _shown_cookies(request)
        for name in sorted(shown):
            if name in request.cookies:
                self._clear_cookie(response, request, name)
        if viewer is not None:
            # A signed-in page is its user's (a new API key's secret is on one, once): no cache
            # may keep it, nor show it again from history after signing out.
            response.headers["Cache-Control"] = "no-store"
        return response

    def error_page(self, request: Request, status: int, message: str,
                   code: str = "error", *, reference: str | None = None,
                   back: str | None = None) -> HTMLResponse:
        """``reference``: a server-side error's, which its log line carries (server_errors).
        ``back``: where its Back link leads, when the caller knows better than ``_back_to`` (a
        page sent a form: the page itself)."""
        # What the failed page took to show once (``take_typed``) is kept for a reload: this
        # page shows none of it.
        _shown_cookies(request).clear()
        viewer = None
        signed_out = False
        try:
            viewer = self.viewer(request)
        except StorageError:
            # The database could not say whose session it is (an outage): not signed out, as
            # far as anyone knows, so the usual way back. Read as signed out, every page of an
            # outage said "Sign in again".
            pass
        except (SignInRequired, SelfieLoraError):
            # Any refusal finding the viewer (a disabled account's session: ForbiddenError)
            # renders this page signed out: escaping here, it turned every page into a bare 500.
            signed_out = True
        return self.render(request, "error.html", viewer=viewer, status_code=status,
                           status=status, message=message, code=code, reference=reference,
                           back=back if back and not signed_out
                           else _back_to(request, status, signed_out=signed_out),
                           signed_out=signed_out,
                           words=_error_words(request, status, code))

    def stopping_page(self, request: Request, status: int, message: str,
                      code: str) -> HTMLResponse:
        """The error page of a request a stopping server cut off (``api.stopping``). Rendered
        signed out: finding the viewer asks the database, which is closing. Its Back link, as
        ``error_page``'s, leads to the refused form's page (a page load: the page itself, to
        load again once the server is back), never to the POST URL a bare link would GET."""
        return self.render(request, "error.html", status_code=status, status=status,
                           message=message, code=code, reference=None,
                           words=_error_words(request, status, code),
                           back=after_sign_in(request.method, app_path(request.scope), "")
                           or "/photos")


def _shown_once(request: Request, cookie: str) -> None:
    """``cookie`` (a notice, typed fields) is shown by the page of ``request``: ``Web.render``
    clears it on that page."""
    shown: set[str] | None = getattr(request.state, "shown_once", None)
    if shown is None:
        shown = request.state.shown_once = set()
    shown.add(cookie)


def _shown_cookies(request: Request) -> set[str]:
    shown: set[str] = getattr(request.state, "shown_once", set())
    return shown


# What a form of the pages does, by the path it posts to (the first that starts it), for the
# title of the error page that refuses it: the title was the status alone ("422 · selfie-lora"),
# the same for every kind of failure.
_FORM_ACTIONS = (
    ("/photos/upload", "Upload"), ("/train/start", "Training"), ("/train/cancel", "Cancel"),
    ("/train/resume", "Resume"), ("/generate", "Generate"), ("/generations/", "Delete"),
    ("/versions/", "Version switch"), ("/model/", "Model change"),
    ("/settings/delete", "Account deletion"), ("/settings/", "Key change"),
)


def _heading(status: int, code: str) -> str:
    """The error page's heading: what kind of failure it is."""
    if status == 404:
        return "Not found"
    if status == 403:
        return "Not allowed"
    if code == "too_many_generations":
        return "Pictures in progress"
    if status == 429:
        return "Too many attempts"
    if status == 507:
        # A full disk or a used-up quota of the server's (``StorageFullError``): "Something
        # went wrong" read as a fault to retry, where nothing is saved until the operator makes
        # room. Words that fit a quota too (the page's sentence says which).
        return "Out of storage space"
    return "Something went wrong" if status >= 500 else "That did not work"


def _error_words(request: Request, status: int, code: str) -> dict[str, str]:
    """The error page's heading, and its title: the refused form's action ("Upload refused"),
    else the heading."""
    heading = _heading(status, code)
    title = heading
    if request.method == "POST" and status < 500:
        path = app_path(request.scope)
        action = next((name for prefix, name in _FORM_ACTIONS if path.startswith(prefix)), None)
        if action is not None:
            title = f"{action} refused"
    return {"heading": heading, "title": title}


# The pages' labels of their forms' fields, for a form FastAPI could not read: its own words
# named the fields as the code does ("lora_scale: Input should be a valid number").
_FIELD_LABELS = {
    "prompt": "the prompt", "num_outputs": "Pictures", "seed": "Seed",
    "lora_scale": "the LoRA scale", "name": "Name", "password": "Password",
    "password_again": "Password again", "training_id": "the training",
    "form_token": "the form's token", "files": "the photos",
}
# The numbers of the pages' addresses (a picture's, a training sample's), for an address
# FastAPI could not read (edited by hand): the form's words told the user to fill in a form
# that is not there.
_ADDRESS_LABELS = {"index": "the picture's number", "step": "the sample's step"}
# What a value of the wrong kind must be, by FastAPI's error type.
_KIND = {"float_parsing": "a number", "float_type": "a number", "finite_number": "a number",
         "int_parsing": "a whole number", "int_type": "a whole number",
         "int_from_float": "a whole number"}


def form_problem(errors: list[dict[str, Any]]) -> str:
    """A page's sentence for a form FastAPI refused before the page ran (a field missing, a
    number that is not one), or for an address of a page whose number it could not read: only
    a hand-made request or an old page sends one."""
    said: list[str] = []
    in_address = bool(errors) and all(
        tuple(error.get("loc", ()))[:1] in (("path",), ("query",)) for error in errors)
    for error in errors:
        loc = [str(part) for part in error.get("loc", ())[1:]]
        field = loc[0] if loc else ""
        label = (_ADDRESS_LABELS if in_address else _FIELD_LABELS).get(
            field, f"the field {field}" if field else "the form")
        kind = _KIND.get(str(error.get("type", "")))
        if error.get("type") == "missing":
            sentence = f"{label} is missing"
        elif kind is not None:
            sentence = f"{label} must be {kind}"
        else:
            sentence = f"{label} is not valid"
        if sentence not in said:
            said.append(sentence)
    joined = "; ".join(said) or "the form is not valid"
    said_up = f"{joined[0].upper()}{joined[1:]}"
    if in_address:
        return f"{said_up} (in the address): go back to the page and follow its link again"
    return f"{said_up}: go back to the page, fill the form in and send it again"


def section_page(path: str) -> str | None:
    """The page of the section ``path`` belongs to (a picture's, ``/generations/...``, is the
    Generate page's gallery), or None for a path of none."""
    if path.startswith("/generations/"):
        return "/generate"
    return next((page for page in SECTION_PAGES
                 if path == page or path.startswith(page + "/")), None)


def _back_to(request: Request, status: int, *, signed_out: bool) -> str:
    """Where an error page's Back link leads without scripts (with them it goes back in the
    browser's history, which keeps what the form held): a refused form's own page (also for a
    form's address opened as a page: 405); for a thing not found (404) or an address that is
    not valid (422: a picture's, its number edited by hand), the page of the section it belongs
    to (a version's download: the Versions page; a gallery's page of a cursor naming nothing:
    the gallery's newest; a gallery's picture: the Generate page), else the photos. Signed out,
    the sign-in page, which leads there: to the page the error came from, its 405 or 404 came
    again."""
    if request.method in ("GET", "HEAD") and status != 405:
        path = app_path(request.scope)
        # A 404's or an address's 422: where the user looked for the thing, rather than the
        # photos whatever it was; never the address that was refused (the same error again).
        page = section_page(path) if status in (404, 422) else None
        if page == path and not request.url.query:
            page = None  # the section's page itself is what was not found
    else:
        # As for a form sent: its address is no page to go back to.
        page = after_sign_in("POST", app_path(request.scope), "")
    if signed_out:
        return _signin_url(page)
    return page or "/photos"


class SecurityHeaders:
    """The Content-Security-Policy and friends on every page (not on the API's JSON), and
    nosniff on the docs pages' files too: served under the API's paths, they were the only
    static files sent without it."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        added: tuple[tuple[str, str], ...]
        path = app_path(scope)
        if is_page(path):
            added = SECURITY_HEADERS
        elif path.startswith(f"{DOCS_STATIC}/"):
            added = _NOSNIFF
        else:
            await self._app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(name.encode(), value.encode()) for name, value in added]
                message = {**message, "headers": headers}
            await send(message)

        await self._app(scope, receive, send_with_headers)


def unexpected_page_error(web: Web, request: Request, exc: Exception) -> Response:
    """The error page of an unexpected exception. Its response is sent by Starlette's
    ServerErrorMiddleware, the outermost of all, so SecurityHeaders never sees it: the headers
    are set here (the page was framable, and sniffable, without a CSP)."""
    return _with_security_headers(page_error_response(web, request, exc))


def guard_page(web: Web, request: Request, status: int, code: str, message: str) -> Response:
    """The error page of a page request the guard refused (a form over its cap, a body that
    stalled, an upload without a session). The guard answers outside SecurityHeaders: the
    headers are set here."""
    if status == 401:
        # An upload whose session ended (signed out in another tab): said as the page's script
        # says it, with the sign-in that comes back to the form's page (the bare "sign in
        # first" and a Back to /signin did not say the photos were not stored).
        message = "Your session has ended: nothing was stored. Sign in again, then send the photos."
    return _with_security_headers(web.error_page(request, status, message, code))


def _with_security_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS:
        response.headers[name] = value
    return response


def _cookie_path(request: Request) -> str:
    """The pages' cookies go to the app's paths alone: under a root path, not to the other
    services of the host."""
    return root_path(request.scope) + "/"


def _signin_url(next_path: str | None) -> str:
    # The whole path and query is one value of "next": its "?", "&" and "=" are encoded, or
    # the sign-in page would read /versions?a=1&b=2 as next=/versions?a=1 and b=2. Where it
    # may lead is checked when it is used (pages._local_target).
    return f"/signin?next={quote(next_path, safe='/')}" if next_path else "/signin"


def page_error_response(web: Web, request: Request, exc: Exception) -> Response:
    """What a page shows for an error: the sign-in page for no session, else an error page."""
    if isinstance(exc, SignInRequired):
        if request.headers.get("hx-request") == "true":
            # htmx's request (the training status it polls) follows a 303 and would put the
            # whole sign-in page inside its section: it is told to load the sign-in page, and
            # to come back to the page it is on (its HX-Current-URL), not to the fragment.
            current = urlsplit(request.headers.get("hx-current-url", ""))
            root = root_path(request.scope)
            back = (without_root(current.path, root) + (f"?{current.query}" if current.query
                                                        else "")
                    if current.path.startswith("/") else exc.next_path)
            redirect = Response(status_code=200,
                                headers={"HX-Redirect": root + _signin_url(back)})
            web.set_notice_cookie(redirect, request, POLL_SESSION_ENDED)
            return redirect
        response = RedirectResponse(root_path(request.scope) + _signin_url(exc.next_path),
                                    status_code=303)
        if request.method == "POST" and app_path(request.scope) != "/signout":
            # A form whose session ended (signed out in another tab): the sign-in page said
            # nothing of why it was there, nor that the form was not carried out.
            web.set_notice_cookie(response, request, FORM_NOT_DONE)
        return response
    if isinstance(exc, SelfieLoraError) and exc.http_status < 500:
        page = web.error_page(request, exc.http_status, page_message(exc), str(exc.code))
        page.headers.update(retry_after_header(exc))
        return page
    # A server-side error's words name the server's paths or the storage's endpoint: the log
    # has them, the page a fixed sentence and the reference of that log line.
    server = report_server_error(exc, method=request.method, path=request.url.path)
    if isinstance(exc, SelfieLoraError):
        page = web.error_page(request, exc.http_status, _page_sentence(exc, server.message),
                              str(exc.code), reference=server.reference)
        # The API's wait for the same error (a storage outage's 503): the page sent none.
        page.headers.update(retry_after_header(exc))
        return page
    return web.error_page(request, 500, server.message, ErrorCode.INTERNAL_ERROR,
                          reference=server.reference)


# A write that clashed with another made at the same moment (``write_conflict``), as a page says
# it: the sentence of the data layer is the API's ("send the request again"), a page's reader sends
# a form.
PAGE_WRITE_CONFLICT = ("the change clashed with another one made at the same moment, so nothing "
                       "was changed; please try again")


def page_message(exc: SelfieLoraError) -> str:
    """A client's error (4xx) as a page shows it: its message, in a form's words where the
    API's are a request's."""
    return PAGE_WRITE_CONFLICT if exc.code == ErrorCode.WRITE_CONFLICT else exc.message


def _page_sentence(exc: SelfieLoraError, sentence: str) -> str:
    """A server-side error's sentence as a page says it. The API's sentence for an outage
    tells a client to wait "the Retry-After header's seconds": a person sees no header, so the
    page says the same wait in their words (the API's sentence is unchanged)."""
    if exc.code == ErrorCode.STORAGE_UNAVAILABLE and exc.retry_after is not None:
        return ("The files or records cannot be reached just now; nothing is wrong with what "
                f"you asked for. Try again in about {exc.retry_after} seconds.")
    return sentence


def mount_web(app: FastAPI, services: Services) -> Web:
    """Add the pages, their static files and security headers to ``app``."""
    from selfie_lora.web import pages

    web = Web(services)
    web.routes = pages.router.routes
    app.state.web = web
    app.mount("/static", StaticFiles(directory=str(WEB_ROOT / "static")), name="static")
    add_routes(app, pages.router)
    app.add_middleware(SecurityHeaders)
    return web
