"""The operator's side of the HTTP app: latency by route for ``/metrics``."""

from __future__ import annotations

import time
from collections.abc import Sequence

from starlette.routing import BaseRoute, Match, Mount
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

    def __init__(self, app: ASGIApp, *, operations: OperationsService,
                 routes: Sequence[BaseRoute] = ()) -> None:
        self._app = app
        self._operations = operations
        # The app's routes, in the router's order, to name the route of an answer sent before
        # routing (``_route_of``).
        self._routes = tuple(routes)

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

        # The request as it came: a mount rewrites the scope's root_path on its way in, and
        # matching the rewritten one found no route for a static file.
        arrived = {key: scope[key] for key in ("type", "path", "root_path", "method")
                   if key in scope}
        try:
            await self._app(scope, receive, timed_send)
        finally:
            # The router writes the matched route into the scope it was given (this one).
            route = getattr(scope.get("route"), "path", None) or _route_of(arrived, self._routes,
                                                                             status=status)
            method = scope["method"] if scope["method"] in METHODS else OTHER_METHOD
            self._operations.record_http(method=method, route=route, status=status,
                                         seconds=time.perf_counter() - started)


def _route_of(scope: Scope, routes: Sequence[BaseRoute], *, status: int) -> str:
    """The template of the route a request without ``scope["route"]`` was for, as the router
    would have matched it (a full match, else one of another method), or ``UNMATCHED``. Why:
    the guard answers before routing (a bad key's 401, a disabled account's 403, 413, 408), and
    all of them were filed under "(unmatched)", even for ``/api/model``; and only FastAPI's own
    routes set ``scope["route"]``, so the schema and docs (Starlette routes) and the static
    files (a mount) were too. A mount is one template (``/static/{path}``: one series whatever
    the file), and its 404 stays ``UNMATCHED`` with the other misses. Only for requests without
    a route (those, 404s, static files and docs): a loop over the routes' patterns."""
    partial: str | None = None
    for route in routes:
        path = getattr(route, "path", None)
        if not isinstance(path, str):
            continue
        match, _child = route.matches(scope)
        if match is Match.FULL:
            if isinstance(route, Mount):
                return UNMATCHED if status == 404 else f"{path}/{{path}}"
            return path
        if match is Match.PARTIAL and partial is None:
            partial = path
    return partial or UNMATCHED
