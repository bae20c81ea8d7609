"""What a keyboard and a screen reader get in Chromium: the focus ring that can be seen, and
where the focus lands after a form is refused."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from selfie_lora.wiring import Services
from tests.browser.support import Account, fulfil_static, sign_in, upload_photos
from tests.integration import test_web
from tests.support.owners import own_model
from tests.support.photos import FIXTURES

pytestmark = pytest.mark.slow

WHITE, SOFT, ACCENT = (255, 255, 255), (244, 245, 248), (36, 86, 201)
BASE = "http://selfie.test"  # the in-process app's pages, served through Playwright's routing
PASSWORD = test_web.PASSWORD


def _luminance(rgb: tuple[int, int, int]) -> float:
    def channel(value: int) -> float:
        c = value / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (channel(v) for v in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    light, dark = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


def _rgb(css: str) -> tuple[int, int, int]:
    found = re.match(r"rgba?\((\d+), (\d+), (\d+)", css)
    assert found, css
    return int(found[1]), int(found[2]), int(found[3])


def _ann_on(chromium: Any, account: Account, path: str, *, javascript: bool = True) -> Any:
    """A page of Chromium's, the account signed in and on ``path``."""
    page = chromium.new_context(java_script_enabled=javascript).new_page()
    sign_in(page, account.server.base_url, account.name, path)
    return page


def test_the_focus_ring_stands_out_against_the_page_and_the_buttons(
        chromium: Any, account: Account) -> None:
    """The ring was amber #f0b400, 1.87:1 against the white page (1.71:1 on the drop zone's
    grey): under the 3:1 a focus indicator needs (a11y review 2). Every Tab stop's ring is now
    3:1 or more against white, the drop zone's grey and the buttons' blue."""
    page = _ann_on(chromium, account, "/photos")
    seen: list[str] = []
    for _ in range(30):
        page.keyboard.press("Tab")
        stop = page.evaluate("""() => { const e = document.activeElement, s = getComputedStyle(e);
            return {what: e.tagName + '#' + e.id + ' ' + (e.textContent || '').trim().slice(0, 20),
                    style: s.outlineStyle, width: parseFloat(s.outlineWidth),
                    color: s.outlineColor}; }""")
        if stop["what"].startswith("BODY"):
            break  # round the page once
        seen.append(stop["what"])
        assert stop["style"] == "solid", stop
        assert stop["width"] >= 2, stop
        ring = _rgb(stop["color"])
        for background in (WHITE, SOFT, ACCENT):
            assert contrast(ring, background) >= 3, (stop, background)
    assert any(what.startswith("BUTTON#send") for what in seen), seen  # a blue button too


def test_without_scripts_revoke_asks_for_a_tick_before_it_revokes(
        chromium: Any, account: Account) -> None:
    """Without JavaScript, one press of Revoke revoked the key at once: its window.confirm
    never ran (a11y review 4). The browser now refuses to send the form until its "Yes,
    revoke" box is ticked."""
    page = _ann_on(chromium, account, "/settings", javascript=False)
    revoke = page.get_by_role("button", name="Revoke")
    revoke.click()
    page.wait_for_timeout(500)  # a sent form has been answered by now
    assert page.locator("table.keys").inner_text().count("active") == 1  # not revoked
    page.get_by_label(re.compile("Yes, revoke")).check()
    revoke.click()
    page.wait_for_load_state()
    # Revoked keys are folded under the keys that work.
    assert "Revoked keys (1)" in page.locator("details.revoked-keys").inner_text()


def test_a_failed_sign_in_puts_the_focus_on_the_password_that_was_wrong(
        chromium: Any, account: Account) -> None:
    """A failed sign-in put the focus in Name, which reads "Name, edit, ann": nothing said that
    it failed (a11y review 5). The focus is in the emptied password field, described by the
    message."""
    page = chromium.new_context().new_page()
    page.goto(f"{account.server.base_url}/signin")
    page.get_by_label("Name").fill(account.name)
    page.get_by_label("Password").fill("not her password")
    page.get_by_role("button", name="Sign in").click()
    page.locator("p.error[role=alert]").wait_for()
    focused = page.evaluate("() => [document.activeElement.id, "
                            "document.activeElement.getAttribute('aria-describedby')]")
    assert focused == ["password", "form-error"], focused


def test_an_upload_sent_from_the_keyboard_gives_the_focus_back_to_its_button(
        chromium: Any, account: Account) -> None:
    """Enter on "Check and upload" disabled the focused button, which dropped the focus to
    <body> for good (a11y review 7). Once the answer is in, the focus is on the button again."""
    page = _ann_on(chromium, account, "/photos")
    page.set_input_files("#files", [str(FIXTURES / name)
                                    for name in ("obama.jpg", "obama2.jpg", "obama3.jpg")])
    page.locator("#send").focus()
    page.keyboard.press("Enter")
    page.wait_for_function("() => ['Done: 3 of 3 photos kept.', 'Some photos need changes.']"
                           ".includes(document.getElementById('upload-status').textContent)",
                           timeout=90_000)
    page.wait_for_timeout(200)  # loadend, after load
    assert page.evaluate("() => document.activeElement.id") == "send"


@pytest.mark.parametrize("javascript", [True, False])
def test_a_refused_upload_s_message_is_said_once(
        chromium: Any, account: Account, javascript: bool) -> None:
    """A refused upload's message was an alert in the report and, with scripts, written in the
    #upload-status live region too: a screen reader said it twice (a11y review). With
    scripts the live region alone says it; without, the page's message has the focus and is
    no alert."""
    page = _ann_on(chromium, account, "/photos", javascript=javascript)
    page.set_input_files("#files", [{"name": "a.jpg", "mimeType": "image/jpeg",
                                     "buffer": b"not a photo"}])
    page.get_by_role("button", name="Check and upload").click()
    if javascript:
        page.wait_for_function("() => !['Sending…', 'Checking your photos…', '1 file(s) chosen']"
                               ".includes(document.getElementById('upload-status').textContent)",
                               timeout=90_000)
        assert page.locator("#upload-status").inner_text() == "Some photos need changes."
    else:
        page.locator("#report p.error").wait_for()  # the page the form's answer is
    message = page.locator("#report p.error")
    assert message.inner_text().startswith("This set cannot be trained")
    assert page.get_by_role("alert").count() == 0
    focused = page.evaluate("() => document.activeElement.id")
    assert focused == ("send" if javascript else "upload-refused"), focused


def test_every_field_s_border_is_3_to_1_against_the_page(
        chromium: Any, account: Account) -> None:
    """Text fields, textareas and selects had a #d9d9de border, 1.41:1 on white: the one thing
    that shows where a field is, under the 3:1 a control's edge needs (a11y review 5). It is
    3:1 or more against white and the grey of the drop zone now."""
    page = _ann_on(chromium, account, "/settings")
    borders = page.evaluate("""() => [...document.querySelectorAll('input, textarea, select')]
        .filter(e => !['hidden', 'checkbox', 'radio', 'file', 'range'].includes(e.type))
        .map(e => [e.id, getComputedStyle(e).borderTopColor,
                   parseFloat(getComputedStyle(e).borderTopWidth)])""")
    assert {field for field, _color, _width in borders} >= {"key-name", "delete-confirm"}
    for field, color, width in borders:
        assert width >= 1, field
        for background in (WHITE, SOFT):
            assert contrast(_rgb(color), background) >= 3, (field, color, background)


def test_the_first_tab_stop_skips_to_the_page_s_content(
        chromium: Any, account: Account) -> None:
    """Eight Tab stops (the brand, six pages, Sign out) came before every page's content and
    nothing skipped them; the nav was named "main", read as "main navigation" next to the main
    landmark (a11y review 6). The first Tab stop is a "Skip to content" link, shown when
    focused, and the next Tab after it is in <main>; the nav is "Site"."""
    page = _ann_on(chromium, account, "/settings")
    assert page.get_by_role("navigation", name="Site", exact=True).count() == 1
    hidden = page.locator("a.skip").bounding_box()
    assert hidden["y"] + hidden["height"] <= 0, hidden  # out of sight until focused
    page.keyboard.press("Tab")
    skip = page.evaluate("""() => { const e = document.activeElement, r = e.getBoundingClientRect();
        return [e.textContent.trim(), e.getAttribute('href'), r.top, r.bottom, r.width]; }""")
    assert skip[:2] == ["Skip to content", "#main"], skip
    assert skip[2] >= 0, skip  # on screen while focused
    assert skip[4] > 20, skip
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.closest('main') !== null"), \
        page.evaluate("() => document.activeElement.outerHTML")


def _serving(pages: dict[str, str], *,
             posts: list[tuple[str, str]] | None = None) -> Callable[[Any], None]:
    """A Playwright route handler playing the server: each of ``pages`` (path: its HTML, the
    server's own, rendered in process), the files under /static; a POST noted in ``posts``
    (its path and body); anything else aborted."""

    def answer(route: Any) -> None:
        path = route.request.url.removeprefix(BASE).split("#")[0]
        if posts is not None and route.request.method == "POST":
            posts.append((path, route.request.post_data or ""))
            route.abort()
        elif path in pages:
            route.fulfill(status=200, content_type="text/html", body=pages[path])
        elif path.startswith("/static/"):
            fulfil_static(route, path)
        else:
            route.abort()

    return answer


def test_a_wide_table_scrolls_in_a_named_region_under_a_whole_caption(
        chromium: Any, client: TestClient, services: Services) -> None:
    """At 320 px the tables themselves scrolled (display: block), the caption with them: it read
    "Every version of yo", cut off, and nothing said the table scrolled (a11y review 7). Each
    table is in a region named by its caption that the keyboard can reach and scroll; the
    caption stays whole and in place, and the page itself does not scroll sideways."""
    services.users.create(name="ann", password=PASSWORD)
    own_model(client, services, "ann")
    test_web.sign_in(client, "ann")
    pages = {path: client.get(path).text for path in ("/versions", "/settings")}
    page = chromium.new_context(viewport={"width": 320, "height": 640}).new_page()
    page.route(f"{BASE}/**", _serving(pages))
    for path, caption in (("/versions", "Every version of your model, newest first"),
                          ("/settings", "Your API keys that work")):
        page.goto(f"{BASE}{path}")
        region = page.get_by_role("region", name=caption, exact=True)
        assert region.count() == 1, path
        assert region.get_attribute("tabindex") == "0"
        found = region.evaluate("""r => { const c = r.querySelector('caption').getBoundingClientRect();
            return {scroll: r.scrollWidth, width: r.clientWidth, left: c.left, right: c.right,
                    page: document.documentElement.scrollWidth}; }""")
        assert found["page"] <= 320, found
        assert found["scroll"] > found["width"], found  # the table is wider: it scrolls
        assert found["right"] <= 320, found
        region.focus()
        page.keyboard.press("ArrowRight")  # the keyboard scrolls the focused region
        page.wait_for_function("r => r.scrollLeft > 0", arg=region.element_handle())
        moved = region.evaluate("r => r.querySelector('caption').getBoundingClientRect().left")
        assert moved == found["left"], (moved, found)  # the caption stays where it was
    page.close()


SCALE_NAME = "LoRA scale of these pictures: how strongly your model shapes them"


def _generate_page(chromium: Any, client: TestClient, services: Services, *, scale: float,
                   posts: list[tuple[str, str]] | None = None) -> Any:
    """ann's Generate page, her saved scale ``scale``, in a page of Chromium's."""
    services.users.create(name="ann", password=PASSWORD)
    own_model(client, services, "ann")
    user = services.users.get_by_name(name="ann")
    services.models.set_lora_scale(user=user, lora_scale=scale)
    test_web.sign_in(client, "ann")
    page = chromium.new_context().new_page()
    page.route(f"{BASE}/**", _serving({"/generate": client.get("/generate").text}, posts=posts))
    page.goto(f"{BASE}/generate")
    return page


def test_the_keyboard_sets_the_lora_scale_to_any_value_and_a_stored_one_is_kept(
        chromium: Any, client: TestClient, services: Services) -> None:
    """The slider had step="any": an arrow key moved it by (max - min) / 100 = 0.04 from where
    it was, so from 1.0 the keyboard could never reach 0.9, 0.7 or 0.5, and nothing else took a
    typed value (a11y review 1, slider.py). The scale is a number field (any value typed, a
    stored 0.73 shown and sent as it is) and the slider beside it moves in steps of 0.05."""
    posts: list[tuple[str, str]] = []
    page = _generate_page(chromium, client, services, scale=0.73, posts=posts)
    field = page.get_by_role("spinbutton", name=SCALE_NAME, exact=True)
    slider = page.get_by_role("slider", name=SCALE_NAME, exact=True)
    assert field.input_value() == "0.73"
    slider.focus()
    values = []
    for key in ("ArrowLeft", "ArrowLeft", "ArrowLeft", "ArrowLeft", "ArrowLeft"):
        page.keyboard.press(key)
        values.append(field.input_value())
    assert values == ["0.7", "0.65", "0.6", "0.55", "0.5"], values
    page.keyboard.press("Home")
    page.keyboard.press("ArrowRight")
    assert field.input_value() == "-0.95"
    field.fill("0.9")  # typed: the slider follows
    assert slider.input_value() == "0.9"
    # Untouched, the stored scale off the slider's steps is sent as it is, not snapped to 0.75.
    page.goto(f"{BASE}/generate")
    page.get_by_label("What should the picture show?").fill("a hike")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_timeout(500)
    assert [path for path, _body in posts] == ["/generate"], posts
    assert "lora_scale=0.73&" in posts[0][1] + "&", posts
    page.close()


def test_the_lora_scale_s_name_is_clean_and_its_value_said_once(
        chromium: Any, client: TestClient, services: Services) -> None:
    """The slider's label held an <output> with the value: the name read "... shapes them ()",
    and the output, a status (live) region app.js wrote each value into, said every value the
    slider already says a second time (a11y review 2). The field and the slider are named by
    the label alone, and no live region in the form repeats the value."""
    page = _generate_page(chromium, client, services, scale=0.8)
    snapshot = page.locator("form.generate").aria_snapshot()
    assert "()" not in snapshot, snapshot
    assert "status" not in snapshot, snapshot
    assert f'spinbutton "{SCALE_NAME}"\': "0.8"' in snapshot, snapshot
    assert f'slider "{SCALE_NAME}"\': "0.8"' in snapshot, snapshot
    page.get_by_role("slider", name=SCALE_NAME).focus()
    page.keyboard.press("ArrowRight")
    assert page.locator("form.generate [role=status], form.generate output, "
                        "form.generate [aria-live]").count() == 0
    page.close()


@pytest.mark.parametrize("javascript", [True, False], ids=["js", "no-js"])
def test_a_form_that_succeeded_says_what_it_did_and_that_takes_the_focus(
        chromium: Any, account: Account, javascript: bool) -> None:
    """Train, Cancel, Create a key, Revoke (and Generate, Save the scale, Use this version...)
    led back to their page with the focus on <body> and no word of what they did; the new key's
    secret sat in a role=status present at load, often not read out (a11y review 3, finding
    3). Each now says it in a notice that takes the focus, once, with or without scripts."""
    playwright_timeout = pytest.importorskip("playwright.sync_api").TimeoutError
    server = account.server
    upload_photos(server.base_url, account.key)
    page = chromium.new_context(java_script_enabled=javascript).new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    sign_in(page, server.base_url, account.name, "/train")

    def focused(expected: str = "done-notice") -> tuple[Any, ...]:
        # Autofocus is applied as the page is first rendered, which can come after "load".
        with contextlib.suppress(playwright_timeout):
            page.wait_for_function("id => document.activeElement.id === id", arg=expected,
                                   timeout=5_000)
        return tuple(page.evaluate("() => [document.activeElement.id, "
                                   "document.activeElement.textContent.trim()]"))

    page.get_by_role("button", name="Train", exact=True).click()
    page.wait_for_load_state()
    assert focused() == ("done-notice", "Training started: its status is below."), \
        server.why(str(focused()))
    if not javascript:
        page.get_by_label("Yes, cancel it: it stops now").check()
    page.get_by_role("button", name="Cancel the training").click()
    page.wait_for_load_state()
    assert focused() == ("done-notice", "Training canceled."), server.why(str(focused()))
    page.reload()  # said once: not again
    assert page.locator("#done-notice").count() == 0
    page.goto(f"{server.base_url}/settings")
    page.get_by_label("New key's name").fill("laptop")
    page.get_by_role("button", name="Create a key").click()
    page.wait_for_load_state()
    element, text = focused("new-key-notice")
    assert element == "new-key-notice"
    assert text.startswith("Your new key laptop, shown this once")
    assert page.locator("#new-key-notice").get_attribute("role") is None  # focus tells, once
    if not javascript:
        page.get_by_label("Yes, revoke laptop: scripts using it stop working").check()
    page.get_by_role("button", name="Revoke the key laptop").click()
    page.wait_for_load_state()
    assert focused() == ("done-notice", "The key laptop was revoked: scripts using it stop "
                                        "working.")


@pytest.mark.parametrize("javascript", [True, False])
def test_an_upload_that_left_photos_out_says_how_many_where_the_focus_is(
        chromium: Any, account: Account, javascript: bool) -> None:
    """An upload that left a photo out said only "Done." with scripts, and without them its page
    left the focus on <body> (a11y review 2, f01_upload_done.py): the report listing the photo
    left out was read only by one who went looking. The focus goes to a notice that says how
    many were kept and left out."""
    page = _ann_on(chromium, account, "/photos", javascript=javascript)
    page.set_input_files("#files", [str(FIXTURES / name) for name in
                                    ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg")])
    page.locator("#send").focus()
    page.keyboard.press("Enter")
    page.locator("#upload-kept").wait_for(timeout=90_000)
    page.wait_for_timeout(300)  # loadend, after load
    notice = page.locator("#upload-kept")
    assert notice.inner_text() == "3 of 4 photos kept; 1 left out, listed below."
    assert page.evaluate("() => document.activeElement.id") == "upload-kept"
    if javascript:  # said once: by the focus, not the live region too
        assert page.locator("#upload-status").inner_text() == ""


def test_the_copy_button_says_what_it_copies_and_whether_it_did(
        chromium: Any, client: TestClient, services: Services) -> None:
    """The Model page's Copy button was named just "Copy", a success only changed its text to
    "Copied" (not reliably read out, and left so for good), and on a plain-HTTP address that is
    not localhost (no navigator.clipboard) it did nothing at all (a11y review 8, f06_copy.py).
    Its name says what it copies; a status beside it says it was copied, or, where the
    clipboard cannot be used, to copy the text (selected for it) with Ctrl+C."""
    services.users.create(name="ann", password=PASSWORD)
    own_model(client, services, "ann")
    test_web.sign_in(client, "ann")
    html = client.get("/model").text
    # http://selfie.test is no secure context: no navigator.clipboard.
    page = chromium.new_context().new_page()
    page.route(f"{BASE}/**", _serving({"/model": html}))
    page.goto(f"{BASE}/model")
    button = page.get_by_role("button", name="Copy the trigger word")  # old code: "Copy"
    button.click()
    said = page.locator("#trigger-copied[role=status]")
    assert said.inner_text().startswith("Could not copy here: the text is selected")
    assert page.evaluate("String(window.getSelection())") == page.locator("#trigger").inner_text()
    page.context.close()
    # localhost is a secure context: copied, and said so.
    local = "http://localhost"
    context = chromium.new_context()
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=local)
    page = context.new_page()

    def answer(route: Any) -> None:
        path = route.request.url.removeprefix(local).split("#")[0]
        if path == "/model":
            route.fulfill(status=200, content_type="text/html", body=html)
        elif path.startswith("/static/"):
            fulfil_static(route, path)
        else:
            route.abort()

    page.route(f"{local}/**", answer)
    page.goto(f"{local}/model")
    page.get_by_role("button", name="Copy the trigger word").click()
    page.wait_for_function("document.getElementById('trigger-copied').textContent !== ''")
    assert page.locator("#trigger-copied").inner_text() == "Copied the trigger word."
    assert page.evaluate("navigator.clipboard.readText()") == page.locator("#trigger").inner_text()
    context.close()


def test_compare_lands_on_the_comparison_it_asked_for(
        chromium: Any, client: TestClient, services: Services) -> None:
    """Compare (a GET form) reloaded the Versions page at its top: the comparison asked for was
    some fourteen Tabs away, past the nav and every version's row (a11y review). Its address
    ends in #compare: the page lands on the comparison, a section named by its heading, and
    the next Tab is in it."""
    services.users.create(name="ann", password=PASSWORD)
    own_model(client, services, "ann", versions=2)
    test_web.sign_in(client, "ann")
    pages = {path: client.get(path).text for path in ("/versions", "/versions?a=1&b=2")}
    page = chromium.new_context(viewport={"width": 800, "height": 500}).new_page()
    page.route(f"{BASE}/**", _serving(pages))
    page.goto(f"{BASE}/versions")
    page.get_by_label("Compare version").select_option("1")
    page.get_by_label("with version").select_option("2")
    page.get_by_role("button", name="Compare", exact=True).focus()
    page.keyboard.press("Enter")
    page.wait_for_url(f"{BASE}/versions?a=1&b=2#compare")  # old code: no #compare
    section = page.get_by_role("region", name="v1 and v2 side by side", exact=True)
    assert section.get_attribute("id") == "compare"
    page.wait_for_function("() => window.scrollY > 0")  # not at the top any more
    top = section.evaluate("s => s.getBoundingClientRect().top")
    assert abs(top) < 2, top  # the comparison at the top of the window
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.closest('#compare') !== null"), \
        page.evaluate("() => document.activeElement.outerHTML")
    page.close()
