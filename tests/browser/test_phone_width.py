"""The pages at a phone's width (375 px) in Chromium, with what a user typed in them: nothing a
user named may make a page wider than the phone. The pages are the server's own (an in-process
app on fakes) served to the browser through Playwright's routing."""

from __future__ import annotations

from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from tests.browser.support import fulfil_static
from tests.conftest import make_settings
from tests.integration.test_web import PASSWORD, browser, fake_services, key_form, sign_in

pytestmark = pytest.mark.slow

BASE = "http://selfie.test"
PHONE = 375


def test_a_long_user_name_does_not_widen_the_pages(chromium: Any, tmp_path: Path) -> None:
    """A user name may be an e-mail address (letters, digits, '.', '@', '-', '_'): one of 56
    characters, with no space to break at, made every signed-in page 546 px wide at 375 px (the
    header's "Signed in as" name), and the Settings page wider still (the delete form's "Type
    your name, ..." and a new key's name in its notice)."""
    name = "christopher.alexander.montgomery@university.example.com"
    settings = make_settings(tmp_path)
    services = fake_services(settings)
    with closing(services), browser(settings, services) as client:
        services.users.create(name=name, password=PASSWORD)
        sign_in(client, name)
        pages = {path: client.get(path).text for path in ("/photos", "/generate", "/settings")}
        made = client.post("/settings/keys",
                           data=key_form(client, "the_key_of_the_backup_scripts_run_every_night"))
        assert made.status_code == 200, made.text
        pages["/settings/keys"] = made.text

    def answer(route: Any) -> None:
        path = route.request.url.removeprefix(BASE)
        if path in pages:
            route.fulfill(status=200, content_type="text/html", body=pages[path])
        elif path.startswith("/static/"):
            fulfil_static(route, path)
        else:
            route.abort()

    context = chromium.new_context(viewport={"width": PHONE, "height": 800}, is_mobile=True,
                                   has_touch=True)
    page = context.new_page()
    page.route(f"{BASE}/**", answer)
    for path in pages:
        page.goto(f"{BASE}{path}")
        assert page.get_by_text(name).first.is_visible()
        width = page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= PHONE, (path, width)
    context.close()
