"""The API's documentation pages, /docs (Swagger UI) and /redoc, served with their own assets
(``fastapi_offline``'s, under /static-offline-docs: no CDN) and with the headers every page
gets: they were sent with none (no Content-Security-Policy, framable, sniffable) and without
``lang`` on <html>, as FastAPI writes them."""

from __future__ import annotations

import base64
import hashlib
import re

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse

# DOCS_STATIC: where fastapi_offline mounts Swagger UI's and ReDoc's files (web.app sends them
# with nosniff, as every other static file).
from selfie_lora.web.app import DOCS_STATIC, SECURITY_HEADERS

# The pages' own CSP, but for what FastAPI's pages need: their one inline script each (allowed
# by its hash, not by 'unsafe-inline'), the <style> elements ReDoc writes as it draws, the
# data: images of Swagger UI and the search worker ReDoc starts from a blob.
DOCS_CSP = ("default-src 'self'; script-src 'self'{hashes}; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data: blob:; connect-src 'self'; worker-src 'self' blob:; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'")
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)


def docs_csp(html: str) -> str:
    """``DOCS_CSP`` allowing exactly the inline scripts of ``html``."""
    hashes = "".join(
        f" 'sha256-{base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()}'"
        for script in _INLINE_SCRIPT.findall(html))
    return DOCS_CSP.format(hashes=hashes)


def _page(response: HTMLResponse) -> HTMLResponse:
    """FastAPI's page, in English (its <html> says so: a screen reader otherwise reads it in
    the user's own language's voice), with every page's headers and the docs' CSP."""
    html = bytes(response.body).decode().replace("<html>", '<html lang="en">', 1)
    headers = {name: value for name, value in SECURITY_HEADERS}
    headers["content-security-policy"] = docs_csp(html)
    return HTMLResponse(html, headers=headers)


def add_docs(app: FastAPI) -> None:
    """/docs, its OAuth2 redirect page and /redoc, as ``fastapi_offline`` serves them (made
    with ``docs_url=None, redoc_url=None``: these replace its routes) but with ``_page``."""
    openapi_url = app.openapi_url or "/openapi.json"
    redirect_url = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _page(get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}", title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}{redirect_url}",
            swagger_js_url=f"{root}{DOCS_STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_STATIC}/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters))

    @app.get(redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return _page(get_swagger_ui_oauth2_redirect_html())

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _page(get_redoc_html(
            openapi_url=f"{root}{openapi_url}", title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_STATIC}/redoc.standalone.js", with_google_fonts=False,
            redoc_favicon_url=f"{root}{DOCS_STATIC}/favicon.png"))
