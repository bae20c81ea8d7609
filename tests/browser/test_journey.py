"""A person's whole journey in Chromium, on the embedded defaults (the offline tiny FLUX, trained
for real in a child process): sign in, upload photos (one of another person among them is left
out, with its advice next to its thumbnail), train and watch it end, set the LoRA scale, retrain,
see both versions and their comparison grid, roll back, download the LoRA (its sha256 is the
API's), generate. Then another user who gets 404 for all of the first one's things. (The upload
and the same pages at phone width: test_photos_page, on its file's shared server.)"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser.support import PASSWORD, create, sign_in
from tests.e2e.conftest import ServeProcess, clean_env, make_users
from tests.support.photos import FIXTURES

pytestmark = pytest.mark.slow

PHOTOS = ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg")
TRAINING_S = 180_000  # ms: two tiny trainings on a loaded 2-core machine
# Where the README's screenshots are written when asked (make screenshots).
SHOTS = os.environ.get("SELFIE_LORA_SCREENSHOTS")


def go(page: Any, name: str) -> None:
    """Follow a link of the main navigation."""
    page.get_by_role("navigation").get_by_role("link", name=name, exact=True).click()
    page.wait_for_load_state()


def shot(page: Any, name: str) -> None:
    """A screenshot for the README, when asked for: 800 px wide, 64 colours (a small file)."""
    if not SHOTS:
        return
    import io

    from PIL import Image

    Path(SHOTS).mkdir(parents=True, exist_ok=True)
    with Image.open(io.BytesIO(page.screenshot(full_page=True))) as image:
        small = image.convert("RGB").resize(
            (800, round(image.height * 800 / image.width)), Image.Resampling.LANCZOS)
        small.quantize(colors=64).save(Path(SHOTS) / name, optimize=True)


def wait_ended(page: Any, server: ServeProcess) -> str:
    ended = page.locator("#ended")
    try:
        ended.wait_for(timeout=TRAINING_S)
    except Exception as exc:  # a Playwright timeout: say what the server said
        raise AssertionError(server.why(f"the training did not end on the page: {exc}")) from exc
    text: str = ended.inner_text()
    return text


def test_the_whole_journey_in_a_browser(chromium: Any, tmp_path: Path,
                                        serve: Callable[..., ServeProcess]) -> None:
    env = clean_env(tmp_path / "home", SELFIE_LORA_TRAINER="local",
                    SELFIE_LORA_BASE_MODEL="tiny", SELFIE_LORA_LOCAL_ISOLATION="process",
                    SELFIE_LORA_PROBE_COUNT="2")
    key = create(env, "ann")
    # bob made in this process, not by a second ``users create`` process (~2 s of CPU).
    make_users(env, "bob", password=PASSWORD)
    server = serve(env)
    base = server.base_url
    context = chromium.new_context(accept_downloads=True, viewport={"width": 1200, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("dialog", lambda dialog: dialog.accept())

    # ---- sign in, upload: each photo's verdict next to its thumbnail
    sign_in(page, base, "ann")
    go(page, "Photos")
    page.set_input_files("#files", [str(FIXTURES / name) for name in PHOTOS])
    assert page.locator("#previews img").count() == 4
    page.get_by_role("button", name="Check and upload").click()
    report = page.locator("#report .report")
    report.wait_for(timeout=60_000)
    assert report.get_attribute("data-trainable") == "true", server.why(report.inner_text())
    assert page.locator("#progress").get_attribute("value") == "100"
    left_out = page.locator('.photo.left-out[data-photo-name="biden.jpg"]')
    assert left_out.count() == 1
    assert left_out.locator(".advice").first.inner_text().strip()  # what to do about it
    kept = page.locator('.photo.kept[data-photo-name="obama.jpg"]')
    assert kept.locator("img").get_attribute("src", timeout=5000).startswith("blob:")
    assert kept.locator(".face-box").count() == 1  # the face the checks found, drawn
    box = kept.locator(".face-box").bounding_box()
    thumb = kept.locator(".thumb").bounding_box()
    assert box is not None
    assert thumb is not None
    assert 0 < box["width"] < thumb["width"]
    shot(page, "upload.png")

    # ---- train and watch it to the end (live, no reload)
    go(page, "Train")
    page.get_by_role("button", name="Train", exact=True).click()
    page.wait_for_load_state()
    assert page.locator("#status-figures[hx-get]").count() == 1  # running: the page polls
    # The server restarts while the page watches (the training is handed back and taken up
    # again): the page carries on by itself, without a reload.
    server.stop()
    server = serve(env, name="serve-again", port=server.port)
    first = wait_ended(page, server)
    # The polls refused while the server was down are logged by the browser: expected here.
    errors.clear()
    assert "succeeded" in first, first
    assert "Version 1 is active" in first

    # ---- the scale, saved with the slider; then a retraining that keeps it
    go(page, "Generate")
    page.locator("#lora_scale").fill("0.8")
    assert page.locator("#scale-slider").input_value() == "0.8"  # the slider follows
    page.get_by_role("button", name="Save the scale").click()
    go(page, "Train")
    kept_panel = page.locator(".kept").inner_text()
    assert "0.8 (yours)" in kept_panel
    page.get_by_role("button", name="Retrain").click()
    second = wait_ended(page, server)
    assert "succeeded" in second, second

    # ---- versions, the grid, rollback
    go(page, "Versions")
    assert page.locator("table.versions tbody tr").count() == 2
    grid = page.locator("#grid")
    grid.wait_for()
    assert page.evaluate("() => document.getElementById('grid').naturalWidth") > 0
    assert page.evaluate("() => document.getElementById('chart').naturalWidth") > 0
    shot(page, "versions.png")
    page.locator("#v1").get_by_role("button", name="Use this version").click()
    page.wait_for_load_state()
    assert "active" in (page.locator("#v1").get_attribute("class") or "")

    # ---- download v1's LoRA: the same bytes the API describes
    with page.expect_download() as download_info:
        page.locator("#v1").get_by_role("link", name="Download LoRA").click()
    data = Path(download_info.value.path()).read_bytes()
    with httpx.Client(base_url=base, timeout=30) as api:
        versions = api.get("/api/model/versions",
                           headers={"Authorization": f"Bearer {key}"}).json()["versions"]
    v1 = next(v for v in versions if v["number"] == 1)
    assert hashlib.sha256(data).hexdigest() == v1["weights_sha256"]

    # ---- generate
    go(page, "Generate")
    page.get_by_role("button", name="Studio portrait").click()
    page.get_by_label("Seed (empty: random)").fill("7")
    page.get_by_role("button", name="Generate").click()
    page.locator(".gallery img").first.wait_for(timeout=60_000)
    assert "seed 7" in page.locator(".gallery").inner_text()
    assert not errors, errors  # no script error, no CSP violation
    image = page.locator(".gallery img").first.get_attribute("src") or ""
    page.goto(f"{base}/photos")
    photo = page.locator(".thumbs img").first.get_attribute("src") or ""
    urls = {"weights": f"{base}/versions/{v1['id']}/weights", "image": base + image,
            "photo": base + photo}
    context.close()

    # ---- another user: 404 for every one of ann's things
    other = chromium.new_context()
    bob = other.new_page()
    sign_in(bob, base, "bob")
    for what, url in urls.items():
        response = bob.request.get(url)
        assert response.status == 404, (what, url, response.status)
    assert "No versions yet" in bob.goto(f"{base}/versions").text()
    other.close()

