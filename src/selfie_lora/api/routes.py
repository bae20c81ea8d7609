"""Routes into an app, built once a process."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI


def add_routes(app: FastAPI, router: APIRouter) -> None:
    """``router``'s routes, as its module built them, into ``app``'s own list: what
    ``include_router`` without a prefix or options of its own does, but built once a process.
    FastAPI's ``include_router`` builds every route's parameters, body and answer models again
    for each app it is included in, at the app's first request (~0.1 s of CPU for the API's
    routes, as much again for the pages': in each of the tests' apps). The routes hold nothing
    of an app's: each reads the app's services from its request, and no app overrides a
    dependency."""
    app.router.routes.extend(router.routes)
