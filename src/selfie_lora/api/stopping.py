"""The answer to a request a stopping server cuts off.

On SIGTERM or SIGINT uvicorn gives the open requests ``api.server.GRACEFUL_SHUTDOWN_S`` seconds,
then cancels those still running (a long upload's intake, a generation). uvicorn itself answered
them ``500 Internal Server Error`` in plain text and logged a traceback each: not the contract's
error shape, and nothing told the client that a restart, which it should retry, was no bug.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from selfie_lora.errors import ErrorCode
from selfie_lora.services.operations import OperationsService

logger = logging.getLogger(__name__)

# About what a restart takes (with several servers behind a proxy, another answers at once).
RETRY_AFTER_S = 10
MESSAGE = ("the server is restarting and stopped before your request was done; send it again "
           "in a few seconds")

PageAnswer = Callable[[Request, int, str, ErrorCode], Response]


class ServerStopping:
    """A request cancelled before its answer started is answered 503 ``server_stopping`` with
    ``Retry-After`` and ``Connection: close``: the JSON error, or on a page (``is_page`` of its
    path) ``page``'s answer, which must not block (the services are closing). One line is
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
            logger.warning("%s %s: answered 503 server_stopping, the server stopping before "
                           "it was done", method, path)
            self._operations.record_error(code=ErrorCode.SERVER_STOPPING)
            response: Response
            if self._is_page(path):
                response = self._page(Request(scope), 503, MESSAGE, ErrorCode.SERVER_STOPPING)
            else:
                response = JSONResponse(status_code=503, content={"error": {
                    "code": ErrorCode.SERVER_STOPPING, "message": MESSAGE, "details": []}})
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
            response.headers["Connection"] = "close"
            await response(scope, receive, send)
