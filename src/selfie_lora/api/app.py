"""The FastAPI application: ``create_app(settings)`` builds it, nothing is built at import.

Routes live by resource in ``api/{training,model,likeness,generation,webhooks,keys}.py``; each
authenticates (the guard did, before the body), parses, calls one service method and serializes.
No route touches the database, the queue or an adapter. The web app's pages (``web/``) are
mounted on the same app and the same services; errors on a page path answer an HTML page.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from anyio import CapacityLimiter
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from selfie_lora.api import account, generation, keys, likeness, model, training, webhooks
from selfie_lora.api.deps import in_thread, intake_limiter, upload_slots
from selfie_lora.api.docs import add_docs
from selfie_lora.api.error_body import error_response
from selfie_lora.api.guard import UPLOAD_PATHS, WEB_UPLOAD_PATHS, Guard, Limits, guard_answered
from selfie_lora.api.head import HeadAsGet, allow_with_head
from selfie_lora.api.observe import HttpMetrics
from selfie_lora.api.paths import app_path
from selfie_lora.api.routes import add_routes
from selfie_lora.api.server_errors import report_server_error, retry_after_header
from selfie_lora.api.slashes import SlashRedirect
from selfie_lora.api.stopping import ServerStopping
from selfie_lora.config import Settings
from selfie_lora.dataset.archive import too_many_parts
from selfie_lora.errors import ClientGoneError, ErrorCode, SelfieLoraError
from selfie_lora.services.operations import METRICS_TOKEN_REQUIRED
from selfie_lora.web.app import (
    SignInRequired,
    form_problem,
    guard_page,
    is_page,
    mount_web,
    page_error_response,
    unexpected_page_error,
)
from selfie_lora.wiring import Services, build_services

logger = logging.getLogger(__name__)
# A page's 405, worded by what its address takes (the route's Allow header): a form's address
# opened as a page (a bookmark, the address bar), or a page that takes only GET sent a form (a
# hand-made request, a stale form); Starlette's "Method Not Allowed" is HTTP's word, not the
# user's, and one sentence for both said the reverse of what is true for a page.
WRONG_METHOD = ("this address only takes what its form sends: open the page the form is on and "
                "use it there")
WRONG_METHOD_PAGE = "this page is only opened, not sent to: open it again"
WRONG_METHOD_FORM_PAGE = ("this page is opened, or takes what its own form sends: open it again "
                          "and use its form")


def allowed_methods(routes: list[BaseRoute], scope: Any, allow: str) -> str:
    """The methods a path takes, of all its ``routes`` (the pages', or the app's): Starlette's Allow
    names the first route's alone ("GET" for /generate, whose form POSTs to a second route)."""
    allowed = {method.strip().upper() for method in allow.split(",") if method.strip()}
    for route in routes:
        methods = getattr(route, "methods", None)
        if methods and route.matches(scope)[0] is not Match.NONE:
            allowed |= methods
    return ", ".join(sorted(allow_with_head(allowed)))


def wrong_method(allow: str) -> tuple[str, bool]:
    """A page's 405 message, by the methods its address allows (the Allow header), and whether
    the address is a page to open again (its Back link leads to it)."""
    allowed = {method.strip().upper() for method in allow.split(",")}
    if "GET" not in allowed:
        return WRONG_METHOD, False
    return (WRONG_METHOD_FORM_PAGE if allowed - {"GET", "HEAD"} else WRONG_METHOD_PAGE), True

# Threads of /readyz (and, separately, of /metrics), theirs alone: a probe never waits behind user work for a
# thread of the shared pool (its timeout is a second or so; a failed readiness probe takes the
# process out of the load balancer exactly when it is busy).
PROBE_THREADS = 2

DESCRIPTION = """Turn a person's selfies into a personal FLUX LoRA, retrain it without losing
anything, and generate pictures with it.

Every `/api/*` route but the webhook needs `Authorization: Bearer <API key>` (`selfie-lora users
create NAME` prints one; `/api/keys` lists, creates, revokes and rotates them). Errors are
`{"error": {"code", "message", "details"}}`."""


def create_app(
    settings: Settings, *, services: Services | None = None, run_worker: bool = False,
    warm_up: bool = False, reconcile: bool = False, collect_garbage: bool = False,
) -> FastAPI:
    """The app for ``settings``. ``run_worker`` starts an in-process worker with the app
    (``selfie-lora serve``); ``reconcile`` without it runs only the reconciler (``serve
    --no-worker``); ``collect_garbage`` lets that worker collect garbage when it is due;
    ``warm_up`` starts the photo-analysis processes with the app (unless the settings'
    ``intake_warm_up`` is false) and stops them with it; the services are built here unless
    given (tests)."""
    # Its queue built now: an app enqueues starts and /readyz asks it, so a queue it cannot
    # use stops its start (``serve``'s one line) rather than leaving a server up that queues
    # nothing.
    svc = services or build_services(settings, open_queue=True)
    owns_services = services is None  # given ones are their caller's to close (tests)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        worker = None
        if warm_up and svc.settings.intake_warm_up:
            # Start the photo-analysis processes now, off the event loop, so the first upload
            # does not wait ~1.5 s for them (SELFIE_LORA_INTAKE_WARM_UP=false: at that upload;
            # the stop below still stops them, as it does those an upload started).
            # A stop before the thread runs (a shutdown right after the start) is seen by
            # the count read here: the thread then starts no process during the stop.
            threading.Thread(target=svc.intake.warm_up, name="intake-warm-up", daemon=True,
                             kwargs={"since": svc.intake.stop_count()}).start()
        # A start that fails (the storage is another deployment's) closes what it opened too.
        try:
            if run_worker or reconcile:
                from selfie_lora.worker import start_embedded

                # Off the event loop: its first reconcile makes database round trips and sends
                # the alerts due (which run their own event loop), all blocking.
                worker = await in_thread(lambda: start_embedded(
                    svc, consume=run_worker, collect_garbage=collect_garbage))
            yield
        finally:
            if worker is not None:
                # Hands running trainings back (in a thread: it joins the worker's threads).
                await in_thread(worker.stop)
            if warm_up:
                await in_thread(svc.intake.shut_down)
            if owns_services:
                # Its generation threads (queued generations dropped), the job queue's
                # connections and the database's; after the worker: it reads the queue.
                await in_thread(svc.close)

    # fastapi_offline's files (no CDN), but its pages' routes are ours (api/docs.py): they sent
    # no CSP, frame or nosniff header.
    app = FastAPIOffline(title="selfie-lora", version="0.1.0", description=DESCRIPTION,
                         lifespan=lifespan, docs_url=None, redoc_url=None)
    add_docs(app)
    app.state.services = svc
    app.state.intake_limiter = intake_limiter(svc.settings.intake_workers)
    app.state.upload_slots = upload_slots()
    probes = CapacityLimiter(PROBE_THREADS)
    # Its own: readiness probes stuck on a hung storage must not hold the threads the scrape
    # needs (monitoring would go dark during the very outage it should show).
    scrapes = CapacityLimiter(PROBE_THREADS)

    # HEAD as GET (uvicorn sends no body): load balancers and uptime checkers probe with HEAD.
    # Routes of their own, so the schema lists them; every other GET takes HEAD too (HeadAsGet).
    @app.get("/healthz", tags=["service"])
    @app.head("/healthz", tags=["service"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers (it checks nothing else, so a broken database does not
        get the process restarted; see /readyz)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["service"], responses={503: {"description": "not ready"}})
    @app.head("/readyz", tags=["service"], responses={503: {"description": "not ready"}})
    async def readyz(request: Request) -> JSONResponse:
        """Readiness: 200 when the database, the queue and the storage answer, 503 otherwise
        (each check "ok" or "unavailable" in ``checks``; why, in the log, and here to a caller
        sending the metrics token when one is set)."""
        readiness = await anyio.to_thread.run_sync(svc.operations.readiness, limiter=probes)
        detailed = svc.operations.is_operator(authorization=request.headers.get("authorization"))
        return JSONResponse(status_code=readiness.http_status,
                            content=readiness.as_json(detailed=detailed))

    @app.get("/metrics", tags=["service"], response_class=Response,
             responses={401: {"description": "SELFIE_LORA_METRICS_TOKEN is set and not sent"}})
    async def metrics(request: Request) -> Response:
        """The operator's figures in the Prometheus text format."""
        if not svc.operations.may_read_metrics(
                authorization=request.headers.get("authorization")):
            return error_response(401, ErrorCode.UNAUTHORIZED, METRICS_TOKEN_REQUIRED,
                          headers={"WWW-Authenticate": "Bearer"})
        body, content_type = await anyio.to_thread.run_sync(svc.operations.metrics,
                                                            limiter=scrapes)
        return Response(body, media_type=content_type)

    # Before the pages: a request is matched against the routes in order, and the API's reads
    # are the requests that come by the hundred.
    for module in (training, model, likeness, generation, keys, account, webhooks):
        add_routes(app, module.router)
    # For a 405's Allow: the app's own (the probes' GET and HEAD are two routes) and the API's.
    api_routes: list[BaseRoute] = list(app.router.routes)
    # A trailing slash: a relative 307, never Starlette's, made of the Host header (api.slashes).
    app.router.redirect_slashes = False
    app.add_middleware(SlashRedirect, routes=app.router.routes)
    # Innermost: every middleware outside sees the HEAD, and adds its headers to the answer.
    app.add_middleware(HeadAsGet, routes=app.router.routes)
    # Inside the pages' security headers: its error page gets them too (Web.stopping_page).
    app.add_middleware(
        ServerStopping, operations=svc.operations, is_page=is_page,
        page=lambda request, status, message, code: request.app.state.web.stopping_page(
            request, status, message, code))
    # The pages (web/): the same services, signed in with a session cookie.
    web = mount_web(app, svc)
    app.add_middleware(
        Guard,
        limits=Limits(max_upload_bytes=svc.settings.max_upload_bytes,
                      max_json_bytes=svc.settings.max_json_bytes,
                      body_timeout=svc.settings.body_timeout,
                      min_body_rate=svc.settings.min_body_rate),
        authenticate=lambda key: svc.users.authenticate(api_key=key),
        remembered=lambda key: svc.users.remembered(api_key=key),
        authenticate_cookie=web.cookie_user,
        # API answers only, as the exception handlers count them: a page's refusal is a page's.
        record_error=lambda path, code: (None if is_page(path)
                                         else svc.operations.record_error(code=code)),
        is_page=is_page,
        page=lambda request, status, code, message: guard_page(web, request, status, code,
                                                               message),
        answer_error=lambda request, exc: _guard_error(request, exc),
    )
    # Outermost: the time of every answer, the guard's refusals included. The routes in the
    # router's order (the app's own, the API's, the pages'), to name the route of an answer
    # sent before routing, or by a route that does not name itself: every one with a path,
    # not only the APIRoutes (the schema, the docs and the /static mount were "(unmatched)").
    app.add_middleware(HttpMetrics, operations=svc.operations, routes=[
        route for route in app.router.routes if isinstance(getattr(route, "path", None), str)])

    def count(request: Request, code: ErrorCode) -> None:
        """Counts an error answer of the app's handlers, but not one to a request the guard
        already answered mid-body (a 413 or 408): the guard counted that answer, and this one
        is dropped (without this, each such 413 was counted again as an ``http_error``)."""
        if not guard_answered(request.scope.get("state", {})):
            svc.operations.record_error(code=code)

    @app.exception_handler(SignInRequired)
    async def _sign_in(request: Request, exc: SignInRequired) -> Response:
        return page_error_response(web, request, exc)

    @app.exception_handler(SelfieLoraError)
    async def _domain_error(request: Request, exc: SelfieLoraError) -> Response:
        if isinstance(exc, ClientGoneError):  # nobody receives it: no page, no error counted
            return Response(status_code=exc.http_status)
        if is_page(app_path(request.scope)):
            return await in_thread(lambda: page_error_response(web, request, exc))
        count(request, exc.code)
        if exc.http_status >= 500:
            # The error's words name the server's paths or the storage's endpoint: the log has
            # them, the client a fixed sentence and the reference of that log line.
            answer = report_server_error(exc, method=request.method, path=request.url.path)
            return error_response(exc.http_status, exc.code, answer.message, answer.details,
                                  retry_after_header(exc) or None)
        headers = retry_after_header(exc) or (
            {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else None)
        return error_response(exc.http_status, exc.code, exc.message, exc.details, headers)

    async def _guard_error(request: Request, exc: SelfieLoraError) -> Response:
        """The guard's lookup failed (the database down): answered as a route's error."""
        if is_page(app_path(request.scope)):  # outside SecurityHeaders: this sets them
            return await in_thread(lambda: unexpected_page_error(web, request, exc))
        return await _domain_error(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        details = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))} for e in exc.errors()
        ]
        if app_path(request.scope) in UPLOAD_PATHS:
            nameless = [d["loc"] for d in details if d["loc"][:2] in (["body", "files"],
                                                                      ["body", "file"])
                        and "Expected UploadFile" in d["msg"]]
            if nameless:  # a photo sent without a filename (see api.training.nameless_part)
                loc = nameless[0]
                part = (f"part {loc[2] + 1} of 'files'" if len(loc) > 2
                        and isinstance(loc[2], int) else f"the '{loc[1]}' part")
                count(request, ErrorCode.INVALID_REQUEST)
                return error_response(422, ErrorCode.INVALID_REQUEST,
                              training.nameless_part(request.url.path, part), details)
        if is_page(app_path(request.scope)):
            message = form_problem(list(exc.errors()))
            return await in_thread(lambda: web.error_page(request, 422, message,
                                                          ErrorCode.INVALID_REQUEST))
        count(request, ErrorCode.INVALID_REQUEST)
        return error_response(422, ErrorCode.INVALID_REQUEST, "the request is not valid", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if (exc.status_code == 400 and app_path(request.scope) in UPLOAD_PATHS
                and str(exc.detail).startswith("Part exceeded maximum size")):
            # The form parser's refusal of a text field over 1 MB: on the upload routes the
            # only text field is ``start``, so this is a photo sent without a filename.
            count(request, ErrorCode.INVALID_REQUEST)
            return error_response(422, ErrorCode.INVALID_REQUEST,
                          training.nameless_part(request.url.path, "a part of the upload"), [])
        if exc.status_code == 400 and app_path(request.scope) in UPLOAD_PATHS | WEB_UPLOAD_PATHS:
            # The form parser's limit of 1000 files or fields: a well-made upload of too many
            # files, refused as the intake refuses 201 (422 too_many_members, or its page).
            refused = too_many_parts(str(exc.detail), limits=svc.intake.limits)
            if refused is not None:
                return await _domain_error(request, refused)
        if exc.status_code == 400 and not is_page(app_path(request.scope)):
            # FastAPI's and Starlette's one 400: a body that could not be parsed at all (JSON
            # that is not UTF-8 or repeats a key, api.json_body; broken multipart framing). A
            # JSON syntax error is already 422 invalid_request, the status every route with a
            # body declares; 400 is declared by none, so these are answered the same way.
            count(request, ErrorCode.INVALID_REQUEST)
            return error_response(422, ErrorCode.INVALID_REQUEST,
                                  f"the request's body could not be read: {exc.detail}", [])
        code = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}.get(
            exc.status_code, ErrorCode.HTTP_ERROR)
        server = (report_server_error(exc, method=request.method, path=request.url.path)
                  if exc.status_code >= 500 else None)
        path = app_path(request.scope)
        if is_page(path) and not path.startswith("/static/"):
            allow = (exc.headers or {}).get("Allow", "")
            back = None
            if exc.status_code == 405:
                allow = allowed_methods(web.routes, request.scope, allow)
                message, opened = wrong_method(allow)
                back = path if opened else None
            else:
                message = ("there is no such page" if exc.status_code == 404
                           else server.message if server is not None else str(exc.detail))
            page = await in_thread(lambda: web.error_page(
                request, exc.status_code, message, code, back=back,
                reference=server.reference if server is not None else None))
            if allow:  # HTTP's 405 names what the address allows
                page.headers["Allow"] = allow
            return page
        count(request, code)
        if server is not None:
            return error_response(exc.status_code, code, server.message, server.details)
        headers = None
        if exc.status_code == 405:
            # HTTP's 405 must name what the address takes, and of all its routes: Starlette's
            # names the first's alone (GET for /api/model, whose PATCH is another route).
            allow = allowed_methods(api_routes, request.scope,
                                    (exc.headers or {}).get("Allow", ""))
            headers = {"Allow": allow} if allow else None
        return error_response(exc.status_code, code, str(exc.detail), headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        if is_page(app_path(request.scope)):
            return await in_thread(lambda: unexpected_page_error(web, request, exc))
        answer = report_server_error(exc, method=request.method, path=request.url.path)
        count(request, ErrorCode.INTERNAL_ERROR)
        return error_response(500, ErrorCode.INTERNAL_ERROR, answer.message, answer.details)

    def openapi() -> dict[str, Any]:
        # The bearer scheme, so the docs' "Authorize" sends the key with every /api call.
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {
                "apiKey": {"type": "http", "scheme": "bearer",
                           "description": "an API key from `selfie-lora users create`"}}
            for path, operations in schema["paths"].items():
                for operation in operations.values():
                    if path.startswith("/api/") and not path.startswith("/api/webhooks/"):
                        operation["security"] = [{"apiKey": []}]
                    # FastAPI's own 422 ({"detail": [...]}) on a route that declared none: the
                    # app never answers that shape (its handler answers ErrorAnswer), and a
                    # route whose parameters are all text cannot fail their validation.
                    default = operation["responses"].get("422", {})
                    if "HTTPValidationError" in str(default):
                        del operation["responses"]["422"]
            for unused in ("HTTPValidationError", "ValidationError"):
                schema["components"].get("schemas", {}).pop(unused, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
