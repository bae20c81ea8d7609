"""The door of the HTTP API: who may send a body, how big, and how slowly.

A pure ASGI middleware in front of the FastAPI app, because FastAPI reads (and a multipart body
spools to disk) before any dependency runs:

- ``/api/*`` (but the webhook, which is signed) is **authenticated before a byte of the body is
  read**: a request without a valid API key gets 401 at once. The user found is handed to the
  routes in ``scope["state"]["user"]``.
- Every body is **capped while it streams** (``Content-Length`` is checked first, then the bytes
  actually received): uploads at the upload limit, the webhook at ``WEBHOOK_MAX_BYTES``, the
  pages' forms at ``MAX_FORM_BYTES`` (or ``max_json_bytes`` if larger), everything else at
  ``max_json_bytes``. Over the cap: 413, whatever the route would do.
- A body that stalls for ``body_timeout`` seconds, or averages less than ``min_body_rate``
  bytes/s after its first ``body_timeout`` seconds, gets 408.

On a page's path (``is_page``) each of these answers is ``page``'s HTML page, never the API's
JSON error: a browser without scripts showed the JSON itself in place of a page.

Each of these answers is counted by its code (``record_error``), as the app's own error answers
are: answered here, they never reach the app's exception handlers.

Any other error of the key's or the cookie's lookup (the database down: ``StorageError``) is
answered by ``answer_error``, the app's own handler: raised here, outside FastAPI's handlers, it
was answered 500 ``internal_error`` and uvicorn logged its whole traceback for every request.

Slow request *headers* never reach an ASGI app; ``api.server`` times those out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from selfie_lora.api.paths import app_path
from selfie_lora.dataset.limits import byte_size
from selfie_lora.domain.entities import User
from selfie_lora.errors import AuthError, ErrorCode, ForbiddenError, SelfieLoraError

logger = logging.getLogger(__name__)

WEBHOOK_PATH = "/api/webhooks/"
UPLOAD_PATHS = frozenset({"/api/training/upload-zip", "/api/training/upload"})
# The web app's upload: the same limit, authenticated by the session cookie before the body.
WEB_UPLOAD_PATHS = frozenset({"/photos/upload"})
# Replicate's training webhooks carry the training's logs.
WEBHOOK_MAX_BYTES = 2 * 1024 * 1024
# Room for multipart boundaries and part headers around the photos themselves.
MULTIPART_OVERHEAD = 1024 * 1024
# The pages' forms are urlencoded: a character of 4 UTF-8 bytes is 12 bytes sent (%XX four
# times), so the Generate form's longest allowed prompt alone is 24,000 bytes. Under the JSON
# cap (16 KB) a legal 2000-character prompt in Chinese or Hindi was refused 413. The rest is
# room for the form's other fields (the CSRF token, the numbers), each far shorter.
MAX_FORM_BYTES = 32 * 1024  # MAX_PROMPT_CHARS (2000) x 12 and room: test_web sends 2000 emoji

# A page's answer to a refusal of the guard: (request, status, code, message) -> the page.
# Blocking (it may find the session's user): run off the event loop.
PageAnswer = Callable[[Request, int, ErrorCode, str], Response]
# The app's answer to an error of the lookup that is not a refusal (the database down).
ErrorAnswer = Callable[[Request, SelfieLoraError], Awaitable[Response]]


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int
    max_json_bytes: int
    body_timeout: float
    min_body_rate: int


# The key in ``scope["state"]`` set once the guard has answered a request mid-body.
GUARD_ANSWERED = "guard_answered"


class _Stop(Exception):  # noqa: N818 - a control-flow signal inside one request, never surfaced
    """The guard already answered this request; the app must stop reading its body."""


class Guard:
    def __init__(self, app: ASGIApp, *, limits: Limits,
                 authenticate: Callable[[str | None], User],
                 remembered: Callable[[str | None], User | None] | None = None,
                 authenticate_cookie: Callable[[str | None], User] | None = None,
                 record_error: Callable[[str, ErrorCode], None] | None = None,
                 is_page: Callable[[str], bool] | None = None,
                 page: PageAnswer | None = None,
                 answer_error: ErrorAnswer | None = None) -> None:
        self._app = app
        self._answer_error = answer_error
        # A page path's refusals are ``page``'s HTML (without it, or off the pages: JSON).
        self._is_page = is_page
        self._page = page
        # Called with the path and the code of every answer the guard sends itself (the app's
        # decides which count: ``selfie_lora_api_errors_total``). Without it, key guessing
        # and a disabled account's script were missing from that counter.
        self._record_error = record_error
        self._limits = limits
        # Blocking (a database lookup): run off the event loop.
        self._authenticate = authenticate
        # Non-blocking: a key this process found valid a moment ago (``UserService.remembered``),
        # answered on the event loop; under load the trip through the thread pool cost more
        # than the lookup itself.
        self._remembered = remembered
        # The web app's session cookie (the Cookie header's value) for its upload path.
        self._authenticate_cookie = authenticate_cookie

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        # Its root path off (``api.paths``): /sl/api/keys is the API's, not a page.
        path = app_path(scope)
        if path.startswith("/api/") and not path.startswith(WEBHOOK_PATH):
            key = bearer(scope)
            user = self._remembered(key) if self._remembered is not None else None
            if user is None:
                try:
                    user = await run_in_threadpool(self._authenticate, key)
                except (AuthError, ForbiddenError) as exc:  # a disabled account's key: 403
                    self._count(path, exc.code)
                    await self._refuse(scope, send, exc.http_status, exc.code, exc.message)
                    return
                except SelfieLoraError as exc:
                    await self._fail(scope, send, exc)
                    return
            scope.setdefault("state", {})["user"] = user
        elif path in WEB_UPLOAD_PATHS and self._authenticate_cookie is not None:
            try:
                await run_in_threadpool(self._authenticate_cookie, _header(scope, b"cookie"))
            except (AuthError, ForbiddenError) as exc:
                self._count(path, exc.code)
                await self._refuse(scope, send, exc.http_status, exc.code, exc.message,
                                   bearer=False)
                return
            except SelfieLoraError as exc:
                await self._fail(scope, send, exc)
                return
        limit = self._limit_for(path)
        upload = path in UPLOAD_PATHS | WEB_UPLOAD_PATHS
        too_large = ErrorCode.UPLOAD_TOO_LARGE if upload else ErrorCode.BODY_TOO_LARGE
        # An upload's limit states SELFIE_LORA_MAX_UPLOAD_BYTES, as the upload routes and
        # `selfie-lora check` do; the room for multipart framing is not the user's to count.
        refusal = (f"the upload is larger than {byte_size(self._limits.max_upload_bytes)}"
                   if upload else _too_large(limit))
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            self._count(path, too_large)
            await self._refuse(scope, send, 413, too_large, refusal)
            return
        answered = False

        async def guarded_send(message: Message) -> None:
            if not answered:  # once the guard has answered, the app's own answer is dropped
                await send(message)

        async def answer(status: int, code: ErrorCode, message: str) -> None:
            nonlocal answered
            if not answered:
                answered = True
                # Before ``_Stop``: the app's body reading turns it into an error of its own
                # (FastAPI's 400 "error parsing the body"), whose answer is dropped below and
                # must not be counted by the app's handlers as well (``guard_answered``).
                scope.setdefault("state", {})[GUARD_ANSWERED] = True
                self._count(path, code)
                await self._refuse(scope, send, status, code, message)
            raise _Stop

        guarded = _BodyMeter(receive, limit=limit, limits=self._limits, answer=answer,
                             too_large=too_large, refusal=refusal)
        try:
            await self._app(scope, guarded.receive, guarded_send)
        except _Stop:
            return
        except Exception:
            if answered:  # the app failed because its body was cut off: already answered
                return
            raise

    async def _refuse(self, scope: Scope, send: Send, status: int, code: ErrorCode, message: str,
                      *, bearer: bool = True) -> None:
        """The guard's answer: a page on a page's path, else the API's JSON error."""
        if self._page is None or not self._on_page(app_path(scope)):
            await _answer(send, status, code, message, bearer=bearer)
            return
        response = await run_in_threadpool(self._page, Request(scope), status, code,
                                           _page_words(code, message))
        # The rest of the body will not be read: the connection cannot serve another request.
        response.headers["connection"] = "close"

        async def nothing_more() -> Message:  # the body is not read (a Response never asks)
            return {"type": "http.disconnect"}

        await response(scope, nothing_more, send)

    async def _fail(self, scope: Scope, send: Send, exc: SelfieLoraError) -> None:
        """The app's answer to an error of the lookup (it logs and counts it, as for a route)."""
        if self._answer_error is None:
            raise exc
        response = await self._answer_error(Request(scope), exc)
        # The body will not be read: the connection cannot serve another request.
        response.headers["connection"] = "close"

        async def nothing_more() -> Message:
            return {"type": "http.disconnect"}

        await response(scope, nothing_more, send)

    def _on_page(self, path: str) -> bool:
        return self._is_page is not None and self._is_page(path)

    def _count(self, path: str, code: ErrorCode) -> None:
        if self._record_error is not None:
            self._record_error(path, code)

    def _limit_for(self, path: str) -> int:
        if path in UPLOAD_PATHS or path in WEB_UPLOAD_PATHS:
            return self._limits.max_upload_bytes + MULTIPART_OVERHEAD
        if path.startswith(WEBHOOK_PATH):
            return WEBHOOK_MAX_BYTES
        if self._on_page(path):
            return max(MAX_FORM_BYTES, self._limits.max_json_bytes)
        return self._limits.max_json_bytes


class _BodyMeter:
    """``receive`` with the body counted and timed."""

    def __init__(self, receive: Receive, *, limit: int, limits: Limits,
                 answer: Callable[[int, ErrorCode, str], Awaitable[None]], too_large: ErrorCode,
                 refusal: str) -> None:
        self._receive = receive
        self._too_large = too_large
        self._refusal = refusal
        self._limit = limit
        self._limits = limits
        self._answer = answer
        self._started = time.monotonic()
        self._received = 0
        self._done = False

    async def receive(self) -> Message:
        if self._done:
            return await self._receive()  # after the body: only a disconnect can come
        try:
            message = await asyncio.wait_for(self._receive(), timeout=self._limits.body_timeout)
        except TimeoutError:
            await self._answer(408, ErrorCode.REQUEST_TIMEOUT,
                               f"the request body stalled for {self._limits.body_timeout:g} s")
            raise AssertionError("unreachable") from None  # ``answer`` raises
        if message["type"] != "http.request":
            return message
        self._received += len(message.get("body", b""))
        if self._received > self._limit:
            await self._answer(413, self._too_large, self._refusal)
        elapsed = time.monotonic() - self._started
        rate = self._limits.min_body_rate
        if (rate and elapsed > self._limits.body_timeout
                and self._received < rate * elapsed and message.get("more_body", False)):
            await self._answer(408, ErrorCode.REQUEST_TIMEOUT,
                               f"the request body arrives slower than {rate} bytes/s")
        if not message.get("more_body", False):
            self._done = True
        return message


def _header(scope: Scope, name: bytes) -> str | None:
    """The first header ``name`` (lower case) of the request, or None."""
    for key, value in scope.get("headers", ()):
        if key == name:
            text: str = value.decode("latin-1")
            return text
    return None


def bearer(scope: Scope) -> str | None:
    """The API key of the request's ``Authorization: Bearer`` header."""
    scheme, _, key = (_header(scope, b"authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and key.strip():
        return key.strip()
    return None


def _content_length(scope: Scope) -> int | None:
    try:
        return int(_header(scope, b"content-length") or "")
    except ValueError:
        return None


def _page_words(code: ErrorCode, message: str) -> str:
    """A refusal's words on a page: a form's user is told what to do about it."""
    if code is ErrorCode.BODY_TOO_LARGE:
        return f"{message.replace('the request body', 'the form sent')}: shorten what you typed"
    if code is ErrorCode.UPLOAD_TOO_LARGE:
        return f"{message}: send fewer or smaller photos"
    if code is ErrorCode.REQUEST_TIMEOUT:
        return (f"{message.replace('the request body', 'the form')}: check your connection and "
                "send it again")
    return message


def _too_large(limit: int) -> str:
    if limit >= 1024 * 1024:
        return f"the request body is larger than {limit / (1024 * 1024):.0f} MB"
    return f"the request body is larger than {limit // 1024} KB"


async def _answer(send: Send, status: int, code: ErrorCode, message: str, *,
                  bearer: bool = True) -> None:
    body = json.dumps({"error": {"code": code, "message": message, "details": []}}).encode()
    headers: list[tuple[bytes, bytes]] = [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        # The rest of the body will not be read: the connection cannot serve another request.
        (b"connection", b"close"),
    ]
    if status == 401 and bearer:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def guard_answered(scope_state: dict[str, Any]) -> bool:
    """Whether the guard already answered this request (and counted its answer): whatever the
    app answers after that is dropped, so it is not an answer to count."""
    return scope_state.get(GUARD_ANSWERED) is True


def user_of(scope_state: dict[str, Any]) -> User | None:
    """The user the guard authenticated for this request (None outside ``/api/*``)."""
    user = scope_state.get("user")
    return user if isinstance(user, User) else None
