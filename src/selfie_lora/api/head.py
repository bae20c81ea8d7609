"""HEAD wherever GET works (RFC 9110 9.3.2: the same status and headers, no content).

FastAPI registers only the methods a route names, so every page and API read answered a HEAD
with 405 (link checkers, uptime monitors and ``curl -I`` all send one). One middleware answers it
for every GET route instead of a second decorator on each: a route with a HEAD of its own (the
probes, the weights downloads, which then skip opening the file, and the photo files, which close
theirs unread) keeps it, and the static files answer HEAD themselves. A GET whose answer is
streamed from the storage needs its own: run as its GET here, a HEAD reads the whole stream and
drops it (this middleware cannot reach the response's iterator to close it, and leaving its loop
early leaves the file open until it is collected).

A HEAD run as its GET has the GET's effects, but one: the pages' one-time cookies (a notice, the
typed fields: ``Web.render``) are not cleared by it, so that a HEAD (a link checker's, ``curl
-I``) does not use up what the next GET of the page shows, and the sign-in forms' cookie is not
set by it (no form is shown). The scope it runs with says so (``ran_for_head``).
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Set on the scope a HEAD runs as its GET with (an ASGI scope may carry keys of its own).
_FOR_HEAD = "selfie_lora.head_as_get"


def ran_for_head(scope: Scope) -> bool:
    """Whether this GET's answer goes to a HEAD (``HeadAsGet``): its body is never sent."""
    return bool(scope.get(_FOR_HEAD))


def allow_with_head(allowed: set[str]) -> set[str]:
    """The methods an address takes, HEAD added where GET is (a 405's Allow says so)."""
    return allowed | {"HEAD"} if "GET" in allowed else allowed


class HeadAsGet:
    """Runs a HEAD that no route takes as the GET its path has, and sends its status and headers
    alone. Inside the other middleware: the guard, the metrics and the security headers see the
    HEAD, and the headers the GET's answer is given (Content-Length, Set-Cookie, the pages' CSP)
    are all sent."""

    def __init__(self, app: ASGIApp, *, routes: Sequence[BaseRoute]) -> None:
        self._app = app
        # The app's own list, read at each request: the pages are added to it after this.
        self._routes = routes

    def _matches(self, scope: Scope) -> bool:
        return any(route.matches(scope)[0] is Match.FULL for route in self._routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD" or self._matches(scope):
            await self._app(scope, receive, send)
            return
        as_get = {**scope, "method": "GET", _FOR_HEAD: True}
        if not self._matches(as_get):
            await self._app(scope, receive, send)  # no GET either: its 404 or 405 as before
            return
        sent = False

        async def headers_only(message: Message) -> None:
            nonlocal sent
            if message["type"] == "http.response.body":
                if sent:
                    # The rest of a streamed answer (a photo): read and dropped, never sent.
                    return
                sent = True
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self._app(as_get, receive, headers_only)
