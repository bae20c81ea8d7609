"""The Generate form in Chromium, clicked twice: one POST. The page is the server's own (an
in-process app on fakes) served to the browser through Playwright's routing, so no model is
trained for it."""

from __future__ import annotations

import re
from typing import Any

from fastapi.testclient import TestClient

from selfie_lora.wiring import Services
from tests.browser.support import fulfil_static
from tests.integration.test_web import PASSWORD, csrf, sign_in
from tests.support.owners import own_model

BASE = "http://selfie.test"


def serving(html: str, *, posts: list[str] | None = None) -> Any:
    """A Playwright route handler playing the server: ``html`` for /generate (whatever its query
    or fragment), the files under /static, a POST noted in ``posts`` and never answered (a
    generation still being made), anything else aborted."""

    def answer(route: Any) -> None:
        request = route.request
        path = request.url.removeprefix(BASE)
        if posts is not None and request.method == "POST":
            posts.append(path)
        elif path.split("?")[0].split("#")[0] == "/generate":
            route.fulfill(status=200, content_type="text/html", body=html)
        elif path.startswith("/static/"):
            fulfil_static(route, path)
        else:
            route.abort()

    return answer


def test_a_double_clicked_generate_sends_one_post(chromium: Any, client: TestClient,
                                                  services: Services) -> None:
    """A double click on Generate sent two POSTs: the first, cut off by the second, still
    made and stored its pictures (review dbl.py: two generations for one click). The form is
    sent once."""
    services.users.create(name="ann", password=PASSWORD)
    own_model(client, services, "ann")
    sign_in(client, "ann")
    html = client.get("/generate").text
    assert 'class="generate"' in html
    posts: list[str] = []
    page = chromium.new_context().new_page()
    page.route(f"{BASE}/**", serving(html, posts=posts))
    page.goto(f"{BASE}/generate")
    page.get_by_label("What should the picture show?").fill("a hike")
    # The second click 0.2 s after the first, once its POST is on its way (Chromium merges
    # two submits of one task into one): the browser cuts the first off and sends another.
    box = page.locator("#generate").bounding_box()
    page.mouse.click(box["x"] + 5, box["y"] + 5)
    page.wait_for_timeout(200)
    page.mouse.click(box["x"] + 5, box["y"] + 5)
    page.wait_for_timeout(1000)  # a second POST, had one been sent, has been seen by now
    assert posts == ["/generate"]
    page.close()


def test_back_from_a_delete_the_next_generation_has_the_focus(chromium: Any, client: TestClient,
                                                              services: Services) -> None:
    """Back from a Delete the focus was on the body at the top of the page: a keyboard user
    tabbed through the nav, the form and the gallery to get back (browser review 4,
    delscroll.py). The generation after the deleted one (the address's #g-<id>) has it."""
    services.users.create(name="ann", password=PASSWORD)
    own_model(client, services, "ann")
    sign_in(client, "ann")
    for _ in range(3):
        client.post("/generate", data={"csrf_token": csrf(client), "prompt": "p",
                                       "num_outputs": "1"})
    html = client.get("/generate").text
    ids = re.findall(r'<li id="g-([^"]+)"', html)
    assert len(ids) == 3, html
    r = client.post(f"/generations/{ids[1]}/delete",
                    data={"csrf_token": csrf(client), "focus": f"g-{ids[2]}"},
                    follow_redirects=False)
    location = r.headers["location"]
    assert location.endswith(f"#g-{ids[2]}")
    html = client.get(location).text
    page = chromium.new_context().new_page()
    page.route(f"{BASE}/**", serving(html))
    page.goto(f"{BASE}{location}")
    page.wait_for_function("document.activeElement !== document.body")
    assert page.evaluate("document.activeElement.id") == f"g-{ids[2]}"
    assert page.locator("#deleted-note[role=status]").inner_text() == "Generation deleted."
    page.close()


def test_a_long_unbroken_prompt_does_not_widen_the_page(chromium: Any, client: TestClient,
                                                        services: Services) -> None:
    """A prompt of one long word made the Generate page 2785 px wide in a 1200 px window, and a
    long one's cell thousands of pixels high (browser review 5, dbl.py/realistic.py): it wraps
    and is clamped to a few lines."""
    services.users.create(name="ann", password=PASSWORD)
    own_model(client, services, "ann")
    sign_in(client, "ann")
    client.post("/generate", data={"csrf_token": csrf(client), "prompt": "x" * 1900,
                                   "num_outputs": "1"})
    html = client.get("/generate").text
    page = chromium.new_context(viewport={"width": 1200, "height": 800}).new_page()
    page.route(f"{BASE}/**", serving(html))
    page.goto(f"{BASE}/generate")
    widths = page.evaluate("[document.documentElement.scrollWidth,"
                           " document.documentElement.clientWidth]")
    assert widths[0] <= widths[1], widths
    assert page.locator(".gallery .prompt").bounding_box()["height"] < 100
    page.close()


def test_save_the_scale_checks_the_scale_but_not_the_prompt(chromium: Any, client: TestClient,
                                                            services: Services) -> None:
    """"Save the scale" skips the form's checks (formnovalidate: an empty prompt must not block
    it), the scale's range too: an empty scale or 5 was sent, and the answer was an error page
    (diff2 review finding 3). The button checks the scale field alone: refused beside it, not
    sent; a scale in the range is sent without a prompt."""
    services.users.create(name="ann", password=PASSWORD)
    own_model(client, services, "ann")
    sign_in(client, "ann")
    html = client.get("/generate").text
    posts: list[str] = []
    page = chromium.new_context().new_page()
    page.route(f"{BASE}/**", serving(html, posts=posts))
    page.goto(f"{BASE}/generate")
    field = page.locator("#lora_scale")
    for typed, said in (("5", ""), ("", "Type the scale to save: a number from -1.0 to 3.0.")):
        field.fill(typed)
        # (Not waiting for a navigation: a POST is never answered here.)
        page.get_by_role("button", name="Save the scale").click(no_wait_after=True)
        page.wait_for_timeout(500)  # a POST, had one been sent, has been seen by now
        assert posts == [], typed  # old code: ['/model/scale']
        message = field.evaluate("e => e.validationMessage")
        assert message, typed
        if said:
            assert message == said
        assert page.evaluate("() => document.activeElement.id") == "lora_scale"
    # Typed in again, the message is gone: Generate is not blocked by an empty scale (the
    # saved one), only Save was.
    field.fill("0.5")
    assert field.evaluate("e => e.validity.valid")
    page.get_by_role("button", name="Save the scale").click(no_wait_after=True)
    page.wait_for_timeout(500)
    assert posts == ["/model/scale"]  # with no prompt
    page.close()


def test_the_presets_are_shown_with_scripts_only(chromium: Any, client: TestClient,
                                                 services: Services) -> None:
    """Without JavaScript the presets were shown and a click on one did nothing (nojs review
    3): hidden then; with scripts they are shown and fill the prompt."""
    services.users.create(name="ann", password=PASSWORD)
    own_model(client, services, "ann")
    sign_in(client, "ann")
    html = client.get("/generate").text
    for scripts in (False, True):
        page = chromium.new_context(java_script_enabled=scripts).new_page()
        page.route(f"{BASE}/**", serving(html))
        page.goto(f"{BASE}/generate")
        preset = page.get_by_role("button", name="Studio portrait")
        assert preset.is_visible() is scripts
        if scripts:
            preset.click()
            assert page.get_by_label("What should the picture show?").input_value().startswith(
                "a studio portrait")
        page.context.close()


def test_generate_in_flight_keeps_the_focus_and_says_it_is_generating(
        chromium: Any, client: TestClient, services: Services) -> None:
    """Once Generate was sent, both buttons were disabled: the focused one dropped the focus to
    <body> and nothing said a generation was running, for tens of seconds on a real model (a11y
    review 1, f10_generate_in_flight.py). The focus stays on the button, a status says what is
    being made, and a second submit is still ignored."""
    services.users.create(name="ann", password=PASSWORD)
    own_model(client, services, "ann")
    sign_in(client, "ann")
    html = client.get("/generate").text
    page = chromium.new_context().new_page()
    page.route(f"{BASE}/**", serving(html))
    page.goto(f"{BASE}/generate")
    # The page stays as it is once sent (a generation still being made): the browser's own
    # submit is stopped after app.js has seen it, and those app.js let through are counted.
    page.evaluate("""window.sent = 0; window.addEventListener("submit", (e) => {
        if (!e.defaultPrevented) window.sent += 1; e.preventDefault(); })""")
    page.get_by_label("What should the picture show?").fill("a hike")
    page.locator("#num_outputs").fill("2")
    # (Not waiting for a navigation: the POST is never answered here.)
    page.locator("#generate").press("Enter", no_wait_after=True)
    page.wait_for_timeout(300)
    assert page.evaluate("document.activeElement.id") == "generate"  # old code: '' (body)
    status = page.locator("#generate-status[role=status]")
    assert status.inner_text().startswith("Generating 2 pictures…")
    assert page.locator("#generate").get_attribute("aria-disabled") == "true"
    page.locator("#generate").press("Enter", no_wait_after=True)
    page.wait_for_timeout(300)
    assert page.evaluate("window.sent") == 1
    page.close()
