"""The path a request names inside this app, its root path taken off.

Served under a prefix (uvicorn's ``--root-path /sl``, or any ASGI server or mount that sets the
scope's ``root_path``), ``scope["path"]`` and ``request.url.path`` still hold the prefix:
``/sl/api/keys``. The router matches without it (Starlette's own ``get_route_path``); every
other decision the app makes by path (an API path or a page, the upload limits, the webhook)
must read the same path, or ``/sl/api/keys`` is taken for a page and its API key is never read.
"""

from __future__ import annotations

from starlette.types import Scope


def root_path(scope: Scope) -> str:
    """The app's root path: a mount's child scope (``/static``) keeps it as ``app_root_path``
    and adds its own prefix to ``root_path``."""
    root: str = scope.get("app_root_path", scope.get("root_path", ""))
    return root.rstrip("/")


def app_path(scope: Scope) -> str:
    """``scope``'s path without the app's root path (as Starlette's router matches it): the
    path as it is when the app is served at ``/``. A path outside the root path is left as it
    came (the router does the same: a proxy that does not strip the prefix)."""
    given: str = scope.get("app_root_path", scope.get("root_path", ""))
    path: str = scope["path"]
    if given.endswith("/") and path.startswith(given) and path[len(given):].startswith("/"):
        # A root path given with its slash (--root-path /sl/): uvicorn writes /sl//api/keys,
        # which the router matches as /api/keys (Starlette's get_route_path), and so must this.
        return path[len(given):]
    return without_root(path, root_path(scope))


def without_root(path: str, root: str) -> str:
    """``path`` (a browser's, as it sent it) without ``root``, as ``app_path`` reads a scope."""
    if not root or not path.startswith(root):
        return path
    rest = path[len(root):]
    if not rest:
        return "/"
    return rest if rest.startswith("/") else path
