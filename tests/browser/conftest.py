"""Browser tests: Playwright driving Debian's Chromium (Playwright cannot download its own
browsers here) against a real ``selfie-lora serve``. They skip, with the reason, where either is
missing; ``.ci/run`` installs the ``chromium`` package."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import serve  # noqa: F401 - the fixture, for these tests too

CHROMIUM = os.environ.get("SELFIE_LORA_TEST_CHROMIUM", "/usr/bin/chromium")
# Chromium's own background connections are refused on a machine without a network: off.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


# One browser per test file, not per run: Playwright's sync API keeps an asyncio event loop
# running in the main thread while it is open, and every later test on that pytest-xdist worker
# would run inside it (``asyncio.run`` then fails, as the HTTP alerter's does). Closed at the end
# of the file, the loop is gone before the next file runs.
@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.skip(f"browser tests need Chromium at {CHROMIUM} (Debian: apt-get install "
                    "chromium; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="browser tests need playwright (pip install playwright)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()
