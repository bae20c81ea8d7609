"""The operator's side of the HTTP app: latency by route for ``/metrics``."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from selfie_lora.services.operations import OperationsService

UNMATCHED = "(unmatched)"
# The method label's values. The method is the client's to choose (any token): each made-up one
# would be a new series in every process for as long as it runs, so anything else is "other".
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
OTHER_METHOD = "other"


class HttpMetrics:
    """Times every HTTP answer by method (one of ``METHODS``, else ``other``), route template
    (``/api/model/versions/{version_id}``, never the raw path: one series per route, whatever
    the ids) and status. Outermost, so the
    time includes the guard's and every error handler's."""

    def __init__(self, app: ASGIApp, *, operations: OperationsService) -> None:
        self._app = app
        self._operations = operations

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the server answers when the app raises before it starts a response

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self._app(scope, receive, timed_send)
        finally:
            # The router writes the matched route into the scope it was given (this one).
            route = getattr(scope.get("route"), "path", None) or UNMATCHED
            method = scope["method"] if scope["method"] in METHODS else OTHER_METHOD
            self._operations.record_http(method=method, route=route, status=status,
                                         seconds=time.perf_counter() - started)
