"""An address with a trailing slash (``/api/model/``, ``/signin/``): a 307 to the address
without it, whatever the method.

Starlette's own redirect (``redirect_slashes``) wrote an absolute Location from the request's
Host header and the connection's scheme: behind a proxy that sends its upstream's Host (nginx's
default) or ends TLS, the client was sent to the internal host, or from https to http, where
HTTP clients drop the Authorization header (and a POST's body went out unencrypted). This one
is relative (the path, root path included, and the query): a client resolves it against the
address it used, so it never leads to another host or scheme. 307 keeps the method and the
body (curl -L, requests, fetch and Go send a POST again as a POST); an address that needs the
slash (none here) is not redirected to.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import quote

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

# Kept as they are in a path (RFC 3986 pchar): the rest is percent-encoded again, as it came.
_PATH_SAFE = "/:@!$&'()*+,;="


def slashless(scope: Scope, routes: Sequence[BaseRoute]) -> str | None:
    """Where a request for an address with trailing slashes that no route takes is sent: the
    same path without them, as a relative URL, when a route takes that; else None."""
    path: str = scope["path"]
    if not path.endswith("/") or path == scope.get("root_path", "") + "/":
        return None
    if any(route.matches(scope)[0] is not Match.NONE for route in routes):
        return None  # its own route (a static folder's file): answered as it is
    stripped = {**scope, "path": path.rstrip("/")}
    if not stripped["path"].startswith("/") or stripped["path"].startswith("//"):
        return None  # "//host" would be another host's address
    if not any(route.matches(stripped)[0] is not Match.NONE for route in routes):
        return None
    location = quote(stripped["path"], safe=_PATH_SAFE)
    query = scope.get("query_string", b"").decode("latin-1")
    return f"{location}?{query}" if query else location


class SlashRedirect:
    """Answers ``slashless`` requests with a 307 to the relative address (the app's router runs
    with ``redirect_slashes`` off); every other request goes on unchanged."""

    def __init__(self, app: ASGIApp, *, routes: Sequence[BaseRoute]) -> None:
        self._app = app
        self._routes = routes  # the app's own list, read at each request (pages come later)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        location = slashless(scope, self._routes) if scope["type"] == "http" else None
        if location is None:
            await self._app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 307,
                    "headers": [(b"location", location.encode("latin-1")),
                                (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
