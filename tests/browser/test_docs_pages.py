"""The API's documentation pages (/docs: Swagger UI, /redoc: ReDoc) in Chromium, under the
Content-Security-Policy they are now sent with: they still draw the API's document."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import ServeProcess, clean_env

pytestmark = pytest.mark.slow

# Every CSP violation of the page, as it happens (the browser blocks it and says nothing).
WATCH_VIOLATIONS = """window.violations = [];
document.addEventListener('securitypolicyviolation',
    (e) => window.violations.push(`${e.violatedDirective} ${e.blockedURI}`));"""


def test_the_docs_pages_work_under_their_content_security_policy(
        chromium: Any, tmp_path: Path, serve: Callable[..., ServeProcess]) -> None:
    """/docs and /redoc were sent with no CSP, frame or nosniff header (a11y and headers
    review). Sent with them now (their inline script allowed by its hash alone), each still
    draws the API's document, and the browser blocks nothing on them."""
    server = serve(clean_env(tmp_path / "home"), args=("--no-worker",))
    context = chromium.new_context()
    context.add_init_script(WATCH_VIOLATIONS)
    page = context.new_page()
    for path, title in (("/docs", ".swagger-ui .info .title"), ("/redoc", "h1")):
        answer = page.goto(f"{server.base_url}{path}")
        assert answer is not None
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
        page.locator(title).first.wait_for(timeout=30_000)
        assert "selfie-lora" in page.locator(title).first.inner_text(), server.why(path)
        page.wait_for_timeout(500)
        # But ReDoc's "powered by" logo, from its CDN: an image this server does not serve
        # (offline, it never loaded either), not the page's workings.
        blocked = [v for v in page.evaluate("() => window.violations")
                   if not v.startswith("img-src https://cdn.redoc.ly/")]
        assert blocked == [], path
        assert page.evaluate("() => document.documentElement.lang") == "en"
    context.close()
