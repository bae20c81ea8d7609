"""Routes into an app, built once a process."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.routing import _DefaultLifespan


def add_routes(app: FastAPI, router: APIRouter) -> None:
    """``router``'s routes, as its module built them, into ``app``'s own list: what
    ``include_router`` without a prefix or options of its own does, but built once a process.
    FastAPI's ``include_router`` builds every route's parameters, body and answer models again
    for each app it is included in, at the app's first request (~0.1 s of CPU for the API's
    routes, as much again for the pages': in each of the tests' apps). The routes hold nothing
    of an app's: each reads the app's services from its request. A router's own prefix, tags,
    dependencies and responses are in its routes already (``APIRouter.add_api_route`` merges
    them); its start-up and shutdown handlers and lifespan are not, and ``include_router`` would
    have added them to the app: such a router is refused here rather than its handlers silently
    dropped. ``app.dependency_overrides`` does not reach these routes (none is set: the tests
    wire fakes through ``build_services``), since a route built once is bound to no app."""
    kept_apart = [name for name, value in (
        ("on_startup", router.on_startup), ("on_shutdown", router.on_shutdown),
        ("lifespan", not isinstance(router.lifespan_context, _DefaultLifespan)),
    ) if value]
    if kept_apart:
        raise ValueError(f"add_routes takes a router without start-up or shutdown handlers; this "
                         f"one has {', '.join(kept_apart)}: include it with app.include_router")
    app.router.routes.extend(router.routes)
