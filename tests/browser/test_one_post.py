"""Every form of the pages in Chromium, clicked twice: one POST. The pages are the server's own
(an in-process app on fakes) served to the browser through Playwright's routing, each POST
noted and never answered (the first one still on its way when the second click comes)."""

from __future__ import annotations

from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from tests.browser.support import fulfil_static
from tests.conftest import make_settings
from tests.integration.test_web import PASSWORD, browser, fake_services, sign_in
from tests.support.owners import own_model

pytestmark = pytest.mark.slow

BASE = "http://selfie.test"


def serving(path: str, html: str, posts: list[str]) -> Any:
    """A route handler playing the server: ``html`` for ``path``, the files under /static, a
    POST noted in ``posts`` and never answered, anything else aborted."""

    def answer(route: Any) -> None:
        request = route.request
        at = request.url.removeprefix(BASE)
        if request.method == "POST":
            posts.append(at)
        elif at == path:
            route.fulfill(status=200, content_type="text/html", body=html)
        elif at.startswith("/static/"):
            fulfil_static(route, at)
        else:
            route.abort()

    return answer


def page_html(tmp_path: Path, path: str) -> str:
    """The server's page at ``path``: signed in as ann, with photos (the Train button shows),
    but for the sign-up page."""
    settings = make_settings(tmp_path, signup=True)
    services = fake_services(settings)
    with closing(services), browser(settings, services) as client:
        if path != "/signup":
            services.users.create(name="ann", password=PASSWORD)
            own_model(client, services, "ann", versions=0)
            sign_in(client, "ann")
        return client.get(path).text


@pytest.mark.parametrize(("path", "button", "fields"), [
    ("/signup", "Create the account", {"Name": "cat", "Password (10 characters or more)": PASSWORD,
                                       "The same password again": PASSWORD}),
    ("/train", "Train", {}),
    ("/settings", "Create a key", {}),
], ids=["sign up", "train", "create a key"])
def test_a_double_clicked_form_sends_one_post(chromium: Any, tmp_path: Path, path: str,
                                              button: str, fields: dict[str, str]) -> None:
    """Only the Generate form and the upload were sent once: a double click on any other
    button sent two POSTs, the browser cut the first off and showed the second's answer, which
    the first had made wrong: "that user name is taken" on the sign-up page for the account the
    first had just made (left signed out), the "That did not work" page of "a training of this
    model is already queued or running" for the training the first had just started."""
    html = page_html(tmp_path, path)
    posts: list[str] = []
    page = chromium.new_context().new_page()
    page.route(f"{BASE}/**", serving(path, html, posts))
    page.goto(f"{BASE}{path}")
    for label, value in fields.items():
        page.get_by_label(label, exact=True).fill(value)
    # The second click 0.2 s after the first, once its POST is on its way (Chromium merges two
    # submits of one task into one): the browser cuts the first off and sends another.
    box = page.get_by_role("button", name=button, exact=True).bounding_box()
    page.mouse.click(box["x"] + 5, box["y"] + 5)
    page.wait_for_timeout(200)
    page.mouse.click(box["x"] + 5, box["y"] + 5)
    page.wait_for_timeout(1000)  # a second POST, had one been sent, has been seen by now
    assert len(posts) == 1, posts
    page.close()


def test_a_stopped_post_leaves_the_forms_working(chromium: Any, tmp_path: Path) -> None:
    """A POST stopped with the browser's Stop (or whose answer never came) held every form of
    the page until a reload, saying nothing: a click did nothing at all. A second click within
    a few seconds is still swallowed (a double click); after them the form is sent again."""
    posts: list[str] = []
    page = chromium.new_context().new_page()
    page.route(f"{BASE}/**", serving("/train", page_html(tmp_path, "/train"), posts))
    page.goto(f"{BASE}/train")
    # Clicks by position: Playwright's locators wait for the navigation the POST began.
    box = page.get_by_role("button", name="Train", exact=True).bounding_box()
    page.mouse.click(box["x"] + 5, box["y"] + 5)  # its answer never comes, as after Stop
    page.wait_for_timeout(200)
    page.mouse.click(box["x"] + 5, box["y"] + 5)  # a double click's second: swallowed
    page.wait_for_timeout(500)
    assert len(posts) == 1, posts
    page.wait_for_timeout(5000)  # past the few seconds a double click is swallowed for
    page.mouse.click(box["x"] + 5, box["y"] + 5)
    page.wait_for_timeout(1000)
    assert len(posts) == 2, posts
    page.close()
