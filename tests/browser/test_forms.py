"""Forms of the pages in Chromium: what a person gets back after a form is refused. And the API's
documentation pages (/docs: Swagger UI, /redoc: ReDoc) under the Content-Security-Policy they
are now sent with: they still draw the API's document."""

from __future__ import annotations

from typing import Any

import pytest

from tests.browser.support import Account, sign_in, upload_photos
from tests.e2e.conftest import ServeProcess

pytestmark = pytest.mark.slow

# Every CSP violation of the page, as it happens (the browser blocks it and says nothing).
WATCH_VIOLATIONS = """window.violations = [];
document.addEventListener('securitypolicyviolation',
    (e) => window.violations.push(`${e.violatedDirective} ${e.blockedURI}`));"""


def test_a_refused_trainer_version_form_comes_back_with_what_was_typed(
        chromium: Any, account: Account) -> None:
    """The error page's Back led to /photos, and what was typed in the form was lost (found in
    review); then Back went back in the history, where a browser may show the form empty. Now
    the refusal is the Model page itself, the form open, both values kept and the field at
    fault focused (webhostile review 3)."""
    server = account.server
    upload_photos(server.base_url, account.key)  # the model the form is about
    page = chromium.new_context().new_page()
    sign_in(page, server.base_url, account.name, "/model")
    page.get_by_text("Move to another trainer version").click()
    page.get_by_label("New trainer version").fill("garbage")
    page.get_by_label("Why").fill("a reason I took a while to write")
    page.get_by_role("button", name="Move").click()
    page.wait_for_load_state()
    assert page.locator("h1").inner_text() != "That did not work"
    assert page.locator("#repin-error").is_visible()
    assert page.get_by_label("New trainer version").input_value() == "garbage"
    assert page.get_by_label("Why", exact=True).input_value() == \
        "a reason I took a while to write"
    assert page.evaluate("document.activeElement.id") == "trainer_version"


def test_a_wrong_name_on_the_delete_form_asks_nothing_and_puts_the_focus_back(
        chromium: Any, account: Account) -> None:
    """A mistyped name got the "cannot be undone" question first, and the refusal left the
    focus on the page's body, 13 Tabs from the field (web3 review finding 5): now a name that is
    not the account's is sent without the question (it deletes nothing), and the answer puts
    the focus in the field."""
    server, erin = account.server, account.name
    confirm = f"Type your name, {erin}, to confirm"
    page = chromium.new_context().new_page()
    asked: list[str] = []
    page.on("dialog", lambda d: (asked.append(d.message), d.dismiss()))
    sign_in(page, server.base_url, erin, "/settings")
    page.get_by_label(confirm).fill(f"{erin}x")
    page.get_by_label(confirm).press("Enter")
    page.wait_for_load_state()
    page.get_by_text("type your name to confirm: nothing was deleted").wait_for()
    assert asked == []
    assert page.evaluate("document.activeElement.id") == "delete-confirm"
    # The right name still asks before anything is deleted.
    page.get_by_label(confirm).fill(erin)
    page.get_by_label(confirm).press("Enter")
    page.wait_for_timeout(300)
    assert len(asked) == 1
    assert "cannot be undone" in asked[0]
    assert page.url.endswith("/settings/delete")  # dismissed: still the refused form's page


def test_a_not_found_page_opened_from_outside_goes_back_to_the_section(
        chromium: Any, account: Account) -> None:
    """A Not found page opened from a bookmark or a typed address (no page of this site
    before it to go back to in the history): its Back led to /photos whatever was missing;
    now the section's page, here the Versions page for a version's download. From a page of
    the site, Back still goes back in the history, to that page."""
    server = account.server
    page = chromium.new_context().new_page()
    sign_in(page, server.base_url, account.name, "/generate")
    page.goto(f"{server.base_url}/versions/v99/weights")  # typed: no referrer
    assert page.locator("h1").inner_text() == "Not found"
    page.get_by_role("link", name="Back").click()
    page.wait_for_url(f"{server.base_url}/versions")
    # Reached from a page of the site (its link), Back goes back there, not to its section.
    page.goto(f"{server.base_url}/generate")
    page.evaluate("""() => { const a = document.createElement("a");
        a.href = "/versions/v99/weights"; a.id = "gone"; a.textContent = "gone";
        document.body.append(a); }""")
    page.click("#gone")
    page.wait_for_url(f"{server.base_url}/versions/v99/weights")
    page.get_by_role("link", name="Back").click()
    page.wait_for_url(f"{server.base_url}/generate")


def test_the_docs_pages_work_under_their_content_security_policy(
        chromium: Any, shared_server: ServeProcess) -> None:
    """/docs and /redoc were sent with no CSP, frame or nosniff header (a11y and headers
    review). Sent with them now (their inline script allowed by its hash alone), each still
    draws the API's document, and the browser blocks nothing on them."""
    # The file's shared server: the docs pages are the same on any server, and a serve of the
    # test's own (its start and stop, and a browser of the file's own) was only set-up.
    server = shared_server
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
