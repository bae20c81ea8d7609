"""The answer to a request a stopping server cuts off.

On SIGTERM or SIGINT uvicorn gives the open requests ``api.server.GRACEFUL_SHUTDOWN_S`` seconds,
then cancels those still running (a long upload's intake, a generation). uvicorn itself answered
them ``500 Internal Server Error`` in plain text and logged a traceback each: not the contract's
error shape, and nothing told the client that a restart, which it should retry, was no bug.

Cancelling the request does not stop the work it started: an intake's thread (anyio abandons it)
and a running generation (the generation service's thread) go on and store what they made. So
"send it again" is said only of work that never began; of work that began, the answer says it
may have been done, and where to look (``Work``). Waiting for that work instead is not possible:
uvicorn cancels once its grace is over, and then closes the app (the photo-analysis processes
stop, the database closes) without awaiting the request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, MutableMapping
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from selfie_lora.api.error_body import error_response
from selfie_lora.api.paths import app_path
from selfie_lora.errors import ErrorCode
from selfie_lora.services.operations import OperationsService

logger = logging.getLogger(__name__)

# About what a restart takes (with several servers behind a proxy, another answers at once).
RETRY_AFTER_S = 10
MESSAGE = ("the server is restarting and stopped before your request was done; send it again "
           "in a few seconds")
# Where the user finds what a request whose work began did (``Work.check``).
UPLOAD_CHECK = ("GET /api/training/progress or the photos page (the photos stored, a training "
                "queued)")
GENERATION_CHECK = "the gallery of the generate page (the pictures stored)"
# The key, in the request's scope["state"], of its ``Work``.
WORK = "work"


def began_message(check: str) -> str:
    """The answer's words when the request's work began: it goes on without its client."""
    return ("the server is restarting and stopped answering while your request was being done; "
            f"it may have been done all the same: see {check} in a few seconds, before "
            "sending it again")


class Work:
    """The one piece of work of a request that goes on once begun, even when the request is
    cancelled (an upload's intake, a generation): whether it began, decided once under a lock by
    whichever comes first, the work beginning (``begin``) or the stopping server answering the
    request (``abandon``). A flag set by the work's thread alone could be set just after the
    answer said "never began". ``check`` says where the user sees what it did."""

    def __init__(self, *, check: str) -> None:
        self.check = check
        self._lock = threading.Lock()
        self._began: bool | None = None

    def begin(self) -> bool:
        """The work's first step: False when the request was answered already (the work must
        not run: nobody is told of it)."""
        with self._lock:
            if self._began is None:
                self._began = True
            return self._began

    def abandon(self) -> bool:
        """The stopping server's answer: True when the work began (it goes on), False when it
        never will."""
        with self._lock:
            if self._began is None:
                self._began = False
            return self._began


def track(scope: MutableMapping[str, Any], *, check: str) -> Work:
    """The request's ``Work``, noted in its scope for ``ServerStopping``."""
    work = Work(check=check)
    scope.setdefault("state", {})[WORK] = work
    return work


PageAnswer = Callable[[Request, int, str, ErrorCode], Response]


class ServerStopping:
    """A request cancelled before its answer started is answered 503 with ``Connection:
    close``: ``server_stopping`` with ``Retry-After`` (send it again) unless its ``Work`` began,
    then ``server_stopped_during_work`` (it may have been done: see ``Work.check``), without
    ``Retry-After``, which invites a blind resend. The JSON error, or on a page (``is_page`` of
    its path) ``page``'s answer, which must not block (the services are closing). One line is
    logged. One cancelled mid-answer (a download) can only be cut: logged too."""

    def __init__(self, app: ASGIApp, *, operations: OperationsService,
                 is_page: Callable[[str], bool], page: PageAnswer) -> None:
        self._app = app
        self._operations = operations
        self._is_page = is_page
        self._page = page

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = False

        async def watched_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self._app(scope, receive, watched_send)
        except asyncio.CancelledError:
            # Only uvicorn cancels a request's task, when a stopping server's grace is over. The
            # task ends here, answered: uvicorn awaits it no more, and would log a traceback.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            method, path = scope["method"], scope["path"]
            if started:
                logger.warning("%s %s: cut off mid-answer, the server stopping", method, path)
                return
            work = scope.get("state", {}).get(WORK)
            if isinstance(work, Work) and work.abandon():
                code, message = ErrorCode.SERVER_STOPPED_DURING_WORK, began_message(work.check)
                logger.warning("%s %s: answered 503 %s, the server stopping while its work ran "
                               "(it goes on)", method, path, code)
            else:
                code, message = ErrorCode.SERVER_STOPPING, MESSAGE
                logger.warning("%s %s: answered 503 %s, the server stopping before it was done",
                               method, path, code)
            self._operations.record_error(code=code)
            response: Response
            if self._is_page(app_path(scope)):
                response = self._page(Request(scope), 503, message, code)
            else:
                response = error_response(503, code, message)
            if code is ErrorCode.SERVER_STOPPING:
                response.headers["Retry-After"] = str(RETRY_AFTER_S)
            response.headers["Connection"] = "close"
            await response(scope, receive, send)
