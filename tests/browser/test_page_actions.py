"""What a click on the pages does in Chromium: an upload clicked twice, and the picture the
Generate button makes with the scale the slider shows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.browser.support import create, sign_in
from tests.e2e.conftest import ServeProcess, clean_env
from tests.support.photos import FIXTURES

pytestmark = pytest.mark.slow

PHOTOS = ("obama.jpg", "obama2.jpg", "obama3.jpg")


def test_a_double_clicked_upload_is_sent_once(chromium: Any, tmp_path: Path,
                                              serve: Callable[..., ServeProcess]) -> None:
    """"Check and upload" stayed clickable while its upload ran: a double click sent two, and
    the server checked and stored the set twice (found in review). The button is disabled
    until the answer, and a second submit meanwhile sends nothing."""
    env = clean_env(tmp_path / "home", SELFIE_LORA_TRAINER="local", SELFIE_LORA_BASE_MODEL="tiny")
    create(env, "ann")
    server = serve(env, args=("--no-worker",))
    page = chromium.new_context().new_page()
    sign_in(page, server.base_url, "ann", "/photos")
    uploads: list[str] = []
    page.on("request", lambda request: uploads.append(request.url)
            if request.method == "POST" and request.url.endswith("/photos/upload") else None)
    page.set_input_files("#files", [str(FIXTURES / name) for name in PHOTOS])
    page.locator("#send").dblclick()
    page.wait_for_function("() => document.getElementById('upload-status').textContent "
                           "=== 'Done.'", timeout=90_000)
    page.wait_for_timeout(1000)  # a second upload, had one been sent, has been seen by now
    assert len(uploads) == 1, server.why(f"{len(uploads)} uploads sent")
    assert page.locator("#send").is_enabled()  # back for the next upload
