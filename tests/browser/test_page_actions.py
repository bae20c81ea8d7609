"""What a click on the pages does in Chromium: the picture the Generate button makes with the
scale the slider shows. (An upload clicked twice: test_photos_page, on its file's shared
server.)"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from selfie_lora.domain.plan import lora_scale_text
from tests.browser.support import PASSWORD, sign_in, upload_photos
from tests.e2e.conftest import ServeProcess, clean_env, make_users, wait_training

pytestmark = pytest.mark.slow

def test_generate_uses_the_scale_the_slider_shows_without_saving_it(
        chromium: Any, tmp_path: Path, serve: Callable[..., ServeProcess]) -> None:
    """The slider was in a form of its own: dragged to 2.5, Generate still made the picture at
    the saved 1.0, and the slider snapped back (found in review). Generate sends the slider's
    scale now, for that request only: the saved scale is unchanged until "Save the scale"."""
    # One probe for the likeness score of the version (four by default): the picture is what is
    # tested here, and each probe is a generation and a face analysis after the training. For
    # the same reason the training runs in the server's worker (inline), not in a child process
    # of its own: its start, a second import of torch and diffusers, took 5-16 s on a loaded
    # machine. Process isolation is tested by test_serve, test_journey and test_cli_worker.
    env = clean_env(tmp_path / "home", SELFIE_LORA_TRAINER="local", SELFIE_LORA_BASE_MODEL="tiny",
                    SELFIE_LORA_PROBE_COUNT="1", SELFIE_LORA_LOCAL_ISOLATION="inline")
    # ann made in this process (make_users), not by a ``users create --password`` process
    # (~2.5 s of CPU, its imports mostly): she is only this test's set-up. The command, its
    # password read from standard input, is run by test_journey (support.create) and
    # test_cli_users.
    headers = make_users(env, "ann", password=PASSWORD)["ann"]
    key = headers["Authorization"].removeprefix("Bearer ")
    server = serve(env)
    upload_photos(server.base_url, key, start=True)
    with httpx.Client(base_url=server.base_url, timeout=30) as api:
        training_id = api.get("/api/training/progress", headers=headers).json()["training"]["id"]
        body, _seen = wait_training(api, headers, training_id, server, deadline_s=300)
        assert body["training"]["status"] == "succeeded", server.why(str(body))
        saved = api.get("/api/model", headers=headers).json()["lora_scale"]
    assert saved != 2.5
    page = chromium.new_context().new_page()
    sign_in(page, server.base_url, "ann", "/generate")
    page.locator("#lora_scale").fill("2.5")
    assert page.locator("#scale-slider").input_value() == "2.5"  # the slider follows
    page.get_by_label("What should the picture show?").fill("slider test")
    page.get_by_role("button", name="Generate").click()
    page.locator(".gallery li").first.wait_for(timeout=120_000)
    assert "scale 2.5" in page.locator(".gallery li").first.inner_text(), server.why("")
    assert page.locator("#lora_scale").input_value() == "2.5"  # kept for the next picture
    # The page says which scale Generate uses, and which one is saved.
    # As every page writes a scale ("1", not the JSON's 1.0).
    note = page.locator("#scale-note").inner_text()
    assert f"Your saved scale is {lora_scale_text(saved)}" in note
    with httpx.Client(base_url=server.base_url, timeout=30) as api:
        assert api.get("/api/model", headers=headers).json()["lora_scale"] == saved
        page.get_by_role("button", name="Save the scale").click()
        page.wait_for_load_state()
        assert api.get("/api/model", headers=headers).json()["lora_scale"] == 2.5
    assert "Your saved scale is 2.5" in page.locator("#scale-note").inner_text()
