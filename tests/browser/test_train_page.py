"""The training page in Chromium while a training runs. The server runs without a worker
(``serve --no-worker``): a training stays queued, and the page polls it, for as long as a test
needs, whatever the machine's speed. One server for the file, a user of its own for each test."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from selfie_lora.config import Settings
from selfie_lora.domain.entities import TrainingStatus
from selfie_lora.domain.states import transition
from selfie_lora.wiring import build_services
from tests.browser.support import Account, sign_in, upload_photos
from tests.e2e.conftest import ServeProcess

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _pages_closed(chromium: Any) -> Iterator[None]:
    """Each test's pages closed at its end: a page left open on a training that never ends
    polls the file's shared server (4 times a second here) for the rest of the file."""
    yield
    for context in list(chromium.contexts):
        context.close()


def watching(chromium: Any, account: Account) -> tuple[Any, ServeProcess, str]:
    """A page on /train that has just started a training (queued: no worker takes it); the
    server; the user's API key."""
    server, key = account.server, account.key
    upload_photos(server.base_url, key)
    page = chromium.new_context().new_page()
    sign_in(page, server.base_url, account.name, "/train")
    page.get_by_role("button", name="Train", exact=True).click()
    page.wait_for_load_state()
    page.get_by_role("button", name="Cancel the training").wait_for()
    # Every status poll answered, counted (htmx's events bubble to the body): an answer whose
    # figures did not change swaps nothing.
    page.evaluate("""() => { window.swaps = 0;
        document.body.addEventListener('htmx:afterRequest', () => { window.swaps += 1; }); }""")
    return page, server, key


def cancel_elsewhere(page: Any, server: ServeProcess, key: str) -> None:
    """The training the page watches, canceled through the API (as from another device)."""
    training_id = page.locator('input[name="training_id"]').get_attribute("value")
    with httpx.Client(base_url=server.base_url, timeout=30) as api:
        r = api.post("/api/training/cancel", json={"training_id": training_id},
                     headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text


def test_the_cancel_button_keeps_the_keyboard_focus_while_the_status_updates(
        chromium: Any, account: Account) -> None:
    """The whole status section, the Cancel button in it, was swapped every second: a keyboard
    user's focus fell to the body, and Enter canceled nothing (found in review)."""
    page, server, _key = watching(chromium, account)
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.textContent.trim()") == \
                "Cancel the training":
            break
    else:
        pytest.fail("Tab never reached the Cancel button")
    page.wait_for_function("() => window.swaps >= 2", timeout=20_000)
    focused = page.evaluate("() => document.activeElement.textContent.trim()")
    assert focused == "Cancel the training", server.why(f"focus on {focused!r} after 2 updates")
    # Cancel asks first (it had no confirmation: one stray key ended the training).
    asked: list[str] = []

    def answer(dialog: Any) -> None:
        asked.append(dialog.message)
        dialog.accept()

    page.once("dialog", answer)
    page.keyboard.press("Enter")
    page.wait_for_load_state()
    page.locator("#ended").wait_for(timeout=20_000)
    assert asked, "no confirmation before the cancel"
    assert asked[0].startswith("Cancel the training?"), asked
    assert page.locator("#ended").inner_text().count("was canceled") == 1


def test_a_training_that_ends_while_the_page_watches_shows_how_it_ended_and_retrain(
        chromium: Any, account: Account) -> None:
    """Only the figures are polled: the answer that finds the training ended swaps the page's
    whole panel, so the Cancel button goes, how it ended shows, and the start button is
    back, without a reload (it came only with one: found in review). This first training made
    no version, so the next is still a first training: "Train", not "Retrain" (browser review
    2: "Retrain" and "the version you use now stays active" beside "No version is active
    yet")."""
    page, server, key = watching(chromium, account)
    cancel_elsewhere(page, server, key)
    page.locator("#ended").wait_for(timeout=20_000)
    assert "was canceled" in page.locator("#ended").inner_text()
    assert page.get_by_role("button", name="Cancel the training").count() == 0
    assert page.get_by_role("button", name="Train", exact=True).is_visible()
    assert page.get_by_role("button", name="Retrain").count() == 0
    assert "stays active" not in page.locator("#train-panel").inner_text()
    assert page.locator("[hx-get]").count() == 0  # polling has stopped
    assert page.evaluate("() => window.swaps") >= 1  # the same document: no reload


def test_the_started_notice_goes_when_the_training_ends_while_the_page_watches(
        chromium: Any, account: Account) -> None:
    """"Training started: its status is below." stood above the panel that the end swaps, so
    it went on saying so under "The training was canceled." (webflow review 2). It is in the
    panel now: the end takes it, and the focus goes to how the training ended. A reload never
    showed it again (a one-time notice)."""
    page, server, key = watching(chromium, account)
    notice = page.locator("#done-notice")
    assert notice.inner_text() == "Training started: its status is below."
    assert page.evaluate("() => document.activeElement.id") == "done-notice"
    cancel_elsewhere(page, server, key)
    page.locator("#ended").wait_for(timeout=20_000)
    page.wait_for_function("() => document.activeElement.id === 'ended'", timeout=20_000)
    assert "Training started" not in page.locator("main").inner_text(), server.why("notice")
    assert notice.count() == 0
    page.reload()
    assert "Training started" not in page.locator("main").inner_text()


def test_the_page_says_when_it_lost_contact_with_the_server_and_when_it_is_back(
        chromium: Any, account: Account) -> None:
    """While the status polls failed (the server restarting, the network gone), the figures
    froze as they were, "about 0 s left" included, and nothing said so (found in review)."""
    page, server, _key = watching(chromium, account)
    notice = page.locator("#poll-notice")
    assert notice.is_hidden()
    page.route("**/train/status", lambda route: route.abort())
    notice.wait_for(state="visible", timeout=20_000)
    assert "Lost contact with the server, retrying" in notice.inner_text(), server.why("notice")
    assert notice.get_attribute("role") == "status"
    page.unroute("**/train/status")
    notice.wait_for(state="hidden", timeout=20_000)  # the next poll that succeeds clears it


def test_one_stable_live_region_speaks_for_the_training_and_its_end(
        chromium: Any, account: Account) -> None:
    """The polled figures sat in an aria-live region, read out every second; the end swap
    replaced that region itself (a region inserted with its text is often not announced), and
    focus fell to the body (found in review)."""
    page, server, key = watching(chromium, account)
    # The figures polled every second are in no live region.
    assert page.locator("#status-figures").evaluate("e => e.closest('[aria-live]')") is None
    live = page.locator("#training-live")
    assert live.get_attribute("role") == "status"
    assert live.evaluate("e => e.closest('#train-panel')") is None  # the end swap keeps it
    page.evaluate("""() => { window.liveChanges = 0;
        new MutationObserver(() => { window.liveChanges += 1; }).observe(
            document.getElementById('training-live'),
            {childList: true, characterData: true, subtree: true});
        document.getElementById('training-live').dataset.before = 'yes'; }""")
    start = page.evaluate("() => window.swaps")
    page.wait_for_function(f"() => window.swaps >= {start + 3}", timeout=20_000)
    assert page.evaluate("() => window.liveChanges") <= 1  # a queued training says nothing new
    cancel_elsewhere(page, server, key)
    page.locator("#ended").wait_for(timeout=20_000)
    page.wait_for_function("() => document.activeElement.id === 'ended'", timeout=20_000)
    page.wait_for_timeout(500)
    assert live.get_attribute("data-before") == "yes"  # the region that was there before
    # The focus on the end message says it: the live region, saying it too, had it read twice
    # (a11y review 3, finding 4).
    assert "was canceled" not in live.inner_text()


def start_processing(page: Any, home: Path, *, step: int = 3) -> None:
    """The training the page watches, running (as a worker's claim leaves it; none takes it
    here), at ``step``."""
    services = build_services(Settings(home=home), trainers={}, generators={})
    try:
        training_id = page.locator('input[name="training_id"]').get_attribute("value")
        queued = services.repo.get_training(training_id)
        assert queued is not None
        services.repo.save_training(dataclasses.replace(
            transition(queued, TrainingStatus.PROCESSING, at=datetime.now(UTC), reason="test"),
            step=step, loss=0.5))
    finally:
        services.close()


def test_the_live_region_does_not_go_on_saying_the_progress_once_it_ended(
        chromium: Any, account: Account) -> None:
    """The hidden live region said "Training processing, 0% done." and, the training ended
    with the focus moved to how it ended, went on saying it: a screen reader's reading cursor
    found the progress of a training that was over (a11y review). It is cleared then (the
    focus says the end)."""
    page, server, key = watching(chromium, account)
    start_processing(page, account.home)
    page.wait_for_function("() => document.getElementById('training-live').textContent"
                           ".includes('Training processing')", timeout=20_000)
    cancel_elsewhere(page, server, key)
    page.locator("#ended").wait_for(timeout=20_000)
    page.wait_for_function("() => document.activeElement.id === 'ended'", timeout=20_000)
    page.wait_for_timeout(500)
    said = page.locator("#training-live").inner_text()
    assert "% done" not in said, server.why(said)  # old code: "Training processing, 0% done."


def test_the_end_is_said_by_the_live_region_when_the_focus_is_elsewhere(
        chromium: Any, account: Account) -> None:
    """Focus on a control of the user's is left there; the live region says how the training
    ended, once (a11y review 3, finding 4: focus and the live region both said it)."""
    page, server, key = watching(chromium, account)
    page.locator("nav a[href='/versions']").focus()
    cancel_elsewhere(page, server, key)
    page.locator("#ended").wait_for(timeout=20_000)
    page.wait_for_function(
        "() => document.getElementById('training-live').textContent.includes('was canceled')",
        timeout=20_000)
    assert page.evaluate("() => document.activeElement.getAttribute('href')") == "/versions"


def test_the_figures_are_redrawn_only_where_they_changed(
        chromium: Any, account: Account) -> None:
    """htmx swapped the whole figures every second, "Status: queued" unchanged too: a screen
    reader reading them had its place reset each second (a11y review 3, finding 8). A poll's
    answer now changes only the parts that differ; a change still shows. While the training
    runs too: the step line held the elapsed seconds, so it was replaced on every poll all
    the same (diff2 review finding 2); the times are a line of their own."""
    page, server, _key = watching(chromium, account)
    page.evaluate("""() => { window.kept = document.querySelector('#status-figures p');
        window.figureChanges = 0;
        const figures = document.getElementById('status-figures');
        // (htmx marks the polling element itself with its htmx-request class.)
        new MutationObserver((changes) => { window.figureChanges += changes.filter(
            (c) => c.target !== figures || c.type !== 'attributes').length; }).observe(
            document.getElementById('status-figures'),
            {childList: true, characterData: true, subtree: true, attributes: true}); }""")
    start = page.evaluate("() => window.swaps")
    page.wait_for_function(f"() => window.swaps >= {start + 3}", timeout=20_000)
    assert page.evaluate("() => window.kept.isConnected"), server.why("the figures were redrawn")
    assert page.evaluate("() => window.figureChanges") == 0

    def later_step(route: Any) -> None:
        answer = route.fetch()
        route.fulfill(response=answer, body=re.sub(r"Step \d+", "Step 7", answer.text()))

    page.route("**/train/status", later_step)
    page.wait_for_function("() => document.getElementById('status-figures').textContent"
                           ".includes('Step 7')", timeout=20_000)
    assert page.evaluate("() => window.kept.isConnected")  # the status line, unchanged, stays
    assert page.locator("#status-figures [data-status]").count() == 1
    page.unroute_all(behavior="wait")

    # Running, as a worker's claim leaves it (none takes it here: the page's figures only).
    start_processing(page, account.home)
    page.wait_for_function("() => document.getElementById('status-figures').textContent"
                           ".includes('elapsed')", timeout=20_000)
    page.evaluate("""() => { window.stepLine = Array.from(document.querySelectorAll(
            '#status-figures p')).find((p) => p.textContent.includes('Step 3'));
        window.timeWas = document.getElementById('status-figures').textContent
            .match(/\\d+ s elapsed/)[0]; }""")
    assert "loss 0.5000" in page.evaluate("() => window.stepLine.textContent")
    page.wait_for_function("""() => document.getElementById('status-figures').textContent
        .match(/\\d+ s elapsed/)[0] !== window.timeWas""", timeout=20_000)
    start = page.evaluate("() => window.swaps")
    page.wait_for_function(f"() => window.swaps >= {start + 2}", timeout=20_000)
    # Old code: the line "Step 3 of ... · 2 s elapsed · loss 0.5000", replaced each second.
    assert page.evaluate("() => window.stepLine.isConnected"), server.why("step line redrawn")
    assert "elapsed" not in page.evaluate("() => window.stepLine.textContent")
